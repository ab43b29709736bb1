"""Throughput and padding between two log lines: what `train_log.jsonl` reports besides the loss."""

from __future__ import annotations

import time

import torch

from finetune.training.cpu_memory import resident_mib


class Throughput:
    """Counts samples, real tokens and padded positions of the micro-batches since the last `take()`.

    `tokens` are the positions the attention mask keeps (image tokens included); `positions` are every position
    the batches computed, padding included, so `padding` is the share of the compute spent on padding. The
    counts are this process's; `take(reduce)` sums them over the job's processes with `reduce` (a collective:
    every rank must call it at the same step).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.samples = self.tokens = self.positions = 0
        self.started = time.perf_counter()

    def add(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        self.samples += int(mask.shape[0])
        self.tokens += int(mask.sum())
        self.positions += int(mask.numel())

    def take(self, reduce=None) -> dict[str, float]:
        """The interval's totals and rates (summed over processes by `reduce`), then start a new interval."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        counts = torch.tensor([self.samples, self.tokens, self.positions], dtype=torch.float64)
        samples, tokens, positions = (int(c) for c in (reduce(counts) if reduce else counts).tolist())
        self.reset()
        return {
            "seconds": seconds,
            "samples": samples,
            "tokens": tokens,
            "padded_positions": positions - tokens,
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "padding": (positions - tokens) / positions if positions else 0.0,
        }


def memory_mib(device: torch.device) -> dict[str, float]:
    """What a log line says of memory: on a GPU the allocator's peak since the previous call (`cuda_peak_mib`,
    then reset), elsewhere this process's resident memory now (`rss_mib`, Linux's VmRSS; nothing where /proc is
    missing). A curve of it over a run shows a leak or a plateau."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {"cuda_peak_mib": peak}
    rss = resident_mib()
    return {"rss_mib": rss} if rss is not None else {}
