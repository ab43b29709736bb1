"""Throughput and padding between two log lines: what `train_log.jsonl` reports besides the loss."""

from __future__ import annotations

import time


class Throughput:
    """Counts samples, real tokens and padded positions of the micro-batches since the last `take()`.

    `tokens` are the positions the attention mask keeps (image tokens included); `positions` are every position
    the batches computed, padding included, so `padding` is the share of the compute spent on padding. The
    numbers are this process's; `take(processes)` scales the rates to the whole job (ranks get equal batches).
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

    def take(self, processes: int = 1) -> dict[str, float]:
        """The interval's totals and rates (all processes), then start a new interval."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        record = {"seconds": seconds, "samples": self.samples * processes, "tokens": self.tokens * processes,
                  "padded_positions": (self.positions - self.tokens) * processes,
                  "samples_per_s": self.samples * processes / seconds,
                  "tokens_per_s": self.tokens * processes / seconds,
                  "padding": (self.positions - self.tokens) / self.positions if self.positions else 0.0}
        self.reset()
        return record
