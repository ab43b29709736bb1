"""The preference (`kind: dpo`) stage: its loss is TRL's, its pairs come only from wrong answers, its reference is the
model as the stage starts and never moves, and a run resumed inside it ends where the uninterrupted one does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import DpoLoss, DpoSection
from finetune.data.dataset import Sample
from finetune.training.dpo import preference_loss, sequence_logps
from finetune.training.dpo_pairs import pairs_from_answers
from tests.conftest import partitioned_zero3, run_train
from tests.test_faults import assert_one_line_error, train

LOSSES = list(DpoLoss.__args__)


def _tiny_lm_and_tokenizer():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finetune.models.tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(
        ["<pad>", "<eos>"],
        vocab_size=300,
        extra_corpus=['total 12.50 vendor ACME date 2024-01-02 {"a": 1}'],
        pad_token="<pad>",
        eos_token="<eos>",
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    return Qwen2ForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize("loss", LOSSES)
def test_preference_loss_equals_trls_dpo_trainer_on_the_same_batch(loss, tmp_path):
    """A real `trl.DPOTrainer` (policy and a separate reference model) computes its loss on one collated batch; the
    same batch through our log-probabilities and `preference_loss` gives the same number, for every loss type the
    recipe offers, with TRL's `sft` term (our `sft_weight`) added too."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _tiny_lm_and_tokenizer()
    reference, _ = _tiny_lm_and_tokenizer()
    with torch.no_grad():  # a reference that differs from the policy, so the log-ratios are not all 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = Dataset.from_list(
        [
            {"prompt": "vendor ACME total", "chosen": " 12.50", "rejected": " 1"},
            {"prompt": "date", "chosen": " 2024-01-02 ok", "rejected": " 2024"},
            {"prompt": '{"a":', "chosen": " 1}", "rejected": " 12.50 vendor}"},
        ]
    )
    smoothing = 0.1 if loss in ("robust", "exo_pair") else 0.0
    settings = DpoSection(beta=0.3, loss=loss, label_smoothing=smoothing, sft_weight=0.5)
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=settings.beta,
        loss_type=[loss, "sft"],
        loss_weights=[1.0, settings.sft_weight],
        label_smoothing=smoothing,
        per_device_train_batch_size=3,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)

    # Ours: labels on the completion tokens only, a forward per model, the per-pair loss, the NLL term on chosen.
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    with torch.no_grad():
        logps, tokens = sequence_logps(model, inputs)
        ref_logps, _ = sequence_logps(reference, inputs)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    out = preference_loss(
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        settings=settings,
    )
    ours = out.losses.mean() + settings.sft_weight * (-chosen.sum() / chosen_tokens.sum())
    assert torch.isfinite(ours) and ours.abs() > 1e-3
    torch.testing.assert_close(ours, trl_loss.to(ours.dtype), rtol=1e-5, atol=1e-6)


def _sample(target: dict, answer_ids: list[int]) -> Sample:
    return Sample(images=[], target=target, origin="t.jsonl:1", answer_ids=answer_ids, length=10 + len(answer_ids))


def test_self_pairs_come_only_from_answers_that_are_not_the_gold():
    samples = [_sample({"a": "1", "b": None}, [5, 6, 1]), _sample({"a": "2"}, [7, 1])]

    def row(index, text, ids, truncated=False):
        return {"index": index, "text": text, "ids": ids, "truncated": truncated}

    answers = {
        "greedy": [
            row(0, '{"b": null, "a": "1"}', [9, 9, 1]),  # right (key order and spacing do not matter): no pair
            row(1, '{"a": "3"}', [8, 1]),  # a wrong value: a pair
        ],
        "sampled": [
            row(0, '{"a": "1", "b": "x"}', [5, 7, 1]),  # filled but should be empty: a pair
            row(0, '{"a": "1", "b": "x"}', [5, 7, 1]),  # the same answer again: no second pair
            row(1, '{"a": "2"', [7], truncated=False),  # invalid JSON: a pair
            row(1, '{"a": "2"}', [7, 4], truncated=True),  # cut by the budget, even if it parses: a pair
            row(1, '{"a": 2}', [7, 3, 1]),  # 2 is not "2" (strict): a pair
        ],
    }
    pairs = pairs_from_answers(answers, samples)
    got = [(p.sample, p.rejected_ids, p.kind) for p in pairs]
    assert got == [
        (1, [8, 1], "greedy"),
        (0, [5, 7, 1], "sampled"),
        (1, [7], "sampled"),
        (1, [7, 4], "sampled"),
        (1, [7, 3, 1], "sampled"),
    ]


