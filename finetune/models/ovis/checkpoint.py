"""Ovis checkpoints, original (AIDC-AI) or `-hf` layout, loaded into the native `OvisForConditionalGeneration` and
saved back into the layout they came from.

Native names are the original's (`llm.*`, `visual_tokenizer.head.*`, `vte.weight`) except inside the backbone:
transformers 5's `SiglipVisionModel` drops the `vision_model.` level (`ORIGINAL_SIGLIP`), and its `Aimv2VisionModel`
names AIMv2's weights differently (`ORIGINAL_AIMV2`); the fused `attn.qkv` is split in thirds into q / k / v (rows
[q; k; v], as AIMv2Attention's reshape reads them) and `pos_embed` [1, N, D] is the [N, D] position-embedding table.
The `-hf` layout renames everything (`HF`). Tied LLM heads (Gemma2, Qwen2.5-0.5B / 1.5B) are absent from both layouts.

Tensors present in the checkpoint but never used by the original forward (the backbone's final norm, SigLIP's
pooling head) are loaded, kept frozen, and saved back unchanged (see `OvisFamily.never_used_parameters`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.models.base import drop_remote_code
from finetune.models.hub import resolve_checkpoint
from finetune.models.ovis.config import read_checkpoint_config
from finetune.models.ovis.modeling import OvisForConditionalGeneration
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

SIDE_FILE_PATTERNS = ["*.json", "tokenizer.model", "*.txt", "*.jinja", "*.py"]
HUB_PATTERNS = [*SIDE_FILE_PATTERNS, "*.safetensors"]
# Files copied from the source checkpoint into a save: tokenizer, image processor, generation settings, remote code.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)

_B = "visual_tokenizer.backbone."
_BLOCK, _LAYER = _B + "trunk.blocks.{layer}.", _B + "encoder.layers.{layer}."
ORIGINAL_SIGLIP = NameTable([(_B + "vision_model.{rest}", _B + "{rest}")])
# Original AIMv2 name → native (transformers Aimv2VisionModel) name.
ORIGINAL_AIMV2 = NameTable(
    [
        (_B + "preprocessor.patchifier.proj.{wb}", _B + "embeddings.patch_embed.{wb}"),
        (_B + "preprocessor.patchifier.norm.weight", _B + "embeddings.rms_norm.weight"),
        (_B + "preprocessor.pos_embed", _B + "embeddings.position_embedding.weight"),
        (_BLOCK + "attn.proj.{wb}", _LAYER + "attention.out_proj.{wb}"),
        (_BLOCK + "norm_1.weight", _LAYER + "rms_norm1.weight"),
        (_BLOCK + "norm_2.weight", _LAYER + "rms_norm2.weight"),
        (_BLOCK + "mlp.fc1.{wb}", _LAYER + "ffn.gate_proj.{wb}"),  # silu(fc1(x)) * fc3(x) → fc2
        (_BLOCK + "mlp.fc3.{wb}", _LAYER + "ffn.up_proj.{wb}"),
        (_BLOCK + "mlp.fc2.{wb}", _LAYER + "ffn.down_proj.{wb}"),
        (_B + "trunk.post_trunk_norm.weight", _B + "rms_norm.weight"),
    ]
)
QKV_ORIGINAL, QKV_NATIVE = _BLOCK + "attn.qkv.{wb}", _LAYER + "attention.{part}_proj.{wb}"
_QKV_ORIGINAL_RE, _QKV_NATIVE_RE = compile_pattern(QKV_ORIGINAL), compile_pattern(QKV_NATIVE)
POS_EMBED_ORIGINAL = _B + "preprocessor.pos_embed"
# transformers' Ovis2ForConditionalGeneration name → native name.
_HF_VT = "model.vision_tower."
HF = NameTable(
    [
        (_HF_VT + "transformer.embeddings.patch_embedding.{wb}", _B + "embeddings.patch_embed.{wb}"),
        (_HF_VT + "transformer.embeddings.rms_norm.weight", _B + "embeddings.rms_norm.weight"),
        (_HF_VT + "transformer.embeddings.position_embedding.weight", _B + "embeddings.position_embedding.weight"),
        (_HF_VT + "transformer.encoder.{rest}", _B + "encoder.{rest}"),
        (_HF_VT + "transformer.rms_norm.weight", _B + "rms_norm.weight"),
        (_HF_VT + "head_linear.weight", "visual_tokenizer.head.0.weight"),
        (_HF_VT + "head_norm.{wb}", "visual_tokenizer.head.1.{wb}"),
        ("model.visual_embeddings_table.weight", "vte.weight"),
        ("model.language_model.{rest}", "llm.model.{rest}"),
        ("lm_head.weight", "llm.lm_head.weight"),
    ]
)
TIED_HEAD = "llm.lm_head.weight"


def _is_identity(key: str) -> bool:
    """Names the original layout shares with the native model (everything outside the backbone)."""
    return not key.startswith(_B)


def to_native(state: Mapping[str, torch.Tensor], layout: str, backbone: str = "aimv2") -> dict[str, torch.Tensor]:
    """Checkpoint names (`layout`: original | hf; `backbone`: siglip | aimv2) → native names. Any key with no native
    place raises, naming it."""
    native: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state.items():
        if layout == "hf":
            new = HF.native_name(key)
        elif _is_identity(key):
            new = key
        elif backbone == "siglip":
            new = ORIGINAL_SIGLIP.native_name(key)
        elif qkv := _QKV_ORIGINAL_RE.fullmatch(key):
            for part, rows in zip("qkv", split_qkv(key, tensor), strict=True):
                native[QKV_NATIVE.format(part=part, **qkv.groupdict())] = rows
            continue
        else:
            new = ORIGINAL_AIMV2.native_name(key)
            if key == POS_EMBED_ORIGINAL:
                tensor = tensor.reshape(tensor.shape[-2:])
        if new is None:
            unmapped.append(key)
        else:
            native[new] = tensor
    if unmapped:
        raise UserError(f"{len(unmapped)} tensor(s) have no place in the Ovis model: {names(unmapped)}")
    return native


def to_checkpoint(
    state: Mapping[str, torch.Tensor], layout: str, backbone: str = "aimv2", *, tied_head: bool
) -> dict[str, torch.Tensor]:
    """Native names → checkpoint names; exact inverse of `to_native` (q / k / v fused back, pos_embed [1, N, D])."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in state.items():
        if tied_head and key == TIED_HEAD:
            continue  # the embedding table's own tensor; checkpoints of tied LLMs do not store it
        if layout == "hf":
            new = HF.checkpoint_name(key)
        elif _is_identity(key):
            new = key
        elif backbone == "siglip":
            new = ORIGINAL_SIGLIP.checkpoint_name(key)
        elif qkv := _QKV_NATIVE_RE.fullmatch(key):
            parts.setdefault((qkv["layer"], qkv["wb"]), {})[qkv["part"]] = tensor
            continue
        else:
            new = ORIGINAL_AIMV2.checkpoint_name(key)
            if new == POS_EMBED_ORIGINAL:
                tensor = tensor.unsqueeze(0)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = tensor
    if unmapped:
        raise UserError(f"{len(unmapped)} tensor(s) have no place in the {layout} Ovis layout: {names(unmapped)}")
    out.update(fuse_qkv(parts, QKV_NATIVE, QKV_ORIGINAL))
    return out


