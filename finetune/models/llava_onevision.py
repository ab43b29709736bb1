"""LLaVA-OneVision (SigLIP → 2-layer MLP → Qwen2), native in transformers.

Quirks kept here:
- The stock `LlavaOnevisionProcessor` insists on a video processor, which needs torchvision (not installable
  beside the CPU torch wheel, and useless for documents). :class:`ImageOnlyProcessor` drops it and keeps every
  other argument, so save → load round-trips; saved folders still name `LlavaOnevisionProcessor` so the stock
  class loads them wherever torchvision exists.
- `image_newline` is a bare parameter of the model, so it belongs to the `projector` group. PEFT can only save
  whole modules next to an adapter, so in a run that mixes LoRA with a `full` projector, image_newline stays
  frozen (logged at setup).
- SigLIP's `post_layernorm` is never used (LLaVA takes the last hidden state before it): always frozen.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.processing_utils import ProcessorMixin

from finetune.errors import UserError
from finetune.models.base import IGNORE_INDEX, Encoded, ModelFamily, drop_remote_code, largest_reduction
from finetune.models.hub import resolve_checkpoint

# ChatML as used by llava-hf's OneVision checkpoints: images first in the user turn, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Files of a Hub checkpoint the processor reads (configs, Qwen2 tokenizer's vocab.json + merges.txt, template).
_PROCESSOR_PATTERNS = ["*.json", "*.txt", "*.jinja"]
# Files of a Hub checkpoint that describe the processor but that we cannot rebuild here (video processor).
_PASS_THROUGH_FILES = ("video_preprocessor_config.json",)


class ImageOnlyProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without the video processor (so no torchvision)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.video_token = getattr(tokenizer, "video_token", None) or video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self):
        data = super().to_dict()
        data["processor_class"] = "LlavaOnevisionProcessor"
        return data

    def save_pretrained(self, save_directory, **kwargs):
        out = super().save_pretrained(save_directory, **kwargs)
        _edit_json(Path(save_directory) / "tokenizer_config.json", processor_class="LlavaOnevisionProcessor")
        return out


def _edit_json(path: Path, **updates) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _to_hub_layout(out_dir: Path) -> None:
    """Rewrite a transformers-5 processor save into the file layout of llava-hf's Hub repos:
    preprocessor_config.json, a flat processor_config.json, chat_template.json, Qwen2Tokenizer."""
    processor_config = json.loads((out_dir / "processor_config.json").read_text())
    image_config = processor_config.pop("image_processor")
    image_config["processor_class"] = "LlavaOnevisionProcessor"
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
    (out_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
    template = (out_dir / "chat_template.jinja").read_text()
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    (out_dir / "chat_template.jinja").unlink()
    _edit_json(out_dir / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer")


class LlavaOnevisionFamily(ModelFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    group_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("model.vision_tower.",),
        "projector": ("model.multi_modal_projector.", "model.image_newline"),
        "llm": ("model.language_model.", "lm_head."),
    }
    default_lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        "vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),  # SigLIP attention + MLP
        "projector": ("linear_1", "linear_2"),
        "llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    }
    never_used_parameters = ("model.vision_tower.post_layernorm.",)
    # Modules PEFT saves beside the adapter when their group is `full` in a LoRA run.
    modules_to_save: ClassVar[dict[str, tuple[str, ...]]] = {
        "projector": ("multi_modal_projector",),
        "vision": ("vision_tower",),
        "llm": ("language_model", "lm_head"),
    }

    # --- loading ---------------------------------------------------------------------------------------
    def check_engine(self, zero_stage: int | None) -> None:
        if zero_stage == 3:
            # `image_newline` is a bare parameter read in pack_image_features, outside any submodule's forward, so
            # ZeRO-3's hooks never gather it (generation then fails on an empty tensor).
            raise UserError(
                "llava_onevision cannot run under DeepSpeed ZeRO-3 (its image_newline parameter is "
                "never gathered); use recipes/accelerate/zero2.yaml or fsdp.yaml"
            )

    def paper_schedule(self, path: str, revision: str | None = None) -> list[dict[str, Any]]:
        # LLaVA-OneVision (arXiv 2408.03326, training-strategy table): stage 1 (language-image alignment) trains
        # the projector alone at 1e-3; stages 1.5 and 2 train everything with the vision tower at 2e-6 and the
        # projector and LLM at 1e-5; each stage one epoch, cosine, warmup 0.03, no weight decay. Adapted to
        # fine-tuning: both stages run on the user's data, and the alignment stage is short (10% of the budget)
        # because a released checkpoint's projector is already aligned — it only re-fits to the new documents.
        return [
            {
                "name": "align",
                "groups": {"vision": "frozen", "projector": "full", "llm": "frozen"},
                "lr": 1e-3,
                "fraction": 0.1,
                "warmup_ratio": 0.03,
            },
            {
                "name": "full",
                "groups": {"vision": "full", "projector": "full", "llm": "full"},
                "lr": {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5},
                "fraction": 0.9,
                "warmup_ratio": 0.03,
            },
        ]

    def load_processor(self, path: str, revision: str | None = None, **options) -> ImageOnlyProcessor:
        if options:
            raise UserError(f"model.processor: llava_onevision takes no processor options, got {sorted(options)}")
        folder = resolve_checkpoint(path, revision, allow_patterns=_PROCESSOR_PATTERNS)
        image_processor = AutoImageProcessor.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        processor_kwargs = ImageOnlyProcessor.get_processor_dict(folder)[0]
        known = (
            "num_image_tokens",
            "vision_feature_select_strategy",
            "image_token",
            "video_token",
            "vision_aspect_ratio",
        )
        kwargs = {k: processor_kwargs[k] for k in known if k in processor_kwargs}
        chat_template = processor_kwargs.get("chat_template") or tokenizer.chat_template
        if chat_template is None:
            raise UserError(f"{path}: no chat template in the processor or tokenizer files")
        return ImageOnlyProcessor(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def load_model(self, path, *, revision=None, dtype=torch.float32, attn_implementation="sdpa", quantization=None):
        folder = resolve_checkpoint(path, revision, allow_patterns=[*_PROCESSOR_PATTERNS, "*.safetensors"])
        config = AutoConfig.from_pretrained(folder)
        if config.model_type != "llava_onevision":
            raise UserError(f"{path}: model_type is '{config.model_type}', expected 'llava_onevision'")
        cls = LlavaOnevisionForConditionalGeneration
        quantized = quantization.loading_kwargs(cls, config) if quantization else {}
        model, info = cls.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True, **quantized
        )
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            raise ValueError(f"{path}: checkpoint does not match the model: {problems}")
        # The path as given (a Hub id, not its cache folder): what PEFT records as an adapter's base.
        model.config._name_or_path = model.name_or_path = str(path)
        return model

    def save_pretrained(
        self,
        model,
        processor,
        out_dir: Path,
        source_path: str | None = None,
        state_dict: dict | None = None,
        remote_code: bool = False,
    ) -> None:
        model.save_pretrained(out_dir, state_dict=state_dict)
        processor.save_pretrained(out_dir)
        # transformers 5 nests the image processor in processor_config.json; servers and older readers (vLLM's
        # AutoImageProcessor, transformers 4) look for preprocessor_config.json as on the Hub: write both.
        image_config = {**processor.image_processor.to_dict(), "processor_class": "LlavaOnevisionProcessor"}
        (Path(out_dir) / "preprocessor_config.json").write_text(
            json.dumps(image_config, indent=2, sort_keys=True) + "\n"
        )
        if source_path and Path(source_path).is_dir():
            for name in _PASS_THROUGH_FILES:
                if (Path(source_path) / name).exists() and not (out_dir / name).exists():
                    shutil.copy(Path(source_path) / name, out_dir / name)
        if not remote_code:  # llava-hf's checkpoints have none; a derived one might name some in its configs
            drop_remote_code(Path(out_dir))

    # --- text and images -----------------------------------------------------------------------------------
    def render_prompt(self, processor, instruction: str, num_images: int) -> str:
        # Several pages stay unlabelled `<image><image>…`, as llava-hf's OneVision chat_template.json writes them.
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": instruction}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    def end_of_turn_token(self, processor) -> str:
        return "<|im_end|>"

    def encode_prompt(self, processor, images: list[Image.Image], prompt_text: str) -> Encoded:
        # Nested: all images belong to this one prompt (a flat list would be read as one image per sample).
        out = processor(images=[images], text=[prompt_text], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        image_inputs = {
            "pixel_values": out["pixel_values"],  # (num_images, num_crops, 3, H, W)
            "image_sizes": out["image_sizes"],  # (num_images, 2)
            "num_images": len(images),
        }
        return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), image_inputs=image_inputs)

    def count_prompt_tokens(self, processor, prompt_text: str, image_sizes: list[tuple[int, int]]) -> int:
        # Each `<image>` is one token in the text; the processor repeats it once per image feature.
        text_tokens = len(processor.tokenizer(prompt_text)["input_ids"]) - len(image_sizes)
        return text_tokens + self._image_tokens(processor, image_sizes)

    def _image_tokens(self, processor, image_sizes: list[tuple[int, int]]) -> int:
        if len(image_sizes) > 1:
            # Multi-image prompts use only the base crop of each image, plus its newline token.
            per_image = processor.num_image_tokens + 1
            if processor.vision_feature_select_strategy == "default":
                per_image -= 1
            return per_image * len(image_sizes)
        hw_sizes = [(height, width) for width, height in image_sizes]
        return sum(processor._get_num_multimodal_tokens(image_sizes=hw_sizes)["num_image_tokens"])

    def decode_size(self, processor, size: tuple[int, int], num_images: int = 1) -> tuple[int, int]:
        # The stock image processor picks its anyres grid from the image it is given, so a reduction is usable only
        # when the reduced page gets the same grid (`select_best_resolution`, which weighs the area too), the same
        # aspect-kept size inside it (the same padding) and the same token count, and both resamplings (onto the grid,
        # and the whole page onto the base crop) stay downscales.
        from transformers.image_processing_utils import select_best_resolution

        image_processor = processor.image_processor
        base = (image_processor.size["height"], image_processor.size["width"])
        pinpoints = image_processor.image_grid_pinpoints

        def layout(width: int, height: int):
            best = select_best_resolution((height, width), pinpoints)
            scale_w, scale_h = best[1] / width, best[0] / height
            if scale_w < scale_h:
                inner = (best[1], min(math.ceil(height * scale_w), best[0]))
            else:
                inner = (min(math.ceil(width * scale_h), best[1]), best[0])
            return best, inner, self._image_tokens(processor, [(width, height)])

        full = layout(*size)
        need_w, need_h = max(full[1][0], base[1]), max(full[1][1], base[0])
        return largest_reduction(
            size, lambda s: s[0] >= need_w and s[1] >= need_h and layout(*s) == full, max_factor=16
        )

    def collate_images(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = [s["pixel_values"] for s in samples if s["num_images"]]
        if not pixel_values:
            return {}
        max_crops = max(p.shape[1] for p in pixel_values)
        padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, max_crops - p.shape[1])) for p in pixel_values]
        return {
            "pixel_values": torch.cat(padded),
            "image_sizes": torch.cat([s["image_sizes"] for s in samples if s["num_images"]]),
            "batch_num_images": torch.tensor([s["num_images"] for s in samples]),
        }

    # --- tiny checkpoints ----------------------------------------------------------------------------------
    # "test": the fastest, with anyres tiling up to 2×2 crops of 32 px (so the tests cover it);
    # "quickstart": ~2.5M parameters, one 64 px crop, which learns to read the `digits` forms from scratch
    # in ~2 CPU minutes (0% → 100% exact match on held-out forms).
    tiny_presets: ClassVar[dict[str, dict[str, Any]]] = {
        "test": {"image_size": 32, "vision_hidden": 32, "text_hidden": 64},
        "quickstart": {
            "image_size": 64,
            "vision_hidden": 128,
            "vision_layers": 3,
            "text_hidden": 192,
            "text_layers": 3,
            "grid": (1,),
        },
    }

    def build_tiny_checkpoint(
        self,
        out_dir: Path,
        *,
        seed: int = 0,
        image_size: int = 32,
        patch_size: int = 8,
        vision_hidden: int = 32,
        vision_layers: int = 2,
        text_hidden: int = 64,
        text_layers: int = 2,
        grid: tuple[int, ...] = (1, 2),
        extra_corpus=(),
    ) -> Path:
        from finetune.models.tiny_tokenizer import train_tiny_tokenizer

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tiny_tokenizer(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
            extra_corpus=extra_corpus,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
            model_max_length=32768,
        )
        tokenizer.chat_template = CHAT_TEMPLATE
        pinpoints = [[image_size * rows, image_size * cols] for rows in grid for cols in grid]
        config = LlavaOnevisionConfig(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": vision_hidden,
                "intermediate_size": vision_hidden * 4,
                "num_hidden_layers": vision_layers,
                "num_attention_heads": 2,
                "image_size": image_size,
                "patch_size": patch_size,
                "vision_use_head": False,
            },
            text_config={
                "model_type": "qwen2",
                "hidden_size": text_hidden,
                "intermediate_size": text_hidden * 4,
                "num_hidden_layers": text_layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 8192,
                "tie_word_embeddings": False,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=pinpoints,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)

        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
            do_convert_rgb=True,
        )
        processor = ImageOnlyProcessor(
            image_processor,
            tokenizer,
            num_image_tokens=(image_size // patch_size) ** 2,
            vision_feature_select_strategy="full",
            chat_template=CHAT_TEMPLATE,
        )
        processor.save_pretrained(out_dir)
        _to_hub_layout(out_dir)
        return out_dir
