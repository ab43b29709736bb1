"""The generic family (`model.family: auto`): any transformers-native image-text-to-text model.

Everything is read from the checkpoint and transformers' own classes, nothing is written per model:
- weights through `AutoModelForImageTextToText`, the processor through the class the checkpoint names (without its
  video processor: `processor.py`), saved back in the Hub's layout;
- prompts, the answer span, the end-of-turn token, per-token inputs and token counts from the processor's chat
  template and expansion (`chat.py`);
- the `vision` / `projector` / `llm` groups from the standard attribute layout (`layout.py`), bound to a checkpoint
  by `for_checkpoint`; LoRA targets are each group's linear layers.
Models with a dedicated family (their native code missing or wrong) keep it; `auto` is chosen for a checkpoint whose
`model_type` has none.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from finetune import progress
from finetune.errors import UserError
from finetune.models.auto.chat import TEXT_KEYS, PromptFormat
from finetune.models.auto.layout import GROUPS, meta_model, read_layout
from finetune.models.auto.processor import load_native_processor, save_hub_layout
from finetune.models.base import IGNORE_INDEX, Encoded, ModelFamily, drop_remote_code
from finetune.models.hub import resolve_checkpoint

_CONFIG_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model"]
# Keys of a processed sample that are not image tensors (the per-token rules travel with each item).
_RULES_KEY = "_token_rules"


class AutoFamily(ModelFamily):
    name = "auto"
    model_types = ()  # the fallback: every image-text-to-text model_type no other family claims
    # The group names are fixed; their prefixes, LoRA targets and saved modules are the checkpoint's (for_checkpoint).
    group_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {g: () for g in GROUPS}
    default_lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {g: () for g in GROUPS}

    # --- binding to a checkpoint ------------------------------------------------------------------------------------
    def for_checkpoint(self, path: str, revision: str | None = None) -> AutoFamily:
        """This family with the groups of the checkpoint at `path` (read from its config, no weights loaded)."""

        folder = resolve_checkpoint(path, revision, allow_patterns=_CONFIG_PATTERNS)
        config = _native_config(folder, path)
        layout = read_layout(meta_model(config), str(path))
        bound = copy.copy(self)
        bound.group_prefixes = dict(layout.group_prefixes)
        bound.default_lora_targets = dict(layout.default_lora_targets)
        bound.modules_to_save = dict(layout.modules_to_save)
        return bound

    # --- loading ---------------------------------------------------------------------------------------------------
    def load_processor(self, path: str, revision: str | None = None, **options):
        if options:
            raise UserError(f"model.processor: the auto family takes no processor options, got {sorted(options)}")
        folder = resolve_checkpoint(path, revision, allow_patterns=_CONFIG_PATTERNS)
        processor = load_native_processor(folder)
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
            raise UserError(f"{path}: its processor has no tokenizer or no image processor")
        PromptFormat.of(processor, str(path))  # read (and refuse) now, not at the first sample
        return processor

    def load_model(self, path, *, revision=None, dtype=torch.float32, attn_implementation="sdpa", quantization=None):
        from transformers import AutoModelForImageTextToText

        folder = resolve_checkpoint(path, revision, allow_patterns=[*_CONFIG_PATTERNS, "*.safetensors"])
        config = _native_config(folder, path)
        cls = AutoModelForImageTextToText._model_mapping[type(config)]
        quantized = quantization.loading_kwargs(cls, config) if quantization else {}
        try:
            model, info = cls.from_pretrained(
                folder, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True, **quantized
            )
        except ValueError as err:
            if attn_implementation != "sdpa" or "does not support an attention implementation" not in str(err):
                raise
            # Some language models have no SDPA path in transformers (Gemma 2, under PaliGemma 2): eager attention
            # computes the same, slower.
            progress.info(f"{path}: {cls.__name__} has no SDPA attention in transformers; using eager attention")
            model, info = cls.from_pretrained(
                folder, dtype=dtype, attn_implementation="eager", output_loading_info=True, **quantized
            )
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if problems:
            raise ValueError(f"{path}: checkpoint does not match the model: {problems}")
        read_layout(model, str(path))  # refuse an unknown layout here too, for callers that never bound the family
        model.config._name_or_path = model.name_or_path = str(path)
        return model

    def save_pretrained(self, model, processor, out_dir: Path, source_path=None, state_dict=None, remote_code=False):
        model.save_pretrained(out_dir, state_dict=state_dict)
        save_hub_layout(processor, Path(out_dir))
        if not remote_code:
            drop_remote_code(Path(out_dir))

    # --- text and images -------------------------------------------------------------------------------------------
    def _format(self, processor) -> PromptFormat:
        return PromptFormat.of(processor, type(processor).__name__)

    def render_prompt(self, processor, instruction: str, num_images: int) -> str:
        return self._format(processor).render(processor, instruction, num_images)

    def end_of_turn_token(self, processor) -> str:
        return self._format(processor).end_of_turn

    def encode_prompt(self, processor, images: list[Image.Image], prompt_text: str) -> Encoded:
        format_ = self._format(processor)
        out = format_.process(processor, images, prompt_text)
        ids = out["input_ids"][0].tolist()
        image_inputs = {k: v for k, v in out.items() if k not in TEXT_KEYS and k not in format_.token_rules}
        image_inputs[_RULES_KEY] = format_.token_rules
        return Encoded(input_ids=ids, labels=[IGNORE_INDEX] * len(ids), image_inputs=image_inputs)

    def count_prompt_tokens(self, processor, prompt_text: str, image_sizes: list[tuple[int, int]]) -> int:
        return self._format(processor).count(processor, prompt_text, list(image_sizes))

    def collate_images(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Each image tensor concatenated over the batch along its first dimension (images, tiles or patches — or the
        sample, for processors that batch per sample), its other dimensions zero-padded to the largest: the layout
        every native processor gives a batch of several samples."""
        keys = [k for k in samples[0] if k not in ("input_ids", "labels", "index", _RULES_KEY)]
        batch = {}
        for key in keys:
            values = [s[key] for s in samples if torch.is_tensor(s.get(key))]
            if not values:
                continue
            shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
            padded = []
            for v in values:
                pad = []
                for d in reversed(range(1, v.dim())):
                    pad += [0, shape[d] - v.shape[d]]
                padded.append(torch.nn.functional.pad(v, pad) if any(pad) else v)
            batch[key] = torch.cat(padded)
        return batch

    def token_inputs(self, batch: dict[str, Any], features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rules = features[0].get(_RULES_KEY) or {}
        return {
            key: PromptFormat._apply_rule(rule, batch["input_ids"], batch["labels"], batch["attention_mask"])
            for key, rule in rules.items()
        }

    def training_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # A processor that types the answer's tokens apart from the prompt's (PaliGemma's prefix-LM) makes the whole
        # prompt attend both ways: there a pad could be seen, so the padding mask stays.
        if self._prefix_lm(batch):
            return dict(batch)
        return super().training_inputs(batch)

    @staticmethod
    def _prefix_lm(batch: dict[str, Any]) -> bool:
        types = batch.get("token_type_ids")
        if types is None:
            return False
        answer = batch["labels"] != IGNORE_INDEX
        prompt = ~answer & (batch["attention_mask"] == 1)
        return bool(answer.any()) and set(types[answer].tolist()).isdisjoint(types[prompt].tolist())

    # --- tiny checkpoints ------------------------------------------------------------------------------------
    # One preset per proven model: its builder in finetune/models/auto/tiny/<model>.py writes the real Hub layout.
    tiny_presets: ClassVar[dict[str, dict[str, Any]]] = {
        name: {"model": name}
        for name in ("qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "internvl", "granite_docling")
    }

    def build_tiny_checkpoint(self, out_dir: Path, *, seed: int = 0, model: str = "qwen2_5_vl", **sizes) -> Path:
        builder = importlib.import_module(f"finetune.models.auto.tiny.{model}")
        return builder.build(Path(out_dir), seed=seed, **sizes)


def _native_config(folder: Path, path: str):
    """The checkpoint's config, read by transformers' own class for its `model_type`; one line when transformers has
    no image-text-to-text model of that type (remote-code checkpoints: their dedicated family, if any, loads them)."""
    import json

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config_file = Path(folder) / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise UserError(f"{path}: no config.json") from None
    except ValueError as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(
            f"{path}: model_type '{model_type}' is no transformers-native image-text-to-text model, so the auto family "
            "cannot load it (a checkpoint that needs remote code loads through its dedicated family, if it has one)"
        )
    return AutoConfig.from_pretrained(folder)
