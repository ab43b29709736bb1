"""Bad input data is never lost and never silent: every bad sample is one `file:line: reason` line in strict mode
(`data.on_bad_sample: error`, a UserError the command line prints as one `error:` line, exit 2) and a counted skip
in lenient mode (`skip`, counted by reason in the data report). Cases: decompression-bomb images, lines that are not
UTF-8, targets nested too deep, non-finite numbers, empty files (an error in both modes) and duplicate samples
(kept, counted and warned about)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from finetune.config import DataSection
from finetune.data.dataset import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DataError,
    DocumentDataset,
    ImageTooLarge,
    load_image,
    prepare_samples,
)
from finetune.data.sources import MAX_JSON_DEPTH
from finetune.errors import UserError
from finetune.models import get_family
from tests.conftest import REPO

INSTRUCTION = 'Extract the details into JSON format: {"a": ""}'
SKELETON = {"a": ""}
GOOD = {"image": "ok.png", "target": {"a": "1"}}


# --- helpers -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family():
    return get_family("llava_onevision")


@pytest.fixture(scope="module")
def processor(family, tiny_llava):
    return family.load_processor(str(tiny_llava))


def prepare(source, family, processor, **kwargs):
    options = dict(
        split="train",
        family=family,
        processor=processor,
        instruction_text=INSTRUCTION,
        skeleton=SKELETON,
        max_length=4096,
    )
    options.update(kwargs)
    return prepare_samples(source, **options)


def write_lines(path: Path, rows: list) -> Path:
    """A JSONL file: dicts are dumped, str lines written as they are, bytes lines written raw."""
    data = b"".join(
        (r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n" for r in rows
    )
    path.write_bytes(data)
    return path


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A real, valid 1-bit PNG of `width`×`height` black pixels, streamed (a few KB on disk, little memory here)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def nested(levels: int) -> dict:
    """A target `levels` levels deep: {"a": {"a": ... {"a": "x"}}}."""
    value: object = "x"
    for _ in range(levels):
        value = {"a": value}
    return value  # type: ignore[return-value]


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (40, 40), "white").save(tmp_path / "ok.png")
    Image.new("RGB", (20, 10), "white").save(tmp_path / "wide.png")  # 200 pixels
    return tmp_path


def strict_error(source: Path, line: int, family, processor, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        prepare(source, family, processor, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{source}:{line}: "), message
    assert "\n" not in message
    return message


# --- 1. images over data.max_image_pixels ------------------------------------------------------------------------


def test_max_image_pixels_defaults_to_pils_limit_and_must_be_positive():
    assert DataSection.model_fields["max_image_pixels"].default == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
    assert DEFAULT_MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # PIL's own default
    with pytest.raises(ValueError):
        DataSection(train="t.jsonl", max_image_pixels=0)


def test_image_over_max_image_pixels_strict_and_skip(family, processor, folder):
    source = write_lines(folder / "d.jsonl", [{"image": "wide.png", "target": {"a": "1"}}, GOOD])
    message = strict_error(source, 2, family, processor, max_image_pixels=1599)
    assert message.endswith(f"image {folder / 'ok.png'} is 40×40 = 1,600 pixels, over data.max_image_pixels=1,599")
    samples, report = prepare(source, family, processor, max_image_pixels=1599, on_bad_sample="skip")
    assert len(samples) == 1 and report.read == 2 and report.skipped == {"image too large": 1}
    assert report.examples["image too large"] == f"{source}:2"
    samples, _ = prepare(source, family, processor, max_image_pixels=1600)  # at the limit: fine
    assert len(samples) == 2


def test_in_memory_images_are_checked_too(family, processor):
    rows = [{"image": Image.new("RGB", (20, 10)), "target": {"a": "1"}}]
    with pytest.raises(DataError, match=r"^item 0: image \(in-memory image\) is 20×10 = 200 pixels, over"):
        prepare(rows, family, processor, max_image_pixels=100)


def test_a_bomb_above_pils_own_refusal_is_a_bad_sample_not_a_crash(family, processor, folder):
    """14000×14000 is over twice PIL's limit, where Image.open itself raises DecompressionBombError; the size is read
    from the header and the image is never decoded (no 196 MB allocation)."""
    write_png_bomb(folder / "bomb.png", 14000, 14000)
    source = write_lines(folder / "d.jsonl", [GOOD, {"image": "bomb.png", "target": {"a": "2"}}, GOOD])
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        message = strict_error(source, 2, family, processor)
        assert message.endswith("is 14000×14000 = 196,000,000 pixels, over data.max_image_pixels=89,478,485")
        samples, report = prepare(source, family, processor, on_bad_sample="skip")
    assert len(samples) == 2 and report.skipped == {"image too large": 1}
    assert before == Image.MAX_IMAGE_PIXELS  # PIL's global is left as it was


def test_the_recipe_limit_applies_whatever_pils_global_says(family, processor, folder, monkeypatch):
    """With PIL's process-wide limit far lower (1,000), a 40×40 image (1,600 px: PIL warns) and a 100×100 one
    (10,000 px: PIL refuses) load under a recipe limit of 20,000, in validation and per batch; PIL's global stays."""
    Image.new("RGB", (100, 100), "white").save(folder / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    source = write_lines(folder / "d.jsonl", [GOOD, {"image": "big.png", "target": {"a": "2"}}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        samples, report = prepare(source, family, processor, max_image_pixels=20_000)
        assert report.kept == 2
        dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=INSTRUCTION)
        assert dataset[1]["input_ids"]  # decoded again for the batch, without PIL's limit getting in the way
        assert load_image(folder / "big.png", max_pixels=20_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageTooLarge, match=r"is 100×100 = 10,000 pixels, over data\.max_image_pixels=5,000$"):
        load_image(folder / "big.png", max_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == 1000


# --- 2. lines that are not UTF-8 ---------------------------------------------------------------------------------


def test_a_line_that_is_not_utf8_is_one_bad_sample(family, processor, folder):
    bad = b'{"image": "ok.png", "target": {"a": "caf\xc3\xa9 \xff"}}'
    column = len(bad[: bad.index(b"\xff")].decode()) + 1  # in characters, like JSON's columns
    source = write_lines(folder / "d.jsonl", [GOOD, bad, GOOD])
    message = strict_error(source, 2, family, processor)
    assert message.endswith(f"not valid UTF-8 (byte 0xff at column {column})")
    samples, report = prepare(source, family, processor, on_bad_sample="skip")
    assert len(samples) == 2 and report.read == 3  # the other lines still read
    assert report.skipped == {"not valid UTF-8": 1} and report.examples["not valid UTF-8"] == f"{source}:2"


def test_an_integer_too_long_for_python_is_a_bad_line_not_a_crash(family, processor, folder):
    """Python refuses integer literals of more than 4,300 digits (a ValueError that is not a JSONDecodeError)."""
    line = '{"image": "ok.png", "target": {"a": %s}}' % ("9" * 5000)
    source = write_lines(folder / "d.jsonl", [GOOD, line])
    assert "invalid JSON line (Exceeds the limit (4300 digits)" in strict_error(source, 2, family, processor)
    rows = [{"image": Image.new("RGB", (40, 40)), "target": '{"a": %s}' % ("9" * 5000)}]
    with pytest.raises(DataError, match=r"^item 0: field 'target' is a string but not JSON \(Exceeds the limit"):
        prepare(rows, family, processor)


# --- 3. targets nested too deep ----------------------------------------------------------------------------------


def test_a_target_nested_deeper_than_the_limit_is_a_bad_sample(family, processor, folder):
    assert MAX_JSON_DEPTH == 64
    deepest = {"image": "ok.png", "target": nested(MAX_JSON_DEPTH)}
    too_deep = {"image": "ok.png", "target": nested(MAX_JSON_DEPTH + 1)}
    # Far too deep for Python's JSON reader (RecursionError), in the target and elsewhere on the line.
    unreadable = '{"image": "ok.png", "target": ' + "[" * 5000 + "]" * 5000 + "}"
    elsewhere = '{"image": "ok.png", "target": {"a": "1"}, "notes": ' + "[" * 5000 + "]" * 5000 + "}"
    source = write_lines(folder / "d.jsonl", [deepest, too_deep, unreadable, elsewhere])
    message = strict_error(source, 2, family, processor)
    assert message.endswith("target nests deeper than 64 levels")
    samples, report = prepare(source, family, processor, on_bad_sample="skip")
    assert len(samples) == 1 and samples[0].target == deepest["target"]
    assert report.skipped == {"nested too deep": 3}
    only_unreadable = write_lines(folder / "u.jsonl", [GOOD, unreadable])
    assert "nests deeper than 64 levels" in strict_error(only_unreadable, 2, family, processor)


def test_deep_targets_from_python_and_from_json_strings(family, processor):
    rows = [
        {"image": Image.new("RGB", (40, 40)), "target": nested(200)},  # a Python object
        {"image": Image.new("RGB", (40, 40)), "target": "[" * 5000 + "]" * 5000},  # a dataset's JSON-string column
    ]
    cycle: dict = {}
    cycle["a"] = cycle  # walked iteratively and bounded: a cycle is just too deep
    rows.append({"image": Image.new("RGB", (40, 40)), "target": cycle})
    with pytest.raises(DataError, match=r"^item 0: target nests deeper than 64 levels$"):
        prepare(rows[:1], family, processor)
    with pytest.raises(DataError, match=r"^item 0: target nests deeper than 64 levels"):
        prepare(rows[1:2], family, processor)
    _, report = prepare(rows, family, processor, on_bad_sample="skip")
    assert report.skipped == {"nested too deep": 3}


# --- 4. non-finite numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_in_jsonl_are_bad_samples(family, processor, folder, literal):
    line = json.dumps({"image": "ok.png", "target": {"a": "1", "items": [{"price": 0}]}}).replace("0}", literal + "}")
    source = write_lines(folder / "d.jsonl", [GOOD, line])
    message = strict_error(source, 2, family, processor)
    assert message.endswith(f"target holds a non-finite number ({literal}) at items.0.price")
    samples, report = prepare(source, family, processor, on_bad_sample="skip")
    assert len(samples) == 1 and report.skipped == {"non-finite number": 1}


def test_non_finite_numbers_from_python_and_from_json_strings(family, processor):
    rows = [
        {"image": Image.new("RGB", (40, 40)), "target": {"a": "1", "items": [{"price": float("nan")}]}},
        {"image": Image.new("RGB", (40, 40)), "target": '{"a": "1", "total": Infinity}'},
        {"image": Image.new("RGB", (40, 40)), "target": {"a": "1", "total": 2.5}},
    ]
    with pytest.raises(DataError, match=r"^item 0: target holds a non-finite number \(nan\) at items\.0\.price$"):
        prepare(rows, family, processor)
    with pytest.raises(DataError, match=r"^item 0: target holds a non-finite number \(Infinity\) at total$"):
        prepare(rows[1:], family, processor)
    samples, report = prepare(rows, family, processor, on_bad_sample="skip")
    assert [s.target["total"] for s in samples] == [2.5] and report.skipped == {"non-finite number": 2}


# --- 5. empty files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["zero bytes", "blank lines"])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_an_empty_file_is_one_line_in_both_modes(family, processor, tmp_path, content, mode):
    source = tmp_path / "d.jsonl"
    source.write_bytes(content)
    with pytest.raises(UserError) as err:
        prepare(source, family, processor, on_bad_sample=mode)
    assert str(err.value).startswith(f"{source}: no samples (the file is empty")
    assert "\n" not in str(err.value)


def test_an_empty_iterable_is_left_to_the_caller(family, processor):
    samples, report = prepare([], family, processor)  # no file to name: the caller says which split is empty
    assert samples == [] and report.read == 0


# --- 6. duplicate samples ----------------------------------------------------------------------------------------


def test_duplicates_are_kept_counted_and_named(family, processor, folder):
    rows = [
        GOOD,
        {"image": "ok.png", "target": {"a": "2"}},  # same image, other target: not a duplicate
        GOOD,
        {"image": "./ok.png", "target": {"a": "1"}},  # the same file, spelt differently
        {"image": ["ok.png", "ok.png"], "target": {"a": "1"}},  # other images
        GOOD,
    ]
    source = write_lines(folder / "d.jsonl", rows)
    for mode in ("error", "skip"):
        samples, report = prepare(source, family, processor, on_bad_sample=mode)
        assert len(samples) == 6 and report.kept == 6 and not report.skipped  # kept: maybe deliberate oversampling
        assert report.duplicates == 3
        assert report.duplicate_examples == [f"{source}:3 duplicates {source}:1", f"{source}:4 duplicates {source}:1"]
        warning = report.duplicates_warning()
        assert f"{source}:3 duplicates {source}:1, {source}:4 duplicates {source}:1" in warning
        assert "3 samples" in warning and "kept" in warning and "\n" not in warning
        assert "3 duplicates kept" in report.summary()
    _, clean = prepare(write_lines(folder / "c.jsonl", rows[:2]), family, processor)
    assert clean.duplicates == 0 and clean.duplicates_warning() is None and "duplicate" not in clean.summary()


def test_duplicates_of_in_memory_and_embedded_images(family, processor, folder):
    png = (folder / "ok.png").read_bytes()
    rows = [
        {"image": Image.new("RGB", (40, 40), "red"), "target": {"a": "1"}},
        {"image": Image.new("RGB", (40, 40), "red"), "target": {"a": "1"}},  # equal pixels
        {"image": Image.new("RGB", (40, 40), "blue"), "target": {"a": "1"}},
        {"image": {"bytes": png, "path": None}, "target": {"a": "1"}},
        {"image": {"bytes": png, "path": None}, "target": {"a": "1"}},
    ]
    _, report = prepare(rows, family, processor)
    assert report.duplicates == 2
    assert report.duplicate_examples == ["item 1 duplicates item 0", "item 4 duplicates item 3"]


# --- the data report and the warnings of a run --------------------------------------------------------------------


def test_a_lenient_run_counts_every_case_in_data_report_json(family, processor, folder, tiny_llava):
    from finetune.recipe import load_recipe
    from finetune.resolve import resolve_recipe
    from finetune.training.train_data import TrainData

    write_png_bomb(folder / "bomb.png", 14000, 14000)
    train = write_lines(
        folder / "train.jsonl",
        [
            GOOD,
            {"image": "bomb.png", "target": {"a": "1"}},
            b'{"image": "ok.png", "target": {"a": "\xff"}}',
            {"image": "ok.png", "target": nested(100)},
            '{"image": "ok.png", "target": {"a": NaN}}',
            GOOD,
            {"image": "ok.png", "target": {"a": "2"}},
        ],
    )
    recipe_file = folder / "r.yaml"
    recipe_file.write_text(f"model: {{family: llava_onevision, path: {tiny_llava}}}\ndata: {{train: {train}}}\n")
    recipe = resolve_recipe(load_recipe(recipe_file, ["data.on_bad_sample=skip"]), family)
    data = TrainData(recipe, family, processor)
    assert len(data.train_samples) == 3
    duplicate_lines = [w for w in data.warnings if "duplicates" in w]
    assert duplicate_lines == [data.reports[0].duplicates_warning()]
    assert f"{train}:6 duplicates {train}:1" in duplicate_lines[0]
    data.write_report(folder)
    report = json.loads((folder / "data_report.json").read_text())["train"]
    assert report["read"] == 7 and report["kept"] == 3
    assert report["skipped"] == {
        "image too large": 1,
        "not valid UTF-8": 1,
        "nested too deep": 1,
        "non-finite number": 1,
    }
    assert report["first_skipped_at"]["not valid UTF-8"] == f"{train}:3"
    assert report["duplicates"] == 1 and report["first_duplicates"] == [f"{train}:6 duplicates {train}:1"]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_an_empty_split_file_stops_a_run_with_one_line(family, processor, folder, tiny_llava, split):
    from finetune.recipe import load_recipe
    from finetune.resolve import resolve_recipe
    from finetune.training.train_data import TrainData

    files = {name: write_lines(folder / f"{name}.jsonl", [GOOD]) for name in ("train", "val", "test")}
    files[split].write_bytes(b"\n\n")
    recipe_file = folder / "r.yaml"
    recipe_file.write_text(
        f"model: {{family: llava_onevision, path: {tiny_llava}}}\ndata: {json.dumps(files, default=str)}\n"
    )
    eval_split = "test" if split == "test" else "val"
    recipe = resolve_recipe(load_recipe(recipe_file, [f"eval.split={eval_split}", "data.on_bad_sample=skip"]), family)
    with pytest.raises(UserError) as err:
        TrainData(recipe, family, processor)
    assert str(err.value) == f"{files[split]}: no samples (the file is empty: blank lines only)"


# --- through the command line: one `error:` line, exit code 2, no traceback --------------------------------------


def train_command(checkpoint: Path, train: Path, val: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python -m finetune.train recipe=quickstart` on tiny Mississippi, one step, no evaluation."""
    overrides = {
        "model.path": str(checkpoint),
        "data.train": str(train),
        "data.val": str(val),
        "data.test": "null",
        "output.dir": str(out),
        "train.max_steps": 1,
        "train.batch_size": 2,
        "train.checkpoint_every": "null",
        "eval.before_training": "false",
        "eval.after_training": "false",
    }
    args = ["recipe=quickstart", *(f"{k}={v}" for k, v in overrides.items()), *extra]
    return subprocess.run(
        [sys.executable, "-m", "finetune.train", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def good_lines(docs: dict) -> list[str]:
    """The `simple` training forms, with absolute image paths (to be written in another folder)."""
    rows = [json.loads(line) for line in docs["train"].read_text().splitlines()]
    return [json.dumps({**row, "image": str(docs["train"].parent / row["image"])}) for row in rows]


def cli_case(case: str, docs: dict, tmp_path: Path) -> tuple[Path, Path, str]:
    """(train file, val file, expected `error:` line) for one case, from the `simple` forms."""
    good = good_lines(docs)[:2]
    image = json.loads(good[0])["image"]
    train, val = tmp_path / f"{case}.jsonl", docs["val"]
    if case == "bomb":
        bomb = write_png_bomb(tmp_path / "bomb.png", 14000, 14000)
        write_lines(train, [*good, {"image": str(bomb), "target": {"number": "1"}}])
        pixels = "14000×14000 = 196,000,000 pixels, over data.max_image_pixels=89,478,485"
        return train, val, f"{train}:3: image {bomb} is {pixels}"
    if case == "utf8":
        line = json.dumps({"image": image, "target": {"number": "?"}}).encode()
        write_lines(train, [*good, line.replace(b"?", b"\xff")])
        column = line.index(b"?") + 1  # all ASCII before it
        return train, val, f"{train}:3: not valid UTF-8 (byte 0xff at column {column})"
    if case == "deep":
        write_lines(train, [*good, {"image": image, "target": nested(65)}])
        return train, val, f"{train}:3: target nests deeper than 64 levels"
    if case == "nan":
        write_lines(train, [*good, json.dumps({"image": image, "target": {"number": 0}}).replace("0}", "NaN}")])
        return train, val, f"{train}:3: target holds a non-finite number (NaN) at number"
    assert case == "empty"
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    return empty, val, f"{empty}: no samples (the file is empty)"


CLI_CASES = ["bomb", "utf8", "deep", "nan", "empty"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_the_command_line_prints_one_error_line(case, tiny_mississippi, simple_docs, tmp_path):
    train, val, expected = cli_case(case, simple_docs, tmp_path)
    result = train_command(tiny_mississippi, train, val, tmp_path / "run")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {expected}"], result.stderr[-4000:]


@pytest.mark.slow
def test_a_lenient_command_line_run_trains_and_reports(tiny_mississippi, simple_docs, tmp_path):
    """With on_bad_sample=skip the same samples are skipped and counted, duplicates warned about, and the run trains."""
    lines = []
    for case in ("bomb", "utf8", "deep", "nan"):
        train, _, _ = cli_case(case, simple_docs, tmp_path)
        lines.append(train.read_bytes().splitlines()[-1])
    good = [line.encode() for line in good_lines(simple_docs)]
    train = write_lines(tmp_path / "mixed.jsonl", [*good, *lines, good[0]])
    result = train_command(tiny_mississippi, train, simple_docs["val"], tmp_path / "run", "data.on_bad_sample=skip")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    warning = [line for line in result.stderr.splitlines() if "duplicates" in line]
    assert len(warning) == 1 and f"{train}:13 duplicates {train}:1" in warning[0], result.stderr[-4000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]
    assert report["read"] == 13 and report["kept"] == 9 and report["duplicates"] == 1
    assert report["skipped"] == {
        "image too large": 1,
        "not valid UTF-8": 1,
        "nested too deep": 1,
        "non-finite number": 1,
    }
