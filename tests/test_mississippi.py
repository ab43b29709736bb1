"""What only H2OVL-Mississippi has: tiling → image tokens, MSAC, gradients through InternViT, saving in the original
H2OVL layout beside the native one (what every family must do is in test_family_contract.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from finetune.config import TuningSection
from finetune.data.dataset import Collator, DocumentDataset, prepare_samples
from finetune.models import get_family
from finetune.training.tuning import apply_tuning

INSTRUCTION = 'Extract the details into JSON format: {"number": "", "total": ""}'
SKELETON = {"number": "", "total": ""}


@pytest.fixture(scope="module")
def family():
    return get_family("mississippi")


@pytest.fixture(scope="module", params=["test", "test-2b"])
def tiny(request, family, tmp_path_factory):
    """Both shapes: Llama LLM without MSAC (0.8B-like) and Mistral LLM with MSAC (2B-like)."""
    return family.build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), **family.tiny_presets[request.param])


def samples_for(source, family, processor):
    samples, _report = prepare_samples(
        source,
        split="train",
        family=family,
        processor=processor,
        instruction_text=INSTRUCTION,
        skeleton=SKELETON,
        max_length=8192,
    )
    return samples, DocumentDataset(samples, family=family, processor=processor, instruction_text=INSTRUCTION)


def test_processor_expands_each_image_into_its_tiles_tokens(family, tiny):
    processor = family.load_processor(str(tiny))
    s = processor.settings
    image = Image.new("RGB", (300, 120), "white")
    out = processor(images=[image], text=f"{family.render_prompt(processor, 'read', 1)}")
    tiles = out["pixel_values"].shape[0]
    assert out["pixel_values"].shape[1:] == (3, s.tile_size, s.tile_size)
    ids = out["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == tiles * s.tokens_per_tile
    assert tiles == processor.tiles_for([image.size])[0]
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|prompt|><img><IMG_CONTEXT>") and text.endswith("</img>\nread<|end|><|answer|>")


def test_msac_is_on_for_the_2b_shape_and_off_for_multi_image(family, tiny):
    processor = family.load_processor(str(tiny))
    wide = (3000, 800)
    single = processor.tiles_for([wide])[0]
    pair = processor.tiles_for([wide, wide])
    if processor.settings.use_msac:
        assert single == 11 and pair == [5, 5]  # MSAC: (4,1) then (3,2) → 5 + 7 − 1; off for two images
    else:
        assert single == 5 and pair == [5, 5]


def test_max_tiles_per_image_option_and_unknown_options(family, tiny):
    processor = family.load_processor(str(tiny), max_tiles_per_image=2)
    assert processor.tiles_for([(3000, 800)])[0] <= 2 + 1 + (2 if processor.settings.use_msac else 0)
    with pytest.raises(ValueError, match="unknown H2OVL processor option"):
        family.load_processor(str(tiny), max_tile=2)


def test_full_training_gives_every_trainable_parameter_a_gradient(family, tiny, simple_docs):
    processor = family.load_processor(str(tiny))
    _, dataset = samples_for(simple_docs["train"], family, processor)
    batch = Collator(family, processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    batch.pop("index")
    model, _ = apply_tuning(
        family.load_model(str(tiny)),
        family,
        TuningSection(groups={"vision": "full", "projector": "full", "llm": "full"}),
    )
    model(**batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_gradient_checkpointing_with_frozen_vision(family, tiny, simple_docs):
    processor = family.load_processor(str(tiny))
    _, dataset = samples_for(simple_docs["train"], family, processor)
    batch = Collator(family, processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    batch.pop("index")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same LoRA initialisation in both
        model = family.load_model(str(tiny))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model, _ = apply_tuning(
            model,
            family,
            TuningSection(groups={"vision": "frozen", "projector": "full", "llm": "lora"}, lora={"dropout": 0.0}),
        )
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert any(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_full_model_saves_natively_and_in_the_original_layout(family, tiny, simple_docs, tmp_path):
    from finetune.models.mississippi.checkpoint import load_h2ovl

    processor = family.load_processor(str(tiny))
    _, dataset = samples_for(simple_docs["train"], family, processor)
    batch = Collator(family, processor.tokenizer.pad_token_id)([dataset[0]])
    batch.pop("index")
    model = family.load_model(str(tiny))
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight.add_(0.01)  # as if trained
        for param in model.parameters():  # the original layout is written in its config's dtype (bf16)
            param.copy_(param.to(torch.bfloat16).float())
        expected = model(**batch).logits
    family.save_pretrained(model, processor, tmp_path / "final", source_path=str(tiny))

    from transformers import AutoModelForImageTextToText

    native = AutoModelForImageTextToText.from_pretrained(tmp_path / "final")
    original = load_h2ovl(str(tmp_path / "final" / "original"))
    reloaded_processor = family.load_processor(str(tmp_path / "final"))
    assert reloaded_processor.settings == processor.settings
    with torch.no_grad():
        torch.testing.assert_close(native(**batch).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(original(**batch).logits, expected, rtol=0, atol=1e-5)


def test_original_layout_records_the_trained_tiling_and_survives_a_second_round(family, tiny, tmp_path):
    """final/original/config.json tiles pages as training did (recipe cap included), and a model loaded from a
    native save of ours can again be saved in the original layout (from the original/ beside it)."""
    from finetune.models.mississippi.processor import H2OVLProcessor

    processor = family.load_processor(str(tiny), max_tiles_per_image=2)
    model = family.load_model(str(tiny))
    family.save_pretrained(model, processor, tmp_path / "first", source_path=str(tiny))
    original = H2OVLProcessor.from_pretrained(str(tmp_path / "first" / "original"))
    for size in [(3000, 800), (600, 4000), (500, 500)]:
        assert original.tiles_for([size]) == processor.tiles_for([size])

    again = family.load_model(str(tmp_path / "first"))
    family.save_pretrained(
        again, family.load_processor(str(tmp_path / "first")), tmp_path / "second", source_path=str(tmp_path / "first")
    )
    assert (tmp_path / "second" / "original" / "model.safetensors").exists()


def test_a_tokenizer_without_chat_template_gets_h2ogpt2(family, tiny, tmp_path):
    import shutil

    from transformers import AutoTokenizer, PretrainedConfig

    folder = tmp_path / "no-template"
    shutil.copytree(tiny, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, config=PretrainedConfig())
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder, config=PretrainedConfig()).chat_template is None
    processor = family.load_processor(str(folder))
    text = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|prompt|>hi<|end|><|answer|>"
