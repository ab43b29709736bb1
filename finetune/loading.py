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


def read_json(path: Path):
    """A JSON file's content, or one line naming the file and where it stops being JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except OSError as err:
        raise UserError(f"{path}: unreadable ({err.strerror or err})") from None


def _read_recipe(path: Path) -> dict:
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({getattr(err, 'strerror', None) or err})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: not a recipe (a mapping of sections)")
    return recipe


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read (its header: tensor names, shapes, offsets against the file's size),
    or None. The tensor data itself is only checked by a manifest's sha256."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{path}: unreadable safetensors file (truncated or corrupted: {detail})"
    return None


def _skipped(relative: Path) -> bool:
    """Files a model folder may hold that no loader reads: evaluations written into it, hidden leftovers."""
    return any(part.startswith(("eval-", ".")) for part in relative.parts[:-1]) or relative.name.startswith(".")


def check_model_folder(folder: str | Path) -> None:
    """Refuse, in one line naming the file, a model or adapter folder that cannot be loaded whole, before anything
    loads it: the folder exists; if it has a `manifest.json` every file matches it (size and sha256); every JSON file
    parses (the error's line and column); every safetensors header reads; an adapter (adapter_config.json) has its
    weights, a model has config.json and its weights (every shard its index names); prompt.json has the instruction
    and skeleton. Evaluations written into the folder (`eval-*/`) are not looked at."""
    from finetune.atomic import MANIFEST, manifest_problem

    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a model folder (it is a file)")
    if (folder / MANIFEST).is_file():
        problem = manifest_problem(folder)
        if problem is not None:
            raise UserError(f"{folder}: {problem}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _skipped(p.relative_to(folder)))
    for path in (p for p in files if p.suffix == ".json"):
        read_json(path)
    for path in (p for p in files if p.suffix == ".safetensors"):
        problem = _safetensors_problem(path)
        if problem is not None:
            raise UserError(problem)
    if (folder / "adapter_config.json").is_file():
        if not any((folder / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UserError(f"{folder / 'adapter_model.safetensors'}: missing (the adapter's weights)")
    elif (folder / "config.json").is_file():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise UserError(f"{folder / shard}: missing (a shard {index.name} names)")
        elif not any(folder.glob("*.safetensors")):
            raise UserError(f"{folder / 'model.safetensors'}: missing (the model's weights)")
    else:
        raise UserError(f"{folder}: neither an adapter (no adapter_config.json) nor a model (no config.json) folder")
    prompt = folder / "prompt.json"
    if prompt.is_file():
        content = read_json(prompt)
        if not isinstance(content, dict) or not {"instruction", "skeleton"} <= set(content):
            raise UserError(f"{prompt}: needs 'instruction' and 'skeleton'")


def _unfinished_run(run: Path) -> UserError:
    """A run folder without final/: say so, and what there is instead."""
    best = run / "best"
    from finetune.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(run)  # numeric order, set-aside (.rejected) ones excluded
    if best.is_dir():
        instead = f"use {best} (the best model evaluated during training)"
        if checkpoints:
            instead += f", or resume the run from {checkpoints[-1]} (same command, output.if_exists=resume)"
    elif checkpoints:
        instead = f"resume the run from {checkpoints[-1]} (same command, output.if_exists=resume)"
    else:
        instead = "it has neither best/ nor a checkpoint: train it again"
    return UserError(f"{run / 'final'}: missing (the run did not finish: stopped or failed?); {instead}")


def resolve_model(model: str, *, family: str | None = None, base: str | None = None) -> ModelSource:
    """A run folder (its `final/`), `final/` or `best/` inside one, an adapter or model folder, or a base checkpoint
    (Hub id or folder; then `family` is needed unless its config.json says). A local folder is checked whole first
    (`check_model_folder`); a path that is not a folder never becomes a Hub id unless it can be one."""
    from finetune.models import family_of_checkpoint
    from finetune.models.hub import looks_local

    folder = Path(model).expanduser()
    recipe: dict = {}
    if not folder.exists():
        if folder.name == "final" and (folder.parent / "recipe.yaml").is_file():
            raise _unfinished_run(folder.parent)
        if looks_local(model):
            raise UserError(f"{model}: no such folder")
        if family is None:  # a Hub id needs --family; without one this can only have been meant as a folder
            raise UserError(f"{model}: no such folder (a Hugging Face Hub checkpoint needs --family)")
    elif (folder / "recipe.yaml").is_file():  # a run folder
        recipe = _read_recipe(folder / "recipe.yaml")
        if not (folder / "final").is_dir():
            raise _unfinished_run(folder)
        folder = folder / "final"
    elif (folder.parent / "recipe.yaml").is_file():  # final/ or best/ inside a run folder
        recipe = _read_recipe(folder.parent / "recipe.yaml")
    if folder.exists():
        check_model_folder(folder)
    section = recipe.get("model") or {}
    adapter = (folder / "adapter_config.json").is_file()
    if adapter:
        base = base or section.get("path") or read_json(folder / "adapter_config.json").get("base_model_name_or_path")
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
    prompt = read_json(folder / "prompt.json") if (folder / "prompt.json").is_file() else None
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

    family = get_family(source.family, source.base if source.adapter else source.weights, source.revision)
    processor = family.load_processor(source.weights, **source.processor_options)
    if source.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(family.load_model(source.base, revision=source.revision), source.weights)
    else:
        model = family.load_model(source.weights)
    return family, processor, model.eval()
