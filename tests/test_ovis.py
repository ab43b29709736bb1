"""Ovis specifics beyond the family contract: the original code's outputs, both checkpoint layouts, tensor-by-tensor
loading and saving, the subgroups, and the paper schedule end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.errors import UserError
from finetune.models import get_family
from finetune.models.ovis import checkpoint as oc
from finetune.models.ovis.processor import OvisProcessor
from finetune.models.ovis.tiny import write_hf_layout

REFERENCE = json.loads((Path(__file__).parent / "data" / "ovis_reference.json").read_text())
VARIANTS = {"ovis2": "test-ovis2", "ovis1.6": "test-ovis1.6"}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    family = get_family("ovis")
    preset = VARIANTS[request.param]
    return request.param, family.build_tiny_checkpoint(tmp_path_factory.mktemp(preset), **family.tiny_presets[preset])


@pytest.fixture(scope="module")
def tiny_ovis2(tmp_path_factory) -> Path:
    family = get_family("ovis")
    return family.build_tiny_checkpoint(tmp_path_factory.mktemp("ovis2"), **family.tiny_presets["test-ovis2"])


# --- what the original computes ----------------------------------------------------------------------------------


def test_ids_and_logits_equal_the_original_codes(tiny):
    """tests/data/ovis_reference.json holds what AIDC-AI's own code (transformers 4.46.3; see
    scripts/ovis_reference.py) computes on these tiny checkpoints: the prompt, its ids (the original's negative
    placeholders expanded here into one image token per visual token and the five indicator tokens), a per-crop digest
    of the pixels (sum and position-weighted sum: order and placement show), per position the argmax and log-sum-exp
    of the logits, and 8 greedy tokens from its `generate`. The pages avoid resampling where they can (Pillow 12.3
    and 13 differ by ±1 in some bicubic downscales of noise); on these, both give the same pixels."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from ovis_reference import INSTRUCTION, pages, pixel_digest

    variant, path = tiny
    processor = OvisProcessor.from_pretrained(str(path))
    model = oc.load_ovis(str(path))
    tokens = processor.settings.tokens_per_crop
    for name, images in pages(processor.settings.side).items():
        reference = REFERENCE[variant][name]
        # The original ran on its own query for the variant (Ovis2 labels several pages; scripts/ovis_reference.py).
        prompt = processor.render_prompt(INSTRUCTION, len(images))
        assert prompt == reference["prompt"], name
        batch = processor(images=[images], text=[prompt])
        expected_ids = []
        for token in reference["input_ids"]:
            if token == -300:  # one crop
                expected_ids += [processor.image_token_id] * tokens
            elif -305 <= token <= -301:
                expected_ids.append(processor.indicator_ids[-301 - token])
            else:
                expected_ids.append(token)
        assert batch["input_ids"][0].tolist() == expected_ids, name
        digest = torch.tensor(pixel_digest(batch["pixel_values"]), dtype=torch.float64)
        torch.testing.assert_close(
            digest, torch.tensor(reference["pixel_digest"], dtype=torch.float64), rtol=0, atol=1e-5
        )
        with torch.no_grad():
            logits = model(**batch).logits[0]
            generated = model.generate(
                **batch,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=model.generation_config.eos_token_id,
                pad_token_id=processor.tokenizer.pad_token_id,
            )[0, batch["input_ids"].shape[1] :]
        assert logits.argmax(-1).tolist() == reference["argmax"], name
        torch.testing.assert_close(logits.logsumexp(-1), torch.tensor(reference["logsumexp"]), rtol=0, atol=1e-5)
        assert generated.tolist() == reference["generated"], name


# --- loading and saving ------------------------------------------------------------------------------------------


def test_every_original_tensor_maps_onto_a_parameter_and_back_bit_for_bit(tiny):
    _, path = tiny
    stored = load_file(path / "model.safetensors")
    model = oc.load_ovis(str(path), dtype=torch.bfloat16)
    native = model.state_dict()
    mapped = oc.to_native(stored, "original", model_backbone(model))
    assert set(mapped) == set(native) - {oc.TIED_HEAD}  # the tied head is the embedding table itself
    for name, tensor in mapped.items():
        assert torch.equal(native[name], tensor), name
    back = oc.to_checkpoint(native, "original", model_backbone(model), tied_head=True)
    assert back.keys() == stored.keys()
    for name, tensor in stored.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def model_backbone(model) -> str:
    return "siglip" if type(model.visual_tokenizer.backbone).__name__.startswith("Siglip") else "aimv2"


