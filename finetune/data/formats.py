"""Dataset adapters: public document datasets read as they are published, no hand conversion.

A data source written as a mapping (`data.train: {format: sroie, path: data/sroie, split: train}`, see
:class:`finetune.config.DataSource`) is read here into the same :class:`~finetune.data.sources.RawRecord` stream
as a JSONL file; strings keep :func:`finetune.data.sources.read_records`'s reading. Every record names its file
(`train/metadata.jsonl:7`, `train/entities/X51005.txt`, `annotations/0001.json`); a malformed one carries its
`problem` (strict runs stop on it, lenient runs count it), never a traceback. A missing folder is one line naming
the path and the layout expected.

- ``donut`` — Donut's layout (clovaai/donut): a folder per split with ``metadata.jsonl`` lines ``{"file_name":
  "x.png", "ground_truth": "<JSON string>"}``; or a Hub / saved dataset with those columns (``image``,
  ``ground_truth``: naver-clova-ix/cord-v2). The target is the ground truth's ``gt_parse``. A ground truth with
  ``gt_parses`` (a list: DocVQA's alternative answers) gives one sample per element, origin ``...:7
  (gt_parses[1])``: Donut draws one of them at random each time it reads the sample, one sample each is the same
  data, deterministically (an evaluation then scores each alternative on its own).
- ``sroie`` — ICDAR 2019 SROIE task 3: images and key files of the same stem, either in ``img/`` + ``entities/``
  (or ``key/``) subfolders (the common redistribution; a ``box/`` folder is ignored) or side by side (the
  competition's own zip). A key file (``.txt`` or ``.json``) is JSON ``{"company", "date", "address", "total"}``,
  kept as written (key order, missing keys). Published key files are not all clean: a UTF-8 byte-order mark, bytes
  that are not UTF-8 (read as Windows-1252), raw control characters or a trailing comma, and quotes left unescaped
  inside a value (read line by line, ``"key": "value",``) are all accepted. An OCR box file (lines of eight
  coordinates and a text, the task 1 ``.txt``) is not a key file: an image with only that is a bad sample.
- ``funsd`` — FUNSD: ``images/*.png`` + ``annotations/*.json`` (``dataset/training_data``, ``testing_data``;
  ``split: train`` / ``test`` picks them). Target: ``{"form": [entity, ...]}``, the entities in the annotation's
  order (as published; FUNSD's own order), each ``{"label": "header" | "question" | "answer" | "other", "text":
  "..."}``; a question also has ``"answers"``: the texts of the answers it links to (``linking``), in the
  annotation's order, ``[]`` when none. An answer linked to a question appears only under it; one linked to no
  question stays an entity of its own. Boxes, word boxes and header→question links are not kept (a target is
  text; a header stands before its questions in the order).
- ``jsonl`` (our JSONL), ``imagefolder`` (HF imagefolder: ``metadata.jsonl`` / ``.csv`` with ``file_name``) and
  ``hf`` (a Hub id, or a local saved dataset folder, with ``split`` and ``columns``) read as the string forms do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finetune.config import DataSource
from finetune.data.sources import (
    RawRecord,
    _from_jsonl,
    _from_rows,
    _load_dataset_folder,
    _NonFinite,
    _parse_float,
    loads_json,
    target_problem,
)
from finetune.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pdf")
LAYOUTS = {
    "jsonl": "a JSONL file of {image, target} lines",
    "imagefolder": "an imagefolder: images with metadata.jsonl or metadata.csv naming them in file_name",
    "hf": "a Hub dataset id or a folder saved with save_to_disk",
    "donut": (
        "a Donut folder (images with metadata.jsonl lines {file_name, ground_truth}) or a Hub / saved dataset "
        "with image and ground_truth columns"
    ),
    "sroie": "a SROIE folder: img/ + entities/ (or key/), or images and key .txt files side by side",
    "funsd": "a FUNSD folder: images/ + annotations/ (dataset/training_data, dataset/testing_data)",
}
_FUNSD_SPLITS = {"train": "training_data", "test": "testing_data"}
_BOX_LINE = re.compile(r"^\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,")
_KEY_LINE = re.compile(r'^\s*"([^"]+)"\s*:\s*"(.*)"\s*,?\s*$')


def as_source(value: Any) -> DataSource | None:
    """A DataSource from a DataSource or a mapping with a `format` (a recorded recipe's); None for anything else."""
    if isinstance(value, DataSource):
        return value
    if isinstance(value, dict) and "format" in value:
        try:
            return DataSource.model_validate(value)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"data source {dict(value)}: {where or 'mapping'}: {first['msg']}") from None
    return None


