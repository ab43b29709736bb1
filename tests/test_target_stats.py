"""Target statistics: per-field missing / empty / null counts in data_report.json and their warning line; the
train / eval overlap warning; the learning rate logged per step is the one that step used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from finetune.data.dataset import prepare_samples
from finetune.data.target_stats import target_field_stats
from finetune.models import get_family
from finetune.schema import schema_from_skeleton

SKELETON = {"number": "", "vendor": {"name": "", "address": ""}, "items": [{"description": "", "qty": ""}], "total": ""}
TARGETS = [
    {
        "number": "1",
        "vendor": {"name": "A", "address": "x"},
        "items": [{"description": "a", "qty": "1"}, {"description": "", "qty": "2"}],
        "total": "3",
    },
    {"number": "", "vendor": {"name": "B"}, "items": [{"qty": "1"}], "total": None},
    {"number": "3", "vendor": None, "items": []},  # no total
    {"number": "4", "vendor": {}, "items": [{"description": None, "qty": "5"}], "total": "9"},
]


def counts(of, present=0, missing=0, empty=0, null=0):
    return {"of": of, "present": present, "missing": missing, "empty": empty, "null": null}


EXPECTED = {
    "number": counts(4, present=3, empty=1),
    "vendor": counts(4, present=2, empty=1, null=1),
    "vendor.name": counts(3, present=2, missing=1),  # in the 3 targets whose vendor is an object ({} included)
    "vendor.address": counts(3, present=1, missing=2),
    "items": counts(4, present=3, empty=1),
    "items[].description": counts(4, present=1, missing=1, empty=1, null=1),  # over the 4 list items
    "items[].qty": counts(4, present=4),
    "total": counts(4, present=2, missing=1, null=1),
}


@pytest.fixture(scope="module")
def family():
    return get_family("llava_onevision")


@pytest.fixture(scope="module")
def processor(family, tiny_llava):
    return family.load_processor(str(tiny_llava))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_field_statistics_count_missing_empty_and_null_in_nested_fields_and_list_items():
    stats = target_field_stats(SKELETON, TARGETS)
    assert stats == EXPECTED
    assert list(stats) == list(EXPECTED)  # skeleton order
    assert all(c["of"] == c["present"] + c["missing"] + c["empty"] + c["null"] for c in stats.values())


def test_a_missing_field_is_optional_in_the_answer_schema_as_the_warning_says():
    # What the warning claims, checked against schema_from_skeleton: missing keys are not required; empty and
    # null ones stay required.
    schema = schema_from_skeleton(SKELETON, TARGETS)
    assert schema["required"] == ["number", "vendor", "items"]  # total is missing once
    assert schema["properties"]["vendor"]["required"] == []
    assert schema["properties"]["items"]["items"]["required"] == ["qty"]


def test_prepared_splits_report_field_statistics_of_kept_samples_and_warn(family, processor, tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "target": t} for t in TARGETS]
    rows.insert(1, {"image": "missing.png", "target": {"number": ""}})  # skipped: not counted
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    _, report = prepare_samples(
        source,
        split="train",
        family=family,
        processor=processor,
        instruction_text="Extract the details into JSON format:",
        skeleton=SKELETON,
        max_length=4096,
        on_bad_sample="skip",
    )
    assert report.kept == 4 and report.fields == EXPECTED
    line = report.fields_warning(shapes_schema=True)
    assert line == (
        "train: fields missing or empty in some targets (a missing field becomes optional in the answer schema): "
        "number empty in 1 of 4, vendor empty in 1 of 4, vendor.name missing in 1 of 3, vendor.address missing in "
        "2 of 3, items empty in 1 of 4, items[].description missing in 1 of 4 list items, and 2 more "
        "(see data_report.json)"
    )
    # An eval split's targets do not shape the schema; a split with only empty values has no schema note.
    assert "optional" not in report.fields_warning(shapes_schema=False)
    assert target_field_stats({"a": ""}, [{"a": "1"}, {"a": None}])["a"] == counts(2, present=1, null=1)
    _, empty_only = prepare_samples(
        write_jsonl(tmp_path / "e.jsonl", [{"image": "a.png", "target": {"number": "", "total": "1"}}]),
        split="train",
        family=family,
        processor=processor,
        instruction_text="Extract the details into JSON format:",
        skeleton={"number": "", "total": ""},
        max_length=4096,
    )
    assert empty_only.fields_warning(shapes_schema=True) == (
        "train: fields missing or empty in some targets: number empty in 1 of 1"
    )
    _, clean = prepare_samples(
        write_jsonl(tmp_path / "c.jsonl", [{"image": "a.png", "target": {"number": "1", "total": None}}]),
        split="train",
        family=family,
        processor=processor,
        instruction_text="Extract the details into JSON format:",
        skeleton={"number": "", "total": ""},
        max_length=4096,
    )
    assert clean.fields_warning(shapes_schema=True) is None  # null is "not on this page", no warning


# --- TrainData: the warnings of a run and data_report.json ---------------------------------------------------


def train_data(folder: Path, tiny_llava, family, processor, **data):
    from finetune.recipe import load_recipe
    from finetune.resolve import resolve_recipe
    from finetune.training.train_data import TrainData

    recipe_file = folder / "r.yaml"
    body = ", ".join(f"{k}: {v}" for k, v in data.items())
    recipe_file.write_text(f"model: {{family: llava_onevision, path: {tiny_llava}}}\ndata: {{{body}}}\n")
    recipe = resolve_recipe(load_recipe(recipe_file, []), family)
    return TrainData(recipe, family, processor)


def test_run_warns_about_missing_fields_and_writes_them_to_data_report(tiny_llava, family, processor, tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    targets = [{"total": "1", "address": "x"}, {"address": ""}, {"total": "3", "address": "y"}]
    train = write_jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "target": t} for t in targets])
    val = write_jsonl(tmp_path / "val.jsonl", [{"image": "a.png", "target": {"total": "", "address": "z"}}])
    data = train_data(tmp_path, tiny_llava, family, processor, train=train, val=val)
    lines = [w for w in data.warnings if "fields missing or empty" in w]
    assert lines == [
        "train: fields missing or empty in some targets (a missing field becomes optional in the answer schema): "
        "total missing in 1 of 3, address empty in 1 of 3",
        "val: fields missing or empty in some targets: total empty in 1 of 1",
    ]
    data.write_report(tmp_path)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["fields"] == {
        "total": counts(3, present=2, missing=1),
        "address": counts(3, present=2, empty=1),
    }
    assert report["val"]["fields"]["total"] == counts(1, empty=1)
    assert report["overlap_with_train"]["val"] == {
        "source": str(val),
        "same_file": False,
        "samples": 1,
        "shared": 0,
        "first_shared": [],
    }
    assert not [w for w in data.warnings if "overstate" in w]


def test_an_eval_split_sharing_samples_with_train_is_warned_about(tiny_llava, family, processor, tmp_path):
    for colour in ("white", "black", "red"):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{colour}.png")
    rows = [{"image": f"{c}.png", "target": {"n": str(i)}} for i, c in enumerate(("white", "black", "red"))]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "eval").mkdir()
    # The same image files under another relative path (same resolved file), one target changed: 2 of 3 shared.
    val_rows = [
        {"image": "../black.png", "target": {"n": "1"}},
        {"image": "../red.png", "target": {"n": "9"}},
        {"image": "../white.png", "target": {"n": "0"}},
    ]
    val = write_jsonl(tmp_path / "eval" / "val.jsonl", val_rows)
    data = train_data(tmp_path, tiny_llava, family, processor, train=train, val=val)
    lines = [w for w in data.warnings if "overstate" in w]
    assert lines == [
        f"val shares 2 of 3 samples with train (same images and target): {val}:1 = {train}:2, {val}:3 = {train}:1; "
        f"scores on val overstate what the model learned"
    ]
    data.write_report(tmp_path)
    overlap = json.loads((tmp_path / "data_report.json").read_text())["overlap_with_train"]
    assert overlap["val"]["shared"] == 2 and overlap["val"]["samples"] == 3 and not overlap["val"]["same_file"]
    assert overlap["val"]["first_shared"] == [f"{val}:1 = {train}:2", f"{val}:3 = {train}:1"]


def test_an_eval_split_that_is_the_training_file_is_warned_about(tiny_llava, family, processor, tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    train = write_jsonl(tmp_path / "train.jsonl", [{"image": "a.png", "target": {"n": str(i)}} for i in range(2)])
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / "train.jsonl"  # another spelling of the same file
    data = train_data(tmp_path, tiny_llava, family, processor, train=train, val=same, test=train)
    lines = [w for w in data.warnings if "overstate" in w]
    assert lines == [
        f"data.val ({same}) is the same file as data.train: scores on val overstate what the model learned",
        f"data.test ({train}) is the same file as data.train: scores on test overstate what the model learned",
    ]
    data.write_report(tmp_path)
    overlap = json.loads((tmp_path / "data_report.json").read_text())["overlap_with_train"]
    assert overlap["val"]["same_file"] and overlap["val"]["shared"] == 2 == overlap["val"]["samples"]
    assert overlap["test"] == {"source": str(train), "same_file": True, "same_as": "data.train"}  # not read (val is)


def test_samples_a_stage_trains_on_count_as_training_samples(tiny_llava, family, processor, tmp_path):
    """A stage's own data is trained on as much as data.train: an eval split sharing its samples, or being its
    file, is warned about too."""
    for colour in ("white", "black"):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{colour}.png")
    train = write_jsonl(tmp_path / "train.jsonl", [{"image": "white.png", "target": {"n": "0"}}])
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"image": "black.png", "target": {"n": "1"}}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"image": "black.png", "target": {"n": "1"}}])
    groups = "{vision: frozen, projector: frozen, llm: full}"
    stages = f"[{{name: a, groups: {groups}}}, {{name: b, groups: {groups}, data: {{train: {extra}}}}}]"
    (tmp_path / "r.yaml").write_text(
        f"model: {{family: llava_onevision, path: {tiny_llava}}}\n"
        f"data: {{train: {train}, val: {val}, test: {extra}}}\nstages: {stages}\n"
    )
    from finetune.recipe import load_recipe
    from finetune.resolve import resolve_recipe
    from finetune.training.train_data import TrainData

    data = TrainData(resolve_recipe(load_recipe(tmp_path / "r.yaml", []), family), family, processor)
    assert [w for w in data.warnings if "overstate" in w] == [
        f"val shares 1 of 1 samples with train (same images and target): {val}:1 = {extra}:1; scores on val "
        f"overstate what the model learned",
        f"data.test ({extra}) is the same file as stages.1.data: scores on test overstate what the model learned",
    ]


# --- the logged learning rate ---------------------------------------------------------------------------------


def test_the_logged_learning_rate_is_the_one_each_step_used(
    tiny_mississippi, simple_docs, tmp_path, fresh_accelerate_state
):
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    out = tmp_path / "run"
    recipe = load_recipe(
        "quickstart",
        [
            f"model.path={tiny_mississippi}",
            f"data.train={simple_docs['train']}",
            "data.val=null",
            "data.test=null",
            "eval.before_training=false",
            "eval.after_training=false",
            "optim.scheduler=linear",
            "optim.warmup_steps=2",
            "train.max_steps=4",
            "train.batch_size=2",
            "train.log_every=1",
            "train.checkpoint_every=null",
            f"output.dir={out}",
        ],
    )
    used: list[dict] = []

    def record(optimizer, args, kwargs):
        if isinstance(optimizer, torch.optim.AdamW):
            used.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    handle = register_optimizer_step_pre_hook(record)
    try:
        job = FineTuneRecipe(recipe)
        job.setup()
        job.train()
    finally:
        handle.remove()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = [{k.removeprefix("lr/"): v for k, v in r.items() if k.startswith("lr/")} for r in log]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and len(used) == 4
    assert logged == used
    # Warmup over 2 steps, then linear decay to 0 at step 4: step 1 ran at 0, step 2 at half the rate.
    lr = 1e-3
    assert [max(r.values()) for r in logged] == pytest.approx([0.0, lr / 2, lr, lr / 2])
