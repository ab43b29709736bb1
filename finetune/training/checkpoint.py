"""What a run writes to disk besides the logs: resumable checkpoints (the trainer position beside Accelerate's
state, written atomically with a manifest, verified before a resume), checkpoint retention, and the saved model
folders (`final/`, `best/`)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.atomic import (
    MANIFEST,
    atomic_folder,
    commit,
    manifest_problem,
    staging_folder,
    staging_path,
    write_error,
)
from finetune.errors import UserError
from finetune.models.base import drop_remote_code
from finetune.training.engine import raise_if_any_failed

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where training is: optimizer steps done in all and in the current stage, and the stage's data position
    (epoch of the stage's data, micro-batches into it)."""

    global_step: int = 0
    stage: int = 0
    stage_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    # The family's prompt format the run writes (`ModelFamily.prompt_format`); None in a checkpoint written before
    # it was recorded (the family's `legacy_prompt_format` then).
    prompt_format: dict | None = None

    def save(self, checkpoint: Path) -> None:
        (checkpoint / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, checkpoint: Path) -> TrainerState:
        return cls(**json.loads((checkpoint / STATE_FILE).read_text()))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders (`step_N`, renamed into place once written), oldest first; not yet verified."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def required_files(num_processes: int, *, sharded: bool) -> tuple[str, ...]:
    """Files without which a resume cannot equal the uninterrupted run: the trainer position and every process's
    RNG state (Accelerate only logs a missing one and goes on), and, unless a sharded engine (DeepSpeed, FSDP)
    keeps them in its own folder, the trained weights, the optimizer and the schedule."""
    names = [STATE_FILE] + [f"random_states_{i}.pkl" for i in range(num_processes)]
    if not sharded:
        names += ["model.safetensors", "optimizer.bin", "scheduler.bin"]
    return tuple(names)


def checkpoint_problem(checkpoint: Path, *, required: tuple[str, ...], num_stages: int) -> str | None:
    """What makes `checkpoint` unusable (one phrase naming the file), or None: every file as the manifest recorded
    it, the required ones present, and a trainer position that can be true of this checkpoint. A checkpoint of an
    earlier version (trainer state, the old completion marker, and no manifest) can only be checked for its files."""
    mismatch = _process_count_mismatch(checkpoint, required)
    if mismatch:
        return mismatch
    if is_unverifiable(checkpoint):
        missing = [n for n in required if not (checkpoint / n).is_file() or not (checkpoint / n).stat().st_size]
        if missing:
            return f"{missing[0]} is missing or empty (required to continue the run exactly)"
    else:
        problem = manifest_problem(checkpoint, required=required)
        if problem:
            return problem
    try:
        raw = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        state = TrainerState(**raw)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    values = {f.name: getattr(state, f.name) for f in fields(state) if f.name != "prompt_format"}
    bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        return f"{STATE_FILE}: {bad[0]} = {values[bad[0]]!r} is not a step count"
    if state.prompt_format is not None and not isinstance(state.prompt_format, dict):
        return f"{STATE_FILE}: prompt_format = {state.prompt_format!r} is not a mapping of processor options"
    step = int(CHECKPOINT_NAME.match(checkpoint.name).group(1))
    if state.global_step != step:
        return f"{STATE_FILE}: global_step {state.global_step} in a checkpoint of step {step}"
    if state.stage >= num_stages:
        return f"{STATE_FILE}: stage {state.stage} but the recipe has {num_stages} stage(s)"
    if state.stage_step > state.global_step:
        return f"{STATE_FILE}: stage_step {state.stage_step} is past global_step {state.global_step}"
    return None


def _process_count_mismatch(checkpoint: Path, required: tuple[str, ...]) -> str | None:
    """A checkpoint written by fewer processes than this run has (one RNG state per process): the data shards and
    RNG streams of the others do not exist, so the run cannot continue exactly; say how it can."""
    needed = sum(1 for name in required if name.startswith("random_states_"))
    try:
        listed = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        listed = {p.name: None for p in checkpoint.glob("random_states_*.pkl")}
    written = sum(1 for i in range(needed) if f"random_states_{i}.pkl" in listed)
    others = {name for name in listed if name.startswith("random_states_")} - {
        f"random_states_{i}.pkl" for i in range(needed)
    }
    if (0 < written < needed and all(f"random_states_{i}.pkl" in listed for i in range(written))) or others:
        count = written + len(others)
        return (
            f"written by {count} process(es), this run has {needed}: resume with --num-processes {count} "
            f"(the data shards and RNG streams are per process)"
        )
    return None


def is_unverifiable(checkpoint: Path) -> bool:
    """Written by a version before manifests: complete by its own marker, its contents unverifiable."""
    return not (checkpoint / MANIFEST).exists() and (checkpoint / STATE_FILE).is_file()


