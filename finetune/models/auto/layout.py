"""Module groups of a transformers-native VLM, read from its standard attribute layout.

transformers 5 writes its image-text-to-text models as `XForConditionalGeneration(model=XModel(...), lm_head)`, with
the vision encoder, the projector and the language model as attributes of `model` under a handful of names. The
`vision`, `projector` and `llm` groups are those modules; where the projector sits inside the vision module (Qwen's
`visual.merger`), the vision group is every other part of it. A model that does not follow the layout is refused
with one line naming what is missing, never trained with a guessed split.

The layout is read from the checkpoint's config alone: the model is built on the meta device (no memory, no weights),
so a 7B checkpoint's groups are known before its weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.errors import UserError

# Attribute names of transformers' image-text-to-text models, as `model.<name>`, in the order they are looked for.
VISION_NAMES = ("vision_tower", "visual", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "projector", "mlp_AR")
# A projector inside the vision module (Qwen2.5-VL / Qwen3-VL `visual.merger`; Qwen3-VL's deepstack mergers).
NESTED_PROJECTOR_NAMES = ("merger", "deepstack_merger_list")
LLM_NAMES = ("language_model", "text_model")
GROUPS = ("vision", "projector", "llm")


@dataclass(frozen=True)
class Layout:
    """Parameter-name prefixes per group, LoRA targets per group, and the modules PEFT saves for a `full` group."""

    group_prefixes: dict[str, tuple[str, ...]]
    default_lora_targets: dict[str, tuple[str, ...]]
    modules_to_save: dict[str, tuple[str, ...]]


def meta_model(config) -> torch.nn.Module:
    """The model a config describes, on the meta device (structure only)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _child(module: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if isinstance(getattr(module, name, None), torch.nn.Module)), None)


def read_layout(model: torch.nn.Module, what: str) -> Layout:
    """The groups of `model` (`what` names it in messages), or a UserError naming what the layout lacks."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, torch.nn.Module):
        raise UserError(f"{what}: {type(model).__name__} has no `model` submodule (the transformers VLM layout)")
    vision = _child(inner, VISION_NAMES)
    llm = _child(inner, LLM_NAMES)
    projector = _child(inner, PROJECTOR_NAMES)
    nested = [
        n
        for n in NESTED_PROJECTOR_NAMES
        if vision and isinstance(getattr(getattr(inner, vision), n, None), torch.nn.Module)
    ]
    missing = [
        label
        for label, found in (
            ("a vision encoder (model." + " / model.".join(VISION_NAMES) + ")", vision),
            (
                "a projector (model." + " / model.".join(PROJECTOR_NAMES) + " or a merger in the vision encoder)",
                projector or nested,
            ),
            ("a language model (model." + " / model.".join(LLM_NAMES) + ")", llm),
        )
        if not found
    ]
    if missing:
        raise UserError(
            f"{what}: {type(model).__name__} does not follow the transformers VLM layout: no {'; no '.join(missing)}"
        )

    names = {name for name, _ in model.named_parameters()}
    if nested:  # the vision group is the vision module without its merger(s)
        children = [n for n, _ in getattr(inner, vision).named_children() if n not in nested]
        bare = [n for n, _ in getattr(inner, vision).named_parameters(recurse=False)]
        vision_prefixes = [f"model.{vision}.{n}." for n in children] + [f"model.{vision}.{n}" for n in bare]
        projector_prefixes = [f"model.{vision}.{n}." for n in nested]
    else:
        vision_prefixes = [f"model.{vision}."]
        projector_prefixes = []
    if projector:
        projector_prefixes.append(f"model.{projector}.")
    # Bare parameters of the inner model (LLaVA-OneVision's image_newline) are part of how image features are laid
    # out for the LLM: the projector's.
    projector_prefixes += [f"model.{n}" for n, _ in inner.named_parameters(recurse=False)]
    llm_prefixes = [f"model.{llm}.", "lm_head."]
    prefixes = {"vision": vision_prefixes, "projector": projector_prefixes, "llm": llm_prefixes}
    # Keep only prefixes that hold parameters (a tied lm_head has none of its own; a merger may have none).
    prefixes = {g: tuple(p for p in ps if any(n.startswith(p) for n in names)) for g, ps in prefixes.items()}
    orphans = sorted(n for n in names if not any(n.startswith(p) for ps in prefixes.values() for p in ps))
    if orphans:
        raise UserError(
            f"{what}: parameter '{orphans[0]}' ({len(orphans)} in all) is in none of the vision, projector and llm "
            "modules of the transformers VLM layout"
        )
    empty = [g for g, ps in prefixes.items() if not ps]
    if empty:
        raise UserError(f"{what}: {type(model).__name__}: the {' and '.join(empty)} group(s) hold no parameter")

    # A group without linear layers (Gemma 3's projector: a norm and a bare matrix) has no LoRA targets.
    targets = {group: _linear_leaves(model, group_prefixes) for group, group_prefixes in prefixes.items()}
    targets = {group: leaves for group, leaves in targets.items() if leaves}
    # PEFT saves whole modules, not lists of them: a list (Qwen3-VL's deepstack mergers) is saved item by item.
    save = {}
    for group, ps in prefixes.items():
        paths = []
        for prefix in (p[:-1] for p in ps if p.endswith(".")):
            module = model.get_submodule(prefix)
            if isinstance(module, torch.nn.ModuleList):
                paths += [f"{prefix}.{i}" for i in range(len(module))]
            else:
                paths.append(prefix)
        save[group] = tuple(p.removeprefix("model.") for p in paths)
    return Layout(group_prefixes=prefixes, default_lora_targets=targets, modules_to_save=save)


def _linear_leaves(model: torch.nn.Module, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """Names for the linear layers under `prefixes` (as PEFT's `all-linear`, the output head excepted): each layer's
    leaf name, or as many trailing path parts as it takes to match no other kind of module (Qwen's vision `attn.proj`
    beside the patch embedding's convolution `patch_embed.proj`)."""
    inside = [(n, m) for n, m in model.named_modules() if f"{n}.".startswith(prefixes) and n != "lm_head"]
    others = [n for n, m in inside if not isinstance(m, torch.nn.Linear) and any(True for _ in m.parameters(False))]
    leaves = set()
    for name, module in inside:
        if not isinstance(module, torch.nn.Linear):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith(f".{suffix}") for o in others):
                leaves.add(suffix)
                break
    return tuple(sorted(leaves))
