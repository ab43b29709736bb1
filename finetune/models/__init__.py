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


def get_family(name: str) -> ModelFamily:
    """The family object for a recipe's `model.family`."""
    if name not in FAMILIES:
        import difflib

        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(FAMILIES))})"
        raise ValueError(f"unknown model family '{name}'{hint}")
    module_name, class_name = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
