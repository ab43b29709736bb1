"""Shared fixtures: tiny offline checkpoints and small synthetic datasets, built once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is never reachable here; fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """The 'test' size LLaVA-OneVision checkpoint in Hub layout."""
    from finetune.models import get_family

    family = get_family("llava_onevision")
    return family.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava"), **family.tiny_presets["test"])


@pytest.fixture(scope="session")
def simple_docs(tmp_path_factory) -> dict[str, Path]:
    """8 train / 8 val / 4 test `simple` forms (two fields each)."""
    from finetune.synthetic.invoices import write_dataset

    return write_dataset(tmp_path_factory.mktemp("simple"), seed=0, n_train=8, n_val=8, n_test=4, preset="simple")


@pytest.fixture(scope="session")
def invoice_docs(tmp_path_factory) -> dict[str, Path]:
    from finetune.synthetic.invoices import write_dataset

    return write_dataset(tmp_path_factory.mktemp("invoices"), seed=0, n_train=6, n_val=2, n_test=2)


def write_recipe(folder: Path, name: str, template: str) -> Path:
    """A recipe file from `template` (with `{train}` for an existing, empty train file) in `folder`."""
    train = folder / "train.jsonl"
    train.write_text("")
    path = folder / name
    path.write_text(template.format(train=train))
    return path


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; reset it around in-process training."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def partitioned_zero3(folder: Path) -> dict:
    """`run_train` launch arguments for ZeRO-3 with every weight really partitioned (the checked-in config with
    persistence threshold 0: tiny models would otherwise keep all their weights whole on every rank). The config
    file is written into `folder`."""
    config = json.loads((REPO / "recipes" / "accelerate" / "ds_zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (folder / "zero3.json").write_text(json.dumps(config))
    return {
        "accelerate_config": "zero3.yaml",
        "extra_launch_args": ("--deepspeed_config_file", str(folder / "zero3.json")),
    }


def run_train(
    args: list[str],
    *,
    processes: int = 1,
    timeout: int = 600,
    check: bool = True,
    accelerate_config: str | None = None,
    extra_launch_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`accelerate launch finetune/train.py ARGS` as a user runs it (2 processes: gloo on CPU). With
    `accelerate_config` (a file under recipes/accelerate/), the launch uses that checked-in config."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    if accelerate_config:
        launch += ["--config_file", str(REPO / "recipes" / "accelerate" / accelerate_config)]
    else:
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if processes > 1:
            # `--cpu --num_processes 2` silently runs one process; --multi_gpu with ACCELERATE_USE_CPU runs two.
            launch.append("--multi_gpu")
            env["ACCELERATE_USE_CPU"] = "true"
        else:
            launch.append("--cpu")
    launch += list(extra_launch_args)
    result = subprocess.run(
        [*launch, str(REPO / "finetune" / "train.py"), *args],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture(scope="session")
def tiny_mississippi(tmp_path_factory) -> Path:
    """The 'test' size H2OVL-Mississippi checkpoint (Llama LLM, original Hub layout)."""
    from finetune.models import get_family

    family = get_family("mississippi")
    return family.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-miss"), **family.tiny_presets["test"])
