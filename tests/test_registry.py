"""The family registry: derived from the family classes, and the only place generic code learns about families
(no `if family == "..."` outside finetune/models/)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.models import (
    FAMILIES,
    FAMILY_CLASSES,
    MODEL_TYPES,
    family_groups,
    family_names,
    family_of_checkpoint,
    get_family,
)

REPO = Path(__file__).resolve().parent.parent
COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


# --- no family branches in generic code ----------------------------------------------------------------------------
def _literals(node: ast.AST) -> list[str] | None:
    """The strings of a string literal or a tuple / list / set of them; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts:
        values = [_literals(e) for e in node.elts]
        if all(v is not None for v in values):
            return [s for v in values for s in v]
    return None


def _is_family(node: ast.AST) -> bool:
    """`family`, `x.family`, `x["family"]`, `x.get("family")`, `family_name`, ... — an expression naming a family."""
    if isinstance(node, ast.Name):
        return "family" in node.id
    if isinstance(node, ast.Attribute):
        return "family" in node.attr
    if isinstance(node, ast.Subscript):
        return _literals(node.slice) == ["family"]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and _literals(node.args[0]) == ["family"]
    return False


def family_branches(source: str) -> list[tuple[int, str]]:
    """(line, code) of every comparison of a family against literals, of `.name` against a family name, and of
    anything against a family name or model_type; comments and strings do not count."""
    known = set(FAMILIES) | set(MODEL_TYPES)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if not isinstance(op, COMPARISONS):
                continue
            for side, other in ((left, right), (right, left)):
                strings = _literals(other)
                if strings is None:
                    continue
                # a family name or model_type compared with anything (`.name == "mississippi"` included)
                if _is_family(side) or set(strings) & known:
                    found.append((node.lineno, ast.get_source_segment(source, node) or ""))
    return sorted(set(found))


def _generic_files() -> list[Path]:
    models = REPO / "finetune" / "models"
    files = [p for p in (REPO / "finetune").rglob("*.py") if models not in p.parents]
    return sorted(files + list((REPO / "scripts").rglob("*.py")))


def test_generic_code_has_no_family_branches():
    files = _generic_files()
    assert any(p.name == "publish.py" for p in files) and any(p.name == "make_tiny_checkpoint.py" for p in files)
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {code}" for path in files for line, code in family_branches(path.read_text())
    ]
    assert not offenders, "family-specific branches outside finetune/models/:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "code",
    [
        'if family == "mississippi":\n    pass',
        'x = 1 if cfg.family != "llava_onevision" else 2',
        'if recipe["model"]["family"] in ("a", "b"):\n    pass',
        'if model.get("family") not in ["a"]:\n    pass',
        'if fam.name == "mississippi":\n    pass',
        'if config["model_type"] == "h2ovl_chat":\n    pass',
        'if "mississippi" == kind:\n    pass',
    ],
)
def test_the_scan_finds_family_branches(code):
    assert [line for line, _ in family_branches(code)] == [1]


def test_the_scan_ignores_comments_strings_and_registry_lookups():
    code = (
        '# if family == "mississippi": a comment\n'
        "doc = 'if family == \"mississippi\":'\n"
        "if family not in FAMILIES:\n    pass\n"
        'family = get_family("mississippi")\n'
        'if stage.name == "lora":\n    pass\n'
    )
    assert family_branches(code) == []


# --- the registry is derived from the classes ------------------------------------------------------------------------
def test_registry_is_derived_from_the_family_classes():
    names = [cls.name for cls in FAMILY_CLASSES]
    assert len(set(names)) == len(names) and family_names() == names == list(FAMILIES)
    assert all(FAMILIES[cls.name] is cls for cls in FAMILY_CLASSES)
    all_types = [t for cls in FAMILY_CLASSES for t in cls.model_types]
    assert len(set(all_types)) == len(all_types)
    derived = {t: cls.name for cls in FAMILY_CLASSES for t in cls.model_types}
    assert derived == MODEL_TYPES
    for cls in FAMILY_CLASSES:
        assert family_groups(cls.name) == tuple(cls.group_prefixes) and family_groups(cls.name)
        assert type(get_family(cls.name)) is cls


def test_an_unknown_family_suggests_the_closest_name():
    with pytest.raises(UserError, match=r"did you mean 'mississippi'\?"):
        get_family("mississipi")
    with pytest.raises(UserError, match="known: mississippi, llava_onevision"):
        get_family("qwen")


def test_serving_commands_are_the_family_s():
    mississippi, llava = get_family("mississippi"), get_family("llava_onevision")
    assert llava.serving_commands("me/reader", base="llava-hf/x", adapter=False) == ["vllm serve me/reader"]
    # a whole Mississippi model is served from the original layout kept in original/; --trust-remote-code only
    # where the folder was saved with its remote code (model.trust_remote_code)
    assert mississippi.serving_commands("me/reader", base="h2oai/x", adapter=False) == [
        "huggingface-cli download me/reader --local-dir reader",
        "vllm serve reader/original",
    ]
    assert mississippi.serving_commands("me/reader", base="h2oai/x", adapter=False, remote_code=True) == [
        "huggingface-cli download me/reader --local-dir reader",
        "vllm serve reader/original --trust-remote-code",
    ]
    for family in (mississippi, llava):
        assert family.serving_commands("me/lora", base="org/base", adapter=True) == [
            "vllm serve org/base --enable-lora --lora-modules extractor=me/lora"
        ]


# --- recognising a checkpoint --------------------------------------------------------------------------------------
def test_family_of_checkpoint_reads_each_family_s_tiny_checkpoint(tiny_mississippi, tiny_llava):
    assert family_of_checkpoint(str(tiny_mississippi)) == "mississippi"
    assert family_of_checkpoint(str(tiny_llava)) == "llava_onevision"


def test_family_of_checkpoint_refuses_an_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert' belongs to no family"):
        family_of_checkpoint(str(tmp_path))
    with pytest.raises(UserError, match=r"no config\.json"):
        family_of_checkpoint(str(tmp_path / "absent"))
