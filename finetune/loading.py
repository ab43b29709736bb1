"""Finding and loading what a run produced: a run folder, a saved adapter, a merged / fully trained model, or a
base checkpoint — with its family, base, processor options and the prompt it was trained with."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune.errors import UserError


@dataclass
class ModelSource:
    """Where a model's weights and everything needed to prompt it come from."""

    weights: str  # the folder (or Hub id) holding the adapter or the model
    adapter: bool
    family: str
    base: str | None = None  # the base checkpoint of an adapter
    revision: str | None = None  # the base's revision, when the run recorded it
    prompt: dict | None = None  # {"instruction", "skeleton"} from prompt.json
    recipe: dict = field(default_factory=dict)  # the run's resolved recipe, when known
    processor_options: dict = field(default_factory=dict)

    def split(self, name: str) -> str:
        """The data source of a split (`train`, `val`, `test`) named by the run's recipe."""
        value = self.recipe.get("data", {}).get(name)
        if not value:
            raise UserError(f"--data {name}: a split name needs a run folder whose recipe names it; give a file")
        return value


def resolve_model(model: str, *, family: str | None = None, base: str | None = None) -> ModelSource:
    """A run folder (its `final/`), `final/` or `best/` inside one, an adapter or model folder, or a base checkpoint
    (Hub id or folder; then `family` is needed unless its config.json says)."""
    from finetune.models import family_of_checkpoint
    from finetune.models.hub import looks_local

    folder = Path(model)
    recipe: dict = {}
    if (folder / "recipe.yaml").is_file() and (folder / "final").is_dir():  # a run folder
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        folder = folder / "final"
    elif (folder.parent / "recipe.yaml").is_file():  # final/ or best/ inside a run folder
        recipe = yaml.safe_load((folder.parent / "recipe.yaml").read_text())
    section = recipe.get("model", {})
    adapter = (folder / "adapter_config.json").is_file()
    if adapter:
        base = (
            base
            or section.get("path")
            or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        )
        if not base:
            raise UserError(f"{folder}: an adapter without a recorded base model; pass --base")
    family = family or section.get("family")
    if family is None:
        source = base if adapter else folder
        if not Path(str(source)).is_dir():
            if looks_local(str(source)):
                raise UserError(f"{source}: checkpoint not found (no such folder)")
            raise UserError(f"{model}: cannot tell the model family of {source}; pass --family")
        family = family_of_checkpoint(str(source))
    prompt = json.loads((folder / "prompt.json").read_text()) if (folder / "prompt.json").is_file() else None
    return ModelSource(
        weights=str(folder) if folder.exists() else model,
        adapter=adapter,
        family=family,
        base=base,
        revision=section.get("revision") if base and base == section.get("path") else None,
        prompt=prompt,
        recipe=recipe,
        processor_options=section.get("processor", {}),
    )


def load_model_and_processor(source: ModelSource):
    """(family, processor, model): the base with the adapter applied, or the saved model, in eval mode."""
    from finetune.models import get_family

    family = get_family(source.family)
    processor = family.load_processor(source.weights, **source.processor_options)
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(family.load_model(source.base, revision=source.revision), source.weights)
    else:
        model = family.load_model(source.weights)
    return family, processor, model.eval()
