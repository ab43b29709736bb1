"""Which parameters train: a mode per module group (`frozen` | `full` | `lora`) applied to a family's model.

LoRA goes through PEFT with `target_modules` as a regex scoped to the groups in `lora` mode, so the vision
tower's `q_proj` is never wrapped by accident when only the LLM asked for LoRA. A group in `full` mode inside a
LoRA run is saved beside the adapter through PEFT's `modules_to_save`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model

from finetune.config import DEFAULT_GROUPS, LoraSection, Recipe, TuningSection
from finetune.errors import UserError
from finetune.models.base import ModelFamily
from finetune.models.quantization import MIN_4BIT_IN_FEATURES, Quantization, require_bitsandbytes
from finetune.training.lora_dropout import share_lora_dropout

log = logging.getLogger(__name__)


@dataclass
class TuningPlan:
    """What `apply_tuning` did: mode per group and the parameter counts to log."""

    modes: dict[str, str]
    uses_lora: bool
    trainable: dict[str, int] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [
            f"{g}: {self.modes[g]} (trainable {self.trainable.get(g, 0):,} / frozen {self.frozen.get(g, 0):,})"
            for g in self.modes
        ]
        return "; ".join(rows)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing: it works when the inputs of a checkpointed block need no grad
    (a frozen vision tower under LoRA), where the reentrant variant silently drops the gradient — so the input
    hooks transformers adds for the reentrant variant are removed at once (see `set_trainable`)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()


def quantization_for(recipe: Recipe, family: ModelFamily, accelerator) -> Quantization | None:
    """`tuning.quantization` as the family loads it (QLoRA), or None. Refused under a sharding engine (DeepSpeed,
    FSDP), whose parameter handling (casting, flattening, partitioning) does not know bitsandbytes' packed weights."""
    section = recipe.tuning.quantization
    if section is None:
        return None
    require_bitsandbytes()
    engine = accelerator.distributed_type.name
    if engine in ("DEEPSPEED", "FSDP"):
        raise UserError(
            f"{recipe.where('tuning.quantization')}: tuning.quantization runs in one process or under DDP; this "
            f"launch uses {engine} (launch without it, or drop tuning.quantization)"
        )
    return Quantization.from_recipe(section, family.group_prefixes)


def prepare_quantized(model: torch.nn.Module, quantization: Quantization, skip, say) -> torch.nn.Module:
    """PEFT's preparation for k-bit training (the unquantised weights, layer norms above all, in fp32; every weight
    frozen until a stage sets what trains); `say`s what was quantised and what was kept as it was."""
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing stays ours (non-reentrant: `enable_gradient_checkpointing`), not PEFT's.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_weights_trainable(model)
    say(f"quantised the base to {quantization.describe()} (groups kept unquantised: {', '.join(skip) or 'none'})")
    if quantization.narrow:
        names = ", ".join(quantization.narrow[:4]) + (" ..." if len(quantization.narrow) > 4 else "")
        say(
            f"warning: {len(quantization.narrow)} linear layer(s) with fewer than {MIN_4BIT_IN_FEATURES} inputs kept "
            f"unquantised (4-bit quantises in blocks of {MIN_4BIT_IN_FEATURES}): {names}"
        )
    return model


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes (0.50, on a CPU with AVX512-BF16) repacks a 4-bit layer's weight into a faster inference layout
    the first time the layer runs in eval mode, and keeps it so: its matmul in that layout has no backward, so a run
    that evaluates (generates) and then trains would get wrong gradients or fail. A training model keeps the
    trainable layout (generation is a little slower on the CPU; nothing changes on a GPU)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_tuning(
    model: torch.nn.Module, family: ModelFamily, tuning: TuningSection, groups: dict[str, str] | None = None
) -> tuple[torch.nn.Module, TuningPlan]:
    """Freeze / unfreeze / wrap with LoRA for one set of modes (`groups`, default `tuning.groups`); returns the
    (maybe PEFT) model. A staged run calls `inject_lora` and `set_trainable` itself, stage by stage."""
    modes = dict(groups or tuning.groups or DEFAULT_GROUPS)
    check_groups(family, modes)
    lora_groups = [g for g, m in modes.items() if m == "lora"]
    if lora_groups:
        model = inject_lora(model, family, tuning.lora, lora_groups, [g for g, m in modes.items() if m == "full"])
    return model, set_trainable(model, family, modes, uses_lora=bool(lora_groups))


def check_groups(family: ModelFamily, modes: dict[str, str]) -> None:
    missing, unknown = set(family.group_prefixes) - set(modes), set(modes) - set(family.group_prefixes)
    if missing or unknown:
        raise UserError(
            f"tuning.groups must name exactly the groups of family '{family.name}' "
            f"({sorted(family.group_prefixes)}); missing {sorted(missing)}, unknown {sorted(unknown)}"
        )


