"""What each optimizer step reports: the progress bar, and every `train.log_every` steps (and at a stage's last
step) one record in `train_log.jsonl` and the trackers."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from finetune.config import Recipe
from finetune.training.throughput import Throughput, memory_mib


class StepLog:
    """The step records of one run: loss, the learning rates the step used, throughput and padding since the
    previous record, memory, and a preference stage's rewards. Recording is a collective (the counts are summed
    over processes), so every process calls `step` at every step; only the main process writes the file."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator, run_dir: Path):
        self.recipe, self.accelerator = recipe, accelerator
        self.path = run_dir / "train_log.jsonl"
        self.throughput = Throughput()  # samples, tokens and padding between records
        self.tokens_per_s = float("nan")

    def start_stage(self) -> None:
        """Throughput counts from here (not from the previous stage's last record)."""
        self.throughput.reset()

    def add(self, batch: dict) -> None:
        self.throughput.add(batch)

    def step(self, bar, state, stage, stage_total: int, loss: float, lrs: dict[str, float], *, preference, best):
        """Advance `bar` for the step `state` has just counted; on a record step, write the record. `preference`: a
        `kind: dpo` stage (its rewards join the record) or None; `best`: the latest evaluation's value, shown on the
        bar when the recipe evaluates during training."""
        acc, step = self.accelerator, state.global_step
        records = step % self.recipe.train.log_every == 0 or state.stage_step == stage_total
        rates = self.throughput.take(lambda counts: acc.reduce(counts.to(acc.device), "sum").cpu()) if records else {}
        if records and preference is not None:
            rates.update(preference.take_stats(acc))
        self.tokens_per_s = rates.get("tokens_per_s", self.tokens_per_s)
        bar.update(1)
        extra = {self.recipe.eval.best_metric: f"{best:.3f}"} if self.recipe.eval.every_steps else {}
        bar.set_postfix(
            loss=f"{loss:.4f}",
            lr=f"{max(lrs.values()):.2e}",
            tok_s=f"{self.tokens_per_s:,.0f}",
            epoch=state.epoch,
            **extra,
        )
        if not records:
            return
        record = {
            "step": step,
            "stage": stage.name,
            "stage_step": state.stage_step,
            "epoch": state.epoch,
            "loss": loss,
            **rates,
            **{f"lr/{k}": v for k, v in lrs.items()},
            **memory_mib(acc.device),
        }
        acc.log({k: v for k, v in record.items() if k != "stage"}, step=step)
        if acc.is_main_process:
            try:
                with self.path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as err:  # a write's OSError names no file: the error line must
                err.filename = err.filename or str(self.path)
                raise


def tracker_init_kwargs(recipe: Recipe) -> dict:
    """The run's name for the trackers that take one: `tracking.run_name`, else the output folder's name."""
    name = recipe.tracking.run_name or Path(recipe.output.dir).name
    return {"wandb": {"name": name}, "trackio": {"name": name}}
