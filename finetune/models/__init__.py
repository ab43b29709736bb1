"""Model families. Each family's quirks live in its own module; `get_family` picks one by recipe name."""

from __future__ import annotations

import importlib

from finetune.models.base import ModelFamily

# family name → "module:class"; modules are imported on demand so a family's dependencies stay optional.
FAMILIES = {
    "llava_onevision": "finetune.models.llava_onevision:LlavaOnevisionFamily",
    "mississippi": "finetune.models.mississippi:MississippiFamily",
}


# family name → its module groups, known without importing the family (recipes are checked before loading).
FAMILY_GROUPS = {
    "llava_onevision": ("vision", "projector", "llm"),
    "mississippi": ("vision", "projector", "llm"),
}


# config.json `model_type` → family, to recognise a saved model or adapter base without a recipe (the original
# H2OVL layout says h2ovl_chat; our native Mississippi saves say internvl).
FAMILY_MODEL_TYPES = {"llava_onevision": "llava_onevision", "h2ovl_chat": "mississippi", "internvl": "mississippi"}


def family_of_checkpoint(path: str) -> str:
    """The family name for a local checkpoint folder, from its config.json."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: no config.json to tell the model family from; pass the family explicitly")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in FAMILY_MODEL_TYPES:
        raise ValueError(f"{config}: model_type '{model_type}' is not a known family ({sorted(FAMILY_MODEL_TYPES)})")
    return FAMILY_MODEL_TYPES[model_type]


def get_family(name: str) -> ModelFamily:
    """The family object for a recipe's `model.family`."""
    if name not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(FAMILIES))})"
        raise ValueError(f"unknown model family '{name}'{hint}")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
