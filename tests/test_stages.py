"""Stages in recipes: validation with file:line, schedule presets, budgets, weighted data mixes, and what a frozen
tower costs (no autograd graph, no optimizer state)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from finetune.config import StageSection, TrainSection
from finetune.models import get_family
from finetune.recipe import RecipeError, load_recipe
from finetune.resolve import resolve_recipe
from finetune.training.sampler import MixtureSampler
from finetune.training.stages import stage_steps
from tests.conftest import write_recipe

STAGED = """\
model:
  family: mississippi
  path: some/checkpoint
data:
  train: {train}
optim:
  lr: 1.0e-4
stages:
  - name: align
    groups: {{vision: frozen, projector: full, llm: frozen}}
    lr: 1.0e-3
    fraction: 0.2
  - name: tune
    groups:
      vision: lora
      projector: full
      llm: full
    lr: {{vision: 2.0e-5, projector: 1.0e-4, llm: 1.0e-4}}
    fraction: 0.8
"""


@pytest.fixture
def staged_file(tmp_path) -> Path:
    return write_recipe(tmp_path, "staged.yaml", STAGED)


def test_explicit_stages_resolve_with_a_learning_rate_per_trainable_group(staged_file):
    recipe = load_recipe(staged_file)
    align, tune = resolve_recipe(recipe, get_family("mississippi")).stages
    assert align.lr == {"projector": 1e-3} and align.fraction == 0.2
    assert tune.lr == {"vision": 2e-5, "projector": 1e-4, "llm": 1e-4}
    # A stage without its own lr takes optim.lr for each of its trainable groups.
    recipe = load_recipe(staged_file, ["stages.0.lr=null"])
    assert resolve_recipe(recipe, get_family("mississippi")).stages[0].lr == {"projector": 1e-4}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "stages.1.groups.visoin=full",
            (
                r"staged\.yaml \(override stages\.1\.groups\.visoin=full\): "
                r"stages\.1\.groups\.visoin: no group 'visoin' \(did you mean 'vision'\?\)"
            ),
        ),
        (
            "stages.1.lr={projector: 1.0e-4, llm: 1.0e-4}",
            r"staged\.yaml \(override stages\.1\.lr=.*\): stages\.1\.lr: "
            r"no learning rate for trainable group\(s\) vision",
        ),
        ("stages.0.lr={projector: 1.0e-3, llm: 1.0e-3}", r"stages\.0\.lr\.llm: group 'llm' is frozen in this stage"),
        (
            "stages.0.groups={vision: frozen, projector: frozen, llm: frozen}",
            r"stages\.0\.groups: every group is frozen",
        ),
        (
            "stages.0.max_steps=10",
            r"stages\.0: give at most one of epochs, max_steps, fraction \(got max_steps, fraction\)",
        ),
        ("stages.1.name=align", r"stages\.1\.name: 'align' is used by an earlier stage"),
        (
            "tuning.groups={vision: frozen, projector: frozen, llm: lora}",
            r"stages and tuning\.groups both give the training modes; keep one",
        ),
        (
            "schedule=paper",
            r"staged\.yaml \(override schedule=paper\): stages and schedule both give the training modes",
        ),
        ("stages.2.lr=1", r"override stages\.2\.lr: 'stages' has no entry 2 \(entries 0-1\)"),
    ],
)
def test_stage_errors_name_file_line_and_key(staged_file, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(staged_file, [override])


def test_stage_errors_point_at_the_yaml_line(staged_file):
    text = staged_file.read_text()
    staged_file.write_text(text.replace("      llm: full", "      llm: half"))
    with pytest.raises(RecipeError, match=r"staged\.yaml:17: stages\.1\.groups\.llm: .*'frozen', 'full' or 'lora'"):
        load_recipe(staged_file)
    staged_file.write_text(text.replace("      vision: lora", "      visoin: lora"))
    with pytest.raises(RecipeError, match=r"staged\.yaml:15: stages\.1\.groups\.visoin: no group 'visoin'"):
        load_recipe(staged_file)


def test_a_group_cannot_be_lora_in_one_stage_and_full_in_another(staged_file):
    # Caught when the recipe is loaded, with the file and line of the stages.
    with pytest.raises(
        RecipeError, match=r"staged\.yaml:\d+: stages: group\(s\) vision are lora in one stage and full"
    ):
        load_recipe(staged_file, ["stages.0.groups={vision: full, projector: full, llm: frozen}", "stages.0.lr=1.0e-3"])


def test_schedule_shorthands(staged_file):
    family = get_family("mississippi")
    recipe = load_recipe(staged_file, ["stages=null", "schedule=lora"])
    (stage,) = resolve_recipe(recipe, family).stages
    assert stage.groups == {"vision": "frozen", "projector": "frozen", "llm": "lora"} and stage.lr == {"llm": 1e-4}
    lrs = "optim.lr={vision: 1.0e-5, projector: 1.0e-4, llm: 1.0e-4}"
    recipe = load_recipe(staged_file, ["stages=null", "schedule=full", lrs])
    (stage,) = resolve_recipe(recipe, family).stages
    assert set(stage.groups.values()) == {"full"} and stage.lr["vision"] == 1e-5


def _paper(family_name: str, checkpoint: Path, tmp_path) -> list[StageSection]:
    train = tmp_path / "t.jsonl"
    train.write_text("")
    recipe_file = tmp_path / "paper.yaml"
    recipe_file.write_text(
        f"model: {{family: {family_name}, path: {checkpoint}}}\ndata: {{train: {train}}}\nschedule: paper\n"
    )
    return resolve_recipe(load_recipe(recipe_file), get_family(family_name)).stages


def test_paper_schedule_llava_onevision(tiny_llava, tmp_path):
    align, full = _paper("llava_onevision", tiny_llava, tmp_path)
    assert align.groups == {"vision": "frozen", "projector": "full", "llm": "frozen"} and align.lr == {
        "projector": 1e-3
    }
    assert full.lr == {"vision": 2e-6, "projector": 1e-5, "llm": 1e-5}
    assert align.fraction + full.fraction == pytest.approx(1.0)


@pytest.mark.parametrize(
    "preset, names",
    [
        ("test", ["projector", "projector+llm", "task"]),  # Llama LLM: Mississippi-0.8B's schedule
        ("test-2b", ["vision+projector", "task"]),  # Mistral LLM: Mississippi-2B's schedule
    ],
)
def test_paper_schedule_mississippi_follows_the_checkpoint_size(tmp_path, preset, names):
    family = get_family("mississippi")
    checkpoint = family.build_tiny_checkpoint(tmp_path / preset, **family.tiny_presets[preset])
    stages = _paper("mississippi", checkpoint, tmp_path)
    assert [s.name for s in stages] == names
    assert sum(s.fraction for s in stages) == pytest.approx(1.0)
    assert stages[0].groups["llm"] == "frozen"  # both sizes start with the LLM frozen
    if preset == "test-2b":
        assert stages[0].groups["vision"] == "full" and stages[0].lr == {"vision": 4e-5, "projector": 2e-4}


def test_stage_budgets():
    train = TrainSection(max_steps=100, grad_accum=2)

    def steps(*budgets, index=0, train=train):
        stages = [StageSection(name=f"s{i}", groups={"llm": "full"}, **b) for i, b in enumerate(budgets)]
        return stage_steps(stages, index, train, stage_batches_per_epoch=30, main_batches_per_epoch=50)

    assert steps({"max_steps": 7}) == 7
    assert steps({"epochs": 2}) == 30  # 2 × 30 micro-batches / 2 accumulation
    assert steps({"fraction": 0.25}) == 25
    assert steps({}) == 100
    by_epochs = TrainSection(epochs=1.5, grad_accum=2)
    assert steps({"fraction": 0.5}, train=by_epochs) == 19  # 0.5 × ceil(1.5 × 50 / 2) = 0.5 × 38
    # Consecutive shares add up to exactly the budget (independent rounding would give 1 + 2 + 3 = 6 of 5).
    paper = [{"fraction": 0.1}, {"fraction": 0.3}, {"fraction": 0.6}]
    for total, expected in ((5, [1, 1, 3]), (10, [1, 3, 6]), (800, [80, 240, 480])):
        got = [steps(*paper, index=i, train=TrainSection(max_steps=total)) for i in range(3)]
        assert got == expected and sum(got) == total


def test_fractions_above_the_budget_are_an_error(staged_file):
    with pytest.raises(RecipeError, match=r"stages: the fractions of the train budget add up to 1\.2 \(> 1\)"):
        load_recipe(staged_file, ["stages.1.fraction=1.0"])


def test_optim_lr_may_name_groups_a_stage_keeps_frozen(staged_file):
    """One per-group optim.lr for every stage: a stage takes the rates of the groups it trains."""
    rates = "optim.lr={vision: 2.0e-5, projector: 1.0e-4, llm: 3.0e-4}"
    recipe = load_recipe(staged_file, [rates, "stages.0.lr=null", "stages.1.lr=null"])
    align, tune = resolve_recipe(recipe, get_family("mississippi")).stages
    assert align.lr == {"projector": 1e-4} and tune.lr == {"vision": 2e-5, "projector": 1e-4, "llm": 3e-4}
    plain = load_recipe(
        staged_file, [rates, "stages=null", "tuning.groups={vision: frozen, projector: full, llm: lora}"]
    )
    assert resolve_recipe(plain, get_family("mississippi")).stages[0].lr == {"projector": 1e-4, "llm": 3e-4}
    with pytest.raises(
        RecipeError,
        match=r"staged\.yaml \(override optim\.lr=.*\): optim\.lr \(used by stages\.1, "
        r"which has no lr\): no learning rate for trainable group\(s\) vision",
    ):
        load_recipe(staged_file, ["optim.lr={projector: 1.0e-4, llm: 3.0e-4}", "stages.1.lr=null"])


def test_stage_data_files_are_checked_at_load_time(staged_file, tmp_path):
    with pytest.raises(RecipeError, match=r"stages\.1\.data\.mix\.1\.source: file not found: .*nope\.jsonl"):
        mix = (
            f"stages.1.data={{mix: [{{source: {staged_file.parent / 'train.jsonl'}, weight: 1}},"
            f" {{source: {tmp_path / 'nope.jsonl'}, weight: 1}}]}}"
        )
        load_recipe(staged_file, [mix])


def test_preset_stages_cannot_be_overridden_by_index(staged_file):
    with pytest.raises(RecipeError, match=r"override stages\.1\.max_steps: 'stages' is not set in the recipe"):
        load_recipe(staged_file, ["stages=null", "schedule=paper", "stages.1.max_steps=5"])


def test_lora_targets_of_a_later_stage_are_checked_before_the_first(
    tiny_mississippi, simple_docs, tmp_path, fresh_accelerate_state
):
    from finetune.errors import UserError
    from finetune.training.runner import FineTuneRecipe

    stages = (
        "[{name: a, groups: {vision: frozen, projector: full, llm: frozen}, max_steps: 1},"
        " {name: b, groups: {vision: lora, projector: frozen, llm: frozen}, max_steps: 1}]"
    )
    recipe = load_recipe(
        "quickstart",
        [
            f"model.path={tiny_mississippi}",
            f"data.train={simple_docs['train']}",
            f"data.val={simple_docs['val']}",
            "data.test=null",
            "tuning.groups=null",
            f"stages={stages}",
            "tuning.lora.targets={vision: [qkv]}",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    job = FineTuneRecipe(recipe)
    with pytest.raises(UserError, match=r"tuning\.lora\.targets\.vision: \['qkv'\] match no module of group 'vision'"):
        job.setup()


def test_mixture_sampler_draws_by_weight_without_early_repeats():
    sizes, weights = [10, 90], [3.0, 1.0]  # the small source is drawn 3× as often as the big one
    lengths = list(range(100))
    sampler = MixtureSampler(
        lengths, sizes, weights, samples_per_epoch=400, batch_size=4, seed=1, group_by_length=False
    )
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 400
    from_small = sum(i < 10 for i in drawn)
    assert 270 < from_small < 330  # ≈ 3/4 of 400
    # The big source: 100 draws from 90 samples, so every sample at least once and none more than twice.
    counts = Counter(i for i in drawn if i >= 10)
    assert set(counts) == set(range(10, 100)) and max(counts.values()) <= 2
    assert list(sampler) == drawn  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != drawn


def test_mixture_sampler_groups_by_length():
    lengths = [1, 100] * 50
    sampler = MixtureSampler(lengths, [50, 50], [1.0, 1.0], samples_per_epoch=100, batch_size=4, seed=0)
    batches = [list(sampler)[i : i + 4] for i in range(0, 100, 4)]
    mixed = sum(len({lengths[i] for i in batch}) > 1 for batch in batches)
    assert mixed <= 2  # sorted mega-batches: almost every batch is all-short or all-long


@pytest.fixture(scope="module")
def mississippi_batch(tiny_mississippi, simple_docs):
    from finetune.data.dataset import Collator, DocumentDataset, prepare_samples

    family, checkpoint = get_family("mississippi"), tiny_mississippi
    processor = family.load_processor(str(checkpoint))
    instruction = 'Extract into JSON format: {"number": "", "total": ""}'
    samples, _ = prepare_samples(
        simple_docs["train"],
        split="train",
        family=family,
        processor=processor,
        instruction_text=instruction,
        skeleton={"number": "", "total": ""},
        max_length=4096,
    )
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=instruction)
    batch = Collator(family, processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    batch.pop("index")
    return family, checkpoint, batch


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("llm_mode", ["full", "lora"])
def test_a_frozen_vision_tower_builds_no_graph_and_holds_no_optimizer_state(mississippi_batch, checkpointing, llm_mode):
    from finetune.config import TuningSection
    from finetune.training.tuning import apply_tuning, enable_gradient_checkpointing, optimizer_groups

    family, checkpoint, batch = mississippi_batch
    outputs = {}
    for vision_mode in ("frozen", "full"):
        model = family.load_model(str(checkpoint))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model, _ = apply_tuning(
            model, family, TuningSection(), groups={"vision": vision_mode, "projector": "full", "llm": llm_mode}
        )
        model.train()
        tower = next(m for n, m in model.named_modules() if n.endswith("model.vision_tower"))
        handle = tower.register_forward_hook(lambda mod, args, out, mode=vision_mode: outputs.__setitem__(mode, out))
        optimizer = torch.optim.AdamW(optimizer_groups(model, family, lambda g: 1e-3, 0.0))
        model(**batch).loss.backward()
        optimizer.step()
        handle.remove()
        hidden = outputs[vision_mode].last_hidden_state
        vision_params = {id(p) for n, p in model.named_parameters() if family.group_of(n) == "vision"}
        with_state = {id(p) for p in optimizer.state}
        if vision_mode == "frozen":
            # Nothing of the tower is recorded for backward (its activations are freed as it goes) ...
            assert hidden.grad_fn is None and not hidden.requires_grad
            # ... and the optimizer keeps no moments for it.
            assert not (vision_params & with_state)
        else:
            assert hidden.grad_fn is not None
            assert vision_params & with_state


def test_vision_lora_weights_receive_gradients_under_checkpointing(mississippi_batch):
    """LoRA on a tower whose base weights are frozen, with gradient checkpointing: the classic silent failure is
    adapters that never get a gradient."""
    from finetune.config import TuningSection
    from finetune.training.tuning import apply_tuning, enable_gradient_checkpointing, optimizer_groups

    family, checkpoint, batch = mississippi_batch
    model = family.load_model(str(checkpoint))
    enable_gradient_checkpointing(model)
    model, _ = apply_tuning(
        model,
        family,
        TuningSection(lora={"dropout": 0.0}),
        groups={"vision": "lora", "projector": "frozen", "llm": "frozen"},
    )
    model.train()
    optimizer = torch.optim.AdamW(optimizer_groups(model, family, lambda g: 1e-2, 0.0))
    for _ in range(2):  # B starts at zero, so A's gradient is zero until the first step moved B
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    vision_lora = {n: p for n, p in model.named_parameters() if ".lora_" in n and family.group_of(n) == "vision"}
    assert vision_lora and all(p.requires_grad for p in vision_lora.values())
    no_grad = [n for n, p in vision_lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"vision LoRA weights without gradient: {no_grad[:3]}"
