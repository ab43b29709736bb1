"""End to end through `accelerate launch finetune/train.py`: overfitting proves that image tokens, labels and
generation line up; resume and multi-process runs must not change the result."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import UserError
from tests.conftest import run_train

pytestmark = pytest.mark.slow


def base_args(checkpoint, docs, out, **overrides):
    args = {
        "model.family": "llava_onevision",
        "model.path": str(checkpoint),
        "data.train": str(docs["train"]),
        "data.val": str(docs["val"]),
        "data.max_length": 2048,
        "output.dir": str(out),
        "eval.max_new_tokens": 32,
        "train.seed": 0,
        "optim.warmup_ratio": 0.0,
        "data.test": "null",
        "train.log_every": 1,
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


def test_bf16_lora_run_with_gradient_checkpointing(tiny_llava, simple_docs, tmp_path):
    out = tmp_path / "bf16"
    run_train(
        base_args(
            tiny_llava,
            simple_docs,
            out,
            **{
                "tuning.groups": "{vision: frozen, projector: full, llm: lora}",
                "tuning.gradient_checkpointing": True,
                "train.precision": "bf16",
                "train.max_steps": 3,
                "train.batch_size": 4,
                "train.grad_accum": 2,
                "eval.before_training": False,
                "eval.max_new_tokens": 4,
            },
        )
    )
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(loss == loss and loss < 20 for loss in losses)  # finite
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_resume_mid_run_equals_uninterrupted_run(tiny_llava, simple_docs, tmp_path):
    """2N steps == N steps + resume (fresh process) + N steps. LoRA dropout, length grouping, gradient
    accumulation and epoch boundaries inside an optimizer step all depend on restored RNG and data position."""
    full = tmp_path / "full"
    overrides = {
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "tuning.lora.dropout": 0.1,
        "tuning.lora.r": 4,
        "optim.lr": 1e-2,
        "train.max_steps": 6,
        "train.batch_size": 3,
        "train.grad_accum": 2,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 5,
        "eval.before_training": False,
        "eval.after_training": False,
    }
    run_train(base_args(tiny_llava, simple_docs, full, **overrides))

    resumed = tmp_path / "resumed"
    # Step 2 = 4 micro-batches of 3 batches per epoch: the resume lands mid-epoch (epoch 1, batch 1).
    shutil.copytree(
        full, resumed, ignore=shutil.ignore_patterns("final", "step_000004", "step_000006", "train_log.jsonl")
    )
    assert json.loads((resumed / "checkpoints" / "step_000002" / "trainer_state.json").read_text()) == {
        "global_step": 2,
        "stage": 0,
        "stage_step": 2,
        "epoch": 1,
        "batches_in_epoch": 1,
        "prompt_format": {},  # LLaVA-OneVision's prompts have no options
    }
    changed = run_train(
        base_args(tiny_llava, simple_docs, resumed, **{**overrides, "optim.lr": 1e-3, "output.if_exists": "resume"}),
        check=False,
    )
    assert changed.returncode != 0 and "cannot resume with a different recipe; changed: optim.lr" in changed.stderr
    result = run_train(base_args(tiny_llava, simple_docs, resumed, **overrides, **{"output.if_exists": "resume"}))
    assert "resumed from" in result.stderr and "at step 2" in result.stderr

    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    start = load_file(full / "checkpoints" / "step_000002" / "model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # ...and the second half did train (the comparison is not between two untouched copies).
    assert any(not torch.equal(a[k], start[k.replace(".weight", ".default.weight")]) for k in a if "lora_B" in k)
    logged = [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert logged == [3, 4, 5, 6]


def test_two_processes_end_with_identical_weights(tiny_llava, simple_docs, tmp_path):
    out = tmp_path / "ddp"
    result = run_train(
        base_args(
            tiny_llava,
            simple_docs,
            out,
            **{
                "tuning.groups": "{vision: full, projector: full, llm: lora}",
                "train.max_steps": 4,
                "train.batch_size": 2,
                "eval.before_training": False,
                "eval.max_new_tokens": 4,
                "tracking.report_to": "[tensorboard]",
            },
        ),
        processes=2,
    )
    assert "trainable weights identical on all 2 processes" in result.stderr
    assert list(out.glob("**/events.out.tfevents.*")), "tensorboard logged nothing"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["num_samples"] == 8  # both ranks' generations gathered, none lost or doubled
    assert (out / "final" / "adapter_model.safetensors").exists()


def test_saved_adapter_reloads_with_identical_logits(tiny_llava, simple_docs, tmp_path, fresh_accelerate_state):
    """In-process run, then base + saved adapter from disk must reproduce the trained model's logits."""
    from peft import PeftModel

    from finetune.data.dataset import Collator, DocumentDataset
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    out = tmp_path / "run"
    args = base_args(
        tiny_llava,
        simple_docs,
        out,
        **{
            "tuning.groups": "{vision: frozen, projector: full, llm: lora}",
            "optim.lr": 1e-2,
            "train.max_steps": 3,
            "train.batch_size": 4,
            "eval.before_training": False,
            "eval.after_training": False,
        },
    )
    job = FineTuneRecipe(load_recipe("quickstart", args[1:]))
    job.setup()
    job.train()
    final = job.save_final()

    dataset = DocumentDataset(
        job.train_samples, family=job.family, processor=job.processor, instruction_text=job.instruction_text
    )
    batch = Collator(job.family, job.processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    batch.pop("index")
    trained = job.accelerator.unwrap_model(job.model).eval()
    reloaded = PeftModel.from_pretrained(job.family.load_model(str(tiny_llava)), final).eval()
    with torch.no_grad():
        expected, got = trained(**batch).logits, reloaded(**batch).logits
        base = job.family.load_model(str(tiny_llava))(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)  # training (adapter + projector) changed the model
    # The adapter folder also carries what is needed to prompt it: processor, tokenizer and chat template.
    processor = job.family.load_processor(str(final))
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False, add_generation_prompt=True
    ).endswith("assistant\n")


