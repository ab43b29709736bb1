"""The trainer's loss path: no padding mask (causal attention) and logits only where a label follows must give
transformers' own loss and gradients on right-padded batches of unequal lengths, for every family."""

from __future__ import annotations

import pytest
import torch

from finetune.config import TuningSection
from finetune.data.dataset import Collator, DocumentDataset, prepare_samples
from finetune.data.prompt import derive_skeleton, render_instruction
from finetune.data.sources import read_records
from finetune.models import get_family
from finetune.models.base import IGNORE_INDEX
from finetune.training.loss import causal_lm_loss, predicting_positions
from finetune.training.tuning import apply_tuning


def test_predicting_positions_are_those_before_a_label_in_any_row():
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7]]
    )
    assert predicting_positions(labels).tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "family_name, checkpoint", [("mississippi", "tiny_mississippi"), ("llava_onevision", "tiny_llava")]
)
def test_trainer_loss_equals_transformers_loss_with_padding_mask(family_name, checkpoint, invoice_docs, request):
    family = get_family(family_name)
    path = str(request.getfixturevalue(checkpoint))
    processor = family.load_processor(path)
    skeleton = derive_skeleton(r.target for r in read_records(invoice_docs["train"]))
    instruction = render_instruction("Read the invoice as JSON:", skeleton)
    samples, _ = prepare_samples(
        invoice_docs["train"],
        split="train",
        family=family,
        processor=processor,
        instruction_text=instruction,
        skeleton=skeleton,
        max_length=16384,
    )
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=instruction)
    batch = Collator(family, processor.tokenizer.pad_token_id, padding_side="right")([dataset[i] for i in range(3)])
    batch.pop("index")
    padding = 1 - batch["attention_mask"].float().mean().item()
    assert padding > 0.02, "the batch must hold sequences of unequal length"

    model, _ = apply_tuning(
        family.load_model(path), family, TuningSection(groups={"vision": "full", "projector": "full", "llm": "full"})
    )
    model.eval()  # no dropout: both passes must compute the same function
    label_tokens = (batch["labels"] != IGNORE_INDEX).sum()

    reference = model(**batch, num_items_in_batch=label_tokens).loss  # transformers: masked, full logits
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    inputs = family.training_inputs(batch)
    assert "attention_mask" not in inputs
    loss = causal_lm_loss(model, inputs, label_tokens)
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_inputs_refuse_a_left_padded_batch():
    # Without the mask, the real tokens of a left-padded row would attend to the pads before them.
    family = get_family("mississippi")
    right = {
        "input_ids": torch.ones(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    assert "attention_mask" not in family.training_inputs(right)
    left = {**right, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    with pytest.raises(ValueError, match="right-padded"):
        family.training_inputs(left)
