"""Which parameters train: LoRA scoped to its groups, frozen groups bit-identical after steps, per-group LRs."""

from __future__ import annotations

import pytest
import torch

from finetune.config import TuningSection
from finetune.data.dataset import Collator, DocumentDataset, prepare_samples
from finetune.models import get_family
from finetune.training.tuning import apply_tuning, enable_gradient_checkpointing, optimizer_groups

INSTRUCTION = 'Extract into JSON format: {"number": "", "total": ""}'


@pytest.fixture(scope="module")
def family():
    return get_family("llava_onevision")


@pytest.fixture(scope="module")
def batch(family, tiny_llava, simple_docs):
    processor = family.load_processor(str(tiny_llava))
    samples, _ = prepare_samples(
        simple_docs["train"],
        split="train",
        family=family,
        processor=processor,
        instruction_text=INSTRUCTION,
        skeleton={"number": "", "total": ""},
        max_length=4096,
    )
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=INSTRUCTION)
    data = Collator(family, processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    data.pop("index")
    return data


def train_steps(model, family, batch, lrs, steps=3):
    optimizer = torch.optim.AdamW(optimizer_groups(model, family, lambda g: lrs[g], weight_decay=0.01))
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_steps_change_only_lora_weights(family, tiny_llava, batch):
    model = family.load_model(str(tiny_llava))
    model, _ = apply_tuning(
        model, family, TuningSection(groups={"vision": "frozen", "projector": "frozen", "llm": "lora"})
    )
    before = snapshot(model)
    train_steps(model, family, batch, {"llm": 1e-2})
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        elif ".lora_" not in name:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_full_with_frozen_vision(family, tiny_llava, batch):
    model = family.load_model(str(tiny_llava))
    groups = {"vision": "frozen", "projector": "full", "llm": "full"}
    model, plan = apply_tuning(model, family, TuningSection(groups=groups))
    before = snapshot(model)
    optimizer = train_steps(model, family, batch, {"projector": 1e-3, "llm": 1e-4})
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {
        "llm": 1e-4,
        "llm.no_decay": 1e-4,
        "projector": 1e-3,
        "projector.no_decay": 1e-3,
    }
    for name, param in model.named_parameters():
        group = family.group_of(name)
        if group == "vision":
            assert torch.equal(param, before[name]) and not param.requires_grad
        elif name.startswith("model.language_model.embed_tokens"):
            continue  # rows of tokens absent from the batch get no gradient
        else:
            assert not torch.equal(param, before[name]), f"{name} did not train"
    assert plan.frozen["vision"] == sum(
        p.numel() for n, p in model.named_parameters() if family.group_of(n) == "vision"
    )


@pytest.mark.parametrize("llm_mode", ["full", "lora"])
def test_every_trainable_parameter_gets_a_gradient(family, tiny_llava, batch, llm_mode):
    """SigLIP's post_layernorm is never used by LLaVA: it must stay frozen, also as a PEFT modules_to_save copy,
    or DDP fails on unused parameters."""
    model = family.load_model(str(tiny_llava))
    model, _ = apply_tuning(
        model, family, TuningSection(groups={"vision": "full", "projector": "full", "llm": llm_mode})
    )
    model(**batch).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert not no_grad, f"trainable parameters without gradient (DDP would hang or need find_unused): {no_grad}"
    assert not any(p.requires_grad for n, p in model.named_parameters() if "post_layernorm" in n)


def test_full_projector_inside_lora_run_is_saved_with_adapter(family, tiny_llava, batch):
    model = family.load_model(str(tiny_llava))
    model, plan = apply_tuning(
        model, family, TuningSection(groups={"vision": "frozen", "projector": "full", "llm": "lora"})
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save.default.linear_1." in n for n in trainable)
    assert not any(".original_module." in n for n in trainable)
    assert plan.trainable["projector"] > 0


def test_groups_must_match_family(family, tiny_llava):
    model = family.load_model(str(tiny_llava))
    with pytest.raises(ValueError, match=r"missing \['vision'\]"):
        apply_tuning(model, family, TuningSection(groups={"projector": "full", "llm": "full"}))
    with pytest.raises(ValueError, match="leaves no parameter trainable"):
        apply_tuning(model, family, TuningSection(groups={"vision": "frozen", "projector": "frozen", "llm": "frozen"}))


def test_gradient_checkpointing_with_frozen_vision_gives_the_same_gradients(family, tiny_llava, batch):
    """The classic failure: checkpointed blocks whose inputs need no grad (frozen tower) silently get none."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = family.load_model(str(tiny_llava))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model, _ = apply_tuning(
            model,
            family,
            TuningSection(groups={"vision": "frozen", "projector": "frozen", "llm": "lora"}, lora={"dropout": 0.0}),
        )
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[1].keys() == grads[0].keys()
    assert all(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n)  # lora_A: 0 while B is 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_full_llm_inside_a_lora_run_trains_the_whole_llm(family, tiny_llava):
    model = family.load_model(str(tiny_llava))
    llm_size = sum(p.numel() for n, p in model.named_parameters() if family.group_of(n) == "llm")
    model, plan = apply_tuning(
        model, family, TuningSection(groups={"vision": "lora", "projector": "frozen", "llm": "full"})
    )
    assert plan.trainable["llm"] == llm_size  # every LLM weight, as a PEFT modules_to_save copy
    assert plan.trainable["vision"] > 0


def test_lora_on_modules_directly_under_a_group_prefix(family, tiny_llava):
    model = family.load_model(str(tiny_llava))
    model, plan = apply_tuning(
        model,
        family,
        TuningSection(
            groups={"vision": "frozen", "projector": "lora", "llm": "lora"},
            lora={"targets": {"projector": ["linear_1", "linear_2"]}},
        ),
    )
    wrapped = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert "base_model.model.model.multi_modal_projector.linear_1" in wrapped
    assert plan.trainable["projector"] > 0


def test_a_group_that_would_train_nothing_is_an_error(family, tiny_llava):
    from finetune.errors import UserError

    model = family.load_model(str(tiny_llava))
    with pytest.raises(UserError, match=r"vision \(lora\) would train no parameter"):
        apply_tuning(
            model,
            family,
            TuningSection(
                groups={"vision": "lora", "projector": "frozen", "llm": "lora"},
                lora={"targets": {"vision": ["no_such_layer"]}},
            ),
        )
