"""Answers that fit: the answer schema and decoding bounds travel with a model folder, `--skeleton` for a base
checkpoint, max_new_tokens checked against the longest answer the bounds allow, and answers cut by the budget
reported as truncated (and scored as invalid)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.constrained import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_NEW_TOKENS_CAP,
    JsonConstraint,
    answer_token_budget,
    fit_token_budget,
    longest_answer_units,
    tokens_per_unit,
)
from finetune.errors import UserError
from finetune.eval import evaluate_model
from finetune.predict import predict

LONG = 200  # characters of the longest string in the training targets below


@pytest.fixture
def spy_constraints(monkeypatch):
    """Every JsonConstraint built through `for_model`, in order."""
    built: list[JsonConstraint] = []
    original = JsonConstraint.for_model.__func__

    def for_model(cls, *args, **kwargs):
        built.append(original(cls, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(JsonConstraint, "for_model", classmethod(for_model))
    return built


class _Stop(Exception):
    pass


@pytest.fixture
def spy_budget(monkeypatch):
    """The max_new_tokens generation would run with; stops before generating."""
    seen: list[int] = []

    def evaluate(*args, max_new_tokens, **kwargs):
        seen.append(max_new_tokens)
        raise _Stop

    monkeypatch.setattr("finetune.evaluation.evaluate", evaluate)
    return seen


def _long_docs(simple_docs, folder: Path) -> dict[str, Path]:
    """The simple forms with one training target's number LONG characters long (absolute image paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "val", "test"):
        rows = [json.loads(line) for line in simple_docs[split].read_text().splitlines()]
        for row in rows:
            row["image"] = str(simple_docs[split].parent / row["image"])
        if split == "train":
            rows[0]["target"]["number"] = "7" * LONG
        out[split] = folder / f"{split}.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_trained_bounds_are_saved_with_the_model_and_used_by_eval_and_predict(
    tiny_llava, simple_docs, tmp_path, fresh_accelerate_state, spy_constraints
):
    """Trained on a 200-character string: final/ keeps the answer schema and bounds, and eval / predict
    --constrained on the folder alone (moved away from its run, so no recipe points at the training data) decode
    with them instead of 64 characters."""
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    docs = _long_docs(simple_docs, tmp_path / "docs")
    run = tmp_path / "run"
    overrides = [
        "model.family=llava_onevision",
        f"model.path={tiny_llava}",
        f"data.train={docs['train']}",
        f"data.val={docs['val']}",
        f"data.test={docs['test']}",
        f"output.dir={run}",
        "tuning.groups={vision: frozen, projector: frozen, llm: lora}",
        "train.max_steps=1",
        "eval.before_training=false",
        "eval.after_training=false",
        "eval.max_new_tokens=8",
    ]
    job = FineTuneRecipe(load_recipe("quickstart", overrides))
    job.setup()
    job.train()
    job.save_final()
    answer = json.loads((run / "final" / "prompt.json").read_text())["answer"]
    assert answer["max_string_length"] >= LONG and answer["max_items"] >= 1
    assert answer["schema"]["properties"].keys() == {"number", "total"}

    moved = tmp_path / "moved"
    shutil.copytree(run / "final", moved)
    common = {"constrained": True, "max_new_tokens": 4, "batch_size": 4}
    evaluate_model(str(moved), str(docs["test"]), out_dir=tmp_path / "e", report=False, max_samples=2, **common)
    records = predict(str(moved), [_an_image(docs)], **common)
    assert len(spy_constraints) == 2
    for constraint in spy_constraints:
        assert constraint.max_string_length == answer["max_string_length"] >= LONG
        assert constraint.max_items == answer["max_items"]
        assert "{0," + str(answer["max_string_length"]) + "}" in constraint.schema["properties"]["number"]["pattern"]
        assert set(constraint.schema["required"]) == set(answer["schema"]["required"])
    assert records[0]["truncated"] is True  # 4 tokens cannot hold a JSON answer of these bounds


def _an_image(docs) -> str:
    return json.loads(docs["test"].read_text().splitlines()[0])["image"]


