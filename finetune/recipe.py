"""Loading recipes: YAML file + `key.path=value` overrides → validated :class:`~finetune.config.Recipe`.

Every problem is one line naming the file, the YAML line where it can be known, and the key path, e.g.::

    recipes/invoices.yaml:12: tuning.lora.rr: unknown key (did you mean 'r'?)
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config import DataSource, Origin, Recipe, data_sources
from finetune.errors import RecipeError
from finetune.resolve import check_modes, suggest

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def resolve_recipe_path(name: str | Path) -> Path:
    """A path as given, or a bare name (with or without `.yaml`) resolved under `recipes/`."""
    path = Path(name)
    if path.exists():
        return path
    # `name + ".yaml"`, not with_suffix: a name may hold dots of its own (ovis1.6-gemma2-9b-lora).
    for candidate in (RECIPES_DIR / path, RECIPES_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"{name}: recipe not found (as a path or under {RECIPES_DIR}){suggest(path.stem, known)}")


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
    check_family_groups(recipe)
    if check_files:
        check_recipe_files(recipe)
    return recipe


def validate_recipe(raw: dict, *, source: str = "<recipe>", lines: dict[str, int | str] | None = None) -> Recipe:
    """Validate a plain dict into a Recipe, turning the first pydantic error into a one-line RecipeError."""
    origin = Origin(source, dict(lines or {}))
    try:
        return Recipe.model_validate(raw).with_origin(origin)
    except ValidationError as err:
        errors = err.errors()
        # An unknown key first: its "did you mean" also explains a required key reported missing beside it.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise RecipeError(_format_error(first, origin)) from None


def check_family_groups(recipe: Recipe) -> None:
    """The model family exists and every group name the recipe uses is that family's, in tuning.groups, optim.lr,
    tuning.lora.targets and each stage (checked before any model loads; the rules are in finetune.resolve)."""
    from finetune.models import FAMILIES, family_groups

    family = recipe.model.family
    if family not in FAMILIES:
        where = recipe.where("model.family")
        raise RecipeError(f"{where}: model.family: unknown family '{family}'{suggest(family, list(FAMILIES))}")
    from finetune.resolve import subgroup_specs

    groups = family_groups(family)
    check_modes(recipe, groups, subgroup_specs(recipe, groups, FAMILIES[family].subgroups))


def check_recipe_files(recipe: Recipe) -> None:
    """Local files the recipe names must exist (Hub ids, written `hf:org/name`, are not checked here)."""
    for key, source in data_sources(recipe).items():
        if isinstance(source, DataSource):  # a format mapping: its folder / file, with the layout it expects
            from finetune.data.formats import missing_source

            problem = missing_source(source)
            if problem:
                raise RecipeError(f"{recipe.where(key)}: {key}: {problem}")
            continue
        path = Path(source)
        if str(path).startswith("hf:"):
            continue
        if not path.exists():
            raise RecipeError(f"{recipe.where(key)}: {key}: file not found: {path}")


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


def _format_error(error: dict, origin: Origin) -> str:
    # pydantic names the member of a union it tried (`optim.lr.float`); the user only wrote `optim.lr`.
    loc = [str(part) for part in error["loc"] if not _is_type_name(str(part))]
    key = ".".join(loc)
    where = origin.where(key)
    if error["type"] == "extra_forbidden":
        return f"{where}: {key}: unknown key{_suggest_key(loc)}"
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
    # "mapping": the tag of a data source's mapping form (finetune.config.SourceSpec)
    return part in ("float", "int", "str", "bool", "mapping") or "[" in part


def _known_fields(parent_loc: list[str]) -> list[str]:
    """Field names of the section at `parent_loc` (for "did you mean")."""
    model: type[BaseModel] | None = Recipe
    for part in parent_loc:
        if part.isdigit():  # an entry of a list section (stages.0, mix.1): the entries' model
            continue
        field = model.model_fields.get(part) if model else None
        model = _section_model(field.annotation) if field else None
    return sorted(model.model_fields) if model else []


def _section_model(annotation) -> type[BaseModel] | None:
    """The section model an annotation holds, also inside a union, a list or `Annotated` (a data source written
    as a string or a mapping, a list of stages)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def _suggest_key(loc: list[str]) -> str:
    """For an unknown key: the same name in another section first (`optim.max_steps` → `train.max_steps`), then a
    close name in its own section, then a close name anywhere."""
    name, section = loc[-1], loc[:-1]
    here = _known_fields(section)
    elsewhere = [
        path for path in _all_key_paths() if path.rsplit(".", 1)[-1] == name and path.split(".")[:-1] != section
    ]
    if elsewhere and len(section) <= 1:  # a top-level section's key that belongs to another section
        return f" (did you mean '{elsewhere[0]}'?)"
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    by_leaf = {path.rsplit(".", 1)[-1]: path for path in reversed(_all_key_paths())}
    close = difflib.get_close_matches(name, list(by_leaf), n=1, cutoff=0.75)
    if close and len(section) <= 1:
        return f" (did you mean '{by_leaf[close[0]]}'?)"
    return suggest(name, here)


def _all_key_paths(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every section key of the schema as a dotted path (`train.max_steps`, `tuning.lora.r`, ...)."""
    model = model or Recipe
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        paths.append(prefix + name)
        if nested is not None:
            paths += _all_key_paths(nested, f"{prefix}{name}.")
    return paths


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
