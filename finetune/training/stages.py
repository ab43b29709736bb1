"""Training stages at run time: which adapters exist when, and how many optimizer steps each stage takes.

Which stages a recipe runs (`stages:`, a `schedule:` preset, or one plain stage) and every rule they obey are
settled before the run by `finetune.resolve`; the runner reads the resolved `recipe.stages`.

LoRA across stages: adapters are created at the start of the first stage that puts a group in `lora` mode,
for every group that is `lora` in that stage or a later one (one PEFT adapter, so the result saves and loads
as a standard adapter; LoRA's B matrices start at zero, so the adapters of a group whose LoRA stage has not
come yet change nothing and stay frozen until it comes). In later stages an adapter stays in the model: a group
switched to `frozen` keeps its trained adapter, applied and frozen; the saved adapter holds every stage's LoRA
weights. Groups that train `full` in any stage of a LoRA run get PEFT's `modules_to_save` copy when the adapters
are created (so weights trained fully before that point are carried into the saved result, beside the adapter);
in a run with LoRA in any stage, `full` trains only what such a copy can hold (LLaVA's bare `image_newline`
parameter stays frozen), in every stage, so nothing trained is missing from the saved adapter.
One group cannot be `lora` in one stage and `full` in another: its adapter and its full copy would overlap.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from finetune.config import StageSection, TrainSection
from finetune.errors import UserError
from finetune.training.tuning import optimizer_groups


def lora_groups_from(stages: list[StageSection], index: int) -> list[str]:
    """Groups that are `lora` in stage `index` or any later stage (the adapters created at `index`)."""
    return sorted({g for stage in stages[index:] for g, mode in stage.groups.items() if mode == "lora"})


def full_groups(stages: list[StageSection]) -> list[str]:
    """Groups trained `full` in any stage (saved beside a LoRA adapter as `modules_to_save`)."""
    return sorted({g for stage in stages for g, mode in stage.groups.items() if mode == "full"})


def first_lora_stage(stages: list[StageSection]) -> int | None:
    """Index of the first stage that asks for LoRA, or None."""
    return next((i for i, s in enumerate(stages) if "lora" in s.groups.values()), None)


def stage_steps(
    stages: list[StageSection],
    index: int,
    train: TrainSection,
    *,
    stage_batches_per_epoch: int,
    main_batches_per_epoch: int,
) -> int:
    """Optimizer steps of stage `index`. `epochs` count over the stage's own data; `fraction` is a share of the
    train section's budget (max_steps, or epochs over data.train), rounded so that consecutive shares add up to
    exactly their part of the budget (0.1 / 0.3 / 0.6 of 5 steps: 1 / 1 / 3); no budget at all is the whole
    train budget."""
    stage = stages[index]
    if stage.max_steps:
        return stage.max_steps
    if stage.epochs:
        return max(1, math.ceil(stage.epochs * stage_batches_per_epoch / train.grad_accum))
    total = train.max_steps or max(1, math.ceil(train.epochs * main_batches_per_epoch / train.grad_accum))
    if stage.fraction:
        before = sum(s.fraction for s in stages[:index] if s.fraction)
        return max(1, _round_half_up((before + stage.fraction) * total) - _round_half_up(before * total))
    return total


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5 + 1e-9)


def warmup_steps(stage: StageSection, default_ratio: float, default_steps: int | None, steps: int) -> int:
    """A stage's warmup: its own setting, else the optim section's."""
    if stage.warmup_steps is not None:
        return stage.warmup_steps
    if stage.warmup_ratio is not None:
        return round(stage.warmup_ratio * steps)
    return default_steps if default_steps is not None else round(default_ratio * steps)


def optimizer_and_schedule(
    model,
    family,
    stages: list[StageSection],
    index: int,
    recipe,
    *,
    batches_per_epoch: int,
    main_batches_per_epoch: int,
):
    """A stage's fresh AdamW (one parameter group per module group, at the stage's rates) and its warmup + decay
    schedule; returns (optimizer, scheduler, the stage's optimizer steps, warmup steps)."""
    stage, optim = stages[index], recipe.optim
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, family, lambda group: stage.lr[group], optim.weight_decay),
        betas=optim.betas,
        eps=optim.eps,
    )
    total = stage_steps(
        stages,
        index,
        recipe.train,
        stage_batches_per_epoch=batches_per_epoch,
        main_batches_per_epoch=main_batches_per_epoch,
    )
    warmup = warmup_steps(stage, optim.warmup_ratio, optim.warmup_steps, total)
    if warmup >= total > 1:
        raise UserError(
            f"{recipe.where(f'stages.{index}')}: stages.{index} ({stage.name}): warmup of {warmup} steps does not end "
            f"before the stage's {total} steps; lower warmup_steps or use warmup_ratio"
        )
    kind = optim.scheduler if optim.scheduler != "constant" else "constant_with_warmup"
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return optimizer, scheduler, total, warmup
