"""Deterministic, epoch-seeded sample order, optionally grouped by length to keep padding low."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class EpochLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Shuffles with `seed + epoch`, so a resumed run replays exactly the same order.

    With `group_by_length`, transformers' LengthGroupedSampler sorts each shuffled mega-batch (50 batches) by
    length, so batches hold samples of similar length (little padding) while the order stays random. Accelerate
    calls `set_epoch` through its data-loader wrapper.
    """

    def __init__(self, lengths: list[int], *, batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.group_by_length:
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        return iter(LengthGroupedSampler(self.batch_size, lengths=self.lengths, generator=generator))
