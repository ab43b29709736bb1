"""Faults injected into real runs: kill -9 at several moments, corrupted checkpoints, two runs into one folder, a full
disk, secrets in the environment. Whatever happens, the result equals an uninterrupted run, or the user gets one line
(never a traceback) and nothing earlier is lost. Bad input data is in tests/test_faults_data.py, damaged model
folders and remote code in tests/test_faults_models.py (one fault suite, split by what it exercises)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.atomic import MANIFEST, atomic_folder, manifest_problem, write_manifest
from finetune.training.checkpoint import required_files, resumable_checkpoint
from finetune.training.run_lock import LOCK_NAME, RunLock
from tests.conftest import REPO

STEPS = 6


def train_args(checkpoint: Path, docs: dict, out: Path, **overrides) -> list[str]:
    """A LoRA run of STEPS steps with a checkpoint every 2: dropout, grouping and accumulation make its result
    depend on every piece of restored state (RNG, data position, optimizer, schedule)."""
    args = {
        "model.family": "llava_onevision",
        "model.path": str(checkpoint),
        "data.train": str(docs["train"]),
        "data.val": str(docs["val"]),
        "data.test": "null",
        "data.max_length": 2048,
        "output.dir": str(out),
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "tuning.lora.dropout": 0.1,
        "tuning.lora.r": 4,
        "optim.lr": 1e-2,
        "optim.warmup_ratio": 0.0,
        "train.seed": 0,
        "train.max_steps": STEPS,
        "train.batch_size": 3,
        "train.grad_accum": 2,
        "train.checkpoint_every": 2,
        "train.keep_checkpoints": 10,
        "train.log_every": 1,
        "eval.before_training": False,
        "eval.after_training": False,
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


def command(args: list[str]) -> list[str]:
    # The training process itself (one process needs no launcher): a kill -9 reaches the process that writes.
    return [sys.executable, "-m", "finetune.train", *args]


def environment(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def train(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(args), cwd=REPO, env=environment(**env), capture_output=True, text=True, timeout=600, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def final_adapter(run: Path) -> dict:
    return load_file(run / "final" / "adapter_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_llava, simple_docs, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one must end equal to."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    result = train(train_args(tiny_llava, simple_docs, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_run(reference: Path, to: Path, *, drop: tuple[str, ...] = ("final",)) -> Path:
    shutil.copytree(reference, to, ignore=shutil.ignore_patterns(*drop))
    return to


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding `run`'s lock (until killed), as a run in progress does."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from finetune.training.run_lock import RunLock; "
            "lock = RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
            str(run),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


# ------------------------------------------------------------------------------------------ atomic folders


def test_an_atomic_folder_is_whole_or_absent_and_its_manifest_catches_every_change(tmp_path):
    dest = tmp_path / "final"
    with atomic_folder(dest) as tmp:
        (tmp / "weights.bin").write_bytes(b"\1" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert manifest_problem(dest) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing left aside

    with pytest.raises(OSError), atomic_folder(dest) as tmp:  # a failure while writing the next version ...
        (tmp / "weights.bin").write_bytes(b"\2" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (dest / "weights.bin").read_bytes() == b"\1" * 1000  # ... leaves the earlier one whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    data = bytearray((dest / "weights.bin").read_bytes())
    data[500] ^= 1
    (dest / "weights.bin").write_bytes(bytes(data))
    assert "weights.bin does not match its sha256" in manifest_problem(dest)
    (dest / "weights.bin").write_bytes(b"\1" * 10)
    assert "weights.bin is 10 bytes, the manifest says 1000" in manifest_problem(dest)
    (dest / "weights.bin").unlink()
    assert manifest_problem(dest) == "weights.bin is missing"
    (dest / MANIFEST).write_text("")  # what a full disk used to leave: a 0-byte completion marker
    assert manifest_problem(dest) == f"{MANIFEST} is unreadable"


def test_the_run_lock_names_its_holder_and_a_dead_holder_is_detected(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        with pytest.raises(Exception, match=rf"run folder in use by another run \(pid {holder.pid} on "):
            RunLock.acquire(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock.acquire(run)  # the OS released the dead holder's lock; its record tells it died
    assert lock.previous["pid"] == holder.pid
    lock.release()
    assert not (run / LOCK_NAME).exists()
    again = RunLock.acquire(run)  # a clean release leaves no record behind
    assert again.previous is None
    again.release()


# --------------------------------------------------------------------------------- corrupted checkpoints


def _rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest agree with a changed folder, so that only the deeper checks can catch the change."""
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)


