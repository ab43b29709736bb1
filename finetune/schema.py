"""The JSON Schema of an answer: from the prompt skeleton, refined by the training targets when they are known.

The skeleton fixes the structure and key order (the order targets are serialised in and a constrained decoder
writes keys in). The targets, when given, say what the data really holds, so that the gold answers themselves
conform:

- a key is required only if every target that has the enclosing object has it (the skeleton is the union of all
  targets' keys, so some keys are optional);
- a leaf allows the JSON types seen at its path in the targets (a field that is a number in one target and a
  string in another allows both), plus null — a model may always say "not on this page";
- an object or list allows null where a target had null there;
- no keys beyond the skeleton's (`additionalProperties: false`).

Without targets (a skeleton alone): every key required, leaf types from the skeleton's empty values ("" string,
0 number, false boolean), leaves nullable. A list takes its first item's shape; a list whose items are never seen
allows strings, numbers, booleans or null.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_MISSING = object()


def json_type(value: Any) -> str:
    """The JSON type name of a Python value (bool before number: True is an int in Python)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not a JSON value: {value!r}")


def schema_from_skeleton(skeleton: dict, examples: list | None = None) -> dict:
    """Draft 2020-12 JSON Schema for answers shaped like `skeleton`, refined by `examples` (training targets)."""
    if not isinstance(skeleton, dict):
        raise TypeError(f"skeleton must be a JSON object, got {type(skeleton).__name__}")
    return {"$schema": DRAFT, **_schema(skeleton, None if examples is None else list(examples))}


def _schema(node: Any, seen: list | None) -> dict:
    # `seen`: the values the examples hold at this path (None: no examples known, use the skeleton alone).
    nullable = seen is not None and any(v is None for v in seen)
    present = [] if seen is None else [v for v in seen if v is not None]
    if isinstance(node, dict):
        objects = [v for v in present if isinstance(v, dict)]
        known = seen is not None and objects
        schema = {
            "type": ["object", "null"] if nullable else "object",
            "properties": {
                key: _schema(value, [o[key] for o in objects if key in o] if known else None)
                for key, value in node.items()
            },
            "required": [k for k in node if all(k in o for o in objects)] if known else list(node),
            "additionalProperties": False,
        }
        return schema
    if isinstance(node, list):
        items = [item for v in present if isinstance(v, list) for item in v]
        if node:
            item_schema = _schema(node[0], items if seen is not None else None)
        else:
            kinds = sorted({json_type(i) for i in items if not isinstance(i, (dict, list))} | {"null"})
            item_schema = {"type": kinds if len(kinds) > 1 else ["string", "number", "boolean", "null"]}
        return {"type": ["array", "null"] if nullable else "array", "items": item_schema}
    kinds = {json_type(v) for v in present if not isinstance(v, (dict, list))} or {
        json_type("" if node is None else node)
    }
    return {"type": [*sorted(kinds), "null"]}


def conforms(value: Any, schema: dict) -> bool:
    """True if `value` is valid against `schema` (Draft 2020-12)."""
    return Draft202012Validator(schema).is_valid(value)


def read_skeleton(value: str | dict, option: str = "--skeleton") -> dict:
    """A prompt skeleton given on the command line: a JSON object, as a JSON string or the path of a JSON file;
    anything else is one line `{option}: ...` (a `UserError`)."""
    import json
    from pathlib import Path

    from finetune.errors import UserError

    if isinstance(value, dict):
        skeleton = value
    else:
        text, where = value, "not valid JSON"
        looks_json = value.lstrip().startswith(("{", "["))
        if not looks_json and Path(value).expanduser().is_file():
            try:
                text, where = Path(value).expanduser().read_text(encoding="utf-8"), f"{value}: not valid JSON"
            except (OSError, UnicodeDecodeError) as err:
                raise UserError(f"{option}: {value}: unreadable ({getattr(err, 'strerror', None) or err})") from None
        elif not looks_json:
            raise UserError(f"{option}: {value!r} is neither a JSON object nor a JSON file")
        try:
            skeleton = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{option}: {where} (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(skeleton, dict) or not skeleton:
        raise UserError(f"{option}: needs a non-empty JSON object (the answer's keys), got {json.dumps(skeleton)[:60]}")
    return skeleton
