"""The instruction prompt and the canonical form of JSON targets.

The prompt follows the style of the models' own cards: an instruction, then a JSON skeleton of the expected
answer with empty values, e.g. ``Extract ... into JSON format: {"name": "", "items": [{"qty": 0}]}``.

Targets are serialised canonically — keys in the skeleton's order (unknown keys after them, sorted), compact
separators, unicode kept — so the same object always becomes the same token sequence, and the model learns
to emit fields in the order the prompt lists them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def derive_skeleton(targets: Iterable[dict]) -> dict:
    """A skeleton covering every key seen in the targets (first-seen order), values replaced by empties."""
    skeleton: Any = None
    for target in targets:
        skeleton = _merge(skeleton, _empty_like(target))
    return skeleton or {}


def render_instruction(instruction: str, skeleton: dict) -> str:
    """The user turn's text: the instruction followed by the one-line skeleton."""
    return f"{instruction.rstrip()} {json.dumps(skeleton, ensure_ascii=False)}"


def canonical_json(value: Any, skeleton: Any = None) -> str:
    """Compact JSON of `value` with keys ordered like `skeleton` (then the rest, sorted)."""
    return json.dumps(_order_like(value, skeleton), ensure_ascii=False, separators=(",", ":"))


def _empty_like(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _empty_like(v) for k, v in value.items()}
    if isinstance(value, list):
        merged = None
        for item in value:
            merged = _merge(merged, _empty_like(item))
        return [] if merged is None else [merged]
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return 0
    return ""  # strings and null: shown as "" like the model cards' prompts


def _merge(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = _merge(merged.get(key), value)
        return merged
    if isinstance(a, list) and isinstance(b, list):
        items = [x for x in (a[:1] + b[:1])]
        merged = None
        for item in items:
            merged = _merge(merged, item)
        return [] if merged is None else [merged]
    return a  # conflicting kinds: the first seen wins in the skeleton; targets are never changed


def _order_like(value: Any, skeleton: Any) -> Any:
    if isinstance(value, dict):
        template = skeleton if isinstance(skeleton, dict) else {}
        keys = [k for k in template if k in value] + sorted(k for k in value if k not in template)
        return {k: _order_like(value[k], template.get(k)) for k in keys}
    if isinstance(value, list):
        item_template = skeleton[0] if isinstance(skeleton, list) and skeleton else None
        return [_order_like(item, item_template) for item in value]
    return value
