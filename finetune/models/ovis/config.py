"""Ovis checkpoints' config.json in its two layouts, and their translation into the native `OvisConfig`.

- Original (AIDC-AI, remote code): `model_type: ovis`, `llm_config` (gemma2 / qwen2), `visual_tokenizer_config`
  (`siglip_visual_tokenizer` / `aimv2_visual_tokenizer`, with `backbone_config`, `vocab_size`, `hidden_stride`,
  `tokenize_function`), `conversation_formatter_class`.
- transformers-converted Ovis2 (`-hf`): `model_type: ovis2`, `text_config`, `vision_config` (`ovis2_vision`: the
  AIMv2 sizes plus `vocab_size`, `hidden_stride`), `image_token_id`, `visual_indicator_token_ids`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import Aimv2VisionConfig, Gemma2Config, Qwen2Config, SiglipVisionConfig

from finetune.errors import UserError
from finetune.models.ovis.modeling import NUM_INDICATORS, OvisConfig

ORIGINAL_MODEL_TYPE, HF_MODEL_TYPE = "ovis", "ovis2"
TEXT_CONFIGS = {"gemma2": Gemma2Config, "qwen2": Qwen2Config}
BACKBONES = {"siglip_visual_tokenizer": "siglip", "aimv2_visual_tokenizer": "aimv2"}
FORMATTERS = {"GemmaConversationFormatter": "gemma2", "QwenConversationFormatter": "qwen2"}
_DROP = ("transformers_version", "auto_map", "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype")


@dataclass
class CheckpointConfig:
    """What a checkpoint's config.json says, in either layout."""

    layout: str  # original | hf
    raw: dict
    text_type: str  # gemma2 | qwen2
    backbone: str  # siglip | aimv2
    chat_format: str
    text: dict
    vision: dict
    visual_vocab_size: int
    hidden_stride: int
    tokenize_function: str
    token_ids: dict[str, int] | None  # image / indicator token ids the -hf layout fixes; None: the processor adds them

    @property
    def image_size(self) -> int:
        return int(self.vision.get("image_size", 448 if self.backbone == "aimv2" else 384))

    @property
    def patch_size(self) -> int:
        return int(self.vision.get("patch_size", 14))

    def tokens_per_crop(self, side: int | None = None) -> int:
        """Visual tokens per crop: the patch grid, padded to a multiple of hidden_stride, merged s × s."""
        patches = (side or self.image_size) // self.patch_size
        return (-(-patches // self.hidden_stride)) ** 2

    def native(self, image_token_id: int, indicator_ids: list[int], *, vision_use_head: bool = False) -> OvisConfig:
        """The native config (the image / indicator ids come from the processor's tokenizer)."""
        text = TEXT_CONFIGS[self.text_type](**{k: v for k, v in self.text.items() if k not in _DROP})
        vision_kwargs = {k: v for k, v in self.vision.items() if k not in _DROP}
        if self.backbone == "siglip":
            vision = SiglipVisionConfig(**vision_kwargs, vision_use_head=vision_use_head)
        else:
            use_bias = bool(vision_kwargs.pop("use_bias", False))
            if bool(vision_kwargs.get("qkv_bias", False)) != use_bias:
                # transformers' AIMv2 gives the attention output projection the qkv bias setting; the original
                # gives it use_bias: only equal settings compute the same.
                raise UserError("visual_tokenizer_config.backbone_config: qkv_bias and use_bias must be equal")
            for key in ("projection_dropout", "num_visual_indicator_tokens", "vocab_size", "hidden_stride", "mlp_bias"):
                vision_kwargs.pop(key, None)
            vision_kwargs.pop("tokenize_function", None)
            vision = Aimv2VisionConfig(**vision_kwargs, mlp_bias=use_bias, use_head=False, is_native=False)
        return OvisConfig(
            text_config=text,
            vision_config=vision,
            visual_vocab_size=self.visual_vocab_size,
            hidden_stride=self.hidden_stride,
            tokenize_function=self.tokenize_function,
            image_token_id=int(image_token_id),
            visual_indicator_token_ids=[int(i) for i in indicator_ids],
        )


def _load(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err})") from None


def read_checkpoint_config(folder: str | Path, where: str | None = None) -> CheckpointConfig:
    """The config of an Ovis checkpoint folder in either layout; anything the native model cannot reproduce is one
    line naming the field."""
    file = Path(folder) / "config.json"
    where = where or str(folder)
    if not file.is_file():
        raise UserError(f"{where}: no config.json (an Ovis checkpoint folder needs one)")
    raw = _load(file)
    model_type = raw.get("model_type")
    if model_type == ORIGINAL_MODEL_TYPE:
        config = _original(raw, file)
    elif model_type == HF_MODEL_TYPE:
        config = _hf(raw, file)
    else:
        raise UserError(
            f"{file}: not an Ovis checkpoint (model_type {model_type!r}; expected "
            f"'{ORIGINAL_MODEL_TYPE}' (AIDC-AI) or '{HF_MODEL_TYPE}' (transformers' -hf))"
        )
    if config.text_type not in TEXT_CONFIGS:
        raise UserError(f"{file}: LLM model_type {config.text_type!r} is not supported (known: {sorted(TEXT_CONFIGS)})")
    if config.tokenize_function not in ("softmax", "st_argmax"):
        raise UserError(
            f"{file}: tokenize_function {config.tokenize_function!r} is not supported (softmax, st_argmax: "
            "gumbel_argmax samples, so it does not compute one answer)"
        )
    if config.hidden_stride < 1:
        raise UserError(f"{file}: hidden_stride {config.hidden_stride} must be at least 1")
    if config.visual_vocab_size <= NUM_INDICATORS:
        raise UserError(f"{file}: visual vocab_size {config.visual_vocab_size} leaves no visual word")
    return config


def _section(raw: dict, key: str, file: Path) -> dict:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise UserError(f"{file}: '{key}' is missing or not an object")
    return value


def _original(raw: dict, file: Path) -> CheckpointConfig:
    llm = _section(raw, "llm_config", file)
    visual = _section(raw, "visual_tokenizer_config", file)
    backbone_config = _section(visual, "backbone_config", file)
    kind = visual.get("model_type")
    if kind not in BACKBONES:
        raise UserError(
            f"{file}: visual_tokenizer_config.model_type {kind!r} is not supported (known: {sorted(BACKBONES)})"
        )
    formatter = raw.get("conversation_formatter_class")
    if formatter not in FORMATTERS:
        raise UserError(
            f"{file}: conversation_formatter_class {formatter!r} is not supported (known: {sorted(FORMATTERS)})"
        )
    if visual.get("drop_cls_token"):
        raise UserError(
            f"{file}: visual_tokenizer_config.drop_cls_token: true is not supported (SigLIP / AIMv2 have none)"
        )
    return CheckpointConfig(
        layout="original",
        raw=raw,
        text_type=llm.get("model_type"),
        backbone=BACKBONES[kind],
        chat_format=FORMATTERS[formatter],
        text=llm,
        vision=backbone_config,
        visual_vocab_size=int(visual.get("vocab_size", 16384)),
        hidden_stride=int(visual.get("hidden_stride", 1)),
        tokenize_function=visual.get("tokenize_function", "softmax"),
        token_ids=None,
    )


def _hf(raw: dict, file: Path) -> CheckpointConfig:
    from finetune.models.ovis.processor import IMAGE_TOKEN, INDICATOR_TOKENS

    text = _section(raw, "text_config", file)
    vision = _section(raw, "vision_config", file)
    indicators = list(raw.get("visual_indicator_token_ids", (151666, 151667, 151668, 151669, 151670)))
    if len(indicators) != NUM_INDICATORS:
        raise UserError(f"{file}: visual_indicator_token_ids must hold {NUM_INDICATORS} ids, not {len(indicators)}")
    token_ids = {IMAGE_TOKEN: int(raw.get("image_token_id", 151665))}
    token_ids.update({token: int(i) for token, i in zip(INDICATOR_TOKENS, indicators, strict=True)})
    text = {**text, "tie_word_embeddings": bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))}
    return CheckpointConfig(
        layout="hf",
        raw=raw,
        text_type=text.get("model_type", "qwen2"),
        backbone="aimv2",
        chat_format="qwen2",
        text=text,
        vision={**vision, "use_bias": vision.get("mlp_bias", False)},
        visual_vocab_size=int(vision.get("vocab_size", 16384)),
        hidden_stride=int(vision.get("hidden_stride", 1)),
        tokenize_function=vision.get("tokenize_function", "softmax"),
        token_ids=token_ids,
    )
