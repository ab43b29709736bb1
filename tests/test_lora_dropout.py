"""One dropout mask for the LoRA adapters that read the same input (finetune/training/lora_dropout.py)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.config import LoraSection
from finetune.models import get_family
from finetune.training.lora_dropout import SharedInputDropout, share_lora_dropout
from finetune.training.tuning import enable_gradient_checkpointing, inject_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_llama(dropout: float, shared: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, param in model.named_parameters():  # B = 0 would hide what reaches the adapters' outputs
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    if shared:
        share_lora_dropout(model)
    return model


def adapter_inputs(model, input_ids) -> dict[str, torch.Tensor]:
    """What each LoRA A matrix of layer 0 received (its input after dropout)."""
    seen, hooks = {}, []
    layer = model.base_model.model.model.layers[0]
    for block in (layer.self_attn, layer.mlp):
        for name, module in block.named_children():
            if name in TARGETS:
                hook = module.lora_A["default"].register_forward_hook(
                    lambda _m, args, _out, name=name: seen.__setitem__(name, args[0])
                )
                hooks.append(hook)
    model(input_ids=input_ids)
    for hook in hooks:
        hook.remove()
    return seen


def test_siblings_share_one_mask_and_others_do_not():
    ids = torch.randint(0, 96, (2, 16))
    model = tiny_lora_llama(0.5, shared=True).train()
    seen = adapter_inputs(model, ids)
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert seen["gate_proj"] is seen["up_proj"]
    assert not torch.equal(seen["q_proj"], seen["o_proj"])  # o_proj reads the attention output: a mask of its own
    peft = adapter_inputs(tiny_lora_llama(0.5, shared=False).train(), ids)
    assert not torch.equal(peft["q_proj"], peft["k_proj"])  # PEFT draws a mask per adapter


def test_rate_and_scaling_are_dropouts():
    model = tiny_lora_llama(0.3, shared=True).train()
    dropout = model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]
    assert isinstance(dropout, SharedInputDropout)
    x = torch.ones(200, 500)
    out = dropout(x)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    x.add_(1)  # changed in place since: a new draw, not the remembered one
    assert dropout(x) is not out


def test_memory_released_when_the_block_ends_and_eval_is_identity():
    model = tiny_lora_llama(0.5, shared=True).train()
    model(input_ids=torch.randint(0, 96, (1, 8)))
    shared = {m for m in model.modules() if isinstance(m, SharedInputDropout)}
    assert len(shared) == 4  # attention and MLP of 2 layers
    assert all(m._output is None for m in shared)
    model.eval()
    x = torch.randn(3, 5)
    assert next(iter(shared))(x) is x


def test_checkpointed_recomputation_draws_the_same_masks():
    """Non-reentrant checkpointing recomputes each layer in backward: its masks must be the forward's, or the
    gradients would belong to another dropout draw. Same seed, with and without checkpointing: same grads."""
    ids = torch.randint(0, 96, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_lora_llama(0.5, shared=True).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("shared", [True, False])
def test_inject_lora_follows_the_recipe(tiny_llava, shared):
    family = get_family("llava_onevision")
    model = family.load_model(str(tiny_llava))
    lora = LoraSection(r=4, alpha=8, dropout=0.1, shared_dropout=shared)
    model = inject_lora(model, family, lora, ["llm"], [])
    kinds = {type(m.lora_dropout["default"]) for m in model.modules() if hasattr(m, "lora_dropout")}
    assert kinds == ({SharedInputDropout} if shared else {torch.nn.Dropout})