def _flip_byte(path: Path, at: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_state(checkpoint: Path, **changes) -> None:
    path = checkpoint / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    _rewrite_manifest(checkpoint)


def _drop_rng_from_manifest(checkpoint: Path) -> None:
    (checkpoint / "random_states_0.pkl").unlink()
    _rewrite_manifest(checkpoint)


CORRUPTIONS = {
    "zero-byte manifest": (lambda c: (c / MANIFEST).write_text(""), "manifest.json is unreadable"),
    # What a kill mid-checkpoint left in an earlier version, renamed into place by hand: no completion marker at all.
    "no manifest, no state": (
        lambda c: ((c / MANIFEST).unlink(), (c / "trainer_state.json").unlink()),
        "manifest.json is missing",
    ),
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is "),
    "bit-flipped weight": (lambda c: _flip_byte(c / "model.safetensors"), "model.safetensors does not match"),
    "garbled optimizer": (lambda c: _flip_byte(c / "optimizer.bin", 0.5), "optimizer.bin does not match"),
    "garbled scheduler": (lambda c: _flip_byte(c / "scheduler.bin", 0.5), "scheduler.bin does not match"),
    "missing RNG state": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "truncated RNG state": (lambda c: _truncate(c / "random_states_0.pkl"), "random_states_0.pkl is "),
    "RNG state never written": (_drop_rng_from_manifest, "random_states_0.pkl is missing (required"),
    "impossible global_step": (lambda c: _edit_state(c, global_step=99), "global_step 99 in a checkpoint of step 6"),
    "stage past the recipe": (lambda c: _edit_state(c, stage=3), "stage 3 but the recipe has 1 stage"),
    "negative position": (lambda c: _edit_state(c, batches_in_epoch=-1), "batches_in_epoch = -1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_used(reference, tmp_path, corruption):
    run = copy_run(reference, tmp_path / "run")
    newest = run / "checkpoints" / f"step_{STEPS:06d}"
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(newest)
    found, rejected = resumable_checkpoint(run, required=required_files(1, sharded=False), num_stages=1)
    assert found == run / "checkpoints" / "step_000004"
    assert len(rejected) == 1 and rejected[0][0] == newest and message in rejected[0][1], rejected


@pytest.mark.slow
def test_a_resume_past_a_corrupt_checkpoint_ends_equal_to_the_uninterrupted_run(
    reference, tiny_llava, simple_docs, tmp_path
):
    run = copy_run(reference, tmp_path / "run")
    _flip_byte(run / "checkpoints" / f"step_{STEPS:06d}" / "model.safetensors")
    result = train(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": "resume"}))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"step_{STEPS:06d}: model.safetensors does not match its sha256" in result.stderr
    assert "resumed from" in result.stderr and "at step 4" in result.stderr
    assert_same_weights(final_adapter(run), final_adapter(reference))
    assert logged_steps(run) == list(range(1, STEPS + 1))  # steps 5 and 6 once each, not twice
    # The bad one is kept for a look, where no resume or prune takes it for a checkpoint.
    assert (run / "checkpoints" / f"step_{STEPS:06d}.rejected" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_folder_of_the_previous_version_still_resumes(reference, tiny_llava, simple_docs, tmp_path):
    """Checkpoints without manifests (the old completion marker, trainer_state.json, is there) and a recipe.yaml
    without the keys added since: resumable, with a warning that the checkpoint could not be verified."""
    run = copy_run(reference, tmp_path / "run", drop=("final", "step_000006"))
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / MANIFEST).unlink()
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())
    del recorded["model"]["trust_remote_code"], recorded["data"]["max_image_pixels"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    result = train(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": "resume"}))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "step_000004 has no manifest (an earlier version wrote it): not verified" in result.stderr
    assert_same_weights(final_adapter(run), final_adapter(reference))


def test_a_kill_between_the_renames_of_a_replacement_loses_nothing(tmp_path):
    from finetune.atomic import commit, recover, staging_folder

    best = tmp_path / "best"
    with atomic_folder(best) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    # The kill lands after the old folder was put aside and before the new one took its place.
    new = staging_folder(best)
    (new / "weights.bin").write_bytes(b"new")
    os.replace(best, tmp_path / ".best.old")
    recover(best)  # what the next run does first
    assert (best / "weights.bin").read_bytes() == b"old" and manifest_problem(best) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    new = staging_folder(best)
    (new / "weights.bin").write_bytes(b"new")
    commit(new, best)
    assert (best / "weights.bin").read_bytes() == b"new" and manifest_problem(best) is None


@pytest.mark.slow
def test_no_verifiable_checkpoint_is_one_line_saying_what_to_do(reference, tiny_llava, simple_docs, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    for checkpoint in (run / "checkpoints").iterdir():
        (checkpoint / MANIFEST).write_text("")
    result = train(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": "resume"}))
    assert_one_line_error(result, "no checkpoint verifies", "step_000002: manifest.json is unreadable", "overwrite")


# ---------------------------------------------------------------------------------------------- kill -9


def _kill_when(args: list[str], ready, log: Path) -> None:
    """Start a run, kill -9 it as soon as `ready()` holds (polled tightly), and wait for it to be gone."""
    with log.open("w") as sink:
        run = subprocess.Popen(command(args), cwd=REPO, env=environment(), stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not ready():
            assert run.poll() is None, f"the run ended before the moment to kill it:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        run.send_signal(signal.SIGKILL)
        run.wait()


def _step_logged(run: Path, step: int):
    def ready() -> bool:
        path = run / "train_log.jsonl"
        return path.is_file() and f'"step": {step},' in path.read_text()

    return ready


MOMENTS = {
    # (what must hold to kill, what the kill must have left behind)
    "mid-step": (lambda run: _step_logged(run, 3), None),
    "mid-checkpoint": (
        lambda run: lambda: (run / "checkpoints" / ".step_000004.tmp" / "model.safetensors").exists(),
        None,  # usually a partial .step_000004.tmp; after the rename if the poller was descheduled (both must resume)
    ),
    "mid-final": (lambda run: lambda: (run / ".final.tmp").exists(), lambda run: not (run / "final").exists()),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_then_resume_ends_equal_to_the_uninterrupted_run(reference, tiny_llava, simple_docs, tmp_path, moment):
    run = tmp_path / "run"
    when, left_behind = MOMENTS[moment]
    _kill_when(train_args(tiny_llava, simple_docs, run), when(run), tmp_path / "killed.log")
    if left_behind is not None:
        assert left_behind(run), sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert (run / LOCK_NAME).exists()  # the dead run's record

    result = train(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": "resume"}))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "did not end cleanly" in result.stderr
    assert_same_weights(final_adapter(run), final_adapter(reference))
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert not [p for p in run.rglob(".*.tmp")] and not (run / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ two runs, one folder


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_stops_naming_the_first(tiny_llava, simple_docs, tmp_path):
    run, steps = tmp_path / "run", 8
    first = train_args(tiny_llava, simple_docs, run, **{"train.max_steps": steps, "train.checkpoint_every": 20})
    with (tmp_path / "first.log").open("w") as sink:
        holder = subprocess.Popen(command(first), cwd=REPO, env=environment(), stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not ((run / LOCK_NAME).is_file() and (run / LOCK_NAME).read_text().strip()):
                assert time.monotonic() < deadline and holder.poll() is None
                time.sleep(0.01)
            # Frozen while the second runs start (however slow the machine, it still holds the folder), then all
            # three policies at once (overwrite would delete its files).
            holder.send_signal(signal.SIGSTOP)
            seconds = [
                subprocess.Popen(
                    command(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": policy})),
                    cwd=REPO,
                    env=environment(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for policy in ("error", "overwrite", "resume")
            ]
            for second in seconds:
                out, err = second.communicate(timeout=300)
                result = subprocess.CompletedProcess(second.args, second.returncode, out, err)
                assert_one_line_error(result, f"{run}: run folder in use by another run (pid {holder.pid} on ")
        finally:
            holder.send_signal(signal.SIGCONT)
            code = holder.wait(timeout=600)
    assert code == 0, (tmp_path / "first.log").read_text()[-3000:]
    # The first run was neither disturbed nor overwritten, and its log is its own.
    assert logged_steps(run) == list(range(1, steps + 1))
    assert (run / "final" / "adapter_model.safetensors").is_file() and not (run / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs whose size the test sets (and can grow, as a user frees space); needs the right to mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here to fill: {err}")

    def resize(size_bytes: int) -> None:
        size = max(4096, size_bytes // 4096 * 4096)
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True, capture_output=True)

    yield mount, resize
    subprocess.run(["umount", str(mount)], check=False)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(
    reference, tiny_llava, simple_docs, tmp_path, small_disk
):
    mount, resize = small_disk
    run = mount / "run"
    copy_run(reference, run, drop=("final", "step_000004", "step_000006", "train_log.jsonl"))
    # Room for what is there and a little more, not for another checkpoint.
    checkpoint = _size(reference / "checkpoints" / "step_000002")
    resize(_size(run) + checkpoint // 2 + 64 * 1024)

    full = train(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": "resume"}))
    line = assert_one_line_error(full, "[Errno 28 ENOSPC] No space left on device")
    assert str(run) in line
    assert manifest_problem(run / "checkpoints" / "step_000002") is None  # the earlier checkpoint is intact

    resize(64 * 1024 * 1024)  # space freed
    result = train(train_args(tiny_llava, simple_docs, run, **{"output.if_exists": "resume"}))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert_same_weights(final_adapter(run), final_adapter(reference))


def test_an_os_error_at_the_command_line_is_one_line_with_path_and_errno(capfd):
    from finetune.cli import run_entry_point

    def entry(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/train_log.jsonl")

    assert run_entry_point(entry, []) == 2
    err = capfd.readouterr().err
    assert err == "error: /runs/x/train_log.jsonl: [Errno 28 ENOSPC] No space left on device\n"

    def bug(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):  # not the machine's fault: a bug keeps its traceback
        run_entry_point(bug, [])


# ------------------------------------------------------------------------------------------------- secrets


@pytest.mark.slow
def test_secrets_in_the_environment_reach_no_file_and_no_log(tiny_llava, simple_docs, tmp_path):
    secrets = {
        "HF_TOKEN": "hf_FAKEtokenDoNotLeak0123456789abcdef",
        "HUGGING_FACE_HUB_TOKEN": "hf_FAKEhubTokenDoNotLeak9876543210",
        "WANDB_API_KEY": "FAKEwandbKeyDoNotLeak0123456789abcdef01234",
    }
    run, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    result = train(
        train_args(
            tiny_llava,
            simple_docs,
            run,
            **{"train.max_steps": 2, "tracking.report_to": "[tensorboard, wandb]", "eval.after_training": True},
        ),
        WANDB_MODE="offline",
        WANDB_DIR=str(wandb_dir),
        WANDB_SILENT="true",
        **secrets,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p for folder in (run, wandb_dir) for p in folder.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in written) and any(p.suffix == ".wandb" for p in written)
    for secret in secrets.values():
        assert secret not in result.stdout + result.stderr
        leaked = [p for p in written if secret.encode() in p.read_bytes()]
        assert not leaked, leaked


@pytest.mark.slow
def test_a_checkpoint_of_another_process_count_says_how_to_resume(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    found, rejected = resumable_checkpoint(run, required=required_files(2, sharded=False), num_stages=1)
    assert found is None and len(rejected) == 3
    assert all("written by 1 process(es), this run has 2: resume with --num-processes 1" in p for _, p in rejected)


@pytest.mark.slow
def test_every_process_of_a_multi_process_run_stops_on_a_busy_folder(tiny_llava, simple_docs, tmp_path):
    """The lock is the main process's; the others learn its outcome and stop with it, instead of waiting."""
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        launch = [sys.executable, "-m", "finetune.train", "--cpu", "--num-processes", "2"]
        result = subprocess.run(
            [*launch, *train_args(tiny_llava, simple_docs, run)],
            cwd=REPO,
            env=environment(OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert_one_line_error(result, f"run folder in use by another run (pid {holder.pid} on ")


@pytest.mark.slow
def test_a_full_disk_while_saving_a_model_folder_is_one_line_and_keeps_the_earlier_one(
    tiny_llava, small_disk, fresh_accelerate_state
):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    from finetune.errors import UserError
    from finetune.models import get_family
    from finetune.training.checkpoint import save_model

    mount, resize = small_disk
    family = get_family("llava_onevision")
    processor = family.load_processor(str(tiny_llava))
    model = get_peft_model(family.load_model(str(tiny_llava)), LoraConfig(r=4, target_modules=["q_proj"]))
    accelerator = Accelerator(cpu=True)
    kwargs = {"family": family, "processor": processor, "adapter": True, "source_path": str(tiny_llava)}
    save_model(accelerator, model, mount / "final", prompt={"instruction": "first", "skeleton": {}}, **kwargs)
    assert manifest_problem(mount / "final") is None
    # Room for a few KB more: the next version of the folder cannot be written.
    resize(shutil.disk_usage(mount).used + 16 * 1024)
    with pytest.raises(UserError, match=r"could not write .*final: .*\[Errno 28 ENOSPC\] No space left on device"):
        save_model(accelerator, model, mount / "final", prompt={"instruction": "second", "skeleton": {}}, **kwargs)
    assert manifest_problem(mount / "final") is None  # the earlier folder, whole
    assert json.loads((mount / "final" / "prompt.json").read_text())["instruction"] == "first"
    assert sorted(p.name for p in mount.iterdir()) == ["final"]  # no partial folder left behind