def resumable_checkpoint(
    run_dir: Path, *, required: tuple[str, ...], num_stages: int
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and each newer one that did not with its problem (which file, what is
    wrong), newest first."""
    rejected = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint, required=required, num_stages=num_stages)
        if problem is None:
            return checkpoint, rejected
        rejected.append((checkpoint, problem))
    return None, rejected


def write_checkpoint(accelerator, path: Path, state: TrainerState, latest_kept: Path | None) -> None:
    """Accelerate's state and the trainer position into a folder beside `path`, fsynced, with its manifest, then
    renamed to `path`: a kill or a full disk at any moment leaves either the whole checkpoint or none. Every
    process calls this; after each phase the processes compare notes, so a write refused on any of them (disk
    full, permission) stops all of them with the same line naming the path and the errno."""
    tmp = staging_path(path)
    kept = f"the latest complete checkpoint, {latest_kept.name}, is intact" if latest_kept else "no earlier one exists"

    def attempt(action, on_this_process: bool) -> None:
        failure = None
        if on_this_process:
            try:
                action()
            except Exception as err:  # only a refused write becomes a line; the rest is raised as it was
                reason = write_error(err, tmp if tmp.is_dir() else path.parent)
                if reason is None:
                    raise
                failure = f"could not write checkpoint {path}: {reason}; {kept}; free space and rerun with "
                failure += "output.if_exists=resume"
        try:
            raise_if_any_failed(accelerator, failure)
        except UserError:
            if accelerator.is_main_process:  # after every process has stopped writing into it
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    attempt(lambda: staging_folder(path), accelerator.is_main_process)
    attempt(lambda: accelerator.save_state(str(tmp)), True)

    def finish() -> None:
        state.save(tmp)
        commit(tmp, path)

    attempt(finish, accelerator.is_main_process)  # every rank's files are in tmp: the manifest covers them


def trained_so_far(name: str, family, stages_so_far) -> bool:
    """Whether a weight may differ from the base checkpoint: LoRA weights, and every weight of a group trained
    fully in one of the stages so far (it may be frozen now, but it is no longer the base checkpoint's)."""
    if ".lora_" in name:
        return True
    group = family.group_of(name)
    return any(stage.groups.get(group) == "full" for stage in stages_so_far)


def keep_trained_weights_only(weights: list[dict], is_trained: Callable[[str], bool]) -> None:
    """Accelerate's save-state pre-hook body: each state dict in `weights` keeps only the weights that trained.
    Untouched weights come back from the base checkpoint on resume; saving them would make every LoRA checkpoint as
    large as the model. A tied LM head is the embedding table under a second name: safetensors refuses to write
    shared storage, and loading the table restores the head, so only the first name of each tensor is kept."""
    for i, state in enumerate(weights):
        kept, seen = type(state)(), set()  # Accelerate's own safetensors clean-up only takes OrderedDicts
        for key, value in state.items():
            if not is_trained(key.removeprefix("module.")):
                continue
            storage = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if value.numel() and storage in seen:
                continue
            seen.add(storage)
            kept[key] = value
        weights[i] = kept


def check_checkpoint_weights(checkpoint: Path, model: torch.nn.Module, is_trained: Callable[[str], bool]) -> None:
    """A non-strict load skips names it does not know: a mismatch would silently restart some weights from the
    base checkpoint, so every trained weight must be in the file and every name in the file known."""
    file = checkpoint / "model.safetensors"
    if not file.exists():
        return
    with safe_open(str(file), framework="pt") as handle:
        saved = {k.removeprefix("module.") for k in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    names = set(model.state_dict())
    expected = {n for n, _ in model.named_parameters() if is_trained(n)}
    if saved - names or expected - saved:
        raise RuntimeError(
            f"{file}: checkpoint does not match the model: unknown {sorted(saved - names)[:3]}, "
            f"missing {sorted(expected - saved)[:3]}"
        )


def save_model(
    accelerator,
    model,
    out: Path,
    *,
    family,
    processor,
    adapter: bool,
    source_path: str,
    prompt: dict,
    remote_code: bool = False,
) -> None:
    """A model folder: the PEFT adapter (LoRA runs) or the whole model through the family, with processor,
    tokenizer, chat template and `prompt.json` (the exact instruction and skeleton it was trained with). Written
    beside `out` and renamed into place with a manifest, so an earlier `out` stays whole until the new one is.
    `remote_code`: whether the source checkpoint's remote-code files and `auto_map` are carried over."""
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (ZeRO-3 / FSDP) weights; every rank calls it
    failure = None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        try:
            with atomic_folder(out) as tmp:
                try:
                    if adapter:
                        unwrapped.save_pretrained(tmp, state_dict=state_dict)
                        processor.save_pretrained(tmp)
                        if not remote_code:  # the base tokenizer's config may name remote code (`auto_map`)
                            drop_remote_code(tmp)
                    else:
                        family.save_pretrained(
                            unwrapped,
                            processor,
                            tmp,
                            source_path=source_path,
                            state_dict=state_dict,
                            remote_code=remote_code,
                        )
                    # Prompting a model any other way than it was trained loses accuracy.
                    (tmp / "prompt.json").write_text(json.dumps(prompt, indent=2, ensure_ascii=False) + "\n")
                except Exception as err:  # only a refused write becomes a line; the rest is raised as it was
                    reason = write_error(err, tmp)  # before the partial folder is removed, which frees the space
                    if reason is None:
                        raise
                    raise _WriteRefused(reason) from None
        except (_WriteRefused, OSError) as err:  # OSError: from the manifest and the renames
            reason = str(err) if isinstance(err, _WriteRefused) else write_error(err, out.parent)
            if reason is None:
                raise
            failure = (
                f"could not write {out}: {reason}; earlier checkpoints, if any, are intact: free space and rerun "
                f"with output.if_exists=resume"
            )
    raise_if_any_failed(accelerator, failure)  # the other processes stop too instead of waiting
    accelerator.wait_for_everyone()


class _WriteRefused(Exception):
    """The machine refused a write of a model folder (the message: path and errno)."""
