"""From a validated :class:`~finetune.config.Recipe` to the :class:`~finetune.config.ResolvedRecipe` a run uses.

A recipe gives its training modes in one of three ways (exactly one): `stages:` (an explicit list), `schedule:
paper | lora | full` (shorthands the model family expands) or neither (one stage named `train` from
`tuning.groups`, `optim.lr` and the train budget). Resolution happens once, before any model or data loader is
built: the stages are expanded, every stage gets one learning rate per trainable group, and the prompt skeleton
is derived from the training targets when the recipe gives none. The result is immutable; nothing later edits it.

Every rule about groups and stages lives here and is checked the same way for stages a user wrote and stages a
preset expanded, each problem one line naming the recipe file and line (`Recipe.where`).
"""

from __future__ import annotations

import difflib

from finetune.config import DEFAULT_GROUPS, Recipe, ResolvedRecipe, StageSection
from finetune.errors import RecipeError


def suggest(word: str, known: list[str] | tuple[str, ...]) -> str:
    """` (did you mean 'x'?)`, or the known names when nothing is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known: {', '.join(known)})" if known else ""


def stage_problems(
    stage: StageSection, family_groups: tuple[str, ...] | list[str], default_lr: float | dict[str, float]
) -> list[tuple[str, str]]:
    """What is wrong with one stage, as (key path inside the stage, message) pairs; empty when it is usable."""
    problems = []
    for group in stage.groups:
        if group not in family_groups:
            problems.append((f"groups.{group}", f"no group '{group}'{suggest(group, family_groups)}"))
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


Subgroups = dict[str, tuple[str, tuple[str, ...]]]  # name → (parent group, module paths)


def subgroup_specs(recipe: Recipe, family_groups: tuple[str, ...], family_subgroups: Subgroups) -> Subgroups:
    """The family's subgroups and the recipe's (`tuning.subgroups`), each carved out of one of the family's groups."""
    specs = dict(family_subgroups)
    for name, sub in recipe.tuning.subgroups.items():
        key = f"tuning.subgroups.{name}"
        if name in family_groups or name in specs:
            raise RecipeError(f"{recipe.where(key)}: {key}: '{name}' is already a group of '{recipe.model.family}'")
        if sub.of not in family_groups:
            raise RecipeError(
                f"{recipe.where(key + '.of')}: {key}.of: '{recipe.model.family}' has no group '{sub.of}'"
                f"{suggest(sub.of, family_groups)}"
            )
        specs[name] = (sub.of, tuple(sub.modules))
    return specs


def with_subgroups(modes: dict, specs: Subgroups) -> dict:
    """Modes (or learning rates) per group with every subgroup the mapping leaves out given its parent's value."""
    filled = dict(modes)
    for name, (parent, _) in specs.items():
        if name not in filled and parent in modes:
            filled[name] = modes[parent]
    return filled


def _filled_stage(stage: StageSection, specs: Subgroups) -> StageSection:
    groups = with_subgroups(stage.groups, specs)
    lr = stage.lr
    if isinstance(lr, dict):  # a subgroup its parent's rate, where the parent trains and the subgroup does too
        lr = {**lr, **{n: lr[p] for n, (p, _) in specs.items() if n not in lr and p in lr and groups[n] != "frozen"}}
    return stage.model_copy(update={"groups": groups, "lr": lr})


def _filled_lr(lr, specs: Subgroups):
    return with_subgroups(lr, specs) if isinstance(lr, dict) else lr


def check_modes(recipe: Recipe, groups: tuple[str, ...], specs: Subgroups | None = None) -> None:
    """The recipe's groups, modes, learning rates and explicit stages fit a family with these module groups (and
    these subgroups, which take their parent's mode and rate wherever the recipe gives them none)."""
    specs = specs or {}
    groups = (*groups, *specs)
    where = recipe.where
    given = [
        k
        for k, v in (("stages", recipe.stages), ("schedule", recipe.schedule), ("tuning.groups", recipe.tuning.groups))
        if v is not None
    ]
    if len(given) > 1:
        raise RecipeError(
            f"{where(given[-1])}: {' and '.join(given)} both give the training modes; keep one (set the other to null)"
        )
    family = recipe.model.family
    named = {f"tuning.groups.{g}": g for g in recipe.tuning.groups or {}}
    named.update({f"optim.lr.{g}": g for g in (recipe.optim.lr if isinstance(recipe.optim.lr, dict) else {})})
    named.update({f"tuning.lora.targets.{g}": g for g in recipe.tuning.lora.targets})
    for key, group in named.items():
        if group not in groups:
            raise RecipeError(f"{where(key)}: {key}: '{family}' has no group '{group}'{suggest(group, groups)}")
    if recipe.stages is None and recipe.schedule is None:
        modes = with_subgroups(recipe.tuning.groups or DEFAULT_GROUPS, specs)
        missing = [g for g in groups if g not in modes]
        if missing:
            raise RecipeError(
                f"{where('tuning.groups')}: tuning.groups: give a mode (frozen, full, lora) for every group of "
                f"'{family}': missing {', '.join(missing)}"
            )
    if recipe.stages is not None:
        check_stages(recipe, [_filled_stage(s, specs) for s in recipe.stages], groups, key="stages", specs=specs)