def test_existing_run_folder_is_never_reused_silently(tiny_llava, simple_docs, tmp_path, fresh_accelerate_state):
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    args = base_args(tiny_llava, simple_docs, out, **{"output.if_exists": "error"})
    with pytest.raises(UserError, match=r"output\.if_exists=resume"):
        FineTuneRecipe(load_recipe("quickstart", args[1:])).setup()
    assert (out / "metrics.json").read_text() == "{}"


def test_loss_is_normalised_over_all_tokens_of_a_step_whatever_the_split(tiny_llava, simple_docs, tmp_path):
    """One process × 4 samples, one process × 2 samples × 2 accumulation steps, and two processes × 2 samples
    see the same 4 samples per step: same logged loss, same weights (mean over all label tokens of the step)."""
    common = {
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "tuning.lora.dropout": 0.0,
        "train.group_by_length": False,
        "optim.lr": 1e-2,
        "train.max_steps": 2,
        "eval.before_training": False,
        "eval.after_training": False,
        "optim.max_grad_norm": "null",
    }
    layouts = {
        "single": ({"train.batch_size": 4}, 1),
        "accumulated": ({"train.batch_size": 2, "train.grad_accum": 2}, 1),
        "two_processes": ({"train.batch_size": 2}, 2),
    }
    losses, weights, counts = {}, {}, {}
    for name, (extra, processes) in layouts.items():
        out = tmp_path / name
        run_train(base_args(tiny_llava, simple_docs, out, **{**common, **extra}), processes=processes)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses[name] = [record["loss"] for record in log]
        counts[name] = [(record["samples"], record["tokens"]) for record in log]  # summed over micro-batches, ranks
        weights[name] = load_file(out / "final" / "adapter_model.safetensors")
    assert [samples for samples, _ in counts["single"]] == [4, 4]
    for name in ("accumulated", "two_processes"):
        assert losses[name] == pytest.approx(losses["single"], rel=1e-5), name
        assert counts[name] == counts["single"], name
        for key, value in weights["single"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-4, atol=1e-5)


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_ends_where_an_uninterrupted_one_does(
    tiny_llava, simple_docs, tmp_path
):
    """SIGINT mid-training: the step that is running finishes, a checkpoint is saved, the process exits 130 with
    one line saying how to resume; resuming then gives the weights of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    overrides = {
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "tuning.lora.dropout": 0.1,
        "tuning.lora.r": 4,
        "optim.lr": 1e-2,
        "train.max_steps": 80,
        "train.batch_size": 2,
        "eval.before_training": False,
        "eval.after_training": False,
    }
    full = tmp_path / "full"
    run_train(base_args(tiny_llava, simple_docs, full, **overrides))

    out = tmp_path / "interrupted"
    command = [
        sys.executable,
        str(REPO / "finetune" / "train.py"),
        *base_args(tiny_llava, simple_docs, out, **overrides),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "interrupted at step" in last and "output.if_exists=resume" in last and "Traceback" not in stderr
    step = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 2 <= step < 80, "the interrupt must land mid-training"
    assert (out / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").is_file()
    assert not (out / "final").exists() and stdout == ""

    result = run_train(base_args(tiny_llava, simple_docs, out, **overrides, **{"output.if_exists": "resume"}))
    assert f"at step {step}" in result.stderr
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_an_overwrite_run_that_stops_on_a_mistake_leaves_the_previous_run_alone(
    tiny_llava, simple_docs, tmp_path, fresh_accelerate_state
):
    """`output.if_exists=overwrite` deletes the old run only once the checkpoint and the data have been checked: a
    mistyped model path or data that does not fit must not cost the user their previous run."""
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    for mistake, message in (
        ({"model.path": str(tmp_path / "no-such-checkpoint")}, "checkpoint not found"),
        ({"data.max_length": 8}, "no usable samples"),
    ):
        args = base_args(tiny_llava, simple_docs, out, **{"output.if_exists": "overwrite", **mistake})
        with pytest.raises(UserError, match=message):
            FineTuneRecipe(load_recipe("quickstart", args[1:])).setup()
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
