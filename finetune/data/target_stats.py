"""Per-field statistics of a split's targets: how often each field of the skeleton is missing, empty or null.

A field is named by its path in the skeleton: nested objects flattened (`vendor.name`), list items as `items[]`
(`items[].description`). Each field is counted where it can occur, i.e. in every object that holds it (a
top-level field: every target; `vendor.name`: every target whose `vendor` is an object; `items[].description`:
every item object of every `items` list), as exactly one of:

- `missing`: the key is absent (in the training targets this makes the key optional in the answer schema,
  see finetune/schema.py);
- `null`: the value is null (always allowed by the answer schema: "not on this page");
- `empty`: `""`, `[]` or `{}`;
- `present`: any other value.

`of` is the number of such objects, the sum of the four counts.
"""

from __future__ import annotations

from typing import Any

COUNTS = ("present", "missing", "empty", "null")
_SHOWN = 6  # fields named in the warning line; the rest are counted ("and 3 more")


def _is_empty(value: Any) -> bool:
    return (isinstance(value, str) and value == "") or (isinstance(value, (list, dict)) and not value)


def target_field_stats(skeleton: dict, targets: list[dict]) -> dict[str, dict[str, int]]:
    """{field path: {"of": n, "present": .., "missing": .., "empty": .., "null": ..}} in skeleton order."""
    out: dict[str, dict[str, int]] = {}
    _walk(skeleton, list(targets), "", out)
    return out


def _walk(node: Any, values: list, path: str, out: dict[str, dict[str, int]]) -> None:
    # `values`: what the targets hold at `path` (present or empty; never missing or null).
    if isinstance(node, dict):
        objects = [v for v in values if isinstance(v, dict)]
        for key, sub in node.items():
            name = f"{path}.{key}" if path else key
            counts = {"of": len(objects), **dict.fromkeys(COUNTS, 0)}
            held = []
            for obj in objects:
                if key not in obj:
                    counts["missing"] += 1
                elif obj[key] is None:
                    counts["null"] += 1
                else:
                    counts["empty" if _is_empty(obj[key]) else "present"] += 1
                    held.append(obj[key])
            out[name] = counts
            _walk(sub, held, name, out)
    elif isinstance(node, list) and node:
        items = [item for v in values if isinstance(v, list) for item in v]
        _walk(node[0], items, f"{path}[]", out)


def missing_or_empty_warning(split: str, stats: dict[str, dict[str, int]], *, shapes_schema: bool) -> str | None:
    """One line naming the fields missing or empty in some targets, or None when there are none.

    `shapes_schema`: these targets refine the answer schema (the training split's), so a missing key there makes
    the field optional in it; said only when some field is missing."""
    parts, missing = [], False
    for name, c in stats.items():
        unit = " list items" if "[]" in name else ""
        for kind in ("missing", "empty"):
            if c[kind]:
                parts.append(f"{name} {kind} in {c[kind]} of {c['of']}{unit}")
                missing = missing or kind == "missing"
    if not parts:
        return None
    note = " (a missing field becomes optional in the answer schema)" if shapes_schema and missing else ""
    more = f", and {len(parts) - _SHOWN} more (see data_report.json)" if len(parts) > _SHOWN else ""
    return f"{split}: fields missing or empty in some targets{note}: {', '.join(parts[:_SHOWN])}{more}"
