"""The contract every registered model family satisfies, checked on each of its tiny presets.

Parametrised from `FAMILY_CLASSES` × `cls.tiny_presets`, so a new family (or preset) is covered by adding it to the
registry. What the generic data, training and evaluation code relies on:

1. `count_prompt_tokens` (used to drop over-length samples without processing pixels) equals the processed length;
2. every parameter is in exactly one module group, and every group prefix is used;
3. the default LoRA targets of each group match modules of that group only, and LoRA on the LLM wraps nothing else;
4. only the answer's tokens and the end-of-turn token carry labels, and the prompt and end-of-turn token are the
   chat template's;
5. the trainer's loss and gradients (no padding mask, logits only where a label follows) equal transformers' own;
6. a saved full model and a saved LoRA adapter reload with identical logits;
7. batched left-padded greedy generation equals one-at-a-time generation;
8. (slow) a real training run overfits 8 forms to 100% exact match.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from finetune.config import TuningSection
from finetune.data.dataset import Collator, DocumentDataset, load_image, prepare_samples
from finetune.data.prompt import canonical_json, render_instruction
from finetune.models import FAMILY_CLASSES, get_family
from finetune.models.base import IGNORE_INDEX, ModelFamily
from finetune.training.loss import causal_lm_loss
from finetune.training.tuning import apply_tuning
from tests.conftest import run_train

SKELETON = {"number": "", "total": ""}
INSTRUCTION = render_instruction("Extract the details into JSON format:", SKELETON)
FULL = {"vision": "full", "projector": "full", "llm": "full"}

CASES = [
    pytest.param((cls.name, preset), id=f"{cls.name}-{preset}") for cls in FAMILY_CLASSES for preset in cls.tiny_presets
]
# The overfit run proves that image tokens, labels, loss and generation line up, which does not depend on the
# model's size: it runs on every preset but the `quickstart` ones, which are sized to learn 2,000 forms (2-3x the
# step time: 5.5 of the suite's minutes for the two). Every other contract check runs on them too, and
# Mississippi's is trained end to end by scripts/quickstart.sh and bench_learn.py's smoke test.
OVERFIT_CASES = [case for case in CASES if case.values[0][1] != "quickstart"]


@dataclass
class Case:
    family: ModelFamily
    preset: str
    path: str
    processor: Any

    def load_model(self, path: str | Path | None = None) -> torch.nn.Module:
        return self.family.load_model(str(path or self.path))

    def dataset(self, source, skeleton: dict = SKELETON, instruction: str = INSTRUCTION, processor=None):
        processor = processor or self.processor
        samples, report = prepare_samples(
            source,
            split="train",
            family=self.family,
            processor=processor,
            instruction_text=instruction,
            skeleton=skeleton,
            max_length=16384,
        )
        assert report.kept == report.read, report.summary()
        return samples, DocumentDataset(samples, family=self.family, processor=processor, instruction_text=instruction)

    def batch(self, dataset, padding_side: str = "right", processor=None) -> dict[str, Any]:
        processor = processor or self.processor
        collate = Collator(self.family, processor.tokenizer.pad_token_id, padding_side=padding_side)
        batch = collate([dataset[i] for i in range(len(dataset))])
        batch.pop("index")
        return batch


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory) -> Case:
    """One family with one tiny preset: its checkpoint (built once for this module) and processor."""
    name, preset = request.param
    family = get_family(name)
    path = family.build_tiny_checkpoint(tmp_path_factory.mktemp(f"{name}-{preset}"), **family.tiny_presets[preset])
    family = family.for_checkpoint(str(path))  # the generic family reads its groups from the checkpoint
    return Case(family, preset, str(path), family.load_processor(str(path)))


@pytest.fixture(scope="module")
def model(case) -> torch.nn.Module:
    """The case's model, for the tests that only read it."""
    return case.load_model()