def test_load_then_save_original_is_bit_identical(tiny, tmp_path):
    _, path = tiny
    model = oc.load_ovis(str(path), dtype=torch.bfloat16)
    out = oc.save_checkpoint(model, tmp_path / "saved", path)
    saved, stored = load_file(out / "model.safetensors"), load_file(path / "model.safetensors")
    assert saved.keys() == stored.keys()
    assert all(saved[k].dtype == stored[k].dtype and torch.equal(saved[k], stored[k]) for k in stored)
    source_config = json.loads((path / "config.json").read_text())
    source_config.pop("auto_map")  # the remote code's, kept only with remote_code=True (model.trust_remote_code)
    assert json.loads((out / "config.json").read_text()) == source_config
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (path / name).read_bytes(), name


def test_float32_model_is_saved_as_float32_and_says_so(tiny, tmp_path):
    _, path = tiny
    model = oc.load_ovis(str(path))
    out = oc.save_checkpoint(model, tmp_path / "saved", path)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["llm_config"]["torch_dtype"] == "float32"


@pytest.mark.parametrize("fault", ["missing", "renamed", "reshaped"])
def test_a_missing_renamed_or_misshaped_tensor_is_named(tiny, tmp_path, fault):
    _, path = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in path.iterdir():
        if file.name != "model.safetensors":
            (broken / file.name).write_bytes(file.read_bytes())
    state = load_file(path / "model.safetensors")
    victim = "visual_tokenizer.head.0.weight"
    if fault == "missing":
        del state[victim]
        expected = f"missing {victim}"
    elif fault == "renamed":
        state["visual_tokenizer.head.zero.weight"] = state.pop(victim)
        expected = "unexpected visual_tokenizer.head.zero.weight"
    else:
        state[victim] = state[victim][:-1].contiguous()
        expected = f"wrong shape {victim}"
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=expected):
        oc.load_ovis(str(broken))


