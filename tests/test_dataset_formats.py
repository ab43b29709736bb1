"""Dataset adapters (finetune/data/formats.py): each published layout, built tiny in tmp_path, reads to the same
samples as the hand-written JSONL; malformed files are named; recipes take the mapping form; the converter
round-trips."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune.config import DataSource
from finetune.data.dataset import DataError, load_image, prepare_samples
from finetune.data.sources import read_records
from finetune.errors import RecipeError, UserError
from finetune.models import get_family

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Extract the details into JSON format:"


@pytest.fixture(scope="module")
def family():
    return get_family("llava_onevision")


@pytest.fixture(scope="module")
def processor(family, tiny_llava):
    return family.load_processor(str(tiny_llava))


def image(path: Path, shade: int, fmt: str | None = None) -> Path:
    """A small image whose pixels differ per `shade`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", (40 + shade % 7, 32), (shade * 37 % 256, shade * 91 % 256, 120))
    picture.putpixel((shade % 30, 5), (255, 255, 255))
    picture.save(path, format=fmt)
    return path


def prepare(source, family, processor, **kwargs):
    options = dict(
        split="train", family=family, processor=processor, instruction_text=INSTRUCTION, skeleton={}, max_length=4096
    )
    return prepare_samples(source, **{**options, **kwargs})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_same_samples(got, expected):
    """Same targets, tokens and image pixels, in the same order."""
    assert [s.target for s in got] == [s.target for s in expected]
    assert [s.answer_ids for s in got] == [s.answer_ids for s in expected]
    assert [s.length for s in got] == [s.length for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert [load_image(r).tobytes() for r in a.images] == [load_image(r).tobytes() for r in b.images]


# --- donut -----------------------------------------------------------------------------------------------------

CORD_PARSE = {"menu": [{"nm": "Latte", "cnt": "1", "price": "4.50"}], "total": {"total_price": "4.50"}}


def donut_folder(root: Path) -> Path:
    split = root / "train"
    image(split / "a.png", 1)
    image(split / "b.png", 2)
    lines = [
        {"file_name": "a.png", "ground_truth": json.dumps({"gt_parse": CORD_PARSE, "meta": {"split": "train"}})},
        {"file_name": "b.png", "ground_truth": json.dumps({"gt_parses": [{"answer": "x"}, {"answer": "y"}]})},
    ]
    write_jsonl(split / "metadata.jsonl", lines)
    return root


def test_donut_folder_reads_like_the_jsonl(family, processor, tmp_path):
    root = donut_folder(tmp_path / "cord")
    spec = DataSource(format="donut", path=str(root), split="train")
    got, report = prepare(spec, family, processor)
    split = root / "train"
    rows = [
        {"image": str(split / "a.png"), "target": CORD_PARSE},
        {"image": str(split / "b.png"), "target": {"answer": "x"}},
        {"image": str(split / "b.png"), "target": {"answer": "y"}},
    ]
    expected, _ = prepare(write_jsonl(tmp_path / "hand.jsonl", rows), family, processor)
    assert_same_samples(got, expected)
    meta = split / "metadata.jsonl"
    assert [s.origin for s in got] == [f"{meta}:1", f"{meta}:2 (gt_parses[0])", f"{meta}:2 (gt_parses[1])"]
    assert report.read == 3 and report.kept == 3


def test_donut_saved_dataset_with_embedded_images_reads_like_the_jsonl(family, processor, tmp_path):
    import datasets

    a, b = image(tmp_path / "src" / "a.png", 3), image(tmp_path / "src" / "b.png", 4)
    truths = [json.dumps({"gt_parse": CORD_PARSE}), json.dumps({"gt_parse": {"total": "9.00"}})]
    rows = {"image": [str(a), str(b)], "ground_truth": truths}
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(tmp_path / "cord-v2"))
    (tmp_path / "src" / "a.png").rename(tmp_path / "a.png")  # the saved dataset holds the bytes, not the paths
    (tmp_path / "src" / "b.png").rename(tmp_path / "b.png")
    spec = {"format": "donut", "path": str(tmp_path / "cord-v2"), "split": "validation"}
    got, _ = prepare(spec, family, processor)
    hand = [{"image": "a.png", "target": CORD_PARSE}, {"image": "b.png", "target": {"total": "9.00"}}]
    expected, _ = prepare(write_jsonl(tmp_path / "hand.jsonl", hand), family, processor)
    assert_same_samples(got, expected)
    assert got[1].origin == f"{tmp_path / 'cord-v2'}[validation] row 1"
    # the same dataset as `hf`: the target column as it is (Donut's wrapper included), columns by name
    spec = {
        "format": "hf",
        "path": str(tmp_path / "cord-v2"),
        "split": "validation",
        "columns": {"target": "ground_truth"},
    }
    assert [r.target for r in read_records(spec)] == [json.loads(t) for t in truths]
    with pytest.raises(UserError, match=r"no split 'train' \(splits: validation\)"):
        list(read_records({"format": "hf", "path": str(tmp_path / "cord-v2")}))


