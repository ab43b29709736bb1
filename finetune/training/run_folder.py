"""The run folder: never reused silently, the resolved recipe recorded, a resume refused if the recipe changed."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune.atomic import recover, write_text_atomic
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.recipe import dump_recipe
from finetune.training.checkpoint import is_unverifiable, list_checkpoints, resumable_checkpoint
from finetune.training.run_lock import LOCK_NAME

# Recipe keys a resumed run may change: budgets, checkpoint cadence, logging, evaluation, tracking, output.
RESUME_MAY_CHANGE = re.compile(
    r"^(train\.(max_steps|epochs|checkpoint_every|keep_checkpoints|log_every|num_workers)"
    r"|stages\.\d+\.(max_steps|epochs|fraction|eval_at_end)|eval\..*|tracking\..*|output\..*)$"
)


REJECTED = ".rejected"  # suffix of a checkpoint folder set aside because it failed to verify


def has_content(run_dir: Path) -> bool:
    """Whether the folder holds anything but its lock (which the run that is starting created)."""
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


@dataclass
class RunFolderPlan:
    """What the run does with its folder, decided under the folder's lock before anything is changed."""

    resume_from: Path | None = None
    clear: bool = False  # overwrite: empty the folder first
    rejected: list[Path] = field(default_factory=list)  # checkpoints newer than `resume_from` that failed to verify
    warnings: list[str] = field(default_factory=list)  # one line each, for the log


def check_run_dir(run_dir: Path, policy: str, *, required: tuple[str, ...], num_stages: int) -> RunFolderPlan:
    """What `prepare_run_dir` will do, without doing it: refuses a folder the policy may not reuse, finds the newest
    checkpoint that verifies for a resume. Called first, so that a run that cannot use its folder stops at once,
    while the folder is changed only after the checkpoint and the data have been checked (an `overwrite` run that
    stops on a mistyped model path must not have deleted the previous run)."""
    exists = has_content(run_dir)
    if exists and policy == "error":
        raise UserError(
            f"{run_dir}: run folder exists; set output.if_exists=resume to continue it "
            f"or output.if_exists=overwrite to replace it"
        )
    if exists and policy == "resume":
        if not list_checkpoints(run_dir):
            raise UserError(f"{run_dir}: output.if_exists=resume but the run has no checkpoint")
        resume_from, rejected = resumable_checkpoint(run_dir, required=required, num_stages=num_stages)
        if resume_from is None:
            problems = "; ".join(f"{path}: {problem}" for path, problem in rejected)
            raise UserError(
                f"{run_dir}: output.if_exists=resume but no checkpoint verifies ({problems}); "
                f"start again with output.if_exists=overwrite"
            )
        warnings = [f"checkpoint {path}: {problem}; set aside as {path.name}{REJECTED}" for path, problem in rejected]
        if is_unverifiable(resume_from):
            warnings.append(f"checkpoint {resume_from} has no manifest (an earlier version wrote it): not verified")
        return RunFolderPlan(resume_from=resume_from, rejected=[path for path, _ in rejected], warnings=warnings)
    return RunFolderPlan(clear=exists and policy == "overwrite")


def prepare_run_dir(run_dir: Path, plan: RunFolderPlan, accelerator) -> None:
    """Empty the folder for an overwrite (its lock stays: it is this run's), make sure it exists."""
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 changes anything
    if accelerator.is_main_process:
        # What a kill left half-done: a model folder put aside mid-replacement comes back, partial ones go.
        for name in ("final", "best"):
            recover(run_dir / name)
        for partial in (run_dir / "checkpoints").glob(".step_*.tmp"):
            shutil.rmtree(partial)
        # Checkpoints that failed to verify would count towards keep_checkpoints and be taken for the latest:
        # kept for a look, under a name no resume or prune considers.
        for rejected in plan.rejected:
            os.replace(rejected, rejected.with_name(rejected.name + REJECTED))
        if plan.clear:
            for child in run_dir.iterdir():
                if child.name == LOCK_NAME:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def trim_train_log(run_dir: Path, step: int) -> None:
    """A resumed run logs the steps after its checkpoint again: drop the lines a killed run wrote past it."""
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def record_recipe(recipe: Recipe, run_dir: Path, *, resumed: bool, is_main_process: bool) -> None:
    """Save the resolved recipe (stages expanded, derived prompt skeleton included). A resumed run must be the
    same run: only budgets, checkpoint cadence, evaluation and tracking may change; the original record is kept."""
    path = run_dir / "recipe.yaml"
    if resumed:
        saved = flatten(yaml.safe_load(path.read_text()))
        current = flatten(recipe.model_dump(mode="json"))
        changed = sorted(
            k
            for k in saved.keys() | current.keys()
            if saved.get(k) != current.get(k)
            and not RESUME_MAY_CHANGE.match(k)
            # a key added to the recipe schema since the run was recorded, left at its default
            and not (k not in saved and (current.get(k) in (None, {}, [], "{}", "[]") or is_default(k, current[k])))
        )
        if changed:
            raise UserError(
                f"{path}: cannot resume with a different recipe; changed: {', '.join(changed)} "
                f"(only budgets, checkpoint cadence, logging, eval, tracking and output may change)"
            )
        return
    if is_main_process:
        dump_recipe(recipe, path)


def load_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_metrics(run_dir: Path, metrics: dict) -> None:
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def flatten(tree, prefix: str = "") -> dict:
    """Nested mappings and lists as `a.b.0.c` → scalar (for comparisons and tracker configs)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def is_default(key: str, value) -> bool:
    """Whether `value` is the recipe schema's default for the flattened `key` (`data.max_image_pixels`)."""
    from pydantic import BaseModel

    model: type[BaseModel] | None = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        field_info = model.model_fields.get(part) if model else None
        if field_info is None:
            return False
        if i == len(parts) - 1:
            return not field_info.is_required() and field_info.get_default(call_default_factory=True) == value
        annotation = field_info.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return False
