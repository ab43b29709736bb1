"""QLoRA: every family's frozen base quantised by bitsandbytes (4-bit NF4 or 8-bit), LoRA trained on top.

bitsandbytes 0.50 runs both on the CPU, so this is tested here: what is quantised and what is kept, the recipe's
refusals, gradients that an evaluation in between does not change, and (slow) runs that train, resume exactly and
save adapters that reload onto the unquantised base.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import QuantizationSection, TuningSection
from finetune.models import FAMILY_CLASSES, get_family
from finetune.models.quantization import MIN_4BIT_IN_FEATURES, Quantization
from finetune.recipe import RecipeError, load_recipe
from finetune.resolve import resolve_recipe
from finetune.training.tuning import apply_tuning, prepare_quantized
from tests.conftest import run_train, write_recipe

bnb = pytest.importorskip("bitsandbytes")

# One tiny preset per family (the first: the contract test covers the others' shapes).
CASES = [pytest.param((cls.name, next(iter(cls.tiny_presets))), id=cls.name) for cls in FAMILY_CLASSES]
NO_DROPOUT = TuningSection(lora={"dropout": 0.0})  # two forwards in train mode see the same adapters
QUANTISED = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    name, preset = request.param
    family = get_family(name)
    path = family.build_tiny_checkpoint(tmp_path_factory.mktemp(name), **family.tiny_presets[preset])
    family = family.for_checkpoint(str(path))
    return family, str(path)


def load_quantised(family, path, bits: int, skip=()):
    quantization = Quantization.from_recipe(QuantizationSection(bits=bits, skip=list(skip)), family.group_prefixes)
    return family.load_model(path, quantization=quantization), quantization


def linears(model, family, group: str):
    """{name: module} of the model's linear layers (plain or bitsandbytes') in `group`."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and family.group_of(f"{name}.weight") == group
    }


@pytest.mark.parametrize("bits", [4, 8])
def test_the_base_is_quantised_except_what_is_kept(case, bits):
    family, path = case
    model, quantization = load_quantised(family, path, bits, skip=["vision"])
    output = model.get_output_embeddings()
    narrow = set()
    for group in set(family.group_prefixes) - {"vision"}:
        for name, module in linears(model, family, group).items():
            if module is output:
                continue
            if bits == 4 and module.in_features < MIN_4BIT_IN_FEATURES:  # kept, and said so
                narrow.add(name)
                assert type(module) is torch.nn.Linear, name
            else:
                assert isinstance(module, QUANTISED[bits]), name
    assert set(quantization.narrow) == narrow
    # Kept as they were: the skipped group and the output embedding.
    vision = linears(model, family, "vision")
    assert vision and not any(isinstance(m, QUANTISED[bits]) for m in vision.values())
    assert type(output) is torch.nn.Linear
    reference = family.load_model(path)
    torch.testing.assert_close(output.weight, reference.get_output_embeddings().weight, rtol=0, atol=0)