def test_donut_malformed_lines_are_named(family, processor, tmp_path):
    folder = tmp_path / "d"
    image(folder / "a.png", 1)
    meta = folder / "metadata.jsonl"
    meta.write_text(
        json.dumps({"file_name": "a.png", "ground_truth": json.dumps({"gt_parse": {"k": "v"}})})
        + "\n{not json\n"
        + json.dumps({"file_name": "a.png", "ground_truth": json.dumps({"parse": {}})})
        + "\n"
        + json.dumps({"file_name": "a.png", "ground_truth": "{oops"})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"^{meta}:2: invalid JSON line"):
        prepare({"format": "donut", "path": str(folder)}, family, processor)
    samples, report = prepare({"format": "donut", "path": str(folder)}, family, processor, on_bad_sample="skip")
    assert len(samples) == 1 and report.skipped["malformed record"] == 3
    problems = {r.origin: r.problem for r in read_records({"format": "donut", "path": str(folder)}) if r.problem}
    assert problems[f"{meta}:3"] == "field 'ground_truth' has no gt_parse object (keys: parse)"
    assert "is a string but not JSON" in problems[f"{meta}:4"]


# --- sroie -----------------------------------------------------------------------------------------------------

KEY = {"company": "BOOK TA .K (TAMAN DAYA) SDN BHD", "date": "25/12/2018", "address": "NO.53, JOHOR.", "total": "9.00"}
BOX = "72,25,326,25,326,64,72,64,TAN WOON YANN\n50,82,440,82,440,121,50,121,BOOK TA .K (TAMAN DAYA) SDN BHD\n"


def test_sroie_both_layouts_read_like_the_jsonl(family, processor, tmp_path):
    sub = tmp_path / "SROIE2019" / "train"
    image(sub / "img" / "X001.jpg", 1, "JPEG")
    image(sub / "img" / "X002.jpg", 2, "JPEG")
    (sub / "entities").mkdir()
    (sub / "entities" / "X001.txt").write_text(json.dumps(KEY, indent=4))
    # published quirks: a Windows-1252 byte, a trailing comma, an unescaped quote in a value
    quirky = '{\n    "company": "CAF\xc9 \\"99\\"",\n    "date": "01/01/2018",\n    "total": "3.00",\n}'
    (sub / "entities" / "X002.txt").write_bytes(quirky.encode("cp1252"))
    (sub / "box").mkdir()
    (sub / "box" / "X001.txt").write_text(BOX)  # OCR boxes: ignored in this layout
    side = tmp_path / "task2train"
    image(side / "X001.jpg", 1, "JPEG")
    image(side / "X003.jpg", 3, "JPEG")
    (side / "X001.txt").write_bytes(b"\xef\xbb\xbf" + json.dumps(KEY).encode())  # a UTF-8 byte-order mark
    (side / "X003.txt").write_text('{\n    "company": "ABC "MART" SDN BHD",\n    "total": "1.00"\n}\n')
    got_sub, _ = prepare({"format": "sroie", "path": str(tmp_path / "SROIE2019"), "split": "train"}, family, processor)
    got_side, _ = prepare({"format": "sroie", "path": str(side)}, family, processor)
    quirky_target = {"company": 'CAFÉ "99"', "date": "01/01/2018", "total": "3.00"}
    hand_sub = [
        {"image": str(sub / "img" / "X001.jpg"), "target": KEY},
        {"image": str(sub / "img" / "X002.jpg"), "target": quirky_target},
    ]
    hand_side = [
        {"image": str(side / "X001.jpg"), "target": KEY},
        {"image": str(side / "X003.jpg"), "target": {"company": 'ABC "MART" SDN BHD', "total": "1.00"}},
    ]
    assert_same_samples(got_sub, prepare(write_jsonl(tmp_path / "a.jsonl", hand_sub), family, processor)[0])
    assert_same_samples(got_side, prepare(write_jsonl(tmp_path / "b.jsonl", hand_side), family, processor)[0])
    assert [s.origin for s in got_sub] == [str(sub / "entities" / "X001.txt"), str(sub / "entities" / "X002.txt")]
    assert list(got_sub[0].target) == ["company", "date", "address", "total"]  # the key file's order


