"""Model families. Each family's quirks live in its own module; everything here is derived from the list of
family classes, so adding a family is: its module, its tiny presets, one line in `FAMILY_CLASSES`."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from finetune.errors import UserError
from finetune.models.auto import AutoFamily
from finetune.models.base import ModelFamily
from finetune.models.llava_onevision import LlavaOnevisionFamily
from finetune.models.mississippi import MississippiFamily
from finetune.models.ovis import OvisFamily

# The registry: every family the toolkit supports, in the order they are listed to users.
# `auto` comes last: it takes any transformers-native image-text-to-text checkpoint no dedicated family claims.
FAMILY_CLASSES: tuple[type[ModelFamily], ...] = (MississippiFamily, LlavaOnevisionFamily, OvisFamily, AutoFamily)

FAMILIES: dict[str, type[ModelFamily]] = {cls.name: cls for cls in FAMILY_CLASSES}
# config.json `model_type` → family name (to recognise a saved model or an adapter's base without a recipe).
MODEL_TYPES: dict[str, str] = {model_type: cls.name for cls in FAMILY_CLASSES for model_type in cls.model_types}
if len(MODEL_TYPES) != sum(len(cls.model_types) for cls in FAMILY_CLASSES):
    raise RuntimeError("two families claim the same model_type")


def family_names() -> list[str]:
    return list(FAMILIES)


def family_groups(name: str) -> tuple[str, ...]:
    """A family's module groups, by name (for checking a recipe before any model loads)."""
    return tuple(FAMILIES[name].group_prefixes)


def get_family(name: str, checkpoint: str | None = None, revision: str | None = None) -> ModelFamily:
    """The family object for a recipe's `model.family`, bound to `checkpoint` when given (`for_checkpoint`)."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(FAMILIES)})"
        raise UserError(f"unknown model family '{name}'{hint}")
    family = FAMILIES[name]()
    return family.for_checkpoint(checkpoint, revision) if checkpoint is not None else family


def family_of_checkpoint(path: str) -> str:
    """The family name for a local checkpoint folder, from its config.json `model_type`."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"{path}: no config.json to tell the model family from; pass the family explicitly")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise UserError(f"{config}: not valid JSON ({err})") from None
    if model_type not in MODEL_TYPES:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            return AutoFamily.name
        raise UserError(
            f"{config}: model_type '{model_type}' belongs to no family and is no image-text-to-text model of "
            f"transformers (dedicated families: {', '.join(MODEL_TYPES)})"
        )
    return MODEL_TYPES[model_type]
