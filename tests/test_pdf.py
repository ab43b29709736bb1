"""PDF input: a PDF where an image is accepted is its pages, one image each, in order (finetune/data/pdf.py).

PDFs are written here, offline: multi-page ones by PIL (`save_all=True`), an encrypted one by hand (a /Encrypt
dictionary whose check value does not match the empty password, which is all a reader looks at before asking for
one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.dataset import DataError, DocumentDataset, prepare_samples
from finetune.data.pdf import PdfPage
from finetune.models import get_family
from tests.test_faults_data import train_command

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (200, 200, 0)]


def write_pdf(path: Path, pages: int, size: tuple[int, int] = (200, 100)) -> Path:
    """A PDF of `pages` pages of `size` points (72 dpi), filled with COLOURS in page order (then grey)."""
    images = [Image.new("RGB", size, COLOURS[i] if i < len(COLOURS) else (128, 128, 128)) for i in range(pages)]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72)
    return path


def hand_written_pdf(extra_objects: list[bytes] = (), trailer: bytes = b"") -> bytes:
    """A one-page 200×100 pt PDF, byte by byte (with a correct cross-reference table)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
        *extra_objects,
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer, xref)
    return bytes(out)


def write_encrypted_pdf(path: Path) -> Path:
    encrypt = b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P -4 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> >>"
    file_id = b"<" + b"ab" * 16 + b">"
    path.write_bytes(hand_written_pdf([encrypt], b"/Encrypt 4 0 R /ID [%s %s] " % (file_id, file_id)))
    return path


def write_corrupt_pdf(path: Path, tmp: Path) -> Path:
    """A 3-page PDF cut to a third of its bytes (a failed download)."""
    data = write_pdf(tmp / "whole.pdf", 3).read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def llava(tiny_llava):
    family = get_family("llava_onevision")
    return family, family.load_processor(str(tiny_llava))


def prepare(llava, source, **kwargs):
    family, processor = llava
    return prepare_samples(
        source,
        split="train",
        family=family,
        processor=processor,
        instruction_text="Read it.",
        skeleton={"number": ""},
        max_length=1 << 20,
        **kwargs,
    )


def test_a_pdf_is_its_pages_in_order_sized_from_the_page_box_and_rendered_only_per_batch(llava, tmp_path, monkeypatch):
    pdf = write_pdf(tmp_path / "doc.pdf", 3)
    data = jsonl(tmp_path / "train.jsonl", [{"image": "doc.pdf", "target": {"number": "1"}}])
    rendered = []
    import finetune.data.dataset as dataset_module

    real_render = dataset_module.render_page
    monkeypatch.setattr(dataset_module, "render_page", lambda page: rendered.append(page) or real_render(page))
    samples, report = prepare(llava, data, pdf_dpi=80)
    assert report.kept == 1 and rendered == []  # checked and counted without rendering a page
    (sample,) = samples
    # 200×100 pt at 80 dpi: 222.2 × 111.1 px, rounded up as pdfium sizes its bitmap
    assert sample.images == [PdfPage(str(pdf), i, 80, (223, 112)) for i in range(3)]
    family, processor = llava
    seen = []
    real_encode = type(family).encode_prompt
    monkeypatch.setattr(
        type(family),
        "encode_prompt",
        lambda self, proc, images, text: seen.append(images) or real_encode(self, proc, images, text),
    )
    item = DocumentDataset(samples, family=family, processor=processor, instruction_text="Read it.")[0]
    assert len(item["input_ids"]) == sample.length  # the token count made from the page box is the real one
    (images,) = seen
    assert [im.size for im in images] == [(223, 112)] * 3 and len(rendered) == 3
    assert [im.getpixel((100, 50)) for im in images] == [pytest.approx(c, abs=3) for c in COLOURS[:3]]


def test_a_pdf_mixed_with_images_keeps_the_order_and_duplicates_are_seen_per_page(llava, tmp_path):
    write_pdf(tmp_path / "doc.pdf", 2)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "cover.png")
    rows = [{"image": ["cover.png", "doc.pdf"], "target": {"number": "1"}}] * 2
    samples, report = prepare(llava, jsonl(tmp_path / "train.jsonl", rows))
    assert [str(ref) for ref in samples[0].images] == [
        str(tmp_path / "cover.png"),
        f"{tmp_path / 'doc.pdf'}#page=1",
        f"{tmp_path / 'doc.pdf'}#page=2",
    ]
    assert report.duplicates == 1


