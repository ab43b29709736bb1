"""Ovis (AIDC-AI): Ovis1.6-Gemma2 (SigLIP + Gemma2) and Ovis2 (AIMv2 + Qwen2), loaded natively.

Their Hub remote code was written for transformers ≈ 4.46 and does not run on 5, and transformers' own Ovis2 port
does not compute what the original computes (it applies AIMv2's final norm; its image processor neither keeps a
crop's aspect nor pads, and orders the grid differently). So the network is rebuilt from transformers parts
(`modeling`), pages are cut the original way (`image`, `processor`), and checkpoints are read from and saved back
into the layout they came in (`checkpoint`): the original AIDC-AI layout, which the Hub remote code and vLLM's Ovis
loader read, or transformers' `-hf` layout of Ovis2. On the tiny checkpoints, ids, pixels, logits and greedy tokens
equal the original code's (run with transformers 4.46.3 at the AIDC-AI/Ovis commits bd0bfe2 and d248e34).

Groups: `vision` = the backbone, `projector` = the visual head and the visual embedding table, `llm` = the LLM, and
`vision_last_block` carved out of `vision` (the backbone's last block), which the paper's first stage trains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from finetune.models.base import IGNORE_INDEX, Encoded, ModelFamily
from finetune.models.hub import resolve_checkpoint
from finetune.models.ovis import image as ovis_image
from finetune.models.ovis.checkpoint import SIDE_FILE_PATTERNS, load_ovis, save_checkpoint
from finetune.models.ovis.config import read_checkpoint_config
from finetune.models.ovis.processor import OvisProcessor
from finetune.models.ovis.tiny import build_tiny_ovis

log = logging.getLogger(__name__)
_BACKBONE = "visual_tokenizer.backbone."


class OvisFamily(ModelFamily):
    name = "ovis"
    model_types = ("ovis", "ovis2")  # the AIDC-AI layout; transformers' -hf layout of Ovis2
    group_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": (_BACKBONE,),
        "projector": ("visual_tokenizer.head.", "vte."),
        "llm": ("llm.",),
    }
    subgroups: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {
        "vision_last_block": ("vision", (_BACKBONE + "encoder.layers.-1",)),
    }
    default_lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        # The attention projections SigLIP's and AIMv2's encoder layers share (SigLIP's unused pooling head has
        # none of them). vte is never a LoRA target: the model mixes its rows by probability, not by lookup.
        "vision": ("q_proj", "k_proj", "v_proj"),
        "projector": ("0",),  # visual_tokenizer.head.0, the Linear before the head's LayerNorm
        "llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    }
    modules_to_save: ClassVar[dict[str, tuple[str, ...]]] = {
        "projector": ("visual_tokenizer.head", "vte"),
        "vision": ("visual_tokenizer.backbone",),
        "llm": ("llm",),
    }
    # The original takes the last layer's output before the backbone's final norm, and never pools (see modeling).
    never_used_parameters: ClassVar[tuple[str, ...]] = (
        _BACKBONE + "post_layernorm.",  # SigLIP
        _BACKBONE + "head.",  # SigLIP's attention-pooling head
        _BACKBONE + "rms_norm.",  # AIMv2's post_trunk_norm
    )
    # Saved in the source's layout: the AIDC-AI one has no transformers class, and transformers' Ovis2 class reads the
    # -hf one but applies AIMv2's final norm, which the original does not.
    saves_transformers_layout = False
    # Both variants at test size: 16 visual tokens per crop (SigLIP's 7 × 7 patch grid padded to 8 × 8, as
    # SigLIP-384's 27 × 27 is padded to 28 × 28).
    tiny_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "test-ovis2": {"variant": "ovis2", "image_size": 56, "patch_size": 7},
        "test-ovis1.6": {"variant": "ovis1.6", "image_size": 42, "patch_size": 6},
    }

    # --- training schedules --------------------------------------------------------------------------------
    def paper_schedule(self, path: str, revision: str | None = None) -> list[dict[str, Any]]:
        # Ovis (arXiv 2405.20797) and the repo's Ovis1.5-Gemma2-9B scripts (scripts/v1_5/*S{1,2,3}.sh): stage 1
        # trains the visual head, the last ViT block and the visual embedding table (LLM and the rest of the ViT
        # frozen); stage 2 the whole visual tokenizer and the table; stage 3 everything. One epoch each with a cosine
        # schedule, warmup 0.1, 0.1, 0.05. Rates: the v1.5 scripts' 3e-4, 5e-5, 1e-5 (the paper's v1 used 1e-4,
        # 1e-4, 2e-5; Ovis1.6 / Ovis2 publish none). On the user's data the epochs become equal thirds of the budget.
        stages = [
            {
                "name": "visual-head",
                "groups": {"vision": "frozen", "vision_last_block": "full", "projector": "full", "llm": "frozen"},
                "lr": 3e-4,
                "fraction": 1 / 3,
                "warmup_ratio": 0.1,
            },
            {
                "name": "visual-tokenizer",
                "groups": {"vision": "full", "vision_last_block": "full", "projector": "full", "llm": "frozen"},
                "lr": 5e-5,
                "fraction": 1 / 3,
                "warmup_ratio": 0.1,
            },
            {
                "name": "all",
                "groups": {"vision": "full", "vision_last_block": "full", "projector": "full", "llm": "full"},
                "lr": 1e-5,
                "fraction": 1 / 3,
                "warmup_ratio": 0.05,
            },
        ]
        config = read_checkpoint_config(resolve_checkpoint(path, revision, allow_patterns=["config.json"]))
        if config.text_type == "gemma2":
            # Ovis1.6 (the Gemma 2 generation) follows instruction tuning with DPO (its README; no code, data or rates
            # published; Ovis2 names no such stage). Here: one epoch over pairs of the model's own wrong answers to
            # the training data (`pairs: self`), the LLM only, at the rate and beta of common full-model DPO recipes
            # (5e-7, 0.1), warmup 0.1.
            stages.append(
                {
                    "name": "dpo",
                    "kind": "dpo",
                    "groups": {"vision": "frozen", "vision_last_block": "frozen", "projector": "frozen", "llm": "full"},
                    "lr": 5e-7,
                    "epochs": 1,
                    "warmup_ratio": 0.1,
                    "dpo": {"beta": 0.1, "loss": "sigmoid", "pairs": "self"},
                }
            )
        return stages

    # --- loading ---------------------------------------------------------------------------------------
    def load_processor(self, path: str, revision: str | None = None, **options) -> OvisProcessor:
        # options: `max_partition` (the crop cap); see OvisProcessor.from_pretrained
        return OvisProcessor.from_pretrained(path, revision=revision, **options)

    def load_model(self, path, *, revision=None, dtype=torch.float32, attn_implementation="sdpa", quantization=None):
        return load_ovis(
            path, revision=revision, dtype=dtype, attn_implementation=attn_implementation, quantization=quantization
        )

    def save_pretrained(
        self,
        model,
        processor,
        out_dir: Path,
        source_path: str | None = None,
        state_dict: dict | None = None,
        remote_code: bool = False,
    ) -> None:
        if source_path is None:
            raise ValueError("Ovis saves in the layout of its source checkpoint: source_path is required")
        source = resolve_checkpoint(source_path, allow_patterns=SIDE_FILE_PATTERNS)
        save_checkpoint(model, out_dir, source, state_dict=state_dict, remote_code=remote_code)
        processor.save_settings(out_dir)  # the crop cap and image settings the model was trained with
        # The chat format it was trained with, for servers that read the template (vLLM's chat endpoint): a Qwen
        # tokenizer's own template has another default system prompt. The tokenizer files stay the source's.
        (Path(out_dir) / "chat_template.jinja").write_text(processor.tokenizer.chat_template)

    # --- publishing: the base class's vLLM lines; vLLM reads the AIDC-AI layout with its own OvisConfig, so they say
    # --trust-remote-code only for a folder saved with its remote code (model.trust_remote_code).

    # --- text and images -----------------------------------------------------------------------------------
    def render_prompt(self, processor, instruction: str, num_images: int) -> str:
        return processor.render_prompt(instruction, num_images)

    def prompt_format(self, processor) -> dict:
        return {"page_labels": processor.settings.page_labels}

    def legacy_prompt_format(self) -> dict:
        return {"page_labels": False}  # pages were written bare until labels were

    def end_of_turn_token(self, processor) -> str:
        return processor.end_of_turn

    def encode_prompt(self, processor, images: list[Image.Image], prompt_text: str) -> Encoded:
        out = processor(images=[images], text=[prompt_text])
        ids = out["input_ids"][0].tolist()
        inputs = {"num_images": len(images)}
        if images:
            inputs["pixel_values"] = out["pixel_values"]
        return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), image_inputs=inputs)

    def count_prompt_tokens(self, processor, prompt_text: str, image_sizes: list[tuple[int, int]]) -> int:
        return len(processor.encode(prompt_text, processor.grids_for(image_sizes)))

    def decode_size(self, processor, size: tuple[int, int], num_images: int = 1) -> tuple[int, int]:
        return ovis_image.decode_size(*size, processor.settings.side, processor.settings.max_partition)

    def collate_images(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Every crop of the batch in one tensor, in the order the image tokens appear.
        pixels = [s["pixel_values"] for s in samples if s["num_images"]]
        return {"pixel_values": torch.cat(pixels)} if pixels else {}

    # --- tiny checkpoints ----------------------------------------------------------------------------------
    def build_tiny_checkpoint(self, out_dir: Path, *, seed: int = 0, **sizes) -> Path:
        return build_tiny_ovis(Path(out_dir), seed=seed, **sizes)
