"""CPU training gives the memory glibc keeps after freeing activations back (finetune/training/cpu_memory.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)

# Large blocks of a size glibc has learnt to serve from its heap (a freed 24 MiB mapping raised its threshold), each
# pinned by a small block above it, freed: what stays resident is what the heap keeps.
SCRIPT = """
import sys
from pathlib import Path

def rss_mib():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024

from finetune.training.cpu_memory import HeapTrimmer

trimmer = HeapTrimmer()
trimmer.after_step()  # the first call reads the steady state
freed = bytearray(24 * 2**20)
del freed
before = rss_mib()
blocks, pins = [], []
for _ in range(10):
    blocks.append(bytearray(16 * 2**20))
    pins.append(bytearray(64 * 1024))
del blocks
if sys.argv[1] == "trimmed":
    trimmer.after_step()
print("trims", trimmer.trims)
print("kept", rss_mib() - before)
"""


def kept_mib(mode: str) -> tuple[int, float]:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        cwd=REPO,
        env=os.environ,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    return int(lines["trims"]), float(lines["kept"])


def test_a_step_after_the_heap_grew_gives_freed_blocks_back():
    trims, kept = kept_mib("untrimmed")
    assert trims == 0 and kept > 100  # glibc's own behaviour: 160 MiB of freed blocks stay resident
    trims, kept = kept_mib("trimmed")
    assert trims == 1 and kept < 20
