"""Deterministic, epoch-seeded sample order, optionally grouped by length to keep padding low."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


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


class MixtureSampler(torch.utils.data.Sampler[int]):
    """Weighted draws from several sources concatenated into one dataset (a stage's `data.mix`).

    Each of the epoch's draws picks a source with probability ∝ its weight, then the next sample of that source's
    own shuffled order (cycling when a small source is drawn more often than it has samples), so within an epoch
    a sample repeats only once its source is exhausted. Each epoch shuffles anew: when an epoch draws fewer
    samples of a source than it holds, which ones varies from epoch to epoch (all are seen over several epochs,
    not necessarily equally often). Seeded with `seed + epoch` like the plain sampler; with `group_by_length`
    the drawn samples are ordered in length-sorted mega-batches the way transformers' sampler does.
    """

    def __init__(
        self,
        lengths: list[int],
        source_sizes: list[int],
        weights: list[float],
        *,
        samples_per_epoch: int,
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
    ):
        if len(source_sizes) != len(weights) or sum(source_sizes) != len(lengths):
            raise ValueError("one weight per source, and source sizes that add up to the dataset")
        self.lengths, self.source_sizes, self.weights = lengths, source_sizes, weights
        self.samples_per_epoch, self.batch_size, self.seed = samples_per_epoch, batch_size, seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        picks = torch.multinomial(
            torch.tensor(self.weights, dtype=torch.float64),
            self.samples_per_epoch,
            replacement=True,
            generator=generator,
        ).tolist()
        offsets = [sum(self.source_sizes[:i]) for i in range(len(self.source_sizes))]
        orders = [torch.randperm(size, generator=generator).tolist() for size in self.source_sizes]
        drawn_so_far = [0] * len(self.source_sizes)
        indices = []
        for source in picks:
            order = orders[source]
            indices.append(offsets[source] + order[drawn_so_far[source] % len(order)])
            drawn_so_far[source] += 1
        if self.group_by_length:
            grouped = get_length_grouped_indices(
                [self.lengths[i] for i in indices], self.batch_size, generator=generator
            )
            indices = [indices[i] for i in grouped]
        return iter(indices)


def batch_stream(train_loader, accelerator, state, batches_per_epoch: int):
    """Micro-batches forever, epoch after epoch, resuming mid-epoch exactly where `state` (a TrainerState) says;
    advances `state.epoch` / `state.batches_in_epoch` as it goes."""
    while True:
        epoch = state.epoch
        train_loader.set_epoch(epoch)
        loader = train_loader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(loader, state.batches_in_epoch)
        for batch in loader:
            state.batches_in_epoch += 1
            if state.batches_in_epoch == batches_per_epoch:
                # Advance now, not after the loop, so a checkpoint taken here says "next epoch, batch 0".
                state.epoch, state.batches_in_epoch = epoch + 1, 0
            yield batch
        if state.epoch == epoch:
            raise RuntimeError(
                f"epoch {epoch} ended after {state.batches_in_epoch} batches, expected {batches_per_epoch}"
            )


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches filled up to a token budget (`train.max_tokens_per_batch`) instead of a fixed number of samples.

    A batch costs what it occupies once right-padded: its longest sample's length (image tokens included: a
    sample's length is its whole prompt and answer) times its size. The batches are packed once: the samples in
    length order (`group_by_length`, longest first) or in one seeded random order, cut greedily into consecutive
    batches of at most `max_samples` that stay within the budget. Fixed batches keep an epoch's batch count the same
    every epoch (the schedule, the epoch accounting and an exact resume rely on it) and lose nothing: the loss sums
    over every label token of an optimizer step's micro-batches, so which samples share a micro-batch does not
    change a step's gradient, only which step they land in. Each epoch shuffles the batch order (`seed + epoch`),
    and the costliest batch comes first, so a budget the memory cannot hold fails at step 1, not hours later.
    """

    def __init__(
        self, lengths: list[int], *, max_tokens: int, max_samples: int, seed: int, group_by_length: bool = True
    ):
        if not lengths or max(lengths) > max_tokens:
            raise ValueError("every sample must fit the token budget (checked by the caller, with its name)")
        self.max_tokens, self.seed, self.epoch = max_tokens, seed, 0
        if group_by_length:
            # Longest first; ties in index order, so the packing does not depend on the sort's stability.
            order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        else:
            order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.batches: list[list[int]] = []
        longest = 0
        for index in order:
            batch = self.batches[-1] if self.batches else None
            grown = max(longest, lengths[index])
            if batch is not None and len(batch) < max_samples and grown * (len(batch) + 1) <= max_tokens:
                batch.append(index)
                longest = grown
            else:
                self.batches.append([index])
                longest = lengths[index]
        self.costs = [max(lengths[i] for i in batch) * len(batch) for batch in self.batches]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        """Itself: where Accelerate sets the epoch once it shards this batch sampler across processes (it looks for
        `batch_sampler.sampler.set_epoch`, as on a torch BatchSampler)."""
        return self

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.batches), generator=generator).tolist()
        costliest = max(range(len(self.batches)), key=lambda b: (self.costs[b], -b))
        order.remove(costliest)
        for b in [costliest, *order]:
            yield list(self.batches[b])