def check_stages(
    recipe: Recipe, stages: list[StageSection], groups: tuple[str, ...], *, key: str, specs: Subgroups | None = None
) -> None:
    """Rules every stage list obeys, the recipe's own or a preset's (`key`: where they came from, for messages)."""
    where = recipe.where
    default_lr = _filled_lr(recipe.optim.lr, specs or {})
    from_recipe = key == "stages"  # an expanded preset has no lines of its own: point at the `schedule:` key

    def place(subkey: str) -> tuple[str, str]:
        return (
            (where(f"stages.{subkey}"), f"stages.{subkey}") if from_recipe else (where(key), f"{key}: stages.{subkey}")
        )

    names = [stage.name for stage in stages]
    for i, name in enumerate(names):
        if name in names[:i]:
            at, label = place(f"{i}.name")
            raise RecipeError(f"{at}: {label}: '{name}' is used by an earlier stage; stage names must be unique")
    for i, stage in enumerate(stages):
        for subkey, message in stage_problems(stage, groups, default_lr):
            if subkey == "(optim.lr)":  # the stage has no lr of its own: the gap is in optim.lr
                raise RecipeError(f"{where('optim.lr')}: optim.lr (used by stages.{i}, which has no lr): {message}")
            at, label = place(f"{i}.{subkey}")
            raise RecipeError(f"{at}: {label}: {message}")
    _check_preference_stages(recipe, stages, place)
    shares = sum(stage.fraction or 0 for stage in stages)
    if shares > 1 + 1e-9:
        raise RecipeError(f"{where(key)}: {key}: the fractions of the train budget add up to {shares:g} (> 1)")
    full = {g for s in stages for g, m in s.groups.items() if m == "full"}
    lora = {g for s in stages for g, m in s.groups.items() if m == "lora"}
    for name, (parent, _) in (specs or {}).items():
        if name in lora and parent in full:
            # A full group in a LoRA run trains as PEFT's copy of its modules, the subgroup's among them: adapters
            # cannot also be injected inside that copy.
            raise RecipeError(
                f"{where(key)}: {key}: subgroup '{name}' is lora while its parent '{parent}' is full in some stage; "
                f"train '{name}' full too, or keep '{parent}' frozen or lora"
            )
    both = sorted(full & lora)
    if both:
        raise RecipeError(
            f"{where(key)}: {key}: group(s) {', '.join(both)} are lora in one stage and full in another; a group's "
            f"adapter and its full copy cannot both train (split the run in two)"
        )


def _check_preference_stages(recipe: Recipe, stages: list[StageSection], place) -> None:
    """`kind: dpo` stages and `data.preference` agree: a stage reading the preference pairs has them, and pairs
    given are read by some stage."""
    readers = [i for i, s in enumerate(stages) if s.preference is not None and s.preference.pairs == "preference"]
    for i in readers:
        if recipe.data.preference is None:
            at, label = place(f"{i}.dpo.pairs")
            raise RecipeError(f"{at}: {label}: pairs: preference reads data.preference, which this recipe does not set")
        if stages[i].data is not None:
            at, label = place(f"{i}.data")
            raise RecipeError(
                f"{at}: {label}: a stage with pairs: preference trains on data.preference; stage data applies to "
                f"pairs: self"
            )
    if recipe.data.preference is not None and not readers:
        raise RecipeError(
            f"{recipe.where('data.preference')}: data.preference: no stage reads these pairs (give a stage kind: dpo "
            f"and dpo: {{pairs: preference}})"
        )