def read_source(spec: DataSource, image_column: str = "image", target_column: str = "target") -> Iterator[RawRecord]:
    """Records of a data source in a published layout (module docstring); `image_column` / `target_column`: the
    columns of jsonl / imagefolder / hf sources its `columns` do not name."""
    cols = spec.columns
    image = cols.image if cols and cols.image else image_column
    target = cols.target if cols and cols.target else target_column
    if spec.format == "jsonl":
        path = Path(spec.path)
        _require(spec, path.is_file())
        yield from _from_jsonl(path, image, target)
    elif spec.format == "imagefolder":
        folder = _folder(spec)
        _require(spec, (folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file())
        yield from _from_rows(_load_dataset_folder(folder), str(folder), image, target)
    elif spec.format == "hf":
        yield from _from_rows(_load_hf(spec), _hf_label(spec), image, target)
    elif spec.format == "donut":
        yield from _donut(spec, cols)
    elif spec.format == "sroie":
        yield from _sroie(_folder(spec))
    else:
        yield from _funsd(spec)


def count_source(spec: DataSource) -> int | None:
    """How many records `read_source(spec)` yields, when cheap to know (for progress displays only)."""
    folder = _folder(spec)
    if spec.format == "jsonl" or (spec.format == "donut" and (folder / "metadata.jsonl").is_file()):
        path = Path(spec.path) if spec.format == "jsonl" else folder / "metadata.jsonl"
        if not path.is_file():
            return None
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if spec.format == "funsd":
        found = _funsd_folder(spec)
        return len(list((found / "annotations").glob("*.json"))) if found else None
    return None


def missing_source(spec: DataSource) -> str | None:
    """`no such folder: ... (a SROIE folder: ...)` when the source's local folder or file is absent (a Hub dataset,
    which may be remote, is not checked here), else None."""
    try:
        if spec.format == "funsd":
            _funsd_folder(spec, required=True)
        elif spec.format == "jsonl":
            _require(spec, Path(spec.path).is_file())
        elif spec.format == "donut":
            if not (_folder(spec) / "metadata.jsonl").is_file() and not _hub_like(spec.path):
                _require(spec, Path(spec.path).is_dir() and _is_saved_dataset(Path(spec.path)))
        elif spec.format != "hf":
            _require(spec, _folder(spec).is_dir())
    except UserError as err:
        return str(err)
    return None


def source_location(source: Any) -> str:
    """What identifies a source's data, for "is it the same as data.train" checks: a local file or folder, or
    `hf:name:split` for a Hub dataset; a string source as it is."""
    spec = as_source(source)
    if spec is None:
        return str(source)
    if spec.format in ("hf", "donut") and not Path(spec.path).exists() and _hub_like(spec.path):
        return f"hf:{spec.path}:{spec.split or 'train'}"
    if spec.format == "hf" and spec.split:  # one split of a saved DatasetDict
        return f"{Path(spec.path)}#{spec.split}"
    if spec.format == "funsd":
        found = _funsd_folder(spec)
        return str(found) if found else str(_folder(spec))
    return str(Path(spec.path) if spec.format == "jsonl" else _folder(spec))


def source_stem(source: Any) -> str:
    """A short name for a source (output folder names): its file's or folder's name, split included."""
    spec = as_source(source)
    if spec is None:
        return Path(str(source)).stem
    name = Path(spec.path).stem or spec.format
    return f"{name}-{spec.split}" if spec.split else name


# --- layouts ---------------------------------------------------------------------------------------------------


def _folder(spec: DataSource) -> Path:
    return Path(spec.path) / spec.split if spec.split and spec.format not in ("hf", "jsonl") else Path(spec.path)


def _require(spec: DataSource, ok: bool, where: Path | None = None) -> None:
    """One line naming the path and the layout expected, unless `ok`."""
    if ok:
        return
    where = where or (Path(spec.path) if spec.format == "jsonl" else _folder(spec))
    if spec.format == "jsonl":
        what = "a folder, not a file" if where.is_dir() else "no such file"
    else:
        what = "no such folder" if not where.exists() else "not the layout expected"
    raise UserError(f"{where}: {what} (expected {LAYOUTS[spec.format]})")


def _hub_like(path: str) -> bool:
    return not path.startswith((".", "/", "~")) and path.count("/") <= 1


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _hf_label(spec: DataSource) -> str:
    return f"{spec.path}[{spec.split or 'train'}]"


def _load_hf(spec: DataSource):
    """A saved dataset folder (a DatasetDict: its `split`) or a Hub dataset (`split`, default train)."""
    import datasets

    path, split = Path(spec.path), spec.split or "train"
    try:
        if path.is_dir() and _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"{path}: no split '{split}' (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        if not path.exists() and not _hub_like(spec.path):
            _require(spec, False, path)
        return datasets.load_dataset(spec.path, split=split)
    except UserError:
        raise
    except Exception as err:  # the Hub unreachable, no such dataset or split, an unreadable folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{spec.path}: cannot load as {LAYOUTS[spec.format]} ({first})") from None


def _donut(spec: DataSource, cols) -> Iterator[RawRecord]:
    folder = _folder(spec)
    target_col = cols.target if cols and cols.target else "ground_truth"
    if (folder / "metadata.jsonl").is_file():
        image_col = cols.image if cols and cols.image else "file_name"
        records = _from_jsonl(folder / "metadata.jsonl", image_col, target_col)
    else:
        path = Path(spec.path)
        if path.exists() and not (path.is_dir() and _is_saved_dataset(path)):
            _require(spec, False, folder)
        if not path.exists() and not _hub_like(spec.path):
            _require(spec, False, folder)
        image_col = cols.image if cols and cols.image else "image"
        records = _from_rows(_load_hf(spec), _hf_label(spec), image_col, target_col)
    for record in records:
        yield from _gt_parse(record, target_col)


def _gt_parse(record: RawRecord, column: str) -> Iterator[RawRecord]:
    if record.problem:
        yield record
        return
    truth = record.target
    if isinstance(truth, dict) and isinstance(truth.get("gt_parses"), list):
        for i, parse in enumerate(truth["gt_parses"]):
            origin = f"{record.origin} (gt_parses[{i}])"
            if not isinstance(parse, dict):
                yield RawRecord([], None, origin, f"field '{column}': gt_parses[{i}] is not a JSON object")
            else:
                yield RawRecord(record.images, parse, origin)
        return
    if not isinstance(truth, dict) or not isinstance(truth.get("gt_parse"), dict):
        keys = f"keys: {', '.join(truth)}" if isinstance(truth, dict) else f"a {type(truth).__name__}"
        yield RawRecord([], None, record.origin, f"field '{column}' has no gt_parse object ({keys})")
        return
    yield RawRecord(record.images, truth["gt_parse"], record.origin)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.suffix.lower() != ".pdf":
            found.setdefault(path.stem, path)
    return found


def _sroie(folder: Path) -> Iterator[RawRecord]:
    spec_layout = LAYOUTS["sroie"]
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected {spec_layout})")
    image_dir = next((folder / n for n in ("img", "images") if (folder / n).is_dir()), None)
    key_dir = next((folder / n for n in ("entities", "key", "keys") if (folder / n).is_dir()), None)
    if (image_dir is None) != (key_dir is None):
        has, lacks = ("img/", "entities/ (or key/)") if key_dir is None else ("entities/", "img/")
        raise UserError(f"{folder}: has {has} but no {lacks} (expected {spec_layout})")
    image_dir, key_dir = image_dir or folder, key_dir or folder
    images = _images_by_stem(image_dir)
    keys: dict[str, Path] = {}
    for path in sorted(key_dir.iterdir()):
        if path.is_file() and path.suffix.lower() in (".txt", ".json"):
            keys.setdefault(path.stem, path)
    if not images and not keys:
        raise UserError(f"{folder}: no images and no key files (expected {spec_layout})")
    for stem in sorted(set(images) | set(keys)):
        image, key = images.get(stem), keys.get(stem)
        if key is None:
            yield RawRecord([], None, str(image), f"no key file {stem}.txt in {key_dir} for this image", "no key file")
        elif image is None:
            yield RawRecord([], None, str(key), f"no image {stem}.jpg (or .png) in {image_dir}", "no image")
        else:
            target, problem, reason = _sroie_key(key)
            yield RawRecord([image], target, str(key), problem, reason)


