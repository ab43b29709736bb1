"""Evaluation end to end: the eval CLI on base models, adapters and run folders; schema-constrained decoding; and
evaluation during training choosing the best model."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.eval import evaluate_model, main


@pytest.mark.parametrize("docs_fixture, max_new_tokens", [("simple_docs", 96), ("invoice_docs", 400)])
def test_constrained_decoding_makes_a_random_model_write_valid_json(
    tiny_mississippi, request, tmp_path, docs_fixture, max_new_tokens
):
    """A randomly initialised model almost never writes JSON; with the grammar every answer parses and conforms to
    the answer schema — for flat forms and for invoices (nested objects, lists of line items, numbers)."""
    docs = request.getfixturevalue(docs_fixture)
    common = {
        "family": "mississippi",
        "instruction": "Extract the fields:",
        "max_new_tokens": max_new_tokens,
        "batch_size": 4,
        "report": False,
    }
    free = evaluate_model(str(tiny_mississippi), str(docs["test"]), out_dir=tmp_path / "free", **common)
    bound = evaluate_model(
        str(tiny_mississippi),
        str(docs["test"]),
        out_dir=tmp_path / "bound",
        constrained=True,
        max_string_length=8,
        max_items=2,
        **common,
    )
    assert free["valid_json_rate"] < 0.5
    assert bound["valid_json_rate"] == 1.0 and bound["schema_conformance_rate"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "bound" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(row["schema_valid"] for row in rows)
    first_key = next(iter(rows[0]["target"]))
    assert all(len(row["prediction"][first_key] or "") <= 8 for row in rows)  # the decoding bound held


def test_eval_cli_on_a_run_folder_and_on_its_adapter(tiny_llava, simple_docs, tmp_path, fresh_accelerate_state, capsys):
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    run = tmp_path / "run"
    overrides = [
        "model.family=llava_onevision",
        f"model.path={tiny_llava}",
        f"data.train={simple_docs['train']}",
        f"data.val={simple_docs['val']}",
        f"data.test={simple_docs['test']}",
        f"output.dir={run}",
        "tuning.groups={vision: frozen, projector: frozen, llm: lora}",
        "train.max_steps=2",
        "eval.before_training=false",
        "eval.after_training=false",
        "eval.max_new_tokens=8",
    ]
    job = FineTuneRecipe(load_recipe("quickstart", overrides))
    job.setup()
    job.train()
    job.save_final()

    metrics = main(["--model", str(run), "--data", "test", "--max-new-tokens", "8", "--out", str(tmp_path / "e1")])
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{") :])  # the CLI prints the scalar metrics as JSON
    assert printed["num_samples"] == metrics["num_samples"] == 4 and "per_field_accuracy" not in printed
    for name in ("metrics.json", "predictions.jsonl", "report.html"):
        assert (tmp_path / "e1" / name).is_file(), name
    saved = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    for key in (
        "json_exact_match",
        "field_f1",
        "ted_accuracy",
        "anls_star",
        "valid_json_rate",
        "schema_conformance_rate",
        "per_field_accuracy",
    ):
        assert key in saved, key
    # The adapter folder alone: base from adapter_config.json, family from the base's config, prompt.json used.
    again = evaluate_model(
        str(run / "final"), str(simple_docs["test"]), out_dir=tmp_path / "e2", max_new_tokens=8, report=False
    )
    first = [json.loads(x)["text"] for x in (tmp_path / "e1" / "predictions.jsonl").read_text().splitlines()]
    second = [json.loads(x)["text"] for x in (tmp_path / "e2" / "predictions.jsonl").read_text().splitlines()]
    assert first == second and again["num_samples"] == 4


def test_split_name_needs_a_run_folder(tiny_mississippi):
    from finetune.errors import UserError

    with pytest.raises(UserError, match="a split name needs a run folder"):
        evaluate_model(str(tiny_mississippi), "val", family="mississippi")


@pytest.mark.slow
def test_evaluation_during_training_keeps_the_best_model(tiny_mississippi, simple_docs, tmp_path):
    from tests.conftest import run_train

    out = tmp_path / "run"
    args = [
        "recipe=quickstart",
        f"model.path={tiny_mississippi}",
        f"data.train={simple_docs['train']}",
        f"data.val={simple_docs['val']}",
        "data.test=null",
        f"output.dir={out}",
        "train.max_steps=6",
        "train.batch_size=4",
        "eval.every_steps=2",
        "eval.during_training_samples=3",
        "eval.max_new_tokens=24",
        "eval.constrained=true",
        "eval.max_string_length=6",
        "eval.best_metric=valid_json_rate",
        "tracking.report_to=[tensorboard]",
        "eval.before_training=false",
    ]
    result = run_train(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [d["step"] for d in metrics["during"]] == [2, 4, 6]
    assert all(d["num_samples"] == 3 for d in metrics["during"])
    best = metrics["best"]
    assert best["metric"] == "valid_json_rate" and best["value"] == max(d["valid_json_rate"] for d in metrics["during"])
    assert best["step"] == min(d["step"] for d in metrics["during"] if d["valid_json_rate"] == best["value"])
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "prompt.json").is_file()
    assert "best valid_json_rate" in result.stderr and (out / "report.html").is_file()
    assert list(out.glob("**/events.out.tfevents.*")), "tensorboard logged nothing"


@pytest.mark.slow
def test_bench_eval_script_runs(tmp_path):
    """Smoke test: the benchmark prints its table (its numbers are in BENCHMARKS.md, not asserted here)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_eval.py"),
            "--samples",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| batch | constrained |" in result.stdout and result.stdout.count("\n| ") >= 5