SFT_THEN_DPO = (
    "[{name: sft, groups: {vision: frozen, projector: frozen, llm: lora}, lr: 1.0e-2, max_steps: 2},"
    " {name: dpo, kind: dpo, groups: {vision: frozen, projector: frozen, llm: lora}, lr: 1.0e-2, max_steps: 4,"
    "  dpo: {beta: 0.2, sampled: 1, temperature: 1.5}}]"
)


def _args(checkpoint, docs, out, **overrides):
    args = {
        "model.family": "mississippi",
        "model.path": str(checkpoint),
        "tuning.groups": "null",
        "data.train": str(docs["train"]),
        "data.val": str(docs["val"]),
        "data.test": "null",
        "output.dir": str(out),
        "eval.max_new_tokens": 8,
        "eval.before_training": False,
        "eval.after_training": False,
        "optim.warmup_ratio": 0.0,
        "optim.scheduler": "constant",
        "train.batch_size": 2,
        "train.log_every": 1,
        "train.checkpoint_every": "null",
        "stages": SFT_THEN_DPO,
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


@pytest.mark.slow
def test_the_reference_is_the_model_as_the_stage_starts_and_never_changes(
    tiny_mississippi, simple_docs, tmp_path, fresh_accelerate_state
):
    """The stored reference log-probabilities are those of the weights the SFT stage ended with (recomputed here
    from a snapshot), not of the base model the adapter-disabled forward would give, and the DPO stage's training
    leaves them as they were while the policy moves."""
    from finetune.recipe import load_recipe
    from finetune.training.dpo_pairs import fill_reference, load_pairs
    from finetune.training.runner import FineTuneRecipe

    out = tmp_path / "run"
    job = FineTuneRecipe(load_recipe("quickstart", _args(tiny_mississippi, simple_docs, out)[1:]))
    job.setup()
    snapshot = {}

    def keep_stage_end(job, index):
        if index == 0:
            model = job.accelerator.unwrap_model(job.model)
            snapshot.update({n: p.detach().clone() for n, p in model.state_dict().items()})

    job.train(on_stage_end=keep_stage_end)
    folder = out / "preference" / "stage2-dpo"
    pairs, summary = load_pairs(folder)
    assert pairs and summary["pairs"] == len(pairs) and {p.kind for p in pairs} <= {"greedy", "sampled"}
    written = (folder / "pairs.jsonl").read_bytes()

    model = job.accelerator.unwrap_model(job.model)
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}
    assert any(not torch.equal(trained[n], snapshot[n]) for n in snapshot), "the DPO stage trained nothing"
    samples = job.data.stage_samples[1].samples
    common = dict(family=job.family, processor=job.processor, instruction_text=job.instruction_text)

    def reference_under(weights):
        model.load_state_dict(weights)
        fresh = [type(p)(p.sample, p.rejected_ids, p.kind) for p in pairs]
        fill_reference(model, fresh, samples, **common, accelerator=job.accelerator, batch_size=2)
        return [(p.ref_chosen, p.ref_rejected) for p in fresh]

    stored = [(p.ref_chosen, p.ref_rejected) for p in pairs]
    assert reference_under(snapshot) == stored  # exactly the stage-start model's
    assert reference_under(trained) != stored  # the policy has moved away from it
    with model.disable_adapter():  # the base model (what disabling the adapter would give) is another model
        base = [(p.ref_chosen, p.ref_rejected) for p in pairs]
        fresh = [type(p)(p.sample, p.rejected_ids, p.kind) for p in pairs]
        model.load_state_dict(snapshot)
        fill_reference(model, fresh, samples, **common, accelerator=job.accelerator, batch_size=2)
        assert [(p.ref_chosen, p.ref_rejected) for p in fresh] != base
    assert (folder / "pairs.jsonl").read_bytes() == written
    job.close()