@torch.no_grad()
def perturb(parameters, std: float, seed: int = 0) -> None:
    """Add seeded Gaussian noise to parameters (a stand-in for training that every family's weights can take)."""
    generator = torch.Generator().manual_seed(seed)
    for param in parameters:
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def varied_docs(tmp_path_factory) -> Path:
    """Three samples whose prompts differ in length (page shapes tile differently; one has two pages)."""
    folder = tmp_path_factory.mktemp("varied")
    pages = {"square.png": (64, 64), "wide.png": (150, 50), "tall.png": (50, 110)}
    for seed, (name, size) in enumerate(pages.items()):
        noise_image(size, seed).save(folder / name)
    rows = [
        {"image": "square.png", "target": {"number": "7", "total": "1.00"}},
        {"image": "wide.png", "target": {"number": "12345", "total": "99.99"}},
        {"image": ["tall.png", "square.png"], "target": {"number": "42", "total": "5.5"}},
    ]
    path = folder / "varied.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- 1. token counts ---------------------------------------------------------------------------------------------

PAGE_SIZES = {
    "tall": [(600, 4000)],
    "wide": [(3000, 800)],
    "tiny": [(20, 20)],
    "square": [(128, 128)],
    "two-images": [(64, 200), (300, 120)],
    "three-images": [(64, 200), (300, 120), (90, 90)],  # several pages are labelled in some families' prompts
}


@pytest.mark.parametrize("sizes", list(PAGE_SIZES.values()), ids=list(PAGE_SIZES))
def test_counted_prompt_tokens_equal_processed_tokens(case, sizes, tmp_path):
    family, processor = case.family, case.processor
    images = [noise_image(size, seed) for seed, size in enumerate(sizes)]
    prompt = family.render_prompt(processor, INSTRUCTION, len(images))
    encoded = family.encode_prompt(processor, images, prompt)
    assert family.count_prompt_tokens(processor, prompt, sizes) == len(encoded.input_ids)
    assert encoded.input_ids.count(processor.image_token_id) >= len(images)

    # The same through the data pipeline: the measured sample length is the item's length.
    names = []
    for i, image in enumerate(images):
        names.append(f"page{i}.png")
        image.save(tmp_path / names[-1])
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps({"image": names, "target": {"number": "1", "total": "2"}}) + "\n")
    samples, dataset = case.dataset(source)
    assert len(dataset[0]["input_ids"]) == samples[0].length


# --- 2. module groups ---------------------------------------------------------------------------------------------


def test_every_parameter_is_in_exactly_one_group(case, model):
    prefixes = case.family.group_prefixes
    wrong, used = {}, set()
    for name, _ in model.named_parameters():
        groups = [group for group, group_prefixes in prefixes.items() if name.startswith(group_prefixes)]
        if len(groups) != 1:
            wrong[name] = groups
        used.update(prefix for group in groups for prefix in prefixes[group] if name.startswith(prefix))
    assert not wrong, f"parameters in no group or in several: {wrong}"
    unused = [prefix for group_prefixes in prefixes.values() for prefix in group_prefixes if prefix not in used]
    assert not unused, f"group prefixes that match no parameter: {unused}"


# --- 3. LoRA targets ----------------------------------------------------------------------------------------------


def test_default_lora_targets_match_modules_of_their_group_only(case, model):
    family = case.family
    assert set(family.default_lora_targets) <= set(family.group_prefixes)
    modules = dict(model.named_modules())
    for group, leaves in family.default_lora_targets.items():
        pattern = re.compile(family.lora_target_regex({group: leaves}))
        matched = [name for name in modules if pattern.fullmatch(name)]  # PEFT matches a regex with fullmatch
        unmatched_leaves = [leaf for leaf in leaves if not any(f".{name}".endswith(f".{leaf}") for name in matched)]
        assert not unmatched_leaves, f"{group}: default targets {unmatched_leaves} match no module"
        for name in matched:
            parameters = [f"{name}.{p}" for p, _ in modules[name].named_parameters()]
            outside = [p for p in parameters if family.group_of(p) != group]
            assert parameters and not outside, f"{group} target {name} holds parameters of other groups: {outside}"