def test_scores_made_under_other_scoring_rules_are_set_aside_on_resume():
    """A run resumed across an upgrade of the scoring rules compares new scores with neither its old `before`
    nor its old `best` (which would then be kept by a score that is not better under the same rules)."""
    from finetune.metrics import METRICS_VERSION
    from finetune.training.run_eval import set_aside_outdated

    notes = []
    old = {"before": {"json_exact_match": 0.5}, "best": {"metric": "field_f1", "value": 0.9, "samples": 3}}
    kept = set_aside_outdated(old, notes.append)
    assert "before" not in kept and "best" not in kept and kept["metrics_version"] == METRICS_VERSION
    assert kept["outdated"] == {"metrics_version": 1, **old}
    assert len(notes) == 1 and "version 1" in notes[0] and "outdated" in notes[0]
    current = {"metrics_version": METRICS_VERSION, **old}
    assert set_aside_outdated(current, notes.append) == current and len(notes) == 1  # same rules: kept as is
    assert set_aside_outdated({}, notes.append) == {"metrics_version": METRICS_VERSION}  # a new run


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_budget_that_is_not_a_positive_number_is_a_usage_error(value, capsys):
    from finetune.eval import main as eval_main
    from finetune.predict import main as predict_main

    for command, args in ((eval_main, ["--model", "m", "--data", "d"]), (predict_main, ["--model", "m", "page.png"])):
        with pytest.raises(SystemExit) as exit_:
            command([*args, "--max-new-tokens", value])
        assert exit_.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert "--max-new-tokens" in line and value in line


def test_grammar_processor_masks_as_xgrammars_own(tiny_mississippi):
    """Our batched processor (one transfer, C++ batch fill, finished rows skipped) must allow exactly the tokens
    xgrammar's reference transformers processor allows, step after step, rows finishing at different steps."""
    from xgrammar.contrib.hf import LogitsProcessor as ReferenceProcessor

    from finetune.constrained import JsonConstraint
    from finetune.models import get_family

    family = get_family("mississippi")
    processor = family.load_processor(str(tiny_mississippi))
    tokenizer = processor.tokenizer
    stop = family.stop_token_ids(processor)
    vocab = len(tokenizer)
    skeleton = {"name": "", "total": 0.0, "items": [{"code": ""}]}
    constraint = JsonConstraint(
        tokenizer, vocab_size=vocab, stop_token_ids=stop, skeleton=skeleton, max_string_length=4, max_items=2
    )
    ours, reference = constraint.logits_processor(), ReferenceProcessor(constraint.grammar)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.zeros(3, 1, dtype=torch.long)
    finished = [False] * 3
    for _ in range(80):
        scores = torch.randn(3, vocab, generator=generator)
        masked, expected = ours(input_ids, scores.clone()), reference(input_ids, scores.clone())
        live = [i for i in range(3) if not finished[i]]
        torch.testing.assert_close(masked[live], expected[live], rtol=0, atol=0)
        chosen = masked.argmax(-1)
        for i in range(3):
            if finished[i]:
                chosen[i] = tokenizer.pad_token_id  # what generate feeds a finished row
            elif chosen[i].item() in stop:
                finished[i] = True
        input_ids = torch.cat([input_ids, chosen[:, None]], dim=1)
        if all(finished):
            break
    assert all(finished)  # every row closed its JSON within the bounds