def check_quantization(
    recipe: Recipe, stages: list[StageSection], family_groups: tuple[str, ...], specs: Subgroups, *, key: str
) -> None:
    """`tuning.quantization` (QLoRA): `skip` names groups of the family; a quantised group never trains in full
    (its 4-bit / 8-bit weights have no gradient), so every group in `full` mode in some stage is skipped; and some
    stage trains LoRA adapters, the only thing a quantised base can learn through."""
    quantization = recipe.tuning.quantization
    if quantization is None:
        return
    where = recipe.where
    for i, group in enumerate(quantization.skip):
        if group not in family_groups:
            at = f"tuning.quantization.skip.{i}"
            raise RecipeError(
                f"{where(at)}: {at}: '{recipe.model.family}' has no group '{group}'{suggest(group, family_groups)}"
            )
    skipped = set(quantization.skip)
    for i, stage in enumerate(stages):
        for group, mode in stage.groups.items():
            parent = specs.get(group, (group,))[0]
            if mode == "full" and parent not in skipped:
                label = f"stages.{i}.groups.{group}" if key == "stages" else f"{key}: stages.{i} ({stage.name})"
                raise RecipeError(
                    f"{where(key)}: {label}: '{group}' trains in full, but tuning.quantization quantises it "
                    f"(quantised weights cannot train); add '{parent}' to tuning.quantization.skip or make it lora"
                )
    if not any(mode == "lora" for stage in stages for mode in stage.groups.values()):
        raise RecipeError(
            f"{where('tuning.quantization')}: tuning.quantization: no stage trains a group with LoRA; a quantised "
            "base learns only through LoRA adapters (QLoRA)"
        )


def expand_stages(recipe: Recipe, family) -> list[StageSection]:
    """The stages to run, as written, from a preset, or the single `train` stage; each checked, every subgroup given
    a mode (its parent's unless named)."""
    specs = subgroup_specs(recipe, tuple(family.group_prefixes), family.subgroups)
    groups = (*family.group_prefixes, *specs)
    if recipe.stages:
        stages, key = list(recipe.stages), "stages"
    elif recipe.schedule:
        preset = family.schedule(recipe.schedule, recipe.model.path, recipe.model.revision)
        stages, key = [StageSection.model_validate(s) for s in preset], "schedule"
    else:
        stages = [StageSection(name="train", groups=dict(recipe.tuning.groups or DEFAULT_GROUPS))]
        key = "tuning.groups"
    stages = [_filled_stage(stage, specs) for stage in stages]
    check_stages(recipe, stages, groups, key=key, specs=specs)
    check_quantization(recipe, stages, tuple(family.group_prefixes), specs, key=key)
    optim_lr = _filled_lr(recipe.optim.lr, specs)
    filled = []
    for stage in stages:
        lr = stage.lr if stage.lr is not None else optim_lr
        rates = {g: (lr[g] if isinstance(lr, dict) else lr) for g, m in stage.groups.items() if m != "frozen"}
        filled.append(stage.model_copy(update={"lr": rates}))
    return filled


def derived_skeleton(recipe: Recipe) -> dict:
    """The prompt skeleton: the recipe's, else every key seen in the training targets (first-seen order)."""
    if recipe.data.prompt.skeleton is not None:
        return recipe.data.prompt.skeleton
    from finetune.data.prompt import derive_skeleton
    from finetune.data.sources import read_records

    d = recipe.data
    records = read_records(d.train, image_column=d.image_column, target_column=d.target_column)
    return derive_skeleton(rec.target for rec in records if isinstance(rec.target, dict))


def resolve_recipe(recipe: Recipe, family=None) -> ResolvedRecipe:
    """The recipe a run uses (see the module docstring); a ResolvedRecipe is returned as it is."""
    if isinstance(recipe, ResolvedRecipe):
        return recipe
    if family is None:
        from finetune.models import get_family

        family = get_family(recipe.model.family)
    stages = expand_stages(recipe, family)
    data = recipe.data.model_copy(
        update={"prompt": recipe.data.prompt.model_copy(update={"skeleton": derived_skeleton(recipe)})}
    )
    raw = {
        **recipe.model_dump(),
        "data": data.model_dump(),
        "stages": [s.model_dump() for s in stages],
        "schedule": None,
        "tuning": {**recipe.tuning.model_dump(), "groups": None},
    }
    return ResolvedRecipe.model_validate(raw).with_origin(recipe.origin)