def test_lora_on_the_llm_wraps_only_llm_modules(case):
    from peft.tuners.lora import LoraLayer

    family = case.family
    base = case.load_model()
    llm = re.compile(family.lora_target_regex({"llm": family.default_lora_targets["llm"]}))
    expected = {name for name, _ in base.named_modules() if llm.fullmatch(name)}
    model, plan = apply_tuning(base, family, TuningSection())
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert wrapped == expected and wrapped
    outside = [name for name in wrapped if family.group_of(f"{name}.weight") != "llm"]
    assert not outside, f"LoRA wrapped modules outside the llm group: {outside}"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name and family.group_of(name) == "llm" for name in trainable)
    assert set(plan.trainable) == {"llm"}


# --- 4. labels ----------------------------------------------------------------------------------------------------


def test_only_the_answer_and_the_end_of_turn_token_carry_labels(case, simple_docs, varied_docs):
    family, processor = case.family, case.processor
    tokenizer = processor.tokenizer
    end_of_turn = family.end_of_turn_token(processor)
    one_page, two_pages = case.dataset(simple_docs["train"]), case.dataset(varied_docs)
    for samples, dataset, index in [(*one_page, 0), (*two_pages, 2)]:
        sample, item = samples[index], dataset[index]
        ids, labels = item["input_ids"], item["labels"]
        labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert tokenizer.decode([labels[i] for i in labelled]) == canonical_json(sample.target, SKELETON) + end_of_turn
        n = len(labelled)
        assert labelled == list(range(len(ids) - n, len(ids))), "labelled tokens are not the sequence's last ones"
        assert labels[-n:] == ids[-n:]
        # Everything before them is the prompt as the family encodes it, image tokens included.
        images = [load_image(ref) for ref in sample.images]
        prompt = family.encode_prompt(processor, images, family.render_prompt(processor, INSTRUCTION, len(images)))
        assert ids[:-n] == prompt.input_ids
        assert ids[:-n].count(processor.image_token_id) >= len(images)