def test_hf_layout_loads_the_same_weights_with_identical_logits(tiny_ovis2, tmp_path):
    """transformers' `-hf` layout of the same Ovis2 weights: transformers' own class reads our conversion with no
    missing or unexpected weight (so the names are its names), and our model computes identical logits from it."""
    from PIL import Image
    from transformers import Ovis2ForConditionalGeneration

    hf = write_hf_layout(tiny_ovis2, tmp_path / "hf")
    _, info = Ovis2ForConditionalGeneration.from_pretrained(hf, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    page = Image.new("RGB", (150, 50), (240, 10, 10))
    batches = []
    for path in (tiny_ovis2, hf):
        processor = OvisProcessor.from_pretrained(str(path))
        batches.append(processor(images=[[page]], text=[processor.render_prompt("Read it", 1)]))
    assert all(torch.equal(batches[0][k], batches[1][k]) for k in batches[0])
    with torch.no_grad():
        original = oc.load_ovis(str(tiny_ovis2))(**batches[0]).logits
        converted = oc.load_ovis(str(hf))(**batches[1]).logits
    assert torch.equal(original, converted)
    # Saved back into the -hf layout, bit for bit.
    out = oc.save_checkpoint(oc.load_ovis(str(hf), dtype=torch.bfloat16), tmp_path / "hf-saved", hf)
    saved, stored = load_file(out / "model.safetensors"), load_file(hf / "model.safetensors")
    assert saved.keys() == stored.keys() and all(torch.equal(saved[k], stored[k]) for k in stored)


def test_checkpoint_config_errors_name_the_field(tiny_ovis2, tmp_path):
    from finetune.models.ovis.config import read_checkpoint_config

    config = json.loads((tiny_ovis2 / "config.json").read_text())
    for change, field in [
        ({"conversation_formatter_class": "Llama3ConversationFormatter"}, "conversation_formatter_class"),
        (
            {"visual_tokenizer_config": {**config["visual_tokenizer_config"], "tokenize_function": "gumbel_argmax"}},
            "tokenize_function",
        ),
        ({"model_type": "llava"}, "model_type"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=field):
            read_checkpoint_config(tmp_path)


# --- groups and the paper schedule --------------------------------------------------------------------------------


def test_last_block_subgroup_is_carved_out_of_vision(tiny_ovis2):
    family = get_family("ovis")
    model = oc.load_ovis(str(tiny_ovis2))
    carved = family.with_subgroups(model, family.subgroups)
    last = len(model.visual_tokenizer.backbone.encoder.layers) - 1
    groups = carved.assign_groups(model)
    assert groups["vision_last_block"] and all(
        name.startswith(f"visual_tokenizer.backbone.encoder.layers.{last}.") for name in groups["vision_last_block"]
    )
    assert not any(f"layers.{last}." in name for name in groups["vision"])
    with pytest.raises(UserError, match=r"no module 'visual_tokenizer\.backbone\.blocks'"):
        family.with_subgroups(model, {"x": ("vision", ("visual_tokenizer.backbone.blocks.-1",))})
    with pytest.raises(UserError, match="cannot be carved out of 'vision'"):
        family.with_subgroups(model, {"x": ("vision", ("llm.model.layers.0",))})
    top2 = ("visual_tokenizer.backbone.encoder.layers.-2", "visual_tokenizer.backbone.encoder.layers.-1")
    both = {**family.subgroups, "top2": ("vision", top2)}
    with pytest.raises(UserError, match="already in subgroup 'vision_last_block'"):
        family.with_subgroups(model, both)


def test_subgroup_modes_hold_inside_peft_copies_and_take_the_parents_lora_targets(tiny_ovis2):
    """In a LoRA run a `full` group trains as PEFT's copy of its modules; a frozen subgroup inside it stays frozen
    (its parameters are told apart inside the copy), and a subgroup in lora mode takes the recipe's targets for its
    parent."""
    from finetune.config import LoraSection
    from finetune.training.tuning import inject_lora, lora_targets, set_trainable

    family = get_family("ovis")
    model = oc.load_ovis(str(tiny_ovis2))
    carved = family.with_subgroups(model, family.subgroups)
    modes = {"vision": "full", "vision_last_block": "frozen", "projector": "frozen", "llm": "lora"}
    wrapped = inject_lora(model, carved, LoraSection(), ["llm"], ["vision"])
    plan = set_trainable(wrapped, carved, modes, uses_lora=True)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any(".modules_to_save." in n and "encoder.layers.0." in n for n in trainable)
    assert not any("encoder.layers.1." in n for n in trainable)  # the last block: frozen, also inside the copy
    assert plan.trainable.get("vision_last_block", 0) == 0 and plan.frozen["vision_last_block"] > 0
    lora = LoraSection(targets={"vision": ["out_proj"]})
    assert lora_targets(carved, lora, ["vision", "vision_last_block"]) == {
        "vision": ["out_proj"],
        "vision_last_block": ["out_proj"],
    }


@pytest.mark.slow
def test_paper_schedule_trains_exactly_each_stages_groups(tiny, simple_docs, tmp_path, fresh_accelerate_state):
    """`schedule: paper`: stage 1 changes the visual head, the visual embedding table and the backbone's LAST block
    only; stage 2 the whole visual tokenizer; stage 3 everything. Frozen weights stay bit-identical, and the
    parameters the original never uses (the backbone's final norm, SigLIP's pooling head) never change."""
    from finetune.recipe import load_recipe
    from finetune.training.runner import FineTuneRecipe

    variant, path = tiny
    overrides = {
        "model.family": "ovis",
        "model.path": str(path),
        "tuning.groups": "null",
        "schedule": "paper",
        "eval.max_new_tokens": 8,
        "data.train": str(simple_docs["train"]),
        "data.val": "null",
        "data.test": "null",
        "eval.before_training": False,
        "eval.after_training": False,
        "train.max_steps": 6,
        "train.batch_size": 2,
        "train.checkpoint_every": "null",
        "output.dir": str(tmp_path / "run"),
    }
    job = FineTuneRecipe(load_recipe("quickstart", [f"{k}={v}" for k, v in overrides.items()]))
    job.setup()
    # Ovis1.6 adds DPO after instruction tuning (on the model's own wrong answers here); Ovis2 names no such stage.
    dpo = ["dpo"] if variant == "ovis1.6" else []
    assert [s.name for s in job.stages] == ["visual-head", "visual-tokenizer", "all", *dpo]
    assert [s.kind for s in job.stages] == ["sft"] * 3 + dpo
    never_used = get_family("ovis").never_used_parameters

    def weights():
        return {n: p.detach().clone() for n, p in job.accelerator.unwrap_model(job.model).named_parameters()}

    seen = {"before": weights()}
    last = len(job.accelerator.unwrap_model(job.model).visual_tokenizer.backbone.encoder.layers) - 1

    def check(job, index):
        before, after = seen["before"], weights()
        stage = job.stages[index]
        for name, value in after.items():
            mode = stage.groups[job.family.group_of(name)]
            if mode == "frozen" or name.startswith(never_used):
                assert torch.equal(value, before[name]), f"{stage.name}: {name} changed"
            elif "embed_tokens" not in name:  # rows of unseen tokens get no gradient
                assert not torch.equal(value, before[name]), f"{stage.name}: {name} did not change"
        changed = {n for n, v in after.items() if not torch.equal(v, before[n])}
        backbone = {n for n in changed if n.startswith("visual_tokenizer.backbone.")}
        if index == 0:
            assert backbone and all(f"encoder.layers.{last}." in n for n in backbone)
            assert any(n.startswith("visual_tokenizer.head.") for n in changed) and "vte.weight" in changed
            assert not any(n.startswith("llm.") for n in changed)
        elif index == 1:
            assert any("encoder.layers.0." in n for n in backbone) and not any(n.startswith("llm.") for n in changed)
        else:
            assert any(n.startswith("llm.") for n in changed)
        if index == 3:
            assert changed and all(n.startswith("llm.") for n in changed)
        seen["before"] = after

    job.train(on_stage_end=check)


def test_processor_pads_texts_of_unequal_length_only_when_asked(tiny):
    from PIL import Image

    _, path = tiny
    processor = OvisProcessor.from_pretrained(str(path))
    pages = [[Image.new("RGB", (50, 50))], [Image.new("RGB", (150, 50))]]  # one crop; three crops + thumbnail
    texts = [processor.render_prompt("a", 1), processor.render_prompt("a", 1)]
    with pytest.raises(ValueError, match="padding=True"):
        processor(images=pages, text=texts)
    batch = processor(images=pages, text=texts, padding=True, padding_side="left")
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    assert batch["input_ids"][0, 0] == processor.tokenizer.pad_token_id and batch["attention_mask"][0, 0] == 0
    assert batch["pixel_values"].shape[0] == sum(processor.tiles_for([(50, 50), (150, 50)]))


def test_gemma2_format_refuses_a_system_prompt_and_strips_the_question(tiny):
    variant, path = tiny
    processor = OvisProcessor.from_pretrained(str(path))
    if variant != "ovis1.6":
        system = {"role": "system", "content": "Be brief."}
        assert processor.apply_chat_template([system], tokenize=False).startswith("<|im_start|>system\nBe brief.")
        return
    # The original strips the whole question (images first), so only its ends lose their spaces.
    assert processor.render_prompt("  Read it.  ", 1) == (
        "<bos><start_of_turn>user\n<image>\n  Read it.<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(Exception, match="Gemma does not support system prompt"):
        processor.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


@pytest.mark.slow
def test_tied_head_full_fine_tune_checkpoints_and_resumes_to_the_same_weights(tiny, simple_docs, tmp_path):
    """Gemma2 and small Qwen2 tie their LM head to the embedding table: a checkpoint holds the tensor once (safetensors
    refuses shared storage), and a run resumed from it ends with the uninterrupted run's weights, bit for bit."""
    import shutil

    from tests.conftest import run_train

    _, path = tiny
    args = {
        "model.family": "ovis",
        "model.path": str(path),
        "data.train": str(simple_docs["train"]),
        "data.val": "null",
        "data.test": "null",
        "eval.before_training": False,
        "eval.after_training": False,
        "train.max_steps": 4,
        "train.batch_size": 2,
        "train.checkpoint_every": 2,
    }
    overrides = ["recipe=quickstart"] + [f"{k}={v}" for k, v in args.items()]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_train([*overrides, f"output.dir={full}"])
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    run_train([*overrides, f"output.dir={resumed}", "output.if_exists=resume"])
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "llm.lm_head.weight" not in a  # tied: stored once, as in the AIDC-AI checkpoints


def test_processor_saved_beside_an_adapter_reloads_with_the_same_ids(tiny, tiny_ovis2, tmp_path):
    """An adapter folder holds the processor (tokenizer with the image / indicator tokens, settings) but no model
    config: the ids come back from what was saved, for the original layout and the -hf one alike."""
    from PIL import Image

    _, path = tiny
    hf = write_hf_layout(tiny_ovis2, tmp_path / "hf")
    page = Image.new("RGB", (150, 50), (10, 200, 10))
    for source in (path, hf):
        processor = OvisProcessor.from_pretrained(str(source), max_partition=4)
        processor.save_pretrained(tmp_path / "adapter")
        reloaded = OvisProcessor.from_pretrained(str(tmp_path / "adapter"))
        assert reloaded.token_ids == processor.token_ids and reloaded.settings == processor.settings
        prompt = processor.render_prompt("Read it", 1)
        assert torch.equal(
            processor(images=[[page]], text=[prompt])["input_ids"],
            reloaded(images=[[page]], text=[prompt])["input_ids"],
        )