def test_4bit_weights_take_a_fraction_of_the_memory(case):
    family, path = case
    full = linears(family.load_model(path), family, "llm")
    model, _ = load_quantised(family, path, 4)
    quantised = {n: m for n, m in linears(model, family, "llm").items() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantised
    full_bytes = sum(full[n].weight.numel() * full[n].weight.element_size() for n in quantised)
    packed_bytes = sum(m.weight.numel() * m.weight.element_size() for m in quantised.values())
    assert packed_bytes * 8 == full_bytes  # fp32 → 4 bits: 1/8 (plus the scales, kept in the quant state)


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_an_evaluation_in_between_does_not_change_the_gradients(case):
    """bitsandbytes repacks 4-bit weights for fast CPU inference the first time a layer runs in eval mode, and its
    packed matmul has no backward: without our guard, training after an evaluation would get wrong gradients."""
    family, path = case
    model, quantization = load_quantised(family, path, 4)
    model = prepare_quantized(model, quantization, [], say=lambda line: None)
    model, _ = apply_tuning(model, family, NO_DROPOUT, {"vision": "frozen", "projector": "frozen", "llm": "lora"})
    torch.manual_seed(0)
    for name, param in model.named_parameters():  # lora_B starts at zero: give every adapter a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    ids = torch.randint(5, 60, (2, 12))
    batch = {"input_ids": ids, "labels": ids}
    model.train()
    before = lora_gradients(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = lora_gradients(model, batch)
    assert before.keys() == after.keys() and before
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


RECIPE = """\
model:
  family: mississippi
  path: some/checkpoint
data:
  train: {train}
  prompt:
    skeleton: {{total: ""}}
tuning:
  quantization:
    bits: 4
"""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tuning.groups={vision: full, projector: frozen, llm: lora}"],
            r"r\.yaml \(override tuning\.groups=.*\): tuning\.groups: stages\.0 \(train\): 'vision' trains in full, "
            r"but tuning\.quantization quantises it .*add 'vision' to tuning\.quantization\.skip",
        ),
        (
            ["tuning.quantization.skip=[visoin]"],
            r"r\.yaml \(override tuning\.quantization\.skip=\[visoin\]\): tuning\.quantization\.skip\.0: "
            r"'mississippi' has no group 'visoin' \(did you mean 'vision'\?\)",
        ),
        (
            [
                "tuning.groups={vision: full, projector: full, llm: full}",
                "tuning.quantization.skip=[vision, projector, llm]",
            ],
            r"tuning\.quantization: no stage trains a group with LoRA",
        ),
        (["tuning.quantization.bits=3"], r"tuning\.quantization\.bits: .*4.*8"),
    ],
)
def test_a_recipe_quantising_what_trains_in_full_is_one_line(tmp_path, overrides, message):
    recipe_file = write_recipe(tmp_path, "r.yaml", RECIPE)
    with pytest.raises(RecipeError, match=message):
        resolve_recipe(load_recipe(recipe_file, overrides), get_family("mississippi"))


def test_skipped_groups_may_train_in_full(tmp_path):
    recipe_file = write_recipe(tmp_path, "r.yaml", RECIPE)
    overrides = [
        "tuning.groups={vision: full, projector: full, llm: lora}",
        "tuning.quantization.skip=[vision, projector]",
    ]
    (stage,) = resolve_recipe(load_recipe(recipe_file, overrides), get_family("mississippi")).stages
    assert stage.groups == {"vision": "full", "projector": "full", "llm": "lora"}


# --- end to end ---------------------------------------------------------------------------------------------------


def qlora_args(checkpoint, docs, out, bits: int, **overrides):
    args = {
        "model.path": str(checkpoint),
        "data.train": str(docs["train"]),
        "data.val": str(docs["val"]),
        "data.test": "null",
        "output.dir": str(out),
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "tuning.quantization": f"{{bits: {bits}}}",
        "tuning.lora.r": 4,
        "tuning.lora.dropout": 0.1,
        "optim.lr": 1e-2,
        "optim.warmup_ratio": 0.0,
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        "eval.before_training": False,
        "eval.after_training": False,
    }
    args.update(overrides)
    return ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_a_qlora_run_trains_resumes_exactly_and_reloads_onto_the_unquantised_base(
    tiny_mississippi, simple_docs, tmp_path, bits, capsys
):
    full = tmp_path / "full"
    result = run_train(qlora_args(tiny_mississippi, simple_docs, full, bits))
    assert f"quantised the base to {bits}-bit" in result.stderr
    losses = [json.loads(line)["loss"] for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]

    # Resumed from step 3 in a fresh process: the same adapter as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("final", "step_000006", "train_log.jsonl"))
    run_train(qlora_args(tiny_mississippi, simple_docs, resumed, bits, **{"output.if_exists": "resume"}))
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    # The adapter loads onto the unquantised base, every trained tensor as saved.
    from finetune.loading import load_model_and_processor, resolve_model

    _, _, model = load_model_and_processor(resolve_model(str(full)))
    assert not any(isinstance(m, tuple(QUANTISED.values())) for m in model.modules())
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(a)
    for key, tensor in a.items():
        name = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=key)

    # A merge goes into the unquantised weights, and says so.
    from finetune.merge import merge_adapter

    merged = merge_adapter(str(full), tmp_path / "merged")
    assert f"trained on a {bits}-bit quantised base; merging it into the base's unquantised" in capsys.readouterr().err
    merged_model = get_family("mississippi").load_model(str(merged))
    assert not any(isinstance(m, tuple(QUANTISED.values())) for m in merged_model.modules())
