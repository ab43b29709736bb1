"""The `finetune` command as a user runs it (subprocesses): help, clean stdout, one-line user errors with exit code 2
for one process, for the processes `finetune train` launches and under a raw `accelerate launch`; and the progress
display's two modes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_train

BIN = Path(sys.executable).parent / "finetune"
# The console script from [project.scripts] when the editable install has registered it, else the module.
FINETUNE = [str(BIN)] if BIN.is_file() else [sys.executable, "-m", "finetune"]


def run(args: list[str], *, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FINETUNE, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def recipe_args(checkpoint: Path, docs: dict, out: Path, **overrides) -> list[str]:
    """The quickstart recipe (tiny Mississippi) on the `simple` forms, one step, no evaluation."""
    args = {
        "model.path": str(checkpoint),
        "data.train": str(docs["train"]),
        "data.val": str(docs["val"]),
        "data.test": "null",
        "output.dir": str(out),
        "train.max_steps": 1,
        "train.batch_size": 2,
        "train.checkpoint_every": "null",
        "eval.before_training": "false",
        "eval.after_training": "false",
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


def assert_one_error_line(result: subprocess.CompletedProcess, needle: str, code: int = 2) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr[-4000:]
    assert len(lines) == 1, result.stderr[-4000:]
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


USER_ERRORS = {
    "missing checkpoint": ({"model.path": "/nonexistent/ckpt"}, "/nonexistent/ckpt"),
    "unknown recipe key": ({"optim.max_stepz": 3}, "optim.max_stepz: unknown key"),
    "max_length too tight": ({"data.max_length": 8}, "longer than max_length=8"),
}


# --- help and usage ----------------------------------------------------------------------------------------------


def test_help_of_the_command_and_of_every_subcommand():
    result = run(["--help"])
    assert result.returncode == 0 and result.stderr == ""
    for command in ("train", "eval", "predict", "merge", "publish"):
        assert re.search(rf"^  {command} ", result.stdout, re.M), command  # listed
        sub = run([command, "--help"])
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.startswith(f"usage: finetune {command} "), sub.stdout[:200]
    train = run(["train", "--help"]).stdout
    for text in ("recipe=NAME key.path=value", "--num-processes", "--config-file", "--cpu", "exit codes"):
        assert text in train, text
    module = subprocess.run(
        [sys.executable, "-m", "finetune.eval", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert module.returncode == 0 and "--model" in module.stdout  # `python -m finetune.x` still works


def test_usage_mistakes_are_one_line_and_exit_2():
    assert_one_error_line(run(["bogus"]), "unknown command 'bogus'")
    assert_one_error_line(run(["train", "--num-processes", "x", "recipe=quickstart"]), "--num-processes")
    assert_one_error_line(run(["predict", "--model", "m"]), "the following arguments are required: images")
    assert_one_error_line(run(["train"]), "missing recipe=NAME")


# --- clean stdout ------------------------------------------------------------------------------------------------


def test_predict_writes_only_json_lines_to_stdout(tiny_mississippi, simple_docs):
    images = str(simple_docs["test"].parent / "images" / "test_*.png")
    result = run(
        [
            "predict",
            "--model",
            str(tiny_mississippi),
            "--family",
            "mississippi",
            "--instruction",
            "Extract the number from the form image and structure it into JSON format:",
            "--max-new-tokens",
            "4",
            images,
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 4  # the 4 test forms, nothing else (DeepSpeed's "Setting accelerator to CPU" was first)
    assert all(set(json.loads(line)) == {"image", "prediction", "valid_json", "truncated", "text"} for line in lines)
    assert "Traceback" not in result.stderr and "\r" not in result.stderr  # no weight-loading bar in a log


def test_eval_writes_only_its_metrics_to_stdout(tiny_mississippi, simple_docs, tmp_path):
    result = run(
        [
            "eval",
            "--model",
            str(tiny_mississippi),
            "--family",
            "mississippi",
            "--data",
            str(simple_docs["test"]),
            "--instruction",
            "Extract the number from the form image and structure it into JSON format:",
            "--max-new-tokens",
            "4",
            "--no-report",
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert metrics["num_samples"] == 4 and (tmp_path / "eval" / "metrics.json").is_file()
    assert f"written to {tmp_path / 'eval'}" in result.stderr


def test_training_keeps_stdout_empty_and_progress_plain_in_a_log(tiny_mississippi, simple_docs, tmp_path):
    result = run(["train", *recipe_args(tiny_mississippi, simple_docs, tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout == ""
    assert "\r" not in result.stderr  # stderr is a file here: plain lines, no bar redraws
    assert re.search(r"^\[finetune\] stage 1/1 train: 1/1 \(100%\), .*loss=", result.stderr, re.M), result.stderr
    for noise in ("Setting accelerator to CPU", "is_gradient_checkpointing", "FutureWarning", "Traceback"):
        assert noise not in result.stderr, noise
    assert (tmp_path / "run" / "final").is_dir()


# --- user errors: one line, exit code 2 --------------------------------------------------------------------------


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_in_one_process_are_one_line(case, tiny_mississippi, simple_docs, tmp_path):
    overrides, needle = USER_ERRORS[case]
    result = run(["train", *recipe_args(tiny_mississippi, simple_docs, tmp_path / "run", **overrides)])
    assert_one_error_line(result, needle)


def test_a_recipe_mistake_stops_the_launcher_before_any_process_starts(tiny_mississippi, simple_docs, tmp_path):
    args = recipe_args(tiny_mississippi, simple_docs, tmp_path / "run", **{"optim.max_stepz": 3})
    result = run(["train", "--cpu", "--num-processes", "2", *args])
    assert_one_error_line(result, "optim.max_stepz: unknown key")
    assert "accelerate" not in result.stderr.lower() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_user_errors_in_launched_processes_are_one_line(tiny_mississippi, simple_docs, tmp_path):
    """One process through Accelerate's simple launcher, and two under torch elastic: both ranks hit the bad data,
    the launcher prints the first one's line (no ChildFailedError report, no CalledProcessError traceback)."""
    overrides, needle = USER_ERRORS["missing checkpoint"]
    one = run(["train", "--cpu", *recipe_args(tiny_mississippi, simple_docs, tmp_path / "one", **overrides)])
    assert_one_error_line(one, needle)
    overrides, needle = USER_ERRORS["max_length too tight"]
    two = run(
        [
            "train",
            "--cpu",
            "--num-processes",
            "2",
            *recipe_args(tiny_mississippi, simple_docs, tmp_path / "two", **overrides),
        ]
    )
    assert_one_error_line(two, needle)