def lora_targets(family: ModelFamily, lora: LoraSection, groups: list[str]) -> dict[str, list[str]]:
    """Leaf-module targets per LoRA group (the recipe's, else the family's defaults); a subgroup the recipe names no
    targets for takes its parent's."""

    def of(group: str) -> list[str]:
        parent = family.subgroup_parents.get(group)
        given = lora.targets.get(group) or (lora.targets.get(parent) if parent else None)
        return list(given or family.default_lora_targets.get(group, ()))

    targets = {g: of(g) for g in groups}
    empty = [g for g, leaves in targets.items() if not leaves]
    if empty:
        raise UserError(f"tuning.lora.targets: group(s) {empty} are in lora mode but have no target modules")
    return targets


def check_lora_targets(model: torch.nn.Module, family: ModelFamily, lora: LoraSection, groups: list[str]) -> None:
    """Every group that some stage puts in `lora` mode has modules its targets match — checked before the first
    stage, not when a later stage creates the adapters after hours of training."""
    names = [name for name, _ in model.named_modules()]
    for group, leaves in lora_targets(family, lora, groups).items():
        pattern = re.compile(family.lora_target_regex({group: leaves}))
        if not any(pattern.match(name) for name in names):
            raise UserError(f"tuning.lora.targets.{group}: {leaves} match no module of group '{group}'")


def inject_lora(
    model: torch.nn.Module, family: ModelFamily, lora: LoraSection, lora_groups: list[str], full_groups: list[str]
) -> torch.nn.Module:
    """Wrap the model with one PEFT LoRA adapter on `lora_groups` (targets scoped to each group); `full_groups`
    become `modules_to_save`, PEFT's trainable copies saved beside the adapter (copied now, so weights trained
    fully before this point are the copies' starting values)."""
    family.assign_groups(model)  # fails loudly on a parameter that belongs to no group
    targets = lora_targets(family, lora, lora_groups)
    modules_to_save = [name for g in full_groups for name in family.modules_to_save.get(g, ())]
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=family.lora_target_regex(targets),
        modules_to_save=modules_to_save or None,
    )
    model = get_peft_model(model, config)
    if lora.shared_dropout:
        share_lora_dropout(model)
    return model


def set_trainable(
    model: torch.nn.Module, family: ModelFamily, modes: dict[str, str], uses_lora: bool, lora_later: bool = False
) -> TuningPlan:
    """Set `requires_grad` of every parameter from its group's mode; count what trains and what is frozen.
    `lora_later`: a later stage adds LoRA, so `full` already trains only what PEFT can save with the adapter
    (`modules_to_save`); anything else trained now would be lost from the saved adapter."""
    plan = TuningPlan(modes=dict(modes), uses_lora=uses_lora)
    # transformers (when checkpointing is enabled) and PEFT (when wrapping a checkpointed model) hook every input
    # embedding, the vision tower's patch embedding included, to make its output require grad — needed only by
    # reentrant checkpointing, and it makes a frozen tower record its whole graph (activations kept, or recomputed
    # under checkpointing) for nothing. Our checkpointing is non-reentrant, so the hooks go. (Each call replaces
    # the model's list of hooks, so they are removed after every call that adds them.)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    for name, param in model.named_parameters():
        group = family.group_of(name)
        if group is None:
            raise ValueError(f"{family.name}: parameter '{name}' belongs to no module group")
        trainable = _is_trainable(name, modes[group], uses_lora, family)
        if trainable and lora_later and not uses_lora:
            trainable = _saved_with_adapter(name, group, family)
        param.requires_grad_(trainable)
        counts = plan.trainable if param.requires_grad else plan.frozen
        counts[group] = counts.get(group, 0) + full_numel(param)
    if not plan.trainable:
        raise UserError("tuning.groups leaves no parameter trainable")
    # A group asked to train that trains nothing (LoRA targets that match no module in it, a `full` group
    # PEFT cannot save) must fail here, not show up as an unchanged model after hours of training.
    idle = [f"{g} ({m})" for g, m in modes.items() if m != "frozen" and not plan.trainable.get(g)]
    if idle:
        raise UserError(f"tuning.groups: {', '.join(idle)} would train no parameter; check tuning.lora.targets")
    return plan


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


def full_numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (then its local tensor is empty)."""
    return getattr(param, "ds_numel", None) or param.numel()


def _full_ndim(param: torch.Tensor) -> int:
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


def _saved_with_adapter(name: str, group: str, family: ModelFamily) -> bool:
    # PEFT matches modules_to_save names against the end of module paths; a bare parameter of a parent module
    # (LLaVA's image_newline) is under none of them and cannot be saved beside an adapter.
    return any(f".{module}." in f".{name}" for module in family.modules_to_save.get(group, ()))


def optimizer_groups(model: torch.nn.Module, family: ModelFamily, lr_for, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: one per (module group, decay or not), each with its group's learning rate.
    Biases, norms and other 1-D parameters get no weight decay (the usual transformer recipe)."""
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((family.group_of(name), _full_ndim(param) >= 2), []).append(param)
    return [
        {
            "params": params,
            "lr": lr_for(group),
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{group}{'' if decays else '.no_decay'}",
        }
        for (group, decays), params in sorted(buckets.items())
    ]
