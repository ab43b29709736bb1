"""H2OVL-Mississippi 0.8B (InternViT-300M + Danube3-500M, Llama) and 2B (InternViT-300M + Danube2-1.8B, Mistral).

Its Hub remote code only runs on transformers ≤ 4.48, so checkpoints in the original layout are loaded natively
into transformers' `InternVLForConditionalGeneration` (`checkpoint`), images are tiled the original way
(`image`, `processor`), and full fine-tunes are saved both natively and back in the original layout
(`original/` inside the output folder), which the original `model.chat` code and vLLM's `H2OVLChatModel` read.

Chat format `h2ogpt2`: `<|prompt|>{user}<|end|><|answer|>{assistant}<|end|>`; each image is an `<image>` line
in the user turn (`Image-1: <image>`, `Image-2: <image>`, … when there are several: `processor.image_lines`),
expanded by the processor. The template is written here rather than taken from the tokenizer: the original code
keeps it in `conversation.py`, not in tokenizer_config.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from finetune.models.base import IGNORE_INDEX, Encoded, ModelFamily, drop_remote_code
from finetune.models.hub import resolve_checkpoint
from finetune.models.mississippi import checkpoint as h2ovl_checkpoint
from finetune.models.mississippi import config as h2ovl_config
from finetune.models.mississippi.processor import H2OVLProcessor, image_lines
from finetune.models.mississippi.tiny import build_tiny_h2ovl

PROMPT, ANSWER, END = "<|prompt|>", "<|answer|>", "<|end|>"
_TEST_SIZES = {"image_size": 56, "patch_size": 7, "vision_hidden": 64, "text_hidden": 128}  # see tiny_presets
log = logging.getLogger(__name__)


def _original_layout_source(source_path: str, revision: str | None = None) -> Path | None:
    """The folder in H2OVL's original layout behind a checkpoint: itself (a Hub id or original folder), or the
    `original/` beside a native save of ours; None when there is none."""
    folder = resolve_checkpoint(source_path, revision, allow_patterns=h2ovl_checkpoint.SIDE_FILE_PATTERNS)
    for candidate in (folder, folder / "original"):
        config = candidate / "config.json"
        if config.exists() and json.loads(config.read_text()).get("model_type") == h2ovl_config.MODEL_TYPE:
            return candidate
    return None


class MississippiFamily(ModelFamily):
    name = "mississippi"
    # The original H2OVL layout says h2ovl_chat; native saves of ours say internvl.
    model_types = ("h2ovl_chat", "internvl")
    group_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("model.vision_tower.",),
        "projector": ("model.multi_modal_projector.",),
        "llm": ("model.language_model.", "lm_head."),
    }
    default_lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2"),  # InternViT attention + MLP
        "projector": ("linear_1", "linear_2"),
        "llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    }
    modules_to_save: ClassVar[dict[str, tuple[str, ...]]] = {
        "projector": ("multi_modal_projector",),
        "vision": ("vision_tower",),
        "llm": ("language_model", "lm_head"),
    }
    # Mississippi-0.8B: Llama LLM, no MSAC; Mississippi-2B: Mistral LLM, MSAC (both shapes, tiny).
    # Tokens per tile = (tile / patch)² / 4 after the pixel shuffle: 16 for the test shapes, 64 for the quickstart
    # (with 16 the quickstart model had not started to read after 400 steps; with 64 it reads all 48 held-out forms
    # after the quickstart's 800 steps — at 400 it was 40-100% from run to run, so the budget keeps a margin).
    tiny_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "test": {"llm": "llama", "use_msac": False, **_TEST_SIZES},
        "test-2b": {"llm": "mistral", "use_msac": True, **_TEST_SIZES},
        "quickstart": {
            "llm": "llama",
            "use_msac": False,
            "image_size": 64,
            "patch_size": 4,
            "vision_hidden": 128,
            "vision_layers": 3,
            "text_hidden": 192,
            "text_layers": 3,
        },
    }

    # --- training schedules --------------------------------------------------------------------------------
    def paper_schedule(self, path: str, revision: str | None = None) -> list[dict[str, Any]]:
        # H2OVL-Mississippi (arXiv 2410.13611, section on training). The paper's per-stage learning rates are in
        # a table published as an image; where a number is needed we use InternVL's (the code base H2OVL builds
        # on): MLP warm-up at 2e-4 (InternVL2.5 stage 1), MLP + LLM at 4e-5 with warmup 0.03 and cosine
        # (InternVL's fine-tune). Budgets are shares of the recipe's train budget, all on the user's data.
        if self._llm_type(path, revision) == "mistral":
            # 2B: pre-training trains the vision tower and the MLP with the LLM frozen (4 epochs in the paper);
            # fine-tuning then trains MLP + LLM (InternVL's fine-tune; the paper's ViT setting is unconfirmed).
            return [
                {
                    "name": "vision+projector",
                    "groups": {"vision": "full", "projector": "full", "llm": "frozen"},
                    "lr": {"vision": 4e-5, "projector": 2e-4},
                    "fraction": 0.3,
                    "warmup_ratio": 0.03,
                },
                {
                    "name": "task",
                    "groups": {"vision": "frozen", "projector": "full", "llm": "full"},
                    "lr": 4e-5,
                    "fraction": 0.7,
                    "warmup_ratio": 0.03,
                },
            ]
        # 0.8B: pre-training step 1 trains the MLP alone on ~3% of the data, step 2 the MLP and the LLM jointly,
        # then the OCR / structured-extraction fine-tune (ViT frozen as in InternVL's fine-tune; unconfirmed in
        # the paper). Steps 2 and 3 train the same groups, each with a fresh optimizer and warmup + cosine;
        # step 2 is where general data can be mixed in to limit forgetting (copy the stages from a run's recipe.yaml
        # into the recipe and give stage 2 a `data.mix`).
        return [
            {
                "name": "projector",
                "groups": {"vision": "frozen", "projector": "full", "llm": "frozen"},
                "lr": 2e-4,
                "fraction": 0.1,
                "warmup_ratio": 0.03,
            },
            {
                "name": "projector+llm",
                "groups": {"vision": "frozen", "projector": "full", "llm": "full"},
                "lr": 4e-5,
                "fraction": 0.3,
                "warmup_ratio": 0.03,
            },
            {
                "name": "task",
                "groups": {"vision": "frozen", "projector": "full", "llm": "full"},
                "lr": 4e-5,
                "fraction": 0.6,
                "warmup_ratio": 0.03,
            },
        ]

    @staticmethod
    def _llm_type(path: str, revision: str | None) -> str:
        """`llama` (0.8B) or `mistral` (2B), from the checkpoint's config in either layout."""
        original = _original_layout_source(path, revision)
        if original is not None:
            llm = h2ovl_config.read_original_config(original).get("llm_config", {})
            return llm.get("model_type") or llm.get("architectures", ["llama"])[0].removesuffix("ForCausalLM").lower()
        folder = resolve_checkpoint(path, revision, allow_patterns=["*.json"])
        return json.loads((folder / "config.json").read_text())["text_config"]["model_type"]

    # --- loading ---------------------------------------------------------------------------------------
    def load_processor(self, path: str, revision: str | None = None, **options) -> H2OVLProcessor:
        return H2OVLProcessor.from_pretrained(path, revision=revision, **options)

    def load_model(self, path, *, revision=None, dtype=torch.float32, attn_implementation="sdpa", quantization=None):
        return h2ovl_checkpoint.load_h2ovl(
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
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir, state_dict=state_dict)
        processor.save_pretrained(out_dir)
        original_source = _original_layout_source(source_path) if source_path else None
        if original_source is None:
            log.warning(
                "%s: no original-layout H2OVL checkpoint to take config and tokenizer from; "
                "only the native layout was saved",
                source_path,
            )
            if not remote_code:
                drop_remote_code(out_dir)
            return
        config = h2ovl_config.read_original_config(original_source)
        # The tiling the model was trained with, so model.chat and vLLM tile pages the same way.
        s = processor.settings
        max_tiles = min(s.max_tiles, s.max_tiles_per_image or s.max_tiles)
        config.update(
            min_dynamic_patch=min(s.min_tiles, max_tiles),
            max_dynamic_patch=max_tiles,
            use_msac=s.use_msac,
            force_image_size=s.tile_size,
        )
        h2ovl_checkpoint.save_original(model, out_dir / "original", config, state_dict=state_dict)
        h2ovl_checkpoint.copy_tokenizer_files(original_source, out_dir / "original", remote_code=remote_code)
        if not remote_code:  # config.json's auto_map (and any tokenizer or processor config's) points at the .py
            drop_remote_code(out_dir)

    # --- publishing ----------------------------------------------------------------------------------------
    def serving_commands(
        self, repo_id: str, *, base: str | None, adapter: bool, remote_code: bool = False
    ) -> list[str]:
        if adapter:
            return super().serving_commands(repo_id, base=base, adapter=adapter, remote_code=remote_code)
        # vLLM's H2OVL loader reads the original layout, which save_pretrained keeps in original/; vLLM has its
        # own H2OVLChatConfig, so the remote code is only needed where the folder was saved with it.
        return [
            f"huggingface-cli download {repo_id} --local-dir reader",
            f"vllm serve reader/original{' --trust-remote-code' if remote_code else ''}",
        ]

    # --- text and images -----------------------------------------------------------------------------------
    def render_prompt(self, processor, instruction: str, num_images: int) -> str:
        lines = image_lines(num_images, labelled=processor.settings.page_labels)
        return f"{PROMPT}{lines}{instruction}{END}{ANSWER}"

    def prompt_format(self, processor) -> dict:
        return {"page_labels": processor.settings.page_labels}

    def legacy_prompt_format(self) -> dict:
        return {"page_labels": False}  # pages were written bare until labels were

    def end_of_turn_token(self, processor) -> str:
        return END

    def encode_prompt(self, processor, images: list[Image.Image], prompt_text: str) -> Encoded:
        out = processor(images=[images], text=[prompt_text], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        return Encoded(
            input_ids=ids,
            labels=[IGNORE_INDEX] * len(ids),
            image_inputs={"pixel_values": out["pixel_values"], "num_images": len(images)},
        )

    def count_prompt_tokens(self, processor, prompt_text: str, image_sizes: list[tuple[int, int]]) -> int:
        expanded = processor.expand(prompt_text, processor.tiles_for(image_sizes))
        return len(processor.tokenizer(expanded)["input_ids"])

    def decode_size(self, processor, size: tuple[int, int], num_images: int = 1) -> tuple[int, int]:
        return processor.decode_size(size, num_images)

    def collate_images(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # InternVL takes every tile of the batch as one flat tensor, in the order the image tokens appear.
        pixels = [s["pixel_values"] for s in samples if s["num_images"]]
        return {"pixel_values": torch.cat(pixels)} if pixels else {}

    # --- tiny checkpoints ----------------------------------------------------------------------------------
    def build_tiny_checkpoint(self, out_dir: Path, *, seed: int = 0, **sizes) -> Path:
        return build_tiny_h2ovl(Path(out_dir), seed=seed, **sizes)
