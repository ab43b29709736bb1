"""The run folder: never reused silently, the resolved recipe recorded, a resume refused if the recipe changed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from finetune.config import Recipe
from finetune.errors import UserError
from finetune.recipe import dump_recipe
from finetune.training.checkpoint import latest_checkpoint

# Recipe keys a resumed run may change: budgets, checkpoint cadence, logging, evaluation, tracking, output.
RESUME_MAY_CHANGE = re.compile(
    r"^(train\.(max_steps|epochs|checkpoint_every|keep_checkpoints|log_every|num_workers)"
    r"|stages\.\d+\.(max_steps|epochs|fraction|eval_at_end)|eval\..*|tracking\..*|output\..*)$"
)


def check_run_dir(run_dir: Path, policy: str) -> Path | None:
    """What `prepare_run_dir` will do, without doing it: refuses a folder the policy may not reuse, returns the
    checkpoint to resume from. Called first, so that a run that cannot use its folder stops at once, while the
    folder is changed only after the checkpoint and the data have been checked (an `overwrite` run that stops
    on a mistyped model path must not have deleted the previous run)."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and policy == "error":
        raise UserError(
            f"{run_dir}: run folder exists; set output.if_exists=resume to continue it "
            f"or output.if_exists=overwrite to replace it"
        )
    if exists and policy == "resume":
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise UserError(f"{run_dir}: output.if_exists=resume but the run has no checkpoint")
        return resume_from
    return None


def prepare_run_dir(run_dir: Path, policy: str, accelerator) -> Path | None:
    """Refuse to reuse a run folder unless the recipe says resume or overwrite; replace it for overwrite. Returns
    the checkpoint to resume from, if any."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    resume_from = check_run_dir(run_dir, policy)
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 changes anything
    if accelerator.is_main_process:
        if exists and policy == "overwrite":
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return resume_from


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
            # a key added to the recipe schema since the run was recorded, left at its empty default
            and not (k not in saved and current.get(k) in (None, {}, [], "{}", "[]"))
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
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


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
