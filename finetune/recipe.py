"""Loading recipes: YAML file + `key.path=value` overrides → validated :class:`~finetune.config.Recipe`.

Every problem is one line naming the file, the YAML line where it can be known, and the key path, e.g.::

    recipes/invoices.yaml:12: tuning.lora.rr: unknown key (did you mean 'r'?)
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config import Recipe, data_paths
from finetune.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class RecipeError(UserError):
    """A recipe that cannot be used; the message is one line naming the file and key path."""


def resolve_recipe_path(name: str | Path) -> Path:
    """A path as given, or a bare name (with or without `.yaml`) resolved under `recipes/`."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (RECIPES_DIR / path, RECIPES_DIR / path.with_suffix(".yaml")):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"{name}: recipe not found (as a path or under {RECIPES_DIR}){_suggest(path.stem, known)}")


def load_recipe(name: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe. `overrides` are `key.path=value` strings (values parsed as YAML)."""
    path = resolve_recipe_path(name)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, path)
        key = override.partition("=")[0]
        lines = {k: v for k, v in lines.items() if k != key and not k.startswith(key + ".")}
        lines[key] = f"override {override}"  # errors about it point at the command line, not the file
    recipe = validate_recipe(raw, source=str(path), lines=lines)
    check_family_groups(recipe, source=str(path), lines=lines)
    if check_files:
        check_recipe_files(recipe, source=str(path), lines=lines)
    return recipe


def validate_recipe(raw: dict, *, source: str = "<recipe>", lines: dict[str, int | str] | None = None) -> Recipe:
    """Validate a plain dict into a Recipe, turning the first pydantic error into a one-line RecipeError."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err.errors()[0], source, lines or {})) from None


def check_family_groups(recipe: Recipe, *, source: str = "<recipe>", lines: dict[str, int | str] | None = None) -> None:
    """The model family exists and every group name the recipe uses is that family's, in tuning.groups, optim.lr,
    tuning.lora.targets and each stage (checked before any model loads)."""
    from finetune.config import DEFAULT_GROUPS
    from finetune.models import FAMILIES, family_groups
    from finetune.training.stages import stage_problems

    lines = lines or {}
    family = recipe.model.family
    if family not in FAMILIES:
        where = _where(source, lines, "model.family")
        raise RecipeError(f"{where}: model.family: unknown family '{family}'{_suggest(family, list(FAMILIES))}")
    given = [
        k
        for k, v in (("stages", recipe.stages), ("schedule", recipe.schedule), ("tuning.groups", recipe.tuning.groups))
        if v is not None
    ]
    if len(given) > 1:
        raise RecipeError(
            f"{_where(source, lines, given[-1])}: {' and '.join(given)} both give the training "
            f"modes; keep one (set the other to null)"
        )
    names = [stage.name for stage in recipe.stages or []]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RecipeError(
                f"{_where(source, lines, f'stages.{i}.name')}: stages.{i}.name: '{name}' is used by "
                f"an earlier stage; stage names must be unique"
            )
    groups = family_groups(family)
    named = {f"tuning.groups.{g}": g for g in recipe.tuning.groups or {}}
    named.update({f"optim.lr.{g}": g for g in (recipe.optim.lr if isinstance(recipe.optim.lr, dict) else {})})
    named.update({f"tuning.lora.targets.{g}": g for g in recipe.tuning.lora.targets})
    for key, group in named.items():
        if group not in groups:
            raise RecipeError(
                f"{_where(source, lines, key)}: {key}: '{family}' has no group '{group}'{_suggest(group, list(groups))}"
            )
    if recipe.stages is None and recipe.schedule is None:
        modes = recipe.tuning.groups or DEFAULT_GROUPS
        missing = [g for g in groups if g not in modes]
        if missing:
            raise RecipeError(
                f"{_where(source, lines, 'tuning.groups')}: tuning.groups: give a mode (frozen, full, "
                f"lora) for every group of '{family}': missing {', '.join(missing)}"
            )
        if isinstance(recipe.optim.lr, dict):
            without = [g for g, m in modes.items() if m != "frozen" and g not in recipe.optim.lr]
            if without:
                raise RecipeError(
                    f"{_where(source, lines, 'optim.lr')}: optim.lr: no learning rate for trainable "
                    f"group(s) {', '.join(without)}"
                )
    for i, stage in enumerate(recipe.stages or []):
        for key, message in stage_problems(stage, groups, recipe.optim.lr):
            if key == "(optim.lr)":  # the stage has no lr of its own: the gap is in optim.lr
                raise RecipeError(
                    f"{_where(source, lines, 'optim.lr')}: optim.lr (used by stages.{i}, which has no lr): {message}"
                )
            raise RecipeError(f"{_where(source, lines, f'stages.{i}.{key}')}: stages.{i}.{key}: {message}")
    shares = sum(stage.fraction or 0 for stage in recipe.stages or [])
    if shares > 1 + 1e-9:
        raise RecipeError(
            f"{_where(source, lines, 'stages')}: stages: the fractions of the train budget add up to {shares:g} (> 1)"
        )


def check_recipe_files(recipe: Recipe, *, source: str = "<recipe>", lines: dict[str, int | str] | None = None) -> None:
    """Local files the recipe names must exist (Hub ids, written `hf:org/name`, are not checked here)."""
    for key, path in data_paths(recipe).items():
        if str(path).startswith("hf:"):
            continue
        if not path.exists():
            raise RecipeError(f"{_where(source, lines or {}, key)}: {key}: file not found: {path}")


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (defaults included) so a run folder says exactly what ran."""
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def parse_cli(argv: list[str]) -> tuple[str, list[str]]:
    """Split `recipe=NAME key.path=value ...` into the recipe name and the overrides."""
    recipe_name, overrides = None, []
    for arg in argv:
        if "=" not in arg:
            raise RecipeError(f"argument '{arg}': expected recipe=NAME or key.path=value")
        key, _, value = arg.partition("=")
        if key.lstrip("-") == "recipe":
            recipe_name = value
        else:
            overrides.append(arg)
    if recipe_name is None:
        raise RecipeError("missing recipe=NAME (a YAML path or a name under recipes/)")
    return recipe_name, overrides


# --- internals ---------------------------------------------------------------------------------------------


def _apply_override(raw: dict, override: str, source: Path) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override '{override}': expected key.path=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # an entry of a list, by index: stages.1.lr=1e-4
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"{source}: override {key}: '{'.'.join(parts[:i])}' has no entry {part} (entries 0-{len(node) - 1})"
                )
            node = node[int(part)]
            continue
        if node.get(part) is None and parts[i + 1].isdigit():
            raise RecipeError(
                f"{source}: override {key}: '{'.'.join(parts[: i + 1])}' is not set in the recipe, so "
                f"it has no entry {parts[i + 1]} (a `schedule:` preset expands when the run starts: "
                f"copy the expanded stages from a run's recipe.yaml to change them)"
            )
        if part not in node or node[part] is None:
            # Overriding one entry of a defaulted mapping (tuning.groups.llm=full) keeps the other defaults.
            default = _default_at(parts[: i + 1])
            node[part] = default if isinstance(default, dict) else {}
        child = node[part]
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"{source}: override {key}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    if isinstance(node, list):
        last = parts[-1]
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"{source}: override {key}: no entry {last} (entries 0-{len(node) - 1})")
        node[int(last)] = parsed
    else:
        node[parts[-1]] = parsed


def _format_error(error: dict, source: str, lines: dict[str, int | str]) -> str:
    # pydantic names the member of a union it tried (`optim.lr.float`); the user only wrote `optim.lr`.
    loc = [str(part) for part in error["loc"] if not _is_type_name(str(part))]
    key = ".".join(loc)
    where = _where(source, lines, key)
    if error["type"] == "extra_forbidden":
        known = _known_fields(loc[:-1])
        return f"{where}: {key}: unknown key{_suggest(loc[-1], known)}"
    if error["type"] == "missing":
        return f"{where}: {key}: required key is missing"
    got = error.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {key or '<top>'}: {message}{got_text}"


def _default_at(parts: list[str]):
    """The schema's default value at a key path (as plain data), or None."""
    model: type[BaseModel] | None = Recipe
    value = None
    for part in parts:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        value = field.get_default(call_default_factory=True)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        value = extra.get("override_seed", value)  # a None default that stands for a known mapping
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return value.model_dump() if isinstance(value, BaseModel) else copy.deepcopy(value)


def _is_type_name(part: str) -> bool:
    return part in ("float", "int", "str", "bool") or "[" in part


def _known_fields(parent_loc: list[str]) -> list[str]:
    """Field names of the section at `parent_loc` (for "did you mean")."""
    model: type[BaseModel] | None = Recipe
    for part in parent_loc:
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(model.model_fields) if model else []


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known: {', '.join(known)})" if known else ""


def _where(source: str, lines: dict[str, int | str], key: str) -> str:
    # Walk up to the nearest key with a known place: a YAML line, or the command-line override that set it.
    parts = key.split(".")
    while parts:
        place = lines.get(".".join(parts))
        if isinstance(place, str):
            return f"{source} ({place})"
        if place:
            return f"{source}:{place}"
        parts.pop()
    return source


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted key paths to 1-based YAML line numbers."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):  # list entries by index: stages.1.groups
            path = f"{prefix}.{index}"
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines
