"""Trainer position saved beside Accelerate's checkpoint state, and checkpoint retention."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"


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
    """Complete checkpoints (those whose trainer state was written last), oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if (p / STATE_FILE).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
