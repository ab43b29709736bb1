"""Staged training end to end: what each stage may change, the learning rates it runs at, resume inside a later
stage, and the same two-stage recipe under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (2 processes on CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import partitioned_zero3, run_train

pytestmark = pytest.mark.slow


def base_args(checkpoint, docs, out, **overrides):
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
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


THREE_STAGES = (
    "[{name: projector, groups: {vision: frozen, projector: full, llm: frozen}, lr: 1.0e-3, max_steps: 2},"
    " {name: vision, groups: {vision: full, projector: full, llm: frozen}, lr: {vision: 2.0e-4, projector: 5.0e-4},"
    "  max_steps: 2, data: {mix: [{source: TRAIN, weight: 3}, {source: VAL, weight: 1}], samples_per_epoch: 6}},"
    " {name: llm, groups: {vision: frozen, projector: frozen, llm: full}, lr: 3.0e-4, epochs: 1}]"
)


def test_each_stage_trains_exactly_its_groups_at_its_learning_rates(
    tiny_mississippi, simple_docs, tmp_path, fresh_accelerate_state
):
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    stages = THREE_STAGES.replace("TRAIN", str(simple_docs["train"])).replace("VAL", str(simple_docs["val"]))
    out = tmp_path / "run"
    recipe = load_recipe(
        "quickstart", base_args(tiny_mississippi, simple_docs, out, stages=stages, **{"eval.after_training": True})[1:]
    )
    job = FineTuneRecipe(recipe)
    job.setup()

    def weights():
        model = job.accelerator.unwrap_model(job.model)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    seen = {"before": weights()}
    expected_lr = [{"projector": 1e-3}, {"vision": 2e-4, "projector": 5e-4}, {"llm": 3e-4}]

    def check_stage(job, index):
        before, after = seen["before"], weights()
        stage = job.stages[index]
        for name, value in after.items():
            group = job.family.group_of(name)
            if stage.groups[group] == "frozen":
                assert torch.equal(value, before[name]), f"stage {stage.name}: frozen {name} changed"
            elif not name.startswith("model.language_model.embed_tokens"):  # rows of unseen tokens: no gradient
                assert not torch.equal(value, before[name]), f"stage {stage.name}: trainable {name} did not change"
        # One optimizer per stage, one parameter group per (module group, decay), at the stage's rates; state
        # (Adam moments) only for what the stage trains.
        lrs = {g["name"].removesuffix(".no_decay"): g["lr"] for g in job.optimizer.param_groups}
        assert lrs == expected_lr[index]
        trainable = {
            id(p)
            for n, p in job.accelerator.unwrap_model(job.model).named_parameters()
            if stage.groups[job.family.group_of(n)] != "frozen"
        }
        assert {id(p) for p in job.optimizer.state} == trainable
        seen["before"] = after

    job.train(on_stage_end=check_stage)
    job.save_final()

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["projector"] * 2 + ["vision"] * 2 + ["llm"] * 4  # epochs: 1 = 8 / 2
    for record in log:  # the logged learning rate of every group, every step, is the recipe's (constant schedule)
        index = ["projector", "vision", "llm"].index(record["stage"])
        assert {
            k.removeprefix("lr/").removesuffix(".no_decay"): v for k, v in record.items() if k.startswith("lr/")
        } == expected_lr[index]
    # The mixed stage drew its 6 samples per epoch from both sources (train and val, 8 samples each).
    mix = job.data.stage_samples[1]
    assert mix.source_sizes == [8, 8] and mix.weights == [3, 1] and len(job.data.loader(1).sampler) == 6
    # recipe.yaml records the stages as run (learning rate per group filled in).
    import yaml

    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [s["lr"] for s in saved["stages"]] == expected_lr and saved["schedule"] is None


def test_paper_schedule_runs_its_stages_in_one_job(tiny_mississippi, simple_docs, tmp_path):
    out = tmp_path / "paper"
    result = run_train(
        base_args(
            tiny_mississippi,
            simple_docs,
            out,
            stages="null",
            schedule="paper",
            **{"train.max_steps": 10, "eval.after_training": True},
        )
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = {}
    for record in log:
        steps[record["stage"]] = steps.get(record["stage"], 0) + 1
    assert steps == {"projector": 1, "projector+llm": 3, "task": 6}  # 10%, 30%, 60% of 10 steps
    assert log[0]["lr/projector"] == 2e-4 and log[-1]["lr/llm"] == 4e-5
    # Each stage starts by saying what trains, with parameter counts per group.
    assert "stage 1/3 'projector'" in result.stderr and "stage 'projector' parameters: vision: frozen" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"stage1-projector", "stage2-projector+llm"} and "after" in metrics


TWO_STAGES = (
    "[{name: align, groups: {vision: frozen, projector: full, llm: frozen}, lr: 1.0e-3, max_steps: 2},"
    " {name: tune, groups: {vision: lora, projector: full, llm: lora}, lr: 1.0e-2, max_steps: 4}]"
)


@pytest.mark.parametrize(
    "resume_at, state",
    [
        ("step_000004", {"global_step": 4, "stage": 1, "stage_step": 2, "epoch": 1, "batches_in_epoch": 1}),
        # The end of stage 1: the adapters do not exist yet in this checkpoint; the resumed run creates them.
        ("step_000002", {"global_step": 2, "stage": 0, "stage_step": 2, "epoch": 1, "batches_in_epoch": 1}),
    ],
)
def test_resume_in_stage_two_equals_an_uninterrupted_run(tiny_mississippi, simple_docs, tmp_path, resume_at, state):
    """Stage 2 adds LoRA (with dropout) on the vision tower and the LLM: the resumed run must rebuild the adapters,
    the stage's optimizer and schedule, and the data position, and end bit-identical."""
    overrides = {
        "stages": TWO_STAGES,
        "tuning.lora.dropout": 0.1,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 5,
        "train.batch_size": 3,
        "train.grad_accum": 2,
        "optim.scheduler": "cosine",
        "optim.warmup_steps": 1,
    }
    full = tmp_path / "full"
    run_train(base_args(tiny_mississippi, simple_docs, full, **overrides))
    # The prompt format is recorded too (Mississippi labels the pages of a multi-page prompt, as its original).
    assert json.loads((full / "checkpoints" / resume_at / "trainer_state.json").read_text()) == {
        **state,
        "prompt_format": {"page_labels": True},
    }

    resumed = tmp_path / "resumed"
    later = [p.name for p in (full / "checkpoints").iterdir() if p.name > resume_at]
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final", "train_log.jsonl", *later))
    result = run_train(base_args(tiny_mississippi, simple_docs, resumed, **overrides, **{"output.if_exists": "resume"}))
    stage, step = state["stage"] + 1, state["stage_step"]
    assert (
        f"at step {state['global_step']}: stage {stage} '{['align', 'tune'][stage - 1]}' step {step}/" in result.stderr
    )
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(".vision_tower." in k and "lora_B" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_weights_trained_before_the_adapters_exist_are_saved_with_them(
    tiny_mississippi, simple_docs, tmp_path, fresh_accelerate_state
):
    """Stage 1 trains the projector fully (no PEFT yet); stage 2 adds LLM LoRA and freezes the projector: the
    saved adapter must carry stage 1's projector, not the base checkpoint's."""
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    stages = (
        "[{name: projector, groups: {vision: frozen, projector: full, llm: frozen}, lr: 1.0e-2, max_steps: 3},"
        " {name: lora, groups: {vision: frozen, projector: frozen, llm: lora}, lr: 1.0e-2, max_steps: 2}]"
    )
    job = FineTuneRecipe(
        load_recipe("quickstart", base_args(tiny_mississippi, simple_docs, tmp_path / "run", stages=stages)[1:])
    )
    job.setup()
    after_stage_1 = {}

    def keep_projector(job, index):
        if index == 0:
            model = job.accelerator.unwrap_model(job.model)
            after_stage_1.update(
                {
                    n.removeprefix("model.multi_modal_projector."): p.detach().clone()
                    for n, p in model.named_parameters()
                    if "multi_modal_projector" in n
                }
            )

    job.train(on_stage_end=keep_projector)
    saved = load_file(job.save_final() / "adapter_model.safetensors")
    base = job.family.load_model(str(tiny_mississippi)).state_dict()
    projector = {k.split("multi_modal_projector.")[1]: v for k, v in saved.items() if "multi_modal_projector" in k}
    assert projector.keys() == after_stage_1.keys()
    for name, value in projector.items():
        assert torch.equal(value, after_stage_1[name]), name
        assert not torch.equal(value, base[f"model.multi_modal_projector.{name}"]), name


def test_two_stage_recipe_under_ddp_zero2_and_zero3(tiny_mississippi, simple_docs, tmp_path):
    """The same 2-stage recipe on 2 processes with gradient accumulation and warmup + cosine: DDP, ZeRO-2 and ZeRO-3
    (weights really partitioned: persistence threshold 0) log the same losses and learning rates and end with the
    same adapter; under ZeRO a run resumed in the middle of stage 2 ends where the uninterrupted one did."""
    overrides = {
        "stages": TWO_STAGES.replace(
            "lora, projector: full, llm: lora}, lr: 1.0e-2", "frozen, projector: full, llm: lora}, lr: 1.0e-2"
        ),
        "tuning.lora.dropout": 0.0,
        "eval.after_training": True,
        "train.grad_accum": 2,
        "train.batch_size": 1,
        "optim.scheduler": "cosine",
        "optim.warmup_steps": 1,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 5,
    }
    runs = {"ddp": {}, "zero2": {"accelerate_config": "zero2.yaml"}, "zero3": partitioned_zero3(tmp_path)}
    logs, adapters = {}, {}
    for name, launch in runs.items():
        out = tmp_path / name
        result = run_train(base_args(tiny_mississippi, simple_docs, out, **overrides), processes=2, **launch)
        assert "stage 2/2 'tune'" in result.stderr
        logs[name] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        adapters[name] = load_file(out / "final" / "adapter_model.safetensors")
        assert json.loads((out / "metrics.json").read_text())["after"]["num_samples"] == 8
        if name == "ddp":
            continue
        resumed = tmp_path / f"{name}-resumed"
        shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("final", "step_000006", "metrics.json"))
        result = run_train(
            base_args(tiny_mississippi, simple_docs, resumed, **overrides, **{"output.if_exists": "resume"}),
            processes=2,
            **launch,
        )
        assert "at step 4: stage 2 'tune' step 2/4" in result.stderr
        again = load_file(resumed / "final" / "adapter_model.safetensors")
        for key, value in adapters[name].items():
            torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6)
    assert len(logs["ddp"]) == 6
    for name in ("zero2", "zero3"):
        assert [r["loss"] for r in logs[name]] == pytest.approx([r["loss"] for r in logs["ddp"]], rel=1e-5), name
        for mine, ddp in zip(logs[name], logs["ddp"], strict=True):
            assert {k: v for k, v in mine.items() if k.startswith("lr/")} == pytest.approx(
                {k: v for k, v in ddp.items() if k.startswith("lr/")}
            ), name
        assert adapters[name].keys() == adapters["ddp"].keys()
        for key, value in adapters["ddp"].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=1e-3, atol=1e-3)
