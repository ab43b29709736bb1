"""The trainer's loss path, family-independent parts. That its loss and gradients equal transformers' own on
right-padded batches of unequal lengths is checked for every family in test_family_contract.py."""

from __future__ import annotations

import pytest
import torch

from finetune.models import get_family
from finetune.models.base import IGNORE_INDEX
from finetune.training.loss import predicting_positions


def test_predicting_positions_are_those_before_a_label_in_any_row():
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7]]
    )
    assert predicting_positions(labels).tolist() == [1, 2, 3]


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