@pytest.mark.slow
@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_under_a_raw_accelerate_launch(case, tiny_mississippi, simple_docs, tmp_path):
    """`accelerate launch finetune/train.py`: the training process prints its one line and exits 2, but
    Accelerate's launcher then raises CalledProcessError (its own traceback, exit 1) unless it is given --quiet,
    and nothing in the child can change that. What is guaranteed: the line comes once and first, and no traceback
    comes from the toolkit's code."""
    overrides, needle = USER_ERRORS[case]
    result = run_train(recipe_args(tiny_mississippi, simple_docs, tmp_path / "run", **overrides), check=False)
    lines = result.stderr.splitlines()
    assert result.returncode != 0
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and lines[0] == errors[0], result.stderr[-4000:]
    frames = [line for line in lines if line.strip().startswith("File ")]
    assert all("site-packages/accelerate/" in f or "<frozen runpy>" in f for f in frames), frames
    assert "returned non-zero exit status 2" in result.stderr  # the child's exit code was 2


@pytest.mark.slow
def test_raw_accelerate_launch_with_quiet_gives_one_line(tiny_mississippi, simple_docs, tmp_path):
    overrides, needle = USER_ERRORS["max_length too tight"]
    result = run_train(
        recipe_args(tiny_mississippi, simple_docs, tmp_path / "run", **overrides),
        check=False,
        extra_launch_args=("--quiet",),
    )
    assert_one_error_line(result, needle, code=1)  # accelerate's --quiet exits 1 whatever the child's code


# --- progress ----------------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_plain_lines_at_an_interval_and_one_at_the_end():
    from finetune.progress import Progress

    log = io.StringIO()
    with Progress(4, desc="stage 1/1 train", unit="step", stream=log, interval=0) as bar:
        for _ in range(4):
            bar.update()
            bar.set_postfix(loss=0.123456, lr=1e-4)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("[finetune] stage 1/1 train: ") for line in lines)
    assert re.fullmatch(r"\[finetune\] stage 1/1 train: 1/4 \(25%\), [\d.]+ (step/s|s/step), ETA \d+:\d\d", lines[0])
    assert re.fullmatch(r".*: 4/4 \(100%\), [\d.]+ (step/s|s/step), loss=0\.1235, lr=0\.0001", lines[-1]), lines
    assert len(lines) == 4  # one per update (interval 0); none at close, which would repeat the last

    quiet = io.StringIO()
    with Progress(1000, desc="checking train data", initial=10, stream=quiet, interval=3600) as bar:
        bar.update(5)
    assert quiet.getvalue().splitlines() == [quiet.getvalue().strip()]  # only the line at close
    assert "15/1000 (2%)" in quiet.getvalue()


def test_progress_interval_from_the_environment_and_tqdm_on_a_terminal(monkeypatch):
    from finetune.progress import Progress

    monkeypatch.setenv("FINETUNE_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    with Progress(None, desc="generating", unit="batch", stream=log) as bar:
        bar.update()
        bar.update()
    counts = [line.split(",")[0] for line in log.getvalue().splitlines()]
    assert counts == ["[finetune] generating: 1 batch", "[finetune] generating: 2 batch"]  # unknown total

    terminal = Terminal()
    with Progress(3, desc="stage", stream=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()  # a tqdm bar
    assert not Progress(3, desc="x", disable=True, stream=terminal)._bar


def test_info_and_quick_work_print_nothing_else(capsys):
    from finetune.progress import info, progress_if_slow

    assert list(progress_if_slow(range(3), desc="checking val data")) == [0, 1, 2]
    info("saved model to runs/x/final")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[finetune] saved model to runs/x/final\n"
