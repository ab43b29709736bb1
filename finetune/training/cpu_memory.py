"""Resident memory of a long CPU run: glibc's heap, not a leak (BENCHMARKS.md, "Resident memory over a long run").

glibc's malloc serves a block of at least its mmap threshold with a mapping of its own, returned to the system when
freed; smaller blocks come from its heap, whose freed memory it keeps. The threshold starts at 128 KiB and rises (up
to 32 MiB) each time a mapped block is freed, so after the first steps of training most activations come from the
heap. With length-grouped batches every step asks for blocks of new sizes, the heap cannot reuse all it holds, and
the resident size climbs step after step: in bf16 by ~120 MiB a step on a 28 M-parameter model with ~2,500-token
invoices (fp32's blocks, twice as large, more often stay mapped, and its curve goes up and down instead).

What is done about it: after an optimizer step, when the process's resident memory has grown by a quarter over its
steady state, `malloc_trim(0)` gives the heap's free pages back to the system (glibc also releases free pages in the
middle of the heap). Trimming after every step costs 10-40% of the step time on that benchmark (the next step faults
the pages in again); trimming on growth pays that every few steps. Keeping large blocks mapped instead (a fixed
`M_MMAP_THRESHOLD`) holds memory as low but cost ~60%. CPU training only (on a GPU activations live in CUDA's
allocator); nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

GROWTH = 1.25  # trim once resident memory is a quarter above what it was after the last trim


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_mib() -> float | None:
    """This process's resident memory (Linux's VmRSS), or None where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return kib / 1024 if kib is not None else None


class HeapTrimmer:
    """Called after every optimizer step of a CPU run. The resident memory after a step, free heap pages included
    (reused by the next step), is its steady state; once it has grown by `GROWTH` over the first reading since the
    last trim, the free pages go back to the system and the next step sets the steady state afresh. So memory stays
    within `GROWTH` of one step's needs, and the cost of faulting pages in again is paid every few steps, not every
    step (see the module docstring)."""

    def __init__(self, growth: float = GROWTH):
        self.trim = _malloc_trim()
        self.growth = growth
        self.baseline: float | None = None
        self.trims = 0

    def after_step(self) -> None:
        if self.trim is None:
            return
        now = resident_mib()
        if now is None:
            return
        if self.baseline is None:
            self.baseline = now
        elif now > self.baseline * self.growth:
            self.trim(0)
            self.trims += 1
            self.baseline = None
