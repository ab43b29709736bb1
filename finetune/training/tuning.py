"""Which parameters train: a mode per module group (`frozen` | `full` | `lora`) applied to a family's model.

LoRA goes through PEFT with `target_modules` as a regex scoped to the groups in `lora` mode, so the vision
tower's `q_proj` is never wrapped by accident when only the LLM asked for LoRA. A group in `full` mode inside a
LoRA run is saved beside the adapter through PEFT's `modules_to_save`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model

from finetune.config import TuningSection
from finetune.errors import UserError
from finetune.models.base import ModelFamily

log = logging.getLogger(__name__)


@dataclass
class TuningPlan:
    """What `apply_tuning` did: mode per group and the parameter counts to log."""

    modes: dict[str, str]
    uses_lora: bool
    trainable: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [f"{g}: {self.modes[g]} (trainable {self.trainable.get(g, 0):,} / frozen {self.frozen.get(g, 0):,})"
                for g in self.modes]
        return "; ".join(rows)


def apply_tuning(model: torch.nn.Module, family: ModelFamily, tuning: TuningSection) -> tuple[torch.nn.Module,
                                                                                                 TuningPlan]:
    """Freeze / unfreeze / wrap with LoRA according to `tuning.groups`; returns the (maybe PEFT) model."""
    modes = dict(tuning.groups)
    missing, unknown = set(family.group_prefixes) - set(modes), set(modes) - set(family.group_prefixes)
    if missing or unknown:
        raise UserError(f"tuning.groups must name exactly the groups of family '{family.name}' "
                         f"({sorted(family.group_prefixes)}); missing {sorted(missing)}, unknown {sorted(unknown)}")
    family.assign_groups(model)  # fails loudly on a parameter that belongs to no group

    lora_groups = [g for g, m in modes.items() if m == "lora"]
    if lora_groups:
        targets = {g: list(tuning.lora.targets.get(g) or family.default_lora_targets.get(g, ())) for g in lora_groups}
        empty = [g for g, leaves in targets.items() if not leaves]
        if empty:
            raise UserError(f"tuning.lora.targets: group(s) {empty} are in lora mode but have no target modules")
        full_groups = [g for g, m in modes.items() if m == "full"]
        modules_to_save = [name for g in full_groups for name in family.modules_to_save.get(g, ())]
        config = LoraConfig(
            r=tuning.lora.r, lora_alpha=tuning.lora.alpha, lora_dropout=tuning.lora.dropout,
            target_modules=family.lora_target_regex(targets), modules_to_save=modules_to_save or None,
        )
        model = get_peft_model(model, config)

    plan = TuningPlan(modes=modes, uses_lora=bool(lora_groups))
    for name, param in model.named_parameters():
        group = family.group_of(name)
        param.requires_grad_(_is_trainable(name, modes[group], plan.uses_lora, family))
        counts = plan.trainable if param.requires_grad else plan.frozen
        counts[group] = counts.get(group, 0) + param.numel()
    if not plan.trainable:
        raise UserError("tuning.groups leaves no parameter trainable")
    # A group asked to train that trains nothing (LoRA targets that match no module in it, a `full` group
    # PEFT cannot save) must fail here, not show up as an unchanged model after hours of training.
    idle = [f"{g} ({m})" for g, m in modes.items() if m != "frozen" and not plan.trainable.get(g)]
    if idle:
        raise UserError(f"tuning.groups: {', '.join(idle)} would train no parameter; check tuning.lora.targets")
    return model, plan


def _is_trainable(name: str, mode: str, uses_lora: bool, family: ModelFamily) -> bool:
    # Names as in the un-wrapped model: PEFT adds a prefix and, for modules_to_save, a copy's path segment.
    clean = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    if clean.startswith(family.never_used_parameters):
        return False
    if mode == "frozen":
        return False
    if mode == "lora":
        return ".lora_" in name
    if not uses_lora:
        return True
    # `full` inside a LoRA run: only PEFT's trainable copies (modules_to_save) can be saved with the adapter.
    if ".original_module." in name:
        return False
    return ".modules_to_save." in name


def optimizer_groups(model: torch.nn.Module, family: ModelFamily, lr_for, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: one per (module group, decay or not), each with its group's learning rate.
    Biases, norms and other 1-D parameters get no weight decay (the usual transformer recipe)."""
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((family.group_of(name), param.ndim >= 2), []).append(param)
    return [
        {"params": params, "lr": lr_for(group), "weight_decay": weight_decay if decays else 0.0,
         "name": f"{group}{'' if decays else '.no_decay'}"}
        for (group, decays), params in sorted(buckets.items())
    ]