def test_more_pages_than_the_cap_is_a_bad_sample_never_a_truncated_one(llava, tmp_path):
    pdf = write_pdf(tmp_path / "long.pdf", 12)
    write_pdf(tmp_path / "short.pdf", 2)
    data = jsonl(
        tmp_path / "train.jsonl",
        [{"image": "short.pdf", "target": {"number": "1"}}, {"image": "long.pdf", "target": {"number": "2"}}],
    )
    with pytest.raises(DataError) as err:
        prepare(llava, data)  # the default cap: 8
    assert str(err.value) == f"{data}:2: PDF {pdf} has 12 pages, over data.max_pdf_pages=8"
    samples, report = prepare(llava, data, on_bad_sample="skip")
    assert [len(s.images) for s in samples] == [2]
    assert report.skipped == {"PDF over max_pdf_pages=8": 1}
    assert report.examples["PDF over max_pdf_pages=8"] == f"{data}:2"
    samples, report = prepare(llava, data, max_pdf_pages=12)
    assert [len(s.images) for s in samples] == [2, 12]


def test_the_page_cap_is_per_sample_across_its_pdfs(llava, tmp_path):
    """Two 5-page PDFs in one sample are 10 images in its prompt: over a cap of 8, as one 10-page PDF would be."""
    for name in ("a.pdf", "b.pdf"):
        write_pdf(tmp_path / name, 5)
    data = jsonl(tmp_path / "train.jsonl", [{"image": ["a.pdf", "b.pdf"], "target": {"number": "1"}}])
    with pytest.raises(DataError, match=r"train.jsonl:1: the sample's PDFs have at least 10 pages in all, over "):
        prepare(llava, data)
    samples, _ = prepare(llava, data, max_pdf_pages=10)
    assert [len(s.images) for s in samples] == [10]


def test_the_pixel_limit_applies_to_the_rendered_page(llava, tmp_path):
    pdf = write_pdf(tmp_path / "doc.pdf", 1)
    data = jsonl(tmp_path / "train.jsonl", [{"image": "doc.pdf", "target": {"number": "1"}}])
    with pytest.raises(DataError) as err:
        prepare(llava, data, pdf_dpi=720, max_image_pixels=1_000_000)  # 2000×1000 px
    assert str(err.value) == (
        f"{data}:1: image {pdf}#page=1 is 2000×1000 = 2,000,000 pixels, over data.max_image_pixels=1,000,000"
    )


@pytest.mark.parametrize("case", ["corrupt", "encrypted", "missing"])
def test_an_unreadable_pdf_is_one_bad_sample(case, llava, tmp_path):
    pdf = tmp_path / "bad.pdf"
    if case == "corrupt":
        write_corrupt_pdf(pdf, tmp_path)
        reason, detail = "unreadable PDF", f"unreadable PDF {pdf}: Failed to load document (PDFium: Data format error)."
    elif case == "encrypted":
        write_encrypted_pdf(pdf)
        reason, detail = "unreadable PDF", f"PDF {pdf} is password-protected (encrypted); decrypt it first"
    else:
        reason, detail = "missing image", f"image not found: {pdf}"
    write_pdf(tmp_path / "good.pdf", 1)
    data = jsonl(
        tmp_path / "train.jsonl",
        [{"image": "good.pdf", "target": {"number": "1"}}, {"image": "bad.pdf", "target": {"number": "2"}}],
    )
    with pytest.raises(DataError) as err:
        prepare(llava, data)
    assert str(err.value) == f"{data}:2: field 'image': {detail}"
    samples, report = prepare(llava, data, on_bad_sample="skip")
    assert len(samples) == 1 and report.skipped == {reason: 1}


def test_the_hand_written_pdfs_differ_only_by_their_encryption(llava, tmp_path):
    """The encrypted PDF fails for its encryption: the same bytes without /Encrypt read fine."""
    (tmp_path / "plain.pdf").write_bytes(hand_written_pdf())
    data = jsonl(tmp_path / "train.jsonl", [{"image": "plain.pdf", "target": {"number": "1"}}])
    samples, _ = prepare(llava, data)
    assert samples[0].images[0].size == (400, 200)  # 200×100 pt at the default 144 dpi