def _tied(config) -> bool:
    return bool(getattr(config.text_config, "tie_word_embeddings", False))


def expected_shapes(native_config, layout: str, backbone: str) -> dict[str, tuple[int, ...]]:
    shapes = meta_state_shapes(OvisForConditionalGeneration, native_config)
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    state = to_checkpoint(meta, layout, backbone, tied_head=_tied(native_config))
    return {k: tuple(v.shape) for k, v in state.items()}


def load_ovis(
    path: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    processor=None,
    quantization: Quantization | None = None,
) -> OvisForConditionalGeneration:
    """An Ovis checkpoint (folder or Hub id, original or -hf layout) as the native model. Every weight must come from
    the files: a missing, unexpected (renamed) or mis-shaped tensor fails with one line naming it."""
    from transformers import GenerationConfig

    from finetune.models.ovis.processor import OvisProcessor

    folder = resolve_checkpoint(path, revision, allow_patterns=HUB_PATTERNS)
    ckpt = read_checkpoint_config(folder, str(path))
    processor = processor or OvisProcessor.from_pretrained(str(folder))
    files = safetensors_files(folder, "Ovis")
    found = read_shapes(files)
    head = _B + ("vision_model.head." if ckpt.layout == "original" else "head.")
    siglip_head = ckpt.backbone == "siglip" and any(k.startswith(head) for k in found)
    config = ckpt.native(processor.image_token_id, processor.indicator_ids, vision_use_head=siglip_head)
    check_layout(found, expected_shapes(config, ckpt.layout, ckpt.backbone), str(path), "Ovis")
    native = to_native(read_tensors(files), ckpt.layout, ckpt.backbone)
    # Gemma2's attention soft-caps its scores, which only the eager kernel implements (as the original's
    # llm_attn_implementation says for Ovis1.6); the vision backbone takes the recipe's choice.
    llm_attention = "eager" if ckpt.text_type == "gemma2" else attn_implementation
    quantized = quantization.loading_kwargs(OvisForConditionalGeneration, config) if quantization else {}
    model = OvisForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=native,
        dtype=dtype,
        attn_implementation={"text_config": llm_attention, "vision_config": attn_implementation, "": "eager"},
        **quantized,
    )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
        model.llm.generation_config = model.generation_config
    model.config._name_or_path = model.name_or_path = str(path)
    model.checkpoint_layout = ckpt.layout
    return model.eval()