def test_sroie_unpaired_files_and_box_files_are_named_and_counted(family, processor, tmp_path):
    folder = tmp_path / "s"
    image(folder / "A.jpg", 1, "JPEG")  # a key file
    image(folder / "B.jpg", 2, "JPEG")  # no key file
    image(folder / "C.jpg", 3, "JPEG")  # only an OCR box file
    (folder / "A.txt").write_text(json.dumps(KEY))
    (folder / "C.txt").write_text(BOX)
    (folder / "D.txt").write_text(json.dumps(KEY))  # no image
    spec = {"format": "sroie", "path": str(folder)}
    with pytest.raises(DataError, match=rf"^{folder / 'B.jpg'}: no key file B.txt in {folder} for this image$"):
        prepare(spec, family, processor)
    samples, report = prepare(spec, family, processor, on_bad_sample="skip")
    assert [s.origin for s in samples] == [str(folder / "A.txt")]
    assert report.skipped == {"no key file": 1, "OCR box file, not a key file": 1, "no image": 1}
    assert report.examples["no image"] == str(folder / "D.txt")
    problem = next(r.problem for r in read_records(spec) if r.origin == str(folder / "C.txt"))
    assert problem.startswith("an OCR box file")


# --- funsd -----------------------------------------------------------------------------------------------------


def funsd_form() -> dict:
    def entity(i, label, text, links=()):
        return {"id": i, "text": text, "box": [0, i, 10, i + 5], "label": label, "words": [], "linking": list(links)}

    return {
        "form": [
            entity(0, "header", "R&D ORDER", [[0, 1]]),
            entity(1, "question", "DATE:", [[0, 1], [1, 2]]),
            entity(2, "answer", "12/10/98", [[1, 2]]),
            entity(3, "question", "TO:", [[3, 5], [3, 4]]),
            entity(4, "answer", "Dr. Lee"),  # links given on the question only
            entity(5, "answer", "Dr. Kim"),
            entity(6, "question", "FAX:"),
            entity(7, "answer", "loose answer"),
            entity(8, "other", "Page 1"),
        ]
    }


FUNSD_TARGET = {
    "form": [
        {"label": "header", "text": "R&D ORDER"},
        {"label": "question", "text": "DATE:", "answers": ["12/10/98"]},
        {"label": "question", "text": "TO:", "answers": ["Dr. Lee", "Dr. Kim"]},
        {"label": "question", "text": "FAX:", "answers": []},
        {"label": "answer", "text": "loose answer"},
        {"label": "other", "text": "Page 1"},
    ]
}


def test_funsd_reads_like_the_jsonl(family, processor, tmp_path):
    data = tmp_path / "funsd" / "dataset" / "training_data"
    image(data / "images" / "0001.png", 1)
    (data / "annotations").mkdir()
    (data / "annotations" / "0001.json").write_text(json.dumps(funsd_form()))
    image(data / "images" / "0002.png", 2)  # no annotation
    got, report = prepare(
        {"format": "funsd", "path": str(tmp_path / "funsd"), "split": "train"}, family, processor, on_bad_sample="skip"
    )
    expected, _ = prepare(
        write_jsonl(tmp_path / "f.jsonl", [{"image": str(data / "images" / "0001.png"), "target": FUNSD_TARGET}]),
        family,
        processor,
    )
    assert_same_samples(got, expected)
    assert got[0].origin == str(data / "annotations" / "0001.json")
    assert report.skipped == {"no annotation": 1}
    (data / "annotations" / "0002.json").write_text(
        '{"form": [{"id": 0, "text": "x", "label": "other", "linking": [[0, 9]]}]}'
    )
    problem = next(r.problem for r in read_records({"format": "funsd", "path": str(data)}) if r.problem)
    assert problem == "entity 0: link [0, 9] does not name two entities of the form"