@pytest.mark.parametrize("case", ["corrupt", "encrypted"])
def test_the_command_line_prints_one_error_line_for_a_bad_pdf(case, tiny_mississippi, simple_docs, tmp_path):
    pdf = tmp_path / "bad.pdf"
    if case == "corrupt":
        write_corrupt_pdf(pdf, tmp_path)
        detail = f"unreadable PDF {pdf}: Failed to load document (PDFium: Data format error)."
    else:
        write_encrypted_pdf(pdf)
        detail = f"PDF {pdf} is password-protected (encrypted); decrypt it first"
    write_pdf(tmp_path / "good.pdf", 1)
    train = jsonl(
        tmp_path / "train.jsonl",
        [{"image": "good.pdf", "target": {"number": "1"}}, {"image": "bad.pdf", "target": {"number": "2"}}],
    )
    result = train_command(tiny_mississippi, train, simple_docs["val"], tmp_path / "run")
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: {train}:2: field 'image': {detail}"], result.stderr[-4000:]


def test_predict_collects_pdfs_from_folders_and_globs(tmp_path):
    from finetune.predict import collect_images

    write_pdf(tmp_path / "b.pdf", 1)
    write_pdf(tmp_path / "A.PDF", 1)
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("")
    assert collect_images([str(tmp_path)]) == [str(tmp_path / n) for n in ("A.PDF", "b.pdf", "c.png")]
    assert collect_images([str(tmp_path / "*")]) == [str(tmp_path / n) for n in ("A.PDF", "b.pdf", "c.png")]


@pytest.mark.slow
def test_a_three_page_pdf_trains_evaluates_and_predicts_as_three_images(
    tiny_llava, simple_docs, tmp_path, fresh_accelerate_state, monkeypatch, capsys
):
    from finetune.eval import evaluate_model
    from finetune.predict import main as predict_main
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    pdf = write_pdf(tmp_path / "invoice.pdf", 3, size=(300, 200))
    rows = [json.loads(line) for line in simple_docs["train"].read_text().splitlines()]
    images = [{**row, "image": str(simple_docs["train"].parent / row["image"])} for row in rows[:3]]
    train = jsonl(tmp_path / "train.jsonl", [*images, {"image": "invoice.pdf", "target": rows[3]["target"]}])
    test = jsonl(tmp_path / "test.jsonl", [{"image": str(pdf), "target": rows[3]["target"]}])
    family = get_family("llava_onevision")
    seen: list[int] = []
    real_encode = type(family).encode_prompt
    monkeypatch.setattr(
        type(family),
        "encode_prompt",
        lambda self, processor, imgs, text: seen.append(len(imgs)) or real_encode(self, processor, imgs, text),
    )
    run = tmp_path / "run"
    overrides = [
        "model.family=llava_onevision",
        f"model.path={tiny_llava}",
        f"data.train={train}",
        f"data.val={test}",
        "data.test=null",
        "data.pdf_dpi=48",  # 300×200 pt → 200×134 px pages
        f"output.dir={run}",
        "tuning.groups={vision: frozen, projector: frozen, llm: lora}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.group_by_length=false",
        "eval.before_training=false",
        "eval.after_training=false",
        "eval.max_new_tokens=4",
    ]
    job = FineTuneRecipe(load_recipe("quickstart", overrides))
    job.setup()
    (pdf_sample,) = [s for s in job.data.train_samples if len(s.images) > 1]
    assert pdf_sample.images == [PdfPage(str(pdf), i, 48, (200, 134)) for i in range(3)]
    job.train()
    job.save_final()
    assert 3 in seen and set(seen) <= {1, 3}  # the PDF sample was trained on as 3 images, the others as 1
    assert (run / "final").is_dir()

    seen.clear()
    metrics = evaluate_model(str(run), str(test), out_dir=tmp_path / "eval", max_new_tokens=4)
    assert metrics["num_samples"] == 1 and seen == [3]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert report.count('<img alt="sample 0"') == 3  # a thumbnail per page
    (row,) = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert row["images"] == [f"{pdf}#page={i}" for i in (1, 2, 3)]  # the pages it read, by name

    seen.clear()
    capsys.readouterr()
    records = predict_main(["--model", str(run), str(pdf), "--max-new-tokens", "4"])
    assert seen == [3] and [r["image"] for r in records] == [str(pdf)]  # one prediction for the document
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["image"] == str(pdf)


def test_bench_preprocess_times_pdf_pages(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    args = ["--pdf", "--pages", "2", "--repeats", "1", "--scale", "0.1", "--out", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "scripts/bench_preprocess.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results-pdf.json").read_text())["rows"]
    assert [r["dpi"] for r in rows] == [72, 144, 200] and all(r["pages"] == 2 and r["render"] > 0 for r in rows)
    assert "pages/s" in result.stdout