def _with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """The config with every `torch_dtype` it declares (top level and sub-configs) set to what was written."""
    name = str(dtype).removeprefix("torch.")
    out = {k: _with_dtype(v, dtype) if isinstance(v, dict) else v for k, v in config.items()}
    for key in ("torch_dtype", "dtype"):
        if key in out:
            out[key] = name
    return out


def save_checkpoint(
    model: OvisForConditionalGeneration,
    out_dir: str | Path,
    source: str | Path,
    *,
    state_dict: Mapping | None = None,
    dtype: torch.dtype | None = None,
    remote_code: bool = False,
) -> Path:
    """Write the model in the layout of the `source` checkpoint folder: config.json (the source's, its `torch_dtype`
    set to what was written), model.safetensors in the source's names and in `dtype` (default: as held), and the
    source's tokenizer, image-processor and generation files — what vLLM's Ovis loader reads. With `remote_code`
    also the source's remote-code `*.py` files, and config.json keeps its `auto_map` (what the Hub remote code,
    `trust_remote_code`, reads); without, neither, nor any `auto_map` in the copied tokenizer / processor
    configs."""
    from safetensors.torch import save_file

    source, out_dir = Path(source), Path(out_dir)
    ckpt = read_checkpoint_config(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    native = dict(state_dict if state_dict is not None else model.state_dict())
    tensors = to_checkpoint(native, ckpt.layout, ckpt.backbone, tied_head=_tied(model.config))
    if dtype is None:  # as held: a model trained in float32 is not rounded to the source's bfloat16 behind its back
        dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous().clone()
    index = out_dir / "model.safetensors.index.json"  # a stale sharded copy next to the new file would shadow it
    if index.exists():
        for shard in set(json.loads(index.read_text()).get("weight_map", {}).values()):
            (out_dir / shard).unlink(missing_ok=True)
        index.unlink()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(_with_dtype(ckpt.raw, dtype), indent=2) + "\n")
    if source.resolve() != out_dir.resolve():
        names = [n for n in SIDE_FILES if (source / n).is_file()]
        names += sorted(p.name for p in source.glob("*.py")) if remote_code else []
        for name in names:
            shutil.copyfile(source / name, out_dir / name)
    if not remote_code:
        drop_remote_code(out_dir)
    return out_dir
