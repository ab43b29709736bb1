"""Training stages: what trains in each stage of one job, at which learning rates, for how many steps.

A recipe gives its stages in one of three ways (exactly one):

- `stages:` — an explicit list (name, mode per module group, learning rates, budget, warmup, data, eval);
- `schedule: paper | lora | full` — shorthands the model family expands (`paper` is the family's published
  schedule adapted to fine-tuning on the user's data; see `ModelFamily.schedule`);
- neither — one stage named `train` from `tuning.groups`, `optim.lr` and the train budget (a plain run).

`resolve_stages` turns any of them into a list of :class:`~finetune.config.StageSection` whose `lr` is a
mapping with one learning rate per trainable group, so the run folder's `recipe.yaml` records exactly what ran.

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

import difflib
import math

from finetune.config import DEFAULT_GROUPS, Recipe, StageSection, TrainSection
from finetune.errors import UserError
from finetune.models.base import ModelFamily


def stage_problems(
    stage: StageSection, family_groups: tuple[str, ...] | list[str], default_lr: float | dict[str, float]
) -> list[tuple[str, str]]:
    """What is wrong with one stage, as (key path inside the stage, message) pairs; empty when it is usable."""
    problems = []
    for group in stage.groups:
        if group not in family_groups:
            close = difflib.get_close_matches(group, family_groups, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"groups: {', '.join(family_groups)}"
            problems.append((f"groups.{group}", f"no group '{group}' ({hint})"))
    missing = [g for g in family_groups if g not in stage.groups]
    if missing:
        problems.append(("groups", f"give a mode (frozen, full, lora) for every group: missing {', '.join(missing)}"))
    trainable = [g for g, mode in stage.groups.items() if mode != "frozen"]
    if not trainable:
        problems.append(("groups", "every group is frozen: the stage would train nothing"))
    if isinstance(stage.lr, dict):  # a stage's own rates name exactly what it trains
        for group in stage.lr:
            if group not in stage.groups:
                problems.append((f"lr.{group}", f"no group '{group}' in this stage"))
            elif stage.groups[group] == "frozen":
                problems.append((f"lr.{group}", f"group '{group}' is frozen in this stage"))
    lr = stage.lr if stage.lr is not None else default_lr
    if isinstance(lr, dict):  # optim.lr may also name groups this stage keeps frozen
        without = [g for g in trainable if g not in lr]
        if without:
            where = "lr" if stage.lr is not None else "(optim.lr)"
            problems.append((where, f"no learning rate for trainable group(s) {', '.join(without)}"))
    return problems


def resolve_stages(recipe: Recipe, family: ModelFamily) -> list[StageSection]:
    """The recipe's stages with one learning rate per trainable group; presets expanded by the family."""
    if recipe.stages:
        stages = [stage.model_copy(deep=True) for stage in recipe.stages]
    elif recipe.schedule:
        stages = [
            StageSection.model_validate(s)
            for s in family.schedule(recipe.schedule, recipe.model.path, recipe.model.revision)
        ]
    else:
        stages = [StageSection(name="train", groups=dict(recipe.tuning.groups or DEFAULT_GROUPS))]
    for i, stage in enumerate(stages):
        problems = stage_problems(stage, tuple(family.group_prefixes), recipe.optim.lr)
        if problems:
            key, message = problems[0]
            raise UserError(f"stages.{i}.{key} ({stage.name}): {message}")
        lr = stage.lr if stage.lr is not None else recipe.optim.lr
        stage.lr = {g: (lr[g] if isinstance(lr, dict) else lr) for g, m in stage.groups.items() if m != "frozen"}
    shares = sum(stage.fraction or 0 for stage in stages)
    if shares > 1 + 1e-9:
        raise UserError(f"stages: the fractions of the train budget add up to {shares:g} (> 1)")
    both = sorted(set(full_groups(stages)) & {g for s in stages for g, m in s.groups.items() if m == "lora"})
    if both:
        raise UserError(
            f"stages: group(s) {', '.join(both)} are lora in one stage and full in another; "
            f"a group's adapter and its full copy cannot both train (split the run in two)"
        )
    return stages


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
