"""H2OVL-Mississippi checkpoints in their original (InternVL-chat) layout, loaded natively into transformers'
`InternVLForConditionalGeneration` and saved back into that layout.

The Hub remote code (`H2OVLChatModel`, model_type `h2ovl_chat`) does not run on transformers 5, but the network is
InternVL's: InternViT → pixel shuffle (`ps_version` v2) → `mlp1` (LayerNorm, Linear, GELU, Linear) → a Llama
(mississippi-800m) or Mistral (mississippi-2b) LLM, which the native class implements with other weight names:
`NAME_TABLE` below lists them, original beside native, and both directions of the mapping are derived from it.
InternViT's fused `attn.qkv` is the one tensor that is not a rename: its rows are split in thirds into the native
q / k / v projections, and fused again on saving.

InternViT has no final norm, so the native vision config uses `use_mean_pooling=True` (an Identity there). Its
`hidden_states` count the embeddings first, as InternViT's do, so `select_layer` maps to `vision_feature_layer`
unchanged; the CLS token is dropped (`vision_feature_select_strategy="default"`). Training-only settings without a
native counterpart are ignored: InternViT's `drop_path_rate` (stochastic depth: no effect at inference, but a
fine-tune here runs without it) and `use_flash_attn` (the attention implementation is chosen at load time).

API:
    (configs: finetune.models.mississippi.config.read_original_config / native_config)
    original_to_native(state) / native_to_original(state) key mapping (+ q/k/v split and fusion), exact inverses
    load_h2ovl(path, revision=, dtype=, attn_implementation=) -> InternVLForConditionalGeneration
    save_original(model, out_dir, original_config, state_dict=, dtype=)   config.json + model.safetensors
    copy_tokenizer_files(src, dst)
    (tiny random checkpoints in this layout: finetune.models.mississippi.tiny.build_tiny_h2ovl)
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
)

from finetune.errors import UserError
from finetune.models.hub import resolve_checkpoint
from finetune.models.mississippi.config import native_config, read_original_config
from finetune.models.mississippi.image import IMG_CONTEXT
from finetune.models.quantization import Quantization
from finetune.models.weights import (
    NameTable,
    check_layout,
    compile_pattern,
    fuse_qkv,
    meta_state_shapes,
    names,
    read_shapes,
    read_tensors,
    safetensors_files,
    split_qkv,
)

# Files of a Hub checkpoint we read: configs, tokenizer and remote code (.py, copied into original/ when the recipe
# says model.trust_remote_code), and weights.
SIDE_FILE_PATTERNS = ["*.json", "tokenizer.model", "*.jinja", "*.py"]
HUB_PATTERNS = [*SIDE_FILE_PATTERNS, "*.safetensors"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)

# --- key mapping ---------------------------------------------------------------------------------------------------
_VIT, _NATIVE_VIT = "vision_model.", "model.vision_tower."
_LAYER, _NATIVE_LAYER = "vision_model.encoder.layers.{layer}.", "model.vision_tower.encoder.layer.{layer}."
# (original name, native name): one-to-one renames. A `{placeholder}` stands for the same text on both sides.
NAME_TABLE = (
    (_VIT + "embeddings.class_embedding", _NATIVE_VIT + "embeddings.cls_token"),
    (_VIT + "embeddings.position_embedding", _NATIVE_VIT + "embeddings.position_embeddings"),
    (_VIT + "embeddings.patch_embedding.{wb}", _NATIVE_VIT + "embeddings.patch_embeddings.projection.{wb}"),
    (_LAYER + "attn.proj.{wb}", _NATIVE_LAYER + "attention.projection_layer.{wb}"),
    (_LAYER + "mlp.{fc}.{wb}", _NATIVE_LAYER + "mlp.{fc}.{wb}"),
    (_LAYER + "norm1.{wb}", _NATIVE_LAYER + "layernorm_before.{wb}"),
    (_LAYER + "norm2.{wb}", _NATIVE_LAYER + "layernorm_after.{wb}"),
    (_LAYER + "ls1", _NATIVE_LAYER + "lambda_1"),
    (_LAYER + "ls2", _NATIVE_LAYER + "lambda_2"),
    ("mlp1.0.{wb}", "model.multi_modal_projector.layer_norm.{wb}"),
    ("mlp1.1.{wb}", "model.multi_modal_projector.linear_1.{wb}"),
    ("mlp1.3.{wb}", "model.multi_modal_projector.linear_2.{wb}"),
    ("language_model.model.{rest}", "model.language_model.{rest}"),
    ("language_model.lm_head.weight", "lm_head.weight"),
)
# The fused InternViT projection and its three native parts (`{part}`: q, k, v), split and fused in code.
QKV_ORIGINAL, QKV_NATIVE = _LAYER + "attn.qkv.{wb}", _NATIVE_LAYER + "attention.{part}_proj.{wb}"
_TABLE = NameTable(NAME_TABLE)
_QKV_ORIGINAL_RE, _QKV_NATIVE_RE = compile_pattern(QKV_ORIGINAL), compile_pattern(QKV_NATIVE)


def original_to_native(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original H2OVL weight names → native InternVL names; `attn.qkv` is split by rows into q / k / v.

    Works on meta tensors too. Any key with no native counterpart raises, naming it. (No head count is needed:
    InternViT's qkv rows are [q; k; v], each `hidden_size` rows, so the split is in thirds.)
    """
    native: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state.items():
        qkv = _QKV_ORIGINAL_RE.fullmatch(key)
        if qkv:
            for part, rows in zip("qkv", split_qkv(key, tensor), strict=True):
                native[QKV_NATIVE.format(part=part, **qkv.groupdict())] = rows
            continue
        new = _TABLE.native_name(key)
        if new is None:
            unmapped.append(key)
        else:
            native[new] = tensor
    if unmapped:
        raise UserError(f"{len(unmapped)} tensor(s) have no place in the native InternVL model: {names(unmapped)}")
    return native


