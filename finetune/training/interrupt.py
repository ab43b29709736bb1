"""Ctrl-C during training: finish the optimizer step that is running, save a checkpoint, stop with a resume hint.

A first SIGINT only sets a flag that the loop reads after each optimizer step; a second one interrupts at once
(Python's default). Under several processes the SIGINT reaches every rank (from the terminal, or forwarded by
torch elastic's agent), but not necessarily before the same step: the ranks agree on the flag with one
all-reduce per step, so they stop after the same step and save one consistent checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import torch


class InterruptFlag:
    """Set by SIGINT while `catching()` is active."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce  # only the main process says so, once

    @contextlib.contextmanager
    def catching(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.requested:  # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.requested = True
            if self.announce:
                # A new line first only on a terminal, where a progress bar may hold the current one.
                start = "\n" if sys.stderr.isatty() else ""
                sys.stderr.write(
                    f"{start}[finetune] Ctrl-C: finishing this step and saving a checkpoint "
                    "(Ctrl-C again stops at once)\n"
                )

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def agreed(self, accelerator) -> bool:
        """Whether any process was interrupted (every process must call this after every step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
