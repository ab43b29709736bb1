"""What a run writes to disk besides the logs: the trainer position saved beside Accelerate's checkpoint state,
checkpoint retention and checks, and the saved model folders (`final/`, `best/`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

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
    accelerator, model, out: Path, *, family, processor, adapter: bool, source_path: str, prompt: dict
) -> None:
    """A model folder: the PEFT adapter (LoRA runs) or the whole model through the family, with processor,
    tokenizer, chat template and `prompt.json` (the exact instruction and skeleton it was trained with)."""
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (ZeRO-3 / FSDP) weights; every rank calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if adapter:
            unwrapped.save_pretrained(out, state_dict=state_dict)
            processor.save_pretrained(out)
        else:
            family.save_pretrained(unwrapped, processor, out, source_path=source_path, state_dict=state_dict)
        # Prompting a model any other way than it was trained loses accuracy.
        (out / "prompt.json").write_text(json.dumps(prompt, indent=2, ensure_ascii=False) + "\n")
    accelerator.wait_for_everyone()
