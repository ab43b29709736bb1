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

from finetune.atomic import atomic_folder, commit, manifest_problem, staging_folder, write_error
from finetune.errors import UserError
from finetune.models.base import drop_remote_code

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
    it, the required ones present, and a trainer position that can be true of this checkpoint."""
    problem = manifest_problem(checkpoint, required=required)
    if problem:
        return problem
    try:
        raw = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        state = TrainerState(**raw)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    values = {f.name: getattr(state, f.name) for f in fields(state)}
    bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        return f"{STATE_FILE}: {bad[0]} = {values[bad[0]]!r} is not a step count"
    step = int(CHECKPOINT_NAME.match(checkpoint.name).group(1))
    if state.global_step != step:
        return f"{STATE_FILE}: global_step {state.global_step} in a checkpoint of step {step}"
    if state.stage >= num_stages:
        return f"{STATE_FILE}: stage {state.stage} but the recipe has {num_stages} stage(s)"
    if state.stage_step > state.global_step:
        return f"{STATE_FILE}: stage_step {state.stage_step} is past global_step {state.global_step}"
    return None


def resumable_checkpoint(run_dir: Path, *, required: tuple[str, ...], num_stages: int) -> tuple[Path | None, list]:
    """The newest checkpoint that verifies, and a line for each newer one that did not (which file, what is
    wrong), newest first."""
    rejected = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(checkpoint, required=required, num_stages=num_stages)
        if problem is None:
            return checkpoint, rejected
        rejected.append(f"{checkpoint}: {problem}")
    return None, rejected


def write_checkpoint(accelerator, path: Path, state: TrainerState, latest_kept: Path | None) -> None:
    """Accelerate's state and the trainer position into a folder beside `path`, fsynced, with its manifest, then
    renamed to `path`: a kill or a full disk at any moment leaves either the whole checkpoint or none. Every
    process calls this. An OS error (disk full, permission) is one line naming the path and the errno."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if accelerator.is_main_process:
            staging_folder(path)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank's files are written before the manifest
        if accelerator.is_main_process:
            state.save(tmp)
            commit(tmp, path)
    except Exception as err:  # only a refused write becomes a line; the rest is raised as it was
        reason = write_error(err, path.parent)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        kept = f"the latest complete checkpoint, {latest_kept.name}, is intact" if latest_kept else "none was before"
        raise UserError(
            f"could not write checkpoint {path}: {reason}; {kept}; free space and rerun with output.if_exists=resume"
        ) from None
    accelerator.wait_for_everyone()


def trained_so_far(name: str, family, stages_so_far) -> bool:
    """Whether a weight may differ from the base checkpoint: LoRA weights, and every weight of a group trained
    fully in one of the stages so far (it may be frozen now, but it is no longer the base checkpoint's)."""
    if ".lora_" in name:
        return True
    group = family.group_of(name)
    return any(stage.groups.get(group) == "full" for stage in stages_so_far)


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
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        try:
            with atomic_folder(out) as tmp:
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
            reason = write_error(err, out.parent)
            if reason is None:
                raise
            raise UserError(
                f"could not write {out}: {reason}; the checkpoints are intact: free space and rerun with "
                f"output.if_exists=resume"
            ) from None
    accelerator.wait_for_everyone()