def native_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native InternVL names → original H2OVL names; q / k / v are fused back into `attn.qkv`. Exact inverse of
    `original_to_native`; a key with no original counterpart, or an incomplete q/k/v triple, raises naming it."""
    original: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in state.items():
        qkv = _QKV_NATIVE_RE.fullmatch(key)
        if qkv:
            parts.setdefault((qkv["layer"], qkv["wb"]), {})[qkv["part"]] = tensor
            continue
        new = _TABLE.checkpoint_name(key)
        if new is None:
            unmapped.append(key)
        else:
            original[new] = tensor
    if unmapped:
        raise UserError(f"{len(unmapped)} tensor(s) have no place in the original H2OVL layout: {names(unmapped)}")
    original.update(fuse_qkv(parts, QKV_NATIVE, QKV_ORIGINAL))
    return original


# --- loading -------------------------------------------------------------------------------------------------------
def _expected_original_shapes(config: InternVLConfig) -> dict[str, tuple[int, ...]]:
    shapes = meta_state_shapes(InternVLForConditionalGeneration, config)
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    return {k: tuple(v.shape) for k, v in native_to_original(meta).items()}


def load_h2ovl(
    path: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    quantization: Quantization | None = None,
) -> InternVLForConditionalGeneration:
    """An original-layout H2OVL checkpoint (local folder or Hub id) as a native `InternVLForConditionalGeneration`.

    Every native weight must come from the files: a missing, unexpected (e.g. renamed) or mis-shaped tensor fails
    with one line naming it. A folder already in the native layout (config.json model_type `internvl`, e.g. our own
    `save_pretrained` output) is loaded with `from_pretrained` instead. `quantization`: the base loaded quantised
    (QLoRA; finetune/models/quantization.py).
    """
    from transformers import AutoTokenizer, GenerationConfig, PreTrainedConfig

    folder = resolve_checkpoint(path, revision, allow_patterns=HUB_PATTERNS)
    config_file = folder / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "internvl":
        quantized = {}
        if quantization is not None:
            native = InternVLForConditionalGeneration.config_class.from_pretrained(folder)
            quantized = quantization.loading_kwargs(InternVLForConditionalGeneration, native)
        model = InternVLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, **quantized
        )
        return _named(model, path)
    original = read_original_config(folder)
    # An empty config: otherwise AutoTokenizer reads config.json, whose auto_map asks whether to run remote code.
    tokenizer = AutoTokenizer.from_pretrained(folder, config=PreTrainedConfig(), trust_remote_code=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise UserError(f"{folder}: the tokenizer has no {IMG_CONTEXT} token")
    config = native_config(original, image_token_id)

    files = safetensors_files(folder, "H2OVL")
    check_layout(read_shapes(files), _expected_original_shapes(config), str(path), "H2OVL")
    state = read_tensors(files)
    native = original_to_native(state)
    del state
    quantized = quantization.loading_kwargs(InternVLForConditionalGeneration, config) if quantization else {}
    model = InternVLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=native, dtype=dtype, attn_implementation=attn_implementation, **quantized
    )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return _named(model, path)


def _named(model: InternVLForConditionalGeneration, path: str | Path) -> InternVLForConditionalGeneration:
    # The path as the user gave it (a Hub id, not its cache folder): what PEFT records as an adapter's base.
    model.config._name_or_path = str(path)
    model.name_or_path = str(path)
    return model.eval()


# --- saving --------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _updated_original_config(
    original: dict, model, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict:
    config = copy.deepcopy(original)
    llm, vision = config["llm_config"], config["vision_config"]
    text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
    current = [(llm, "vocab_size", int(state["language_model.model.embed_tokens.weight"].shape[0]))]
    current += [
        (llm, k, getattr(text_cfg, k))
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    ]
    current += [
        (vision, k, getattr(vision_cfg, k))
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    ]
    for section, key, value in current:
        if key in section and section[key] != value:  # an absent key keeps its implied default
            section[key] = value
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for section in (config, llm, vision):
            if "torch_dtype" in section:
                section["torch_dtype"] = name
    return config


def save_original(
    model,
    out_dir: str | Path,
    original_config: dict,
    *,
    state_dict: Mapping | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `config.json` and `model.safetensors` in the original H2OVL layout (qkv fused), which H2OVL's remote
    code (`model.chat`) and vLLM's `H2OVLChatModel` read.

    `state_dict` (native names) replaces `model.state_dict()`, e.g. one gathered by Accelerate. Tensors are written
    in `dtype`, by default the original config's `torch_dtype` (the Hub checkpoints are bfloat16), else as held;
    config.json is `original_config` with sizes updated from the model where they differ (normally none) and its
    `torch_dtype` set to what was written. Tokenizer files are not written here: see `copy_tokenizer_files`.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    native = dict(state_dict if state_dict is not None else model.state_dict())
    original = native_to_original(native)
    if dtype is None:
        dtype = _DTYPES.get(str(original_config.get("torch_dtype", "")).removeprefix("torch."))
    tensors = {}
    for key, tensor in original.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous().clone()
    config = _updated_original_config(original_config, model, tensors, dtype)
    # A stale sharded copy next to the new single file would shadow it.
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        for shard in set(json.loads(index.read_text()).get("weight_map", {}).values()):
            (out_dir / shard).unlink(missing_ok=True)
        index.unlink()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def copy_tokenizer_files(src: str | Path, dst: str | Path, *, remote_code: bool = False) -> list[str]:
    """Copy the tokenizer and generation files present in `src` to `dst`, and with `remote_code` the remote-code
    `*.py` files (`configuration_h2ovl_chat.py`, `modeling_h2ovl_chat.py`, `conversation.py`, ...) that
    config.json's `auto_map` needs for `trust_remote_code` loading. Returns the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    names += sorted(p.name for p in src.glob("*.py")) if remote_code else []
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names