@pytest.mark.parametrize("num_images", [1, 2, 3], ids=["one-image", "two-images", "three-images"])
def test_prompt_and_end_of_turn_token_are_the_chat_templates(case, num_images):
    """What the model is trained on is what its saved chat template writes (so whoever serves it prompts it the same
    way), and the labelled end-of-turn token is the one that closes the assistant's turn there."""
    family, processor = case.family, case.processor
    if (
        hasattr(processor, "chat_template") and not processor.chat_template
    ):  # PaliGemma's pt checkpoints: the processor frames the prompt, EOS ends the answer
        images = [noise_image((64, 64), i) for i in range(num_images)]
        stock = processor(images=[images], text=[INSTRUCTION], suffix=["x"], return_tensors="pt")
        encoded = family.encode_prompt(processor, images, family.render_prompt(processor, INSTRUCTION, num_images))
        labelled = stock["labels"][0] != IGNORE_INDEX
        assert stock["input_ids"][0][~labelled].tolist() == encoded.input_ids
        assert family.end_of_turn_token(processor) == processor.tokenizer.eos_token
        assert processor.tokenizer.decode(stock["input_ids"][0][labelled][-1:]) == processor.tokenizer.eos_token
        return
    user = {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": INSTRUCTION}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    assert family.render_prompt(processor, INSTRUCTION, num_images) == prompt
    answer = canonical_json({"number": "12345", "total": "9.99"}, SKELETON)
    assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    conversation = processor.apply_chat_template([user, assistant], tokenize=False)
    assert conversation.split(answer, 1)[1].startswith(family.end_of_turn_token(processor))
    assert processor.tokenizer.convert_tokens_to_ids(family.end_of_turn_token(processor)) in family.stop_token_ids(
        processor
    )


# --- 5. loss ------------------------------------------------------------------------------------------------------


def test_trainer_loss_and_gradients_equal_transformers_with_padding_mask(case, varied_docs):
    """The trainer runs without the padding mask and asks for logits only where a label follows; on a right-padded
    batch of unequal lengths that must give transformers' own loss (masked attention, full logits) and gradients."""
    family = case.family
    _, dataset = case.dataset(varied_docs)
    batch = case.batch(dataset)
    padding = 1 - batch["attention_mask"].float().mean().item()
    assert padding > 0.02, "the batch must hold sequences of unequal length"

    model, _ = apply_tuning(case.load_model(), family, TuningSection(groups=FULL))
    model.eval()  # no dropout: both passes must compute the same function
    label_tokens = (batch["labels"] != IGNORE_INDEX).sum()

    reference = model(**batch, num_items_in_batch=label_tokens).loss  # transformers: masked, full logits
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    inputs = family.training_inputs(batch)
    if "attention_mask" in inputs:  # only a prefix-LM (PaliGemma) keeps it: the answer is typed apart from the prompt
        types, answer = batch["token_type_ids"], batch["labels"] != IGNORE_INDEX
        prompt = ~answer & (batch["attention_mask"] == 1)
        assert set(types[answer].tolist()).isdisjoint(types[prompt].tolist())
    loss = causal_lm_loss(model, inputs, label_tokens)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


# --- 6. save and reload -------------------------------------------------------------------------------------------


def test_saved_full_model_reloads_with_identical_logits(case, varied_docs, tmp_path):
    family = case.family
    _, dataset = case.dataset(varied_docs)
    batch = case.batch(dataset)
    model = case.load_model().eval()
    with torch.no_grad():
        base = model(**batch).logits
    perturb(model.parameters(), std=0.02)  # as if trained: no weight is the checkpoint's any more
    with torch.no_grad():
        expected = model(**batch).logits
    assert not torch.allclose(base, expected, atol=1e-3)
    family.save_pretrained(model, case.processor, tmp_path / "final", source_path=case.path)

    processor = family.load_processor(str(tmp_path / "final"))
    _, reloaded_dataset = case.dataset(varied_docs, processor=processor)
    reloaded_batch = case.batch(reloaded_dataset, processor=processor)
    assert reloaded_batch.keys() == batch.keys()
    for key, value in batch.items():  # the saved processor prepares the same inputs
        assert torch.equal(reloaded_batch[key], value), key
    reloaded = case.load_model(tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
    if family.saves_transformers_layout:  # transformers' own class reads it too (as servers and users do)
        stock = AutoModelForImageTextToText.from_pretrained(tmp_path / "final").eval()
        with torch.no_grad():
            torch.testing.assert_close(stock(**batch).logits, expected, rtol=0, atol=1e-5)


def test_saved_lora_adapter_reloads_with_identical_logits(case, varied_docs, tmp_path):
    """LoRA on the LLM with the projector trained fully (saved beside the adapter as PEFT modules_to_save)."""
    from peft import PeftModel

    family = case.family
    _, dataset = case.dataset(varied_docs)
    batch = case.batch(dataset)
    groups = {"vision": "frozen", "projector": "full", "llm": "lora"}
    model, _ = apply_tuning(case.load_model(), family, TuningSection(groups=groups))
    model.eval()
    with torch.no_grad():
        base = model(**batch).logits  # LoRA B starts at zero: the base model's logits
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_B." in name for name in trainable) and any(".modules_to_save." in name for name in trainable)
    perturb(trainable.values(), std=0.05)  # as if trained: adapter and projector copy both differ from the start
    with torch.no_grad():
        expected = model(**batch).logits
    assert not torch.allclose(base, expected, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(case.load_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)


# --- 7. generation ------------------------------------------------------------------------------------------------


def test_batched_left_padded_generation_equals_one_at_a_time(case, varied_docs):
    family, processor = case.family, case.processor
    samples, _ = case.dataset(varied_docs)
    dataset = DocumentDataset(
        samples, family=family, processor=processor, instruction_text=INSTRUCTION, with_answer=False
    )
    model = case.load_model().eval()
    stop = family.stop_token_ids(processor)

    def generate(indices: list[int]) -> tuple[list[list[int]], torch.Tensor]:
        batch = case.batch(torch.utils.data.Subset(dataset, indices), padding_side="left")
        batch.pop("labels")
        with torch.no_grad():  # as finetune.evaluation generates
            output = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=stop,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        return [_until_stop(row, stop) for row in output[:, batch["input_ids"].shape[1] :].tolist()], batch[
            "attention_mask"
        ]

    indices = list(range(len(dataset)))
    # A freshly initialised tiny model writes one token over and over: add noise until the continuations differ.
    for seed, std in enumerate((0.05, 0.05, 0.1, 0.2)):
        perturb(model.parameters(), std=std, seed=seed)
        batched, mask = generate(indices)
        if len({tuple(tokens) for tokens in batched}) == len(indices) and all(len(t) > 2 for t in batched):
            break
    assert (mask == 0).any(), "the samples must differ in length, so that the batch is padded"
    one_at_a_time = [generate([i])[0][0] for i in indices]
    assert batched == one_at_a_time
    # Not vacuous: the continuations depend on the input (so a padding error would change them) and run on.
    assert len({tuple(tokens) for tokens in batched}) == len(indices), batched
    assert all(len(tokens) > 2 for tokens in batched), batched


def _until_stop(tokens: list[int], stop: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens


# --- 8. training --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_forms(tmp_path_factory) -> dict[str, Path]:
    """8 training forms of the quickstart's kind (a 5-digit number on a 64 px page: one tile or crop in every
    preset, so each run stays short)."""
    from finetune.synthetic.invoices import write_dataset

    return write_dataset(tmp_path_factory.mktemp("digits"), seed=0, n_train=8, n_val=1, n_test=1, preset="digits")


@pytest.mark.slow
@pytest.mark.parametrize("case", OVERFIT_CASES, indirect=True)
def test_full_fine_tune_overfits_eight_forms_to_full_exact_match(case, digit_forms, tmp_path):
    """A real run through `accelerate launch finetune/train.py`: that the model learns to read all 8 training
    forms shows that image tokens, labels, loss and generation line up end to end."""
    out = tmp_path / "run"
    overrides = {
        "model.family": case.family.name,
        "model.path": case.path,
        "data.train": digit_forms["train"],
        "data.val": digit_forms["train"],  # evaluate on the 8 training forms
        "data.test": "null",
        "data.max_length": 4096,
        "tuning.groups": "{vision: full, projector: full, llm: full}",
        "tuning.gradient_checkpointing": False,
        "optim.lr": 1e-3,
        "optim.weight_decay": 0.0,
        "optim.warmup_ratio": 0.0,
        "train.max_steps": 300,
        "train.batch_size": 8,
        "train.grad_accum": 1,
        "train.precision": "fp32",
        "train.seed": 0,
        "train.checkpoint_every": "null",
        "train.log_every": 1,
        "eval.batch_size": 8,
        "eval.max_new_tokens": 32,
        "output.dir": out,
    }
    run_train(["recipe=quickstart"] + [f"{key}={value}" for key, value in overrides.items()])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["json_exact_match"] == 0.0
    assert metrics["after"]["json_exact_match"] == 1.0, (out / "predictions.jsonl").read_text()[:2000]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]
    # Every step is one batch of all 8 forms: the same samples, tokens and padding on every log line.
    assert {(r["samples"], r["tokens"], r["padded_positions"]) for r in log} == {
        (8, log[0]["tokens"], log[0]["padded_positions"])
    }
    assert all(r["seconds"] > 0 for r in log)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(p["exact_match"] for p in predictions)
    for name in ("recipe.yaml", "data_report.json", "metrics.json", "predictions.jsonl", "train_log.jsonl"):
        assert (out / name).exists(), name
    # The saved model and processor load back through the family.
    case.family.load_model(str(out / "final"))
    case.family.load_processor(str(out / "final"))