def _sroie_key(path: Path) -> tuple[Any, str | None, str]:
    """(target, problem, reason) of one SROIE key file, read as tolerantly as the published files need."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    text = text.strip()
    if not text:
        return None, "key file is empty", "malformed record"
    if not text.startswith("{") and _BOX_LINE.match(text):
        problem = "an OCR box file (coordinates and text per line), not a key file {company, date, address, total}"
        return None, problem, "OCR box file, not a key file"
    try:
        target = json.loads(
            re.sub(r",\s*}\s*$", "}", text), strict=False, parse_constant=_NonFinite, parse_float=_parse_float
        )
    except json.JSONDecodeError as err:
        pairs = [m.groups() for line in text.splitlines() if (m := _KEY_LINE.match(line))]
        if not pairs:
            return None, f"key file is not JSON ({err.msg} at line {err.lineno} column {err.colno})", "malformed record"
        target = dict(pairs)
    if not isinstance(target, dict):
        return None, f"key file is not a JSON object (got {type(target).__name__})", "malformed record"
    found = target_problem(target)
    return (None, found[1], found[0]) if found else (target, None, "")


def _funsd_folder(spec: DataSource, required: bool = False) -> Path | None:
    base = Path(spec.path)
    sub = _FUNSD_SPLITS.get(spec.split, spec.split) if spec.split else None
    candidates = [base / sub, base / "dataset" / sub] if sub else [base]
    for folder in candidates:
        if (folder / "annotations").is_dir() and (folder / "images").is_dir():
            return folder
    if required:
        folder = candidates[0]
        what = "no such folder" if not folder.is_dir() else "no images/ and annotations/ in it"
        raise UserError(f"{folder}: {what} (expected {LAYOUTS['funsd']})")
    return None


def _funsd(spec: DataSource) -> Iterator[RawRecord]:
    folder = _funsd_folder(spec, required=True)
    images = _images_by_stem(folder / "images")
    annotations = {p.stem: p for p in sorted((folder / "annotations").glob("*.json"))}
    if not annotations and not images:
        raise UserError(f"{folder}: no annotations and no images (expected {LAYOUTS['funsd']})")
    for stem in sorted(set(images) | set(annotations)):
        image, annotation = images.get(stem), annotations.get(stem)
        if annotation is None:
            yield RawRecord([], None, str(image), f"no annotation {stem}.json for this image", "no annotation")
        elif image is None:
            yield RawRecord([], None, str(annotation), f"no image {stem}.png in {folder / 'images'}", "no image")
        else:
            target, problem = _funsd_target(annotation)
            yield RawRecord([image], target, str(annotation), problem)


def _funsd_target(path: Path) -> tuple[Any, str | None]:
    try:
        data = loads_json(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, "annotation is not valid UTF-8"
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        return None, f"annotation is not JSON ({getattr(err, 'msg', err)})"
    form = data.get("form") if isinstance(data, dict) else None
    if not isinstance(form, list):
        return None, "annotation has no 'form' list"
    by_id: dict[Any, dict] = {}
    for i, entity in enumerate(form):
        if not isinstance(entity, dict) or not all(k in entity for k in ("id", "text", "label")):
            return None, f"form[{i}] is not an entity with id, text and label"
        by_id[entity["id"]] = entity
    answers_of: dict[Any, set] = {}  # question id → its answers' ids, in the annotation's order
    linked_answers = set()
    for entity in form:
        for link in entity.get("linking") or []:
            if not (isinstance(link, list) and len(link) == 2 and all(end in by_id for end in link)):
                return None, f"entity {entity['id']}: link {link!r} does not name two entities of the form"
            a, b = (by_id[end] for end in link)
            if {a["label"], b["label"]} == {"question", "answer"}:
                q, ans = (a, b) if a["label"] == "question" else (b, a)
                answers_of.setdefault(q["id"], set()).add(ans["id"])
                linked_answers.add(ans["id"])
    entries = []
    for entity in form:
        if entity["label"] == "answer" and entity["id"] in linked_answers:
            continue
        entry = {"label": entity["label"], "text": entity["text"]}
        if entity["label"] == "question":
            ids = answers_of.get(entity["id"], set())
            entry["answers"] = [e["text"] for e in form if e["id"] in ids]
        entries.append(entry)
    target = {"form": entries}
    found = target_problem(target)
    return (None, found[1]) if found else (target, None)