@pytest.mark.slow
def test_a_dpo_stage_resumed_midway_equals_an_uninterrupted_one(tiny_mississippi, simple_docs, tmp_path):
    """Checkpoints inside the DPO stage (LoRA dropout on, sampled answers, grad accumulation): the resumed run reads
    its pairs back instead of generating again, and ends bit-identical; the stage logs its rewards."""
    overrides = {
        "tuning.lora.dropout": 0.1,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 5,
        "train.grad_accum": 2,
        "eval.after_training": True,
    }
    full = tmp_path / "full"
    result = run_train(_args(tiny_mississippi, simple_docs, full, **overrides))
    assert "pairs from its" in result.stderr and "stage 2/2 'dpo'" in result.stderr
    log = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["sft", "sft", "dpo", "dpo", "dpo", "dpo"]
    assert all("rewards/margin" in r and "rewards/accuracy" in r for r in log if r["stage"] == "dpo")
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["preference"]["stage2-dpo"]["start"]["tag"] == "stage1-sft"
    assert metrics["after"]["field_changes"]["since"] == "stage1-sft"
    assert set(metrics["after"]["field_changes"]["fields"]) == {"number", "total"}

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final", "step_000006"))
    # Resumed at step 4: stage 2, step 2 of 4; nothing may be generated again.
    result = run_train(_args(tiny_mississippi, simple_docs, resumed, **overrides, **{"output.if_exists": "resume"}))
    assert "at step 4: stage 2 'dpo' step 2/4" in result.stderr
    assert "pairs read back from" in result.stderr and "pairs from its" not in result.stderr
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_dpo_stage_on_two_processes_equals_one_process(tiny_mississippi, simple_docs, tmp_path):
    """SFT then DPO with the same 4 samples per step on one process and on two (DDP, and ZeRO-3 with the weights
    really partitioned, so generation runs with synced GPUs): the answers are sharded and gathered into the same
    pairs, none lost or doubled, with the same reference log-probabilities; the DPO losses and rewards logged and the
    final adapter are the same, because the loss is divided by the pairs of the whole step across processes."""
    overrides = {
        "stages": SFT_THEN_DPO.replace("sampled: 1, temperature: 1.5", "sampled: 0"),
        "tuning.lora.dropout": 0.0,
        "train.group_by_length": False,
        "optim.max_grad_norm": "null",
    }
    layouts = {
        "one": ({"train.batch_size": 4}, 1, {}),
        "ddp": ({"train.batch_size": 2}, 2, {}),
        "zero3": ({"train.batch_size": 2}, 2, partitioned_zero3(tmp_path)),
    }
    logs, pairs, adapters = {}, {}, {}
    for name, (extra, processes, launch) in layouts.items():
        out = tmp_path / name
        run_train(_args(tiny_mississippi, simple_docs, out, **overrides, **extra), processes=processes, **launch)
        logs[name] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        saved = (out / "preference" / "stage2-dpo" / "pairs.jsonl").read_text().splitlines()
        records = sorted(map(json.loads, saved), key=lambda p: (p["sample"], p["rejected_ids"]))
        pairs[name] = [(p["origin"], p["rejected_ids"], (p["ref_chosen"], p["ref_rejected"])) for p in records]
        adapters[name] = load_file(out / "final" / "adapter_model.safetensors")
    assert pairs["one"], "the SFT stage left no wrong answers to learn from"
    dpo_steps = [r for r in logs["one"] if r["stage"] == "dpo"]
    assert len(dpo_steps) == 4 and all("rewards/margin" in r for r in dpo_steps)
    for name in ("ddp", "zero3"):
        assert [pair[:2] for pair in pairs[name]] == [pair[:2] for pair in pairs["one"]], name
        for (*_, refs), (*_, expected) in zip(pairs[name], pairs["one"], strict=True):
            assert refs == pytest.approx(expected, rel=1e-4), name
        assert [r["samples"] for r in logs[name]] == [r["samples"] for r in logs["one"]], name
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            mine = [r[key] for r in logs[name] if key in r]
            assert mine == pytest.approx([r[key] for r in logs["one"] if key in r], rel=1e-4, abs=1e-6), (name, key)
        assert adapters[name].keys() == adapters["one"].keys()
        # Adam divides by the root of the squared gradient: an element whose gradient is ~0 moves by up to lr (1e-2)
        # a step on summation-order rounding alone. Allow a fifth of one step; the losses above are the exact check.
        for key, value in adapters["one"].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_preference_pairs_from_a_file_train_a_dpo_stage(tiny_mississippi, simple_docs, tmp_path):
    """`data.preference` JSONL {image, chosen, rejected}: a rejected answer given as JSON or as text; a record
    without one is a one-line error naming it."""
    records = [json.loads(line) for line in simple_docs["train"].read_text().splitlines()][:4]
    lines = []
    for i, record in enumerate(records):
        rejected = {**record["target"], "total": "0.00"} if i % 2 else '{"number": "oops"'
        image = str(simple_docs["train"].parent / record["image"])
        lines.append({"image": image, "chosen": record["target"], "rejected": rejected})
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    stages = (
        "[{name: prefer, kind: dpo, groups: {vision: frozen, projector: frozen, llm: lora}, lr: 1.0e-3, epochs: 1,"
        " dpo: {pairs: preference, loss: ipo}}]"
    )
    out = tmp_path / "run"
    result = run_train(_args(tiny_mississippi, simple_docs, out, stages=stages, **{"data.preference": pairs_file}))
    assert "stage 'prefer': 4 preference pairs" in result.stderr
    assert "2 optimizer steps" in result.stderr
    saved = [
        json.loads(line) for line in (out / "preference" / "stage1-prefer" / "pairs.jsonl").read_text().splitlines()
    ]
    assert [s["kind"] for s in saved] == ["given"] * 4 and saved[0]["rejected"] == '{"number": "oops"'

    lines[2].pop("rejected")
    pairs_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    bad = train(
        _args(tiny_mississippi, simple_docs, tmp_path / "bad", stages=stages, **{"data.preference": pairs_file})
    )
    assert_one_line_error(bad, f"{pairs_file}:3: field 'rejected' must be a JSON object or the text of an answer")


def test_a_preference_stage_and_its_pairs_must_agree(tiny_mississippi, simple_docs, tmp_path):
    """pairs: preference without data.preference, and data.preference that no stage reads: one line each."""
    stages = (
        "[{name: prefer, kind: dpo, groups: {vision: frozen, projector: frozen, llm: lora}, max_steps: 1,"
        " dpo: {pairs: preference}}]"
    )
    result = train(_args(tiny_mississippi, simple_docs, tmp_path / "a", stages=stages))
    assert_one_line_error(result, "stages.0.dpo.pairs: pairs: preference reads data.preference")
    result = train(_args(tiny_mississippi, simple_docs, tmp_path / "b", **{"data.preference": simple_docs["train"]}))
    assert_one_line_error(result, "data.preference: no stage reads these pairs")
    result = train(_args(tiny_mississippi, simple_docs, tmp_path / "c", stages=stages.replace("kind: dpo, ", "")))
    assert_one_line_error(result, "dpo settings apply to a stage of kind dpo")
