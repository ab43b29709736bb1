"""Reading image→JSON pairs from a JSONL file, a Hugging Face dataset, or any Python iterable.

Every record keeps its origin (`file.jsonl:17`, `dataset row 17`, `item 17`) so a bad sample can be named.
A record that cannot be used as read (a line that is not valid UTF-8 or not JSON, a missing field, a target that
nests deeper than :data:`MAX_JSON_DEPTH` levels or holds a non-finite number) carries its `problem` instead of
raising, so strict mode names it and lenient mode counts it. Nothing here decodes images;
:mod:`finetune.data.dataset` validates them.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.errors import UserError

# A target may nest objects / lists this many levels deep (a flat object is 1 level). Real documents need a few;
# a deeper one is a generator bug or a hostile file (Python's JSON reader gives up, with RecursionError, near 1,000).
MAX_JSON_DEPTH = 64


@dataclass
class RawRecord:
    """One sample as read: image references (paths or PIL images), the target as given, where it came from."""

    images: list[Any]
    target: Any
    origin: str
    problem: str | None = None  # set when the record itself is malformed (not valid JSON, missing field, ...)
    reason: str = "malformed record"  # what a lenient run counts the problem as in the data report
    text: str | None = None  # the target as given, when it is a string that is not JSON


def read_records(
    source: str | Path | Iterable, *, image_column: str = "image", target_column: str = "target"
) -> Iterator[RawRecord]:
    """Records from a JSONL path, a dataset folder (`save_to_disk` or imagefolder with metadata.jsonl),
    `hf:org/name[:split]`, a `datasets.Dataset`, an iterable of dicts, or a source in a published layout (a
    :class:`~finetune.config.DataSource`, or a mapping with a `format`: :mod:`finetune.data.formats`)."""
    from finetune.data.formats import as_source, read_source

    spec = as_source(source)
    if spec is not None:
        yield from read_source(spec, image_column, target_column)
        return
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("hf:"):
            yield from _from_rows(_load_hub_dataset(text[3:]), f"{text}", image_column, target_column)
            return
        path = Path(source)
        if path.is_dir():
            yield from _from_rows(_load_dataset_folder(path), str(path), image_column, target_column)
            return
        yield from _from_jsonl(path, image_column, target_column)
        return
    yield from _from_rows(source, "item", image_column, target_column)


def count_records(source: str | Path | Iterable) -> int | None:
    """How many records `read_records(source)` will yield, when that is cheap to know (a JSONL file: its non-blank
    lines; anything with a length), else None. For progress displays, not for validation."""
    from finetune.data.formats import as_source, count_source

    spec = as_source(source)
    if spec is not None:
        return count_source(spec)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if str(source).startswith("hf:") or not path.is_file():
            return None
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    return len(source) if hasattr(source, "__len__") else None


def _from_jsonl(path: Path, image_column: str, target_column: str) -> Iterator[RawRecord]:
    if not path.is_file():
        raise UserError(f"{path}: no such file" + (" (a folder must be a saved dataset)" if path.is_dir() else ""))
    base = path.parent
    # Bytes, decoded line by line: one line that is not UTF-8 is one bad sample, not an unreadable file.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            origin = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(raw[: err.start].decode("utf-8")) + 1
                problem = f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})"
                yield RawRecord([], None, origin, problem, "not valid UTF-8")
                continue
            try:
                row = loads_json(line)
            except RecursionError:
                problem = f"line nests deeper than {MAX_JSON_DEPTH} levels (too deep for the JSON reader)"
                yield RawRecord([], None, origin, problem, "nested too deep")
                continue
            except json.JSONDecodeError as err:
                yield RawRecord([], None, origin, f"invalid JSON line ({err.msg} at column {err.colno})")
                continue
            except ValueError as err:  # e.g. an integer literal of more than 4,300 digits
                yield RawRecord([], None, origin, f"invalid JSON line ({err})")
                continue
            if not isinstance(row, dict):
                yield RawRecord([], None, origin, "line is not a JSON object")
                continue
            record = _record(row, origin, image_column, target_column)
            record.images = [base / p if isinstance(p, str) else p for p in record.images]
            yield record


def _from_rows(rows: Iterable, label: str, image_column: str, target_column: str) -> Iterator[RawRecord]:
    rows = _undecoded_images(rows, image_column)
    for index, row in enumerate(rows):
        origin = f"{label} row {index}" if label != "item" else f"item {index}"
        if not isinstance(row, dict):
            yield RawRecord([], None, origin, f"expected a mapping, got {type(row).__name__}")
            continue
        yield _record(row, origin, image_column, target_column)


def _record(row: dict, origin: str, image_column: str, target_column: str) -> RawRecord:
    if image_column not in row:
        return RawRecord([], None, origin, f"field '{image_column}' is missing")
    if target_column not in row:
        return RawRecord([], None, origin, f"field '{target_column}' is missing")
    images = row[image_column]
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        return RawRecord([], None, origin, f"field '{image_column}' is an empty list")
    bad = [type(i).__name__ for i in images if not isinstance(i, (str, Path, Image.Image, dict))]
    if bad:
        return RawRecord([], None, origin, f"field '{image_column}' holds {bad[0]}, expected a path or an image")
    target = row[target_column]
    if isinstance(target, str):  # datasets often store nested JSON as a string column
        try:
            target = loads_json(target)
        except RecursionError:
            problem = f"target nests deeper than {MAX_JSON_DEPTH} levels (too deep for the JSON reader)"
            return RawRecord(images, None, origin, problem, "nested too deep")
        except json.JSONDecodeError as err:
            problem = f"field '{target_column}' is a string but not JSON ({err.msg})"
            return RawRecord(images, None, origin, problem, text=row[target_column])
        except ValueError as err:
            problem = f"field '{target_column}' is a string but not JSON ({err})"
            return RawRecord(images, None, origin, problem, text=row[target_column])
    found = target_problem(target)
    if found is not None:
        reason, problem = found
        return RawRecord(images, None, origin, problem, reason)
    return RawRecord(images, target, origin)


class _NonFinite(float):
    """A number JSON cannot hold (`NaN`, `Infinity`, `1e999`), kept with its spelling so the message can quote it."""

    literal: str

    def __new__(cls, literal: str):
        value = super().__new__(cls, literal)
        value.literal = literal
        return value


def _parse_float(text: str) -> float:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def loads_json(text: str) -> Any:
    """`json.loads`, with `NaN` / `Infinity` / `-Infinity` (Python extensions, not JSON) and literals that overflow
    a float (`1e999`) parsed to markers that :func:`target_problem` reports, instead of silently becoming nan/inf."""
    return json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)


def target_problem(target: Any) -> tuple[str, str] | None:
    """(reason, message) for the first thing in `target` no JSON document could hold: nesting deeper than
    MAX_JSON_DEPTH levels, or a non-finite number. Iterative (a deep or cyclic Python object cannot overflow the
    stack); None when the target is fine."""
    stack: list[tuple[Any, tuple[str, ...], int]] = [(target, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.items())
        elif isinstance(value, (list, tuple)):
            children = list(enumerate(value))
        else:
            if _non_finite(value):
                literal = getattr(value, "literal", repr(value))
                where = ".".join(path) if path else "the top level"
                return "non-finite number", f"target holds a non-finite number ({literal}) at {where}"
            continue
        if depth + 1 > MAX_JSON_DEPTH:
            return "nested too deep", f"target nests deeper than {MAX_JSON_DEPTH} levels"
        stack.extend((child, (*path, str(key)), depth + 1) for key, child in reversed(children))
    return None


def _non_finite(value: Any) -> bool:
    if isinstance(value, numbers.Integral) or not isinstance(value, numbers.Real):  # bool is Integral
        return False
    try:
        return not math.isfinite(value)
    except (TypeError, ValueError, OverflowError):
        return False


def _undecoded_images(rows, image_column: str):
    """A `datasets.Dataset` whose image column yields encoded bytes, decoded only when a batch needs them:
    decoding here would keep every page of the dataset in memory on every rank."""
    try:
        import datasets
    except ImportError:
        return rows
    if isinstance(rows, datasets.Dataset) and isinstance(rows.features.get(image_column), datasets.Image):
        return rows.cast_column(image_column, datasets.Image(decode=False))
    return rows


def _load_dataset_folder(path: Path):
    import datasets

    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    if (path / "metadata.jsonl").exists() or (path / "metadata.csv").exists():
        return datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    raise UserError(f"{path}: a folder must be a saved dataset (save_to_disk) or an imagefolder with metadata.jsonl")


def _load_hub_dataset(spec: str):
    import datasets

    name, _, split = spec.partition(":")
    return datasets.load_dataset(name, split=split or "train")
