"""Checkpoint weights shared by the natively loaded families: name tables, safetensors files, layout checks.

A family whose Hub layout differs from its native module names lists the renames as a table of
(checkpoint name, native name) patterns; `{placeholder}`s stand for the same text on both sides, and both directions
of the mapping are compiled from the one table (`NameTable`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from finetune.errors import UserError

PLACEHOLDERS = {"layer": r"\d+", "wb": "weight|bias", "fc": "fc1|fc2", "part": "q|k|v", "rest": ".+"}


def compile_pattern(name_pattern: str) -> re.Pattern:
    """A name pattern as a regex: literal text escaped, each `{placeholder}` a named group."""
    pieces = re.split(r"\{(\w+)\}", name_pattern)  # literal, placeholder, literal, ..., literal
    return re.compile("".join(f"(?P<{p}>{PLACEHOLDERS[p]})" if i % 2 else re.escape(p) for i, p in enumerate(pieces)))


class NameTable:
    """One-to-one renames between a checkpoint layout and native names, both directions from one table."""

    def __init__(self, rows: Iterable[tuple[str, str]]):
        self.rows = tuple(rows)
        self.to_native = [(compile_pattern(src), dst) for src, dst in self.rows]
        self.to_checkpoint = [(compile_pattern(dst), src) for src, dst in self.rows]

    @staticmethod
    def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match:
                return template.format(**match.groupdict())
        return None

    def native_name(self, key: str) -> str | None:
        return self._rename(key, self.to_native)

    def checkpoint_name(self, key: str) -> str | None:
        return self._rename(key, self.to_checkpoint)


def names(keys: Iterable[str], limit: int = 6) -> str:
    """A short, sorted list of tensor names for an error line."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def safetensors_files(folder: Path, model_name: str) -> list[Path]:
    """The weight files of a checkpoint folder (sharded through model.safetensors.index.json, or not)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in shards if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{index}: shard(s) not found: {names(missing)}")
        return [folder / n for n in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights ({model_name} checkpoints are loaded from safetensors)")
    return files


def read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key in shapes:
                    raise UserError(f"{file}: tensor {key} is stored twice")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                state[key] = f.get_tensor(key)
    return state


def meta_state_shapes(model_class, config) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of `model_class(config)`, built on the meta device (no memory, no init)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    # Under DeepSpeed ZeRO-3, transformers would build the reference partitioned and initialise its (absent)
    # weights; hide the ZeRO-3 config from it for this one construction.
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        with torch.device("meta"):
            reference = model_class(config)
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
    return {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def check_layout(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str, model_name: str
) -> None:
    """One-line error naming missing, unexpected and mis-shaped tensors (checkpoint names), if any."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    mismatched = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {names(missing)}")
    if unexpected:
        problems.append(f"unexpected {names(unexpected)}")
    if mismatched:
        shown = [f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in mismatched[:6]]
        more = f" (and {len(mismatched) - 6} more)" if len(mismatched) > 6 else ""
        problems.append(f"wrong shape {', '.join(shown)}{more}")
    if problems:
        raise UserError(
            f"{where}: weights do not match the {model_name} model its config.json describes: " + "; ".join(problems)
        )


def split_qkv(key: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused [q; k; v] projection split by rows into its three parts (cloned: three views of one storage would
    look like tied parameters)."""
    if tensor.shape[0] % 3:
        raise UserError(f"tensor {key} has shape {tuple(tensor.shape)}: its first dimension is not 3 × hidden")
    q, k, v = (rows.clone() for rows in torch.chunk(tensor, 3, dim=0))
    return q, k, v


def fuse_qkv(
    parts: Mapping[tuple[str, str], Mapping[str, torch.Tensor]], native: str, fused: str
) -> dict[str, torch.Tensor]:
    """q / k / v parts collected per (layer, weight-or-bias) fused back under the `fused` name pattern; an incomplete
    triple raises naming the missing `native` names."""
    out = {}
    for (layer, wb), qkv in sorted(parts.items()):
        absent = [native.format(layer=layer, part=part, wb=wb) for part in "qkv" if part not in qkv]
        if absent:
            raise UserError(f"cannot fuse attn.qkv of vision layer {layer}: missing {names(absent)}")
        out[fused.format(layer=layer, wb=wb)] = torch.cat([qkv[part] for part in "qkv"], dim=0)
    return out
