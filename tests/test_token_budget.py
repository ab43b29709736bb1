"""`train.max_tokens_per_batch`: batches filled up to a token budget instead of a fixed number of samples."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe import RecipeError, load_recipe
from finetune.training.sampler import TokenBudgetBatchSampler
from tests.conftest import run_train
from tests.test_cli import assert_one_error_line, run

# Receipts (short) and A4 pages at several tiles (long), as a real mix.
LENGTHS = [random.Random(i).choice([180, 220, 260, 900, 1400, 1800]) + i % 17 for i in range(97)]


def epoch(sampler: TokenBudgetBatchSampler, n: int) -> list[list[int]]:
    sampler.set_epoch(n)
    return list(sampler)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_batches_never_exceed_the_budget_and_cover_every_sample_once(group_by_length):
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=4096, max_samples=8, seed=3, group_by_length=group_by_length)
    for n in range(3):
        batches = epoch(sampler, n)
        assert len(batches) == len(sampler)  # the same count every epoch: the schedule and resume rely on it
        assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
        for batch in batches:
            assert len(batch) <= 8 and max(LENGTHS[i] for i in batch) * len(batch) <= 4096
        # The costliest batch comes first, so a budget the memory cannot hold fails at step 1.
        costs = [max(LENGTHS[i] for i in batch) * len(batch) for batch in batches]
        assert costs[0] == max(costs)


def test_each_epoch_has_its_own_order_and_the_same_one_when_replayed():
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=4096, max_samples=8, seed=3)
    first, second = epoch(sampler, 0), epoch(sampler, 1)
    assert first != second and sorted(map(sorted, first)) == sorted(map(sorted, second))
    replay = TokenBudgetBatchSampler(LENGTHS, max_tokens=4096, max_samples=8, seed=3)
    assert epoch(replay, 1) == second


def test_grouping_by_length_wastes_less_on_padding():
    def padding(group_by_length: bool) -> int:
        sampler = TokenBudgetBatchSampler(
            LENGTHS, max_tokens=4096, max_samples=8, seed=0, group_by_length=group_by_length
        )
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in sampler)

    assert padding(True) < padding(False) / 3


def test_a_budget_beside_batch_size_one_is_one_line():
    with pytest.raises(RecipeError, match=r"train: max_tokens_per_batch with batch_size 1 batches one sample"):
        load_recipe("recipes/quickstart.yaml", ["train.max_tokens_per_batch=4096", "train.batch_size=1"])


# --- end to end ---------------------------------------------------------------------------------------------------


def budget_args(checkpoint, docs, out, **overrides):
    args = {
        "model.path": str(checkpoint),
        "data.train": str(docs["train"]),
        "data.val": str(docs["val"]),
        "data.test": "null",
        "output.dir": str(out),
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "tuning.lora.dropout": 0.1,
        "tuning.lora.r": 4,
        "optim.lr": 1e-2,
        "optim.warmup_ratio": 0.0,
        "train.max_steps": 6,
        "train.batch_size": 8,
        "train.max_tokens_per_batch": 700,
        "train.grad_accum": 2,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 5,
        "train.log_every": 1,
        "eval.before_training": False,
        "eval.after_training": False,
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


@pytest.mark.slow
def test_a_token_budget_run_resumes_exactly(tiny_mississippi, simple_docs, tmp_path):
    full = tmp_path / "full"
    run_train(budget_args(tiny_mississippi, simple_docs, full))
    log = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    # 8 samples of ~170 tokens: 4 per batch fit 700 tokens, so 2 batches an epoch and 1 epoch per optimizer step.
    assert [row["samples"] for row in log] == [8] * 6 and [row["epoch"] for row in log] == [1, 2, 3, 4, 5, 6]

    resumed = tmp_path / "resumed"
    shutil.copytree(
        full, resumed, ignore=shutil.ignore_patterns("final", "step_000004", "step_000006", "train_log.jsonl")
    )
    run_train(budget_args(tiny_mississippi, simple_docs, resumed, **{"output.if_exists": "resume"}))
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_a_sample_longer_than_the_budget_is_one_line_before_step_one(tiny_mississippi, simple_docs, tmp_path):
    args = budget_args(tiny_mississippi, simple_docs, tmp_path / "run", **{"train.max_tokens_per_batch": 100})
    result = run(["train", *args])
    assert_one_error_line(result, "train.max_tokens_per_batch 100 is less than the")
    assert "train.jsonl:1" in result.stderr and not (tmp_path / "run" / "train_log.jsonl").exists()


@pytest.mark.slow
def test_token_budget_batches_under_ddp(tiny_mississippi, simple_docs, tmp_path):
    """Two processes share each epoch's batches (Accelerate shards the batch sampler, and sets its epoch)."""
    out = tmp_path / "ddp"
    overrides = {"train.max_tokens_per_batch": 400, "train.grad_accum": 1, "train.max_steps": 4}
    result = run_train(budget_args(tiny_mississippi, simple_docs, out, **overrides), processes=2)
    assert "trainable weights identical on all 2 processes" in result.stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # 2 samples per batch fit 400 tokens: 4 batches an epoch, 2 per process, so an epoch every 2 steps.
    assert [row["samples"] for row in log] == [4] * 4 and [row["epoch"] for row in log] == [0, 1, 1, 2]