# --- missing folders, recipes, recorded recipes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("sroie", "no such folder (expected a SROIE folder: img/ + entities/ (or key/), or images and key .txt"),
        ("funsd", "no such folder (expected a FUNSD folder: images/ + annotations/"),
        (
            "donut",
            "no such folder (expected a Donut folder (images with metadata.jsonl lines {file_name, ground_truth})",
        ),
        ("imagefolder", "no such folder (expected an imagefolder"),
        ("jsonl", "no such file (expected a JSONL file"),
    ],
)
def test_a_missing_folder_is_one_line_naming_path_and_layout(fmt, expected, tmp_path):
    missing = tmp_path / "nope" / "train"
    with pytest.raises(UserError) as err:
        list(read_records({"format": fmt, "path": str(missing)}))
    assert str(err.value).startswith(f"{missing}: {expected}") and "\n" not in str(err.value)
    from finetune.recipe import check_recipe_files, validate_recipe

    recipe = validate_recipe(
        {"model": {"family": "llava_onevision", "path": "x"}, "data": {"train": {"format": fmt, "path": str(missing)}}}
    )
    with pytest.raises(RecipeError, match=re.escape(f"data.train: {missing}: {expected}")):
        check_recipe_files(recipe)


def recipe_file(tmp_path: Path, train: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model:\n  family: llava_onevision\n  path: x\ndata:\n  train:\n{train}")
    return path


def test_a_recipe_takes_a_mapping_and_an_unknown_key_in_it_says_did_you_mean(tmp_path):
    from finetune.recipe import load_recipe

    folder = tmp_path / "sroie"
    folder.mkdir()
    recipe = load_recipe(recipe_file(tmp_path, f"    format: sroie\n    path: {folder}\n"))
    assert recipe.data.train == DataSource(format="sroie", path=str(folder))
    with pytest.raises(RecipeError, match=r"recipe\.yaml:7: data\.train\.pth: unknown key \(did you mean 'path'\?\)"):
        load_recipe(recipe_file(tmp_path, "    format: sroie\n    pth: x\n"))
    with pytest.raises(RecipeError, match=r"data\.train\.columns\.imag: unknown key \(did you mean 'image'\?\)"):
        load_recipe(recipe_file(tmp_path, "    format: hf\n    path: org/x\n    columns: {imag: img}\n"))
    with pytest.raises(RecipeError, match=r"data\.train\.format: Input should be 'jsonl', .*\(got 'sroi'\)"):
        load_recipe(recipe_file(tmp_path, "    format: sroi\n    path: x\n"))
    assert load_recipe(recipe_file(tmp_path, "    format: hf\n    path: org/name\n"), check_files=True)  # not checked
    # a plain string is read as before
    train = tmp_path / "t.jsonl"
    train.write_text("")
    assert load_recipe(recipe_file(tmp_path, ""), [f"data.train={train}"]).data.train == str(train)


def test_recorded_recipe_skeleton_and_same_source_warnings_with_a_mapping(tmp_path):
    import yaml

    from finetune.recipe import dump_recipe, validate_recipe
    from finetune.resolve import resolve_recipe
    from finetune.training.run_folder import flatten
    from finetune.training.train_data import _same_source

    folder = tmp_path / "s"
    image(folder / "A.jpg", 1, "JPEG")
    (folder / "A.txt").write_text(json.dumps(KEY))
    spec = {"format": "sroie", "path": str(folder)}
    recipe = validate_recipe(
        {"model": {"family": "llava_onevision", "path": "x"}, "data": {"train": spec, "val": str(folder)}}
    )
    resolved = resolve_recipe(recipe)
    assert resolved.data.prompt.skeleton == {"company": "", "date": "", "address": "", "total": ""}
    dump_recipe(resolved, tmp_path / "recipe.yaml")
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert saved["data"]["train"] == {**spec, "split": None, "columns": None}
    assert flatten(saved) == flatten(resolved.model_dump(mode="json"))
    assert _same_source(resolved.data.train, str(folder)) and _same_source(spec, {**spec, "path": f"{folder}/."})
    assert not _same_source(spec, {"format": "sroie", "path": str(tmp_path)})
    hub = {"format": "hf", "path": "naver-clova-ix/cord-v2", "split": "validation"}
    assert _same_source(hub, {"format": "donut", "path": "naver-clova-ix/cord-v2", "split": "validation"})
    assert not _same_source(hub, {**hub, "split": "test"})
    local = {"format": "hf", "path": str(tmp_path), "split": "validation"}
    assert _same_source(local, dict(local)) and not _same_source(local, {**local, "split": "test"})


# --- convert_dataset.py ----------------------------------------------------------------------------------------


def convert(*args: str) -> subprocess.CompletedProcess:
    script = REPO / "scripts" / "convert_dataset.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def test_convert_dataset_round_trips_and_refuses_to_overwrite(family, processor, tmp_path):
    import datasets

    sub = tmp_path / "sroie" / "train"
    image(sub / "img" / "X001.jpg", 1, "JPEG")
    image(sub / "img" / "X002.jpg", 2, "JPEG")
    (sub / "entities").mkdir()
    (sub / "entities" / "X001.txt").write_text(json.dumps(KEY))
    (sub / "entities" / "X002.txt").write_text(json.dumps({"company": "B", "total": "2.00"}))
    out = tmp_path / "out" / "train.jsonl"
    done = convert("--format", "sroie", "--path", str(tmp_path / "sroie"), "--split", "train", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"out": str(out), "read": 2, "written": 2, "skipped": {}, "images_written": 0}
    assert json.loads(out.read_text().splitlines()[0])["image"] == "../sroie/train/img/X001.jpg"
    spec = {"format": "sroie", "path": str(sub)}
    assert_same_samples(prepare(out, family, processor)[0], prepare(spec, family, processor)[0])
    again = convert("--format", "sroie", "--path", str(sub), "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip() == f"error: {out}: exists (give --overwrite to replace it)"
    copied = convert("--format", "sroie", "--path", str(sub), "--out", str(out), "--overwrite", "--copy-images")
    assert json.loads(copied.stdout)["images_written"] == 2
    assert json.loads(out.read_text().splitlines()[1])["image"] == "train_images/X002.jpg"
    assert_same_samples(prepare(out, family, processor)[0], prepare(spec, family, processor)[0])
    # embedded bytes (a saved dataset) are written out beside the JSONL
    a = image(tmp_path / "a.png", 5)
    dataset = datasets.Dataset.from_dict({"image": [str(a)], "ground_truth": [json.dumps({"gt_parse": {"k": "v"}})]})
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    hf_out = tmp_path / "hf.jsonl"
    done = convert("--format", "donut", "--path", str(tmp_path / "saved"), "--out", str(hf_out))
    assert json.loads(done.stdout)["images_written"] == 1, done.stderr
    assert json.loads(hf_out.read_text()) == {"image": "hf_images/000000-0.png", "target": {"k": "v"}}
    assert load_image(tmp_path / "hf_images" / "000000-0.png").tobytes() == load_image(a).tobytes()
    bad = convert("--format", "funsd", "--path", str(tmp_path / "none"), "--out", str(tmp_path / "x.jsonl"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "expected a FUNSD folder" in bad.stderr
    assert not (tmp_path / "x.jsonl").exists()


# --- a training run ----------------------------------------------------------------------------------------------


def test_a_training_run_accepts_a_sroie_mapping(tiny_llava, tmp_path, fresh_accelerate_state):
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    folder = tmp_path / "sroie"
    for i in range(4):
        image(folder / "img" / f"X{i}.jpg", i, "JPEG")
        (folder / "entities").mkdir(exist_ok=True)
        (folder / "entities" / f"X{i}.txt").write_text(json.dumps({"company": f"C{i}", "total": f"{i}.00"}))
    overrides = {
        "model.family": "llava_onevision",
        "model.path": str(tiny_llava),
        "data.train": json.dumps({"format": "sroie", "path": str(folder)}),
        "data.val": "null",
        "data.test": "null",
        "output.dir": str(tmp_path / "run"),
        "train.max_steps": 1,
        "eval.before_training": False,
        "eval.after_training": False,
    }
    job = FineTuneRecipe(load_recipe("quickstart", [f"{k}={v}" for k, v in overrides.items()]))
    job.setup()
    job.train()
    assert len(job.train_samples) == 4 and job.train_samples[0].origin == str(folder / "entities" / "X0.txt")
    assert "format: sroie" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 1


def test_eval_data_format_reads_a_folder_in_its_layout(monkeypatch, tmp_path):
    import finetune.eval as eval_module
    from finetune.data.formats import missing_source, source_stem

    seen = {}
    monkeypatch.setattr(eval_module, "evaluate_model", lambda model, data, **kw: seen.update(data=data) or {})
    eval_module.main(["--model", "m", "--data", str(tmp_path / "sroie"), "--data-format", "sroie"])
    assert seen["data"] == {"format": "sroie", "path": str(tmp_path / "sroie")}
    assert source_stem(seen["data"]) == "sroie" and source_stem({**seen["data"], "split": "test"}) == "sroie-test"
    assert not eval_module._local_source(seen["data"], missing_source)  # no such folder: no training targets read
    with pytest.raises(UserError, match=r"format: Input should be 'jsonl'"):
        list(read_records({"format": "csv", "path": "x"}))
