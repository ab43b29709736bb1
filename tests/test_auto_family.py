"""The generic family (`auto`) beyond the contract (tests/test_family_contract.py runs every proven model through
that): it computes what a dedicated family computes on the same checkpoint, it is chosen for model types no family
claims, and it refuses a model that does not follow transformers' VLM layout with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data.dataset import Collator, DocumentDataset, prepare_samples
from finetune.data.prompt import render_instruction
from finetune.errors import UserError
from finetune.models import family_of_checkpoint, get_family
from finetune.models.auto.chat import PromptFormat
from finetune.models.auto.layout import read_layout
from finetune.models.base import IGNORE_INDEX

SKELETON = {"number": "", "total": ""}
INSTRUCTION = render_instruction("Extract the details into JSON format:", SKELETON)


def _dataset(family, processor, source, with_answer=True):
    samples, report = prepare_samples(
        source,
        split="train",
        family=family,
        processor=processor,
        instruction_text=INSTRUCTION,
        skeleton=SKELETON,
        max_length=16384,
    )
    assert report.kept == report.read
    return DocumentDataset(
        samples, family=family, processor=processor, instruction_text=INSTRUCTION, with_answer=with_answer
    )


def _batch(family, processor, dataset, padding_side):
    batch = Collator(family, processor.tokenizer.pad_token_id, padding_side=padding_side)(list(dataset))
    batch.pop("index")
    return batch


@pytest.fixture(scope="module")
def two_page_docs(tmp_path_factory):
    """Pages small enough that no family decodes them reduced (LLaVA-OneVision's `decode_size` would, within the
    resampler's rounding), one sample with two pages (several images take another path in LLaVA-OneVision)."""
    folder = tmp_path_factory.mktemp("two-pages")
    for i, size in enumerate([(64, 64), (60, 40), (40, 64)]):
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    rows = [
        {"image": "p0.png", "target": {"number": "7", "total": "1.00"}},
        {"image": "p1.png", "target": {"number": "12345", "total": "99.99"}},
        {"image": ["p2.png", "p0.png"], "target": {"number": "42", "total": "5.5"}},
    ]
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_auto_on_llava_onevision_equals_the_dedicated_family(tiny_llava, two_page_docs):
    """Same prompts, labels, loss and greedy generation as `llava_onevision` on the same checkpoint."""
    dedicated = get_family("llava_onevision", str(tiny_llava))
    auto = get_family("auto", str(tiny_llava))
    assert auto.group_prefixes == dedicated.group_prefixes
    ours = (dedicated, dedicated.load_processor(str(tiny_llava)))
    theirs = (auto, auto.load_processor(str(tiny_llava)))
    model = dedicated.load_model(str(tiny_llava)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # so that generation depends on the input

    items = [list(_dataset(f, p, two_page_docs)) for f, p in (ours, theirs)]
    for a, b in zip(*items, strict=True):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert any(label != IGNORE_INDEX for label in b["labels"])

    losses = []
    for family, processor in (ours, theirs):
        batch = _batch(family, processor, _dataset(family, processor, two_page_docs), "right")
        with torch.no_grad():
            losses.append(model(**batch).loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)

    generated = []
    for family, processor in (ours, theirs):
        batch = _batch(family, processor, _dataset(family, processor, two_page_docs, with_answer=False), "left")
        batch.pop("labels")
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=6,
                eos_token_id=family.stop_token_ids(processor),
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        generated.append(out[:, batch["input_ids"].shape[1] :].tolist())
    assert generated[0] == generated[1]
    assert len({tuple(row) for row in generated[0]}) > 1  # not vacuous: continuations differ between samples


def test_auto_is_chosen_for_model_types_without_a_family(tmp_path, tiny_llava):
    assert family_of_checkpoint(str(tiny_llava)) == "llava_onevision"  # a dedicated family keeps its model type
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert family_of_checkpoint(str(tmp_path)) == "auto"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="model_type 'bert' belongs to no family and is no image-text-to-text"):
        family_of_checkpoint(str(tmp_path))


class _Model(torch.nn.Module):
    def __init__(self, **parts):
        super().__init__()
        self.model = torch.nn.Module()
        for name, module in parts.items():
            setattr(self.model, name, module)
        self.lm_head = torch.nn.Linear(4, 8)


def test_a_model_off_the_layout_is_refused_with_one_line():
    linear = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match=r"^x: _Model does not follow the transformers VLM layout: no a language model"):
        read_layout(_Model(vision_tower=linear, multi_modal_projector=torch.nn.Linear(4, 4)), "x")
    with pytest.raises(UserError) as err:
        read_layout(_Model(vision_tower=linear, language_model=torch.nn.Linear(4, 4)), "x")
    assert "no a projector" in str(err.value) and "\n" not in str(err.value)
    stray = _Model(
        vision_tower=linear, multi_modal_projector=torch.nn.Linear(4, 4), language_model=torch.nn.Linear(4, 4)
    )
    stray.model.extra = torch.nn.Linear(4, 4)
    with pytest.raises(UserError, match=r"parameter 'model.extra.bias' \(2 in all\) is in none of the vision"):
        read_layout(stray, "x")


def test_qwen_groups_split_the_merger_out_of_the_vision_encoder(tmp_path):
    family = get_family("auto")
    path = family.build_tiny_checkpoint(tmp_path / "qwen", model="qwen2_5_vl")
    bound = get_family("auto", str(path))
    assert bound.group_prefixes["projector"] == ("model.visual.merger.",)
    assert "model.visual.merger." not in bound.group_prefixes["vision"]
    assert "attn.proj" in bound.default_lora_targets["vision"]  # not the patch embedding's convolution `proj`


@pytest.mark.parametrize(("model", "arithmetic"), [("qwen2_5_vl", True), ("granite_docling", False)])
def test_prompt_lengths_use_the_processors_arithmetic_only_where_it_counts_everything(tmp_path, model, arithmetic):
    """Qwen's `_get_num_multimodal_tokens` counts its whole expansion; Idefics3's leaves out the row / column markers
    around each tile, so its lengths are measured on blank pages once per set of sizes, and cached."""
    family = get_family("auto")
    path = family.build_tiny_checkpoint(tmp_path / model, model=model)
    processor = family.load_processor(str(path))
    format_ = PromptFormat.of(processor, model)
    assert format_.counts_by_arithmetic is arithmetic
    prompt = family.render_prompt(processor, INSTRUCTION, 1)
    measured_before = len(format_.counted)
    family.count_prompt_tokens(processor, prompt, [(321, 123)])
    family.count_prompt_tokens(processor, prompt, [(321, 123)])
    assert len(format_.counted) - measured_before == (0 if arithmetic else 1)


def test_a_checkpoint_transformers_cannot_load_natively_is_one_line(tiny_mississippi):
    with pytest.raises(UserError, match=r"model_type 'h2ovl_chat' is no transformers-native image-text-to-text model"):
        get_family("auto", str(tiny_mississippi))
    with pytest.raises(UserError, match=r"model_type 'h2ovl_chat' is no transformers-native"):
        get_family("auto").load_model(str(tiny_mississippi))
