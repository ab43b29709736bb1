"""H2OVL-Mississippi's original `config.json` and its translation into transformers' native `InternVLConfig`."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, MistralConfig

from finetune.errors import UserError
from finetune.models.hub import resolve_checkpoint

MODEL_TYPE = "h2ovl_chat"
ARCHITECTURE = "H2OVLChatModel"
TEXT_CONFIGS = {"LlamaForCausalLM": LlamaConfig, "MistralForCausalLM": MistralConfig}
_TEXT_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def read_original_config(path: str | Path, revision: str | None = None) -> dict:
    """The original layout's config.json (from a folder, the file itself, or a Hub id); refused unless H2OVL."""
    file = Path(path)
    if not file.is_file():
        file = resolve_checkpoint(path, revision, allow_patterns=["config.json"]) / "config.json"
    if not file.is_file():
        raise UserError(f"{file}: not found (an H2OVL checkpoint folder needs its config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != MODEL_TYPE or (architectures and ARCHITECTURE not in architectures):
        raise UserError(
            f"{file}: not an H2OVL-Mississippi checkpoint (model_type {model_type!r}, architectures "
            f"{architectures}); expected model_type '{MODEL_TYPE}' / {ARCHITECTURE}"
        )
    for key in ("llm_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise UserError(f"{file}: '{key}' is missing or not an object")
    return config


def tile_size(original: dict) -> int:
    return int(original.get("force_image_size") or original["vision_config"]["image_size"])


def tokens_per_tile(original: dict) -> int:
    """Image tokens per tile: (tile / patch)² · downsample_ratio² (448 px, patch 14, 0.5 → 256; 56, 14 → 4)."""
    patch = original["vision_config"]["patch_size"]
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int((tile_size(original) // int(patch)) ** 2 * float(original.get("downsample_ratio", 0.5)) ** 2)


def _text_config(llm: dict):
    arch = (llm.get("architectures") or [None])[0] or _TEXT_MODEL_TYPES.get(llm.get("model_type"))
    if arch not in TEXT_CONFIGS:
        raise UserError(f"llm_config.architectures: {arch!r} is not supported (known: {', '.join(TEXT_CONFIGS)})")
    if llm.get("tie_word_embeddings"):
        raise UserError("llm_config.tie_word_embeddings: true is not supported (H2OVL's LLMs have untied lm_head)")
    kwargs = {k: v for k, v in llm.items() if k not in ("transformers_version", "auto_map", "_name_or_path")}
    kwargs["tie_word_embeddings"] = False
    return TEXT_CONFIGS[arch](**kwargs)


def native_config(original: dict, image_token_id: int) -> InternVLConfig:
    """The native `InternVLConfig` equivalent to an original H2OVL config.json (a dict).

    Settings the native class cannot reproduce raise a one-line error naming the field.
    """
    vision = original["vision_config"]

    def bad(field: str, why: str):
        raise UserError(f"{field}: {why}")

    if original.get("ps_version", "v1") != "v2":
        bad("ps_version", f"{original.get('ps_version', 'v1')!r} is not supported (the native pixel shuffle is v2)")
    for lora in ("use_backbone_lora", "use_llm_lora"):
        if original.get(lora):
            bad(lora, f"{original[lora]} is not supported (LoRA-wrapped original checkpoints); merge it first")
    if vision.get("qk_normalization"):
        bad("vision_config.qk_normalization", "true is not supported")
    norm_type = vision.get("norm_type", "rms_norm")
    if norm_type not in ("layer_norm", "rms_norm"):
        bad("vision_config.norm_type", f"{norm_type!r} is not supported")
    ratio = float(original.get("downsample_ratio", 0.5))
    if ratio <= 0 or abs(1 / ratio - round(1 / ratio)) > 1e-6:
        bad("downsample_ratio", f"{ratio} is not 1/n for an integer n")
    layers = int(vision["num_hidden_layers"])
    select_layer = int(original.get("select_layer", -1))
    if not -(layers + 1) <= select_layer <= layers:
        bad("select_layer", f"{select_layer} is outside the vision model's {layers} layers")
    if image_token_id is None or image_token_id < 0:
        bad("image_token_id", f"{image_token_id!r} is not a token id")

    text = _text_config(original["llm_config"])
    if image_token_id >= text.vocab_size:
        bad("image_token_id", f"{image_token_id} is outside llm_config.vocab_size {text.vocab_size}")
    vision_config = InternVLVisionConfig(
        hidden_size=int(vision["hidden_size"]),
        num_hidden_layers=layers,
        num_attention_heads=int(vision["num_attention_heads"]),
        intermediate_size=int(vision["intermediate_size"]),
        hidden_act=vision.get("hidden_act", "gelu"),
        attention_bias=bool(vision.get("qkv_bias", False)),
        use_qk_norm=False,
        norm_type=norm_type,
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        layer_scale_init_value=float(vision.get("initializer_factor", 0.1)),
        initializer_range=float(vision.get("initializer_range", 0.02)),
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        num_channels=int(vision.get("num_channels", 3)),
        attention_dropout=float(vision.get("attention_dropout", 0.0)),
        projection_dropout=float(vision.get("dropout", 0.0)),
        hidden_dropout_prob=0.0,
        use_absolute_position_embeddings=True,
        use_mask_token=False,
        use_mean_pooling=True,  # InternViT has no final layer norm
    )
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=int(image_token_id),
        image_seq_length=tokens_per_tile(original),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=select_layer,
        vision_feature_select_strategy="default",  # drop the CLS token
        tie_word_embeddings=False,
    )
