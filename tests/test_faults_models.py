"""Nothing lost, nothing silent (issue 14), for what reads and writes model folders:

- `finetune eval / predict / merge / publish` on a missing or damaged model folder say in one line which file is
  missing or unreadable (exit 2, no traceback), before anything loads it;
- the source checkpoint's remote code (`*.py`, `auto_map`) is never saved or published unless the recipe says
  `model.trust_remote_code: true`, and the model card's serve command matches what was saved;
- an evaluation never silently replaces an earlier one, and the publish folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

REMOTE_FILES = ("configuration_h2ovl_chat.py", "modelling_h2ovl_chat.py", "conversation.py")
# What a remote-code file does if anything runs it: the toolkit must never import it.
REMOTE_CODE = 'raise RuntimeError("remote code must never run")\n'
INSTRUCTION = "Extract the number from the form image and structure it into JSON format:"


# --- helpers ---------------------------------------------------------------------------------------------------------
def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def with_remote_code(checkpoint: Path, out: Path) -> Path:
    """A copy of a tiny checkpoint laid out as its Hub repo is: remote-code `.py` files beside config.json, whose
    `auto_map` (and the tokenizer config's) names them."""
    shutil.copytree(checkpoint, out)
    for name in REMOTE_FILES:
        (out / name).write_text(REMOTE_CODE)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_remote.RemoteTokenizer", None]}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    assert "auto_map" in json.loads((out / "config.json").read_text())  # the tiny builders write the Hub's
    return out


def remote_code_in(folder: Path) -> list[str]:
    """Every `.py` file and every JSON file with a top-level `auto_map`, relative to `folder`."""
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*.py")]
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "auto_map" in data:
            found.append(path.relative_to(folder).as_posix())
    return sorted(found)


def train(overrides: list[str]) -> None:
    """A run trained in this process, as tests/test_eval.py does."""
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    _reset_accelerate()
    try:
        job = FineTuneRecipe(load_recipe("quickstart", overrides))
        job.setup()
        job.train()
        job.save_final()
    finally:
        _reset_accelerate()


def run_overrides(checkpoint: Path, docs: dict, run: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        f"model.path={checkpoint}",
        f"data.train={docs['train']}",
        f"data.val={docs['val']}",
        f"data.test={docs['test']}",
        f"output.dir={run}",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        "train.checkpoint_every=null",
        "eval.before_training=false",
        "eval.after_training=false",
        *extra,
    ]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`finetune ARGS` in this process: (exit code, stdout, stderr)."""
    from finetune.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def set_recipe_key(run: Path, **model_keys) -> None:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"].update(model_keys)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def remote_mississippi(tmp_path_factory, tiny_mississippi) -> Path:
    return with_remote_code(tiny_mississippi, tmp_path_factory.mktemp("remote") / "h2ovl")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, remote_mississippi, simple_docs) -> Path:
    """A 2-step LoRA run of the tiny Mississippi whose base carries remote code; trained once for the module."""
    run = tmp_path_factory.mktemp("faults") / "run"
    train(
        run_overrides(
            remote_mississippi, simple_docs, run, "tuning.groups={vision: frozen, projector: full, llm: lora}"
        )
    )
    return run


@pytest.fixture
def run_copy(lora_run, tmp_path) -> Path:
    """A copy of the trained run to damage (its final/ without a manifest unless the test writes one)."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("eval-*", "publish"))
    (run / "final" / "manifest.json").unlink(missing_ok=True)
    return run


# --- A. a damaged or missing model folder is one line naming the file ------------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x8b\x07 not a safetensors file " * 8)


def _bad_json(path: Path) -> None:
    path.write_text(path.read_text()[:-40])  # a file cut short, as a full disk or a kill leaves it


def _flip_a_byte(path: Path) -> None:
    """Same size, one byte changed: only a manifest's sha256 can tell."""
    from finetune.atomic import write_manifest

    write_manifest(path.parent)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_final(final: Path) -> None:
    shutil.copytree(final, final.parent / "best")  # what a run with evaluations during training also has
    shutil.rmtree(final)


# name → (damage applied to final/ or to a file in it, the file the message must name, text the message must have)
DAMAGE = {
    "missing final/": ("", _no_final, "final", "best"),
    "adapter weights missing": ("adapter_model.safetensors", Path.unlink, "adapter_model.safetensors", "missing"),
    "truncated safetensors": ("adapter_model.safetensors", _truncate, "adapter_model.safetensors", "safetensors"),
    "garbled safetensors": ("adapter_model.safetensors", _garble, "adapter_model.safetensors", "safetensors"),
    "bad adapter_config.json": ("adapter_config.json", _bad_json, "adapter_config.json", "not valid JSON (line"),
    "bad prompt.json": ("prompt.json", _bad_json, "prompt.json", "not valid JSON (line"),
    "bad tokenizer.json": ("tokenizer.json", _bad_json, "tokenizer.json", "not valid JSON (line"),
    "manifest mismatch": ("adapter_model.safetensors", _flip_a_byte, "adapter_model.safetensors", "sha256"),
}


def an_image(docs: dict) -> str:
    return str(next((docs["test"].parent / "images").glob("test_*.png")))


def command_line(command: str, model: Path, tmp_path: Path, simple_docs) -> list[str]:
    image = an_image(simple_docs)
    return {
        "eval": ["eval", "--model", str(model), "--data", "test", "--out", str(tmp_path / "eval")],
        "predict": ["predict", "--model", str(model), image],
        "merge": ["merge", "--model", str(model), "--out", str(tmp_path / "merged")],
        "publish": ["publish", "--run", str(model), "--repo", "me/reader", "--dry-run"],
    }[command]


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_is_one_line_naming_the_file_for_every_command(damage, run_copy, tmp_path, simple_docs, capsys):
    name, spoil, named, why = DAMAGE[damage]
    spoil(run_copy / "final" / name if name else run_copy / "final")
    for command in ("eval", "predict", "merge", "publish"):
        code, out, err = cli(capsys, *command_line(command, run_copy, tmp_path, simple_docs))
        line = assert_one_error_line(code, err, named, why)
        assert out == "", (command, out)
        if name:
            assert str(run_copy / "final") in line, (command, line)  # which folder, not only which file name
    assert not (tmp_path / "merged").exists() and not (run_copy / "publish" / "adapter").exists()


@pytest.mark.slow
def test_a_damaged_final_folder_given_directly_is_named_too(run_copy, tmp_path, simple_docs, capsys):
    """`--model runs/x/final` (the folder itself, not the run) gets the same check; a missing one says the run did
    not finish."""
    _bad_json(run_copy / "final" / "adapter_config.json")
    for command in ("eval", "predict", "merge"):
        code, _, err = cli(capsys, *command_line(command, run_copy / "final", tmp_path, simple_docs))
        assert_one_error_line(code, err, str(run_copy / "final" / "adapter_config.json"), "not valid JSON (line")
    shutil.rmtree(run_copy / "final")
    code, _, err = cli(capsys, *command_line("eval", run_copy / "final", tmp_path, simple_docs))
    assert_one_error_line(code, err, f"{run_copy / 'final'}: missing", "did not finish")


@pytest.mark.slow
def test_the_real_command_prints_one_line_and_no_traceback(run_copy, tmp_path, simple_docs):
    """Through `python -m finetune.<command>` as a user runs it: a manifest mismatch and missing adapter weights
    (which PEFT used to turn into a Hub download and "Repo id must be in the form ...")."""
    _flip_a_byte(run_copy / "final" / "adapter_model.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for module, args in (
        ("finetune.eval", ["--model", str(run_copy), "--data", "test"]),
        ("finetune.publish", ["--run", str(run_copy), "--repo", "me/reader", "--dry-run"]),
    ):
        result = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
        )
        assert_one_error_line(result.returncode, result.stderr, "adapter_model.safetensors", "manifest")
    (run_copy / "final" / "manifest.json").unlink()
    (run_copy / "final" / "adapter_model.safetensors").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "finetune.predict", "--model", str(run_copy / "final"), an_image(simple_docs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    line = assert_one_error_line(result.returncode, result.stderr, "adapter_model.safetensors: missing")
    assert "Repo id" not in line


def test_a_missing_model_folder_never_becomes_a_hub_id(tmp_path, monkeypatch, capsys):
    """An absolute path, and a relative `runs/x` (which is also the shape of a Hub id `org/name`)."""
    monkeypatch.chdir(tmp_path)
    for model in (str(tmp_path / "runs" / "nope"), "runs/nope"):
        code, _, err = cli(capsys, "eval", "--model", model, "--data", str(tmp_path / "test.jsonl"))
        line = assert_one_error_line(code, err, f"{model}: no such folder")
        assert "Repo id" not in line and "Hub" not in line.split("(")[0]
        code, _, err = cli(capsys, "publish", "--run", model, "--repo", "me/reader", "--dry-run")
        assert_one_error_line(code, err, f"{model}: no such folder")
    code, _, err = cli(capsys, "merge", "--model", "runs/nope", "--out", "merged")
    assert_one_error_line(code, err, "runs/nope: no such folder")
    assert not (tmp_path / "merged").exists()


def test_check_model_folder_names_each_problem(tiny_llava, tmp_path):
    """The check on a model folder (a base checkpoint here), without a run around it."""
    from finetune.errors import UserError
    from finetune.loading import check_model_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    check_model_folder(model)  # whole
    (model / "config.json").write_text('{"model_type": "llava_onevision",\n "vision_config": {\n')
    with pytest.raises(UserError, match=r"model/config\.json: not valid JSON \(line 3, column 1"):
        check_model_folder(model)
    shutil.copy2(tiny_llava / "config.json", model / "config.json")
    (model / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"model/model\.safetensors: missing \(the model's weights\)"):
        check_model_folder(model)
    (model / "config.json").unlink()
    with pytest.raises(UserError, match=r"neither an adapter .* nor a model"):
        check_model_folder(model)
    with pytest.raises(UserError, match="no such folder"):
        check_model_folder(tmp_path / "absent")


def test_an_evaluation_inside_the_model_folder_is_not_part_of_the_check(tiny_llava, tmp_path):
    from finetune.loading import check_model_folder

    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    (model / "eval-test").mkdir()
    (model / "eval-test" / "metrics.json").write_text("{")  # an evaluation cut short is no reason to refuse
    check_model_folder(model)


# --- B. remote code stays out unless the recipe opts in --------------------------------------------------------------
def test_mississippi_saves_no_remote_code_unless_asked(remote_mississippi, tmp_path):
    from finetune.models import get_family
    from finetune.models.mississippi.checkpoint import load_h2ovl

    family = get_family("mississippi")
    processor = family.load_processor(str(remote_mississippi))
    model = family.load_model(str(remote_mississippi))
    family.save_pretrained(model, processor, tmp_path / "default", source_path=str(remote_mississippi))
    assert remote_code_in(tmp_path / "default") == []
    original = json.loads((tmp_path / "default" / "original" / "config.json").read_text())
    assert original["model_type"] == "h2ovl_chat" and original["architectures"] == ["H2OVLChatModel"]
    load_h2ovl(str(tmp_path / "default" / "original"))  # still the original layout, loadable without it

    family.save_pretrained(
        model, processor, tmp_path / "opted-in", source_path=str(remote_mississippi), remote_code=True
    )
    assert remote_code_in(tmp_path / "opted-in") == sorted(
        [
            "original/config.json",
            "original/tokenizer_config.json",
            "tokenizer_config.json",  # the native layout's tokenizer keeps the source's auto_map too
            *(f"original/{n}" for n in REMOTE_FILES),
        ]
    )


def test_ovis_saves_no_remote_code_unless_asked(tmp_path):
    from finetune.models import get_family

    family = get_family("ovis")
    tiny = family.build_tiny_checkpoint(tmp_path / "tiny", **family.tiny_presets["test-ovis2"])
    for name in ("configuration_ovis.py", "modeling_ovis.py"):
        (tiny / name).write_text(REMOTE_CODE)
    processor = family.load_processor(str(tiny))
    model = family.load_model(str(tiny))
    family.save_pretrained(model, processor, tmp_path / "default", source_path=str(tiny))
    assert remote_code_in(tmp_path / "default") == []
    assert json.loads((tmp_path / "default" / "config.json").read_text())["model_type"] == "ovis"
    family.load_model(str(tmp_path / "default"))  # the AIDC-AI layout still loads (natively)
    family.save_pretrained(model, processor, tmp_path / "opted-in", source_path=str(tiny), remote_code=True)
    assert remote_code_in(tmp_path / "opted-in") == ["config.json", "configuration_ovis.py", "modeling_ovis.py"]


def hand_made_run(tmp_path: Path, checkpoint: Path, *, saved_with_remote_code: bool, recipe_says: bool | None) -> Path:
    """A finished full fine-tune's run folder, written directly (final/ through the family's save_pretrained)."""
    from finetune.models import get_family

    run = tmp_path / "run"
    family = get_family("mississippi")
    processor = family.load_processor(str(checkpoint))
    model = family.load_model(str(checkpoint))
    family.save_pretrained(
        model, processor, run / "final", source_path=str(checkpoint), remote_code=saved_with_remote_code
    )
    (run / "final" / "prompt.json").write_text(json.dumps({"instruction": INSTRUCTION, "skeleton": {"number": ""}}))
    model_section = {"family": "mississippi", "path": str(checkpoint)}
    if recipe_says is not None:
        model_section["trust_remote_code"] = recipe_says
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": model_section, "data": {"train": "train.jsonl"}}))
    return run


@pytest.mark.parametrize(
    "saved_with, recipe_says",
    [(False, False), (True, None), (True, True)],
    ids=["default", "an-older-run-that-saved-it", "opted-in"],
)
def test_the_publish_folder_and_card_carry_remote_code_only_when_the_recipe_opts_in(
    remote_mississippi, tmp_path, saved_with, recipe_says
):
    from finetune.publish import build_publish_folder

    run = hand_made_run(tmp_path, remote_mississippi, saved_with_remote_code=saved_with, recipe_says=recipe_says)
    folder = build_publish_folder(run, "me/reader")
    card = (folder / "README.md").read_text()
    if recipe_says:
        assert {f"original/{n}" for n in REMOTE_FILES} | {"original/config.json"} <= set(remote_code_in(folder))
        assert "vllm serve reader/original --trust-remote-code" in card
    else:
        assert remote_code_in(folder) == []
        assert "vllm serve reader/original\n" in card and "trust-remote-code" not in card
    assert not (folder / "manifest.json").exists()  # the folder is uploaded as it is


@pytest.mark.slow
@pytest.mark.parametrize("trust", [False, True], ids=["default", "opted-in"])
def test_a_full_fine_tune_saves_remote_code_only_when_the_recipe_opts_in(
    remote_mississippi, simple_docs, tmp_path, trust
):
    run = tmp_path / "run"
    extra = ["model.trust_remote_code=true"] if trust else []
    train(run_overrides(remote_mississippi, simple_docs, run, *extra, steps=1))
    found = remote_code_in(run / "final")
    if trust:
        assert {f"original/{n}" for n in REMOTE_FILES} | {"original/config.json"} <= set(found)
    else:
        assert found == []


@pytest.mark.slow
def test_merge_and_merged_publish_follow_the_recipe(run_copy, tmp_path, capsys):
    code, _, err = cli(capsys, "merge", "--model", str(run_copy), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert remote_code_in(tmp_path / "merged") == []
    assert (tmp_path / "merged" / "manifest.json").is_file()  # a model folder, checked like final/
    code, out, err = cli(capsys, "publish", "--run", str(run_copy), "--repo", "me/reader", "--merged", "--dry-run")
    assert code == 0, err
    folder = Path(out.strip())
    assert remote_code_in(folder) == [] and "trust-remote-code" not in (folder / "README.md").read_text()

    set_recipe_key(run_copy, trust_remote_code=True)
    code, _, err = cli(capsys, "merge", "--model", str(run_copy), "--out", str(tmp_path / "merged"), "--overwrite")
    assert code == 0, err
    assert {f"original/{n}" for n in REMOTE_FILES} <= set(remote_code_in(tmp_path / "merged"))
    code, out, err = cli(capsys, "publish", "--run", str(run_copy), "--repo", "me/reader", "--merged", "--dry-run")
    assert code == 0, err
    assert "vllm serve reader/original --trust-remote-code" in (Path(out.strip()) / "README.md").read_text()


def test_no_loader_is_told_to_trust_remote_code():
    """The toolkit loads every family natively: nothing passes trust_remote_code=True to transformers (the recipe's
    `model.trust_remote_code` only governs what is saved and published)."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "finetune").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "trust_remote_code=" in line.replace(" ", "") and "trust_remote_code=False" not in line.replace(" ", "")
    ]
    assert offenders == []


# --- C. an evaluation never replaces an earlier one silently; the publish folder is written atomically ---------------
@pytest.mark.slow
def test_eval_refuses_to_replace_an_earlier_evaluation_without_overwrite(
    run_copy, simple_docs, capsys, fresh_accelerate_state
):
    args = ["eval", "--model", str(run_copy), "--data", "test", "--max-new-tokens", "4", "--no-report"]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    earlier = run_copy / "final" / "eval-test"
    (earlier / "notes.txt").write_text("the user's notes on this evaluation")
    before = (earlier / "metrics.json").read_bytes()

    code, out, err = cli(capsys, *args)
    assert_one_error_line(code, err, str(earlier), "earlier evaluation", "--overwrite")
    assert out == "" and (earlier / "metrics.json").read_bytes() == before and (earlier / "notes.txt").is_file()

    code, _, err = cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert (earlier / "metrics.json").is_file() and not (earlier / "notes.txt").exists()  # replaced, whole
    assert not list((run_copy / "final").glob(".eval-test*"))  # nothing left beside it

    code, _, err = cli(capsys, *args, "--out", str(run_copy / "final"), "--overwrite")
    assert_one_error_line(code, err, "holds no evaluation")  # never a model folder, even with --overwrite


def test_eval_help_documents_overwrite(capsys):
    from finetune.eval import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_a_failed_publish_leaves_the_earlier_folder_whole(remote_mississippi, tmp_path, monkeypatch):
    import finetune.publish as publish

    run = hand_made_run(tmp_path, remote_mississippi, saved_with_remote_code=False, recipe_says=False)
    folder = publish.build_publish_folder(run, "me/reader")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    def broken_card(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "model_card", broken_card)
    with pytest.raises(OSError):
        publish.build_publish_folder(run, "me/other")
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == files
    assert "me/reader" in (folder / "README.md").read_text()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model"]  # no half-written folder beside it