def test_an_answer_cut_at_max_new_tokens_is_truncated_and_scored_invalid(tiny_mississippi, simple_docs, tmp_path):
    out = tmp_path / "e"
    metrics = evaluate_model(
        str(tiny_mississippi),
        str(simple_docs["test"]),
        family="mississippi",
        out_dir=out,
        constrained=True,
        max_string_length=8,
        max_new_tokens=3,
        batch_size=4,
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(r["truncated"] and r["prediction"] is None and not r["valid_json"] for r in rows)
    assert metrics["truncated_rate"] == 1.0 and metrics["valid_json_rate"] == 0.0
    assert json.loads((out / "metrics.json").read_text())["truncated_rate"] == 1.0
    assert 'class="badge truncated"' in (out / "report.html").read_text()


def test_a_truncated_answer_is_never_scored_as_complete():
    """Even a cut text that happens to parse (the budget ran out right after its last character) scores 0."""
    from finetune.data.dataset import Sample
    from finetune.evaluation import score

    sample = Sample(images=[], target={"a": "1"}, origin="x", answer_ids=[], length=0)
    result = score(
        [sample, sample], [{"index": 0, "text": '{"a":"1"}', "truncated": True}, {"index": 1, "text": '{"a":"1"}'}]
    )
    cut, whole = result.predictions
    assert cut["truncated"] and cut["prediction"] is None and not cut["valid_json"] and cut["exact_match"] == 0
    assert not whole["truncated"] and whole["exact_match"] == 1
    assert result.metrics["truncated_rate"] == 0.5 and result.metrics["json_exact_match"] == 0.5


def test_cut_by_budget_needs_the_whole_budget_without_an_end_token():
    import torch

    from finetune.evaluation import cut_by_budget

    new = torch.tensor([[5, 6, 7], [5, 2, 0], [5, 6, 2]])
    assert cut_by_budget(new, [2], 3) == [True, False, False]
    assert cut_by_budget(new, [2], 4) == [False, False, False]  # ended before the budget: all rows finished


def test_skeleton_on_a_base_checkpoint(tiny_mississippi, simple_docs, tmp_path):
    """predict / eval on a base checkpoint take the answer's keys from --skeleton (a JSON string or file)."""
    image = str(simple_docs["test"].parent / json.loads(simple_docs["test"].read_text().splitlines()[0])["image"])
    file = tmp_path / "skeleton.json"
    file.write_text(json.dumps({"total": ""}))
    common = {"family": "mississippi", "constrained": True, "max_string_length": 4, "batch_size": 2}
    for skeleton in ('{"number": ""}', str(file)):
        records = predict(str(tiny_mississippi), [image, image], skeleton=skeleton, **common)
        keys = set(json.loads(skeleton) if skeleton.startswith("{") else json.loads(file.read_text()))
        assert all(not r["truncated"] and r["valid_json"] and set(r["prediction"]) == keys for r in records)
    out = tmp_path / "e"
    evaluate_model(
        str(tiny_mississippi), str(simple_docs["test"]), out_dir=out, skeleton='{"number": ""}', report=False, **common
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(set(r["prediction"]) == {"number"} for r in rows)


@pytest.mark.parametrize(
    "value, message",
    [
        ("{bad", "--skeleton: not valid JSON (line 1"),
        ("[1, 2]", "--skeleton: needs a non-empty JSON object"),
        ("{}", "--skeleton: needs a non-empty JSON object"),
        ("no/such/file.json", "--skeleton: 'no/such/file.json' is neither a JSON object nor a JSON file"),
    ],
)
def test_a_bad_skeleton_is_one_line(tiny_mississippi, value, message):
    from finetune.predict import main

    with pytest.raises(UserError) as err:
        main(["--model", str(tiny_mississippi), "--family", "mississippi", "--skeleton", value, "x.png"])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_budget_is_estimated_from_the_bounds_and_this_tokenizer(tiny_mississippi):
    from finetune.models import get_family
    from finetune.schema import schema_from_skeleton

    schema = schema_from_skeleton({"number": "", "items": [{"name": ""}]})
    units = longest_answer_units(schema, 200, 3)
    longest = json.dumps({"number": "x" * 200, "items": [{"name": "x" * 200}] * 3}, separators=(",", ":"))
    assert units == len(longest)
    tokenizer = get_family("mississippi").load_processor(str(tiny_mississippi)).tokenizer
    budget = answer_token_budget(schema, tokenizer, max_string_length=200, max_items=3)
    # An upper bound on what the longest answers take, whatever their characters (a byte-level tokenizer spends
    # four tokens on a character outside the BMP) ...
    for char in ("a", "€", "中", "\U0001d11e", "\\n"):
        answer = {"number": "x" * 200, "items": [{"name": "x" * 200}] * 3}
        text = json.dumps(answer, separators=(",", ":"), ensure_ascii=False)
        filled = text.replace("x" * 200, char * (200 // len(char)))
        assert len(tokenizer.encode(filled, add_special_tokens=False)) + 1 <= budget, char
    per_char = max(len(tokenizer.encode(c, add_special_tokens=False)) for c in "a€中\U0001d11e")
    assert budget <= units * per_char + 1  # ... and no more than the character-by-character estimate


def test_the_budget_counts_keys_as_tokens_not_as_worst_case_characters(tiny_mississippi):
    """A list of 16 objects repeats its keys 16 times: counted at the worst character's rate they alone would take
    thousands of tokens; as the tokenizer encodes them, a fraction of that."""
    from finetune.models import get_family
    from finetune.schema import schema_from_skeleton

    keys = ["description", "quantity", "unit_price", "line_total", "tax_rate"]
    schema = schema_from_skeleton({"items": [dict.fromkeys(keys, "")]})
    tokenizer = get_family("mississippi").load_processor(str(tiny_mississippi)).tokenizer
    budget = answer_token_budget(schema, tokenizer, max_string_length=8, max_items=16)
    per_char = tokens_per_unit(tokenizer)
    naive = longest_answer_units(schema, 8, 16) * per_char + 1
    assert budget < 0.6 * naive
    longest = json.dumps(
        {"items": [dict.fromkeys(keys, "\U0001d11e" * 8)] * 16}, separators=(",", ":"), ensure_ascii=False
    )
    assert len(tokenizer.encode(longest, add_special_tokens=False)) + 1 <= budget


def test_fit_token_budget_raises_the_default_and_warns_about_a_given_one():
    said: list[str] = []
    assert fit_token_budget(None, 100, say=said.append) == DEFAULT_MAX_NEW_TOKENS and not said
    assert fit_token_budget(None, 1500, say=said.append) == 1500 and "raised from 512 to 1500" in said[-1]
    assert fit_token_budget(None, 10**6, say=said.append) == MAX_NEW_TOKENS_CAP and "capped" in said[-1]
    assert fit_token_budget(64, 1500, say=said.append) == 64 and said[-1].startswith("warning: --max-new-tokens 64")
    assert len(said) == 3


def test_eval_and_predict_raise_max_new_tokens_to_fit_200_characters(
    tiny_mississippi, simple_docs, tmp_path, spy_budget, capsys
):
    """A 200-character bound needs far more than the default 512 tokens: the budget is raised and said so; a given
    --max-new-tokens is kept with a warning."""
    common = {"family": "mississippi", "constrained": True, "max_string_length": 200}
    image = str(simple_docs["test"].parent / json.loads(simple_docs["test"].read_text().splitlines()[0])["image"])
    with pytest.raises(_Stop):
        evaluate_model(str(tiny_mississippi), str(simple_docs["test"]), out_dir=tmp_path / "e", **common)
    with pytest.raises(_Stop):
        predict(str(tiny_mississippi), [image], skeleton='{"number": "", "total": ""}', **common)
    assert len(spy_budget) == 2 and all(n > DEFAULT_MAX_NEW_TOKENS for n in spy_budget)
    assert capsys.readouterr().err.count("max_new_tokens raised from 512") == 2
    with pytest.raises(_Stop):
        predict(str(tiny_mississippi), [image], skeleton='{"number": ""}', max_new_tokens=100, **common)
    assert spy_budget[-1] == 100 and "warning: --max-new-tokens 100 may cut answers" in capsys.readouterr().err
