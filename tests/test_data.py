"""Data: padding, over-length samples, strict vs lenient bad data, sources, odd images. Which tokens carry labels
and that counted lengths equal processed ones are checked for every family in test_family_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.dataset import Collator, DataError, DocumentDataset, load_image, prepare_samples
from finetune.models import get_family
from finetune.models.base import IGNORE_INDEX

INSTRUCTION = 'Extract the details into JSON format: {"number": "", "total": ""}'
SKELETON = {"number": "", "total": ""}


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


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_padding_never_carries_labels_and_padding_side(family, processor, simple_docs):
    samples, _ = prepare(simple_docs["train"], family, processor)
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=INSTRUCTION)
    items = [dataset[i] for i in range(4)]
    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = Collator(family, pad, padding_side=side)(items)
        mask, labels = batch["attention_mask"], batch["labels"]
        assert (labels[mask == 0] == IGNORE_INDEX).all()
        for row, item in zip(range(4), items, strict=True):
            real = batch["input_ids"][row][mask[row] == 1].tolist()
            assert real == item["input_ids"]
        edge = mask[:, 0] if side == "left" else mask[:, -1]
        assert (edge == 0).any() or len({len(i["input_ids"]) for i in items}) == 1


def test_over_length_samples_are_dropped_and_counted_never_truncated(family, processor, tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "target": {"number": "1"}}, {"image": "a.png", "target": {"number": "9" * 400}}]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = prepare(source, family, processor)
    limit = full[0].length + 5  # the short sample fits, the long one does not
    kept, report = prepare(source, family, processor, max_length=limit)
    assert [s.target for s in kept] == [rows[0]["target"]]
    assert report.read == 2 and report.kept == 1
    assert report.skipped == {f"longer than max_length={limit}": 1}
    assert "d.jsonl:2" in report.summary()


BAD_ROWS = [
    ({"image": "missing.png", "target": {"a": "1"}}, "image not found"),
    ({"image": "corrupt.png", "target": {"a": "1"}}, "unreadable image"),
    ({"image": "ok.png", "target": ["not", "an", "object"]}, "must be a JSON object, got list"),
    ({"image": "ok.png", "target": "{not json"}, "is a string but not JSON"),
    ({"image": "ok.png"}, "field 'target' is missing"),
    ("{this is not json", "invalid JSON line"),
]


@pytest.fixture
def bad_data(tmp_path):
    Image.new("RGB", (40, 40), "white").save(tmp_path / "ok.png")
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "corrupt.png").write_bytes(png[: len(png) // 2])  # truncated file
    return tmp_path


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_strict_mode_names_file_line_and_reason(family, processor, bad_data, row, reason):
    source = write_jsonl(bad_data / "d.jsonl", [{"image": "ok.png", "target": {"a": "1"}}, row])
    with pytest.raises(DataError) as err:
        prepare(source, family, processor)
    assert str(err.value).startswith(f"{source}:2: ")
    assert reason in str(err.value)


def test_lenient_mode_skips_and_counts_every_bad_sample(family, processor, bad_data):
    good = {"image": "ok.png", "target": {"a": "1"}}
    source = write_jsonl(bad_data / "d.jsonl", [good] + [row for row, _ in BAD_ROWS] + [good])
    samples, report = prepare(source, family, processor, on_bad_sample="skip")
    assert len(samples) == 2 and report.read == 8 and report.kept == 2
    assert report.skipped == {
        "missing image": 1,
        "unreadable image": 1,
        "target not a JSON object": 1,
        "malformed record": 3,
    }
    assert report.examples["missing image"] == f"{source}:2"


def test_unusual_images_load_as_rgb(tmp_path):
    Image.new("CMYK", (30, 20), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("I;16", (30, 20), 40000).save(tmp_path / "deep.png")
    Image.new("P", (30, 20)).save(tmp_path / "palette.png")
    Image.new("LA", (30, 20)).save(tmp_path / "grey_alpha.png")
    for name in ("cmyk.jpg", "deep.png", "palette.png", "grey_alpha.png"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (30, 20)
    grey = load_image(tmp_path / "deep.png").getpixel((0, 0))
    assert grey[0] == 40000 // 256  # scaled to 8 bit, not clipped to white


def test_sources_iterable_and_imagefolder(family, processor, tmp_path):
    Image.new("RGB", (40, 40), "white").save(tmp_path / "a.png")
    rows = [
        {"image": Image.new("RGB", (40, 40)), "target": {"number": "1"}},
        {"image": str(tmp_path / "a.png"), "target": {"number": "2"}},
    ]
    samples, report = prepare(rows, family, processor)
    assert [s.target["number"] for s in samples] == ["1", "2"] and report.kept == 2

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    Image.new("RGB", (40, 40), "white").save(folder / "x.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "target": '{"number": "7"}'}) + "\n")
    samples, report = prepare(str(folder), family, processor)
    assert samples[0].target == {"number": "7"}
    # Kept encoded (decoded per batch), so a large dataset's pages are not all held in memory.
    assert isinstance(samples[0].images[0], dict) and load_image(samples[0].images[0]).size == (40, 40)
