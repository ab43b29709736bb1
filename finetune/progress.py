"""Progress and status lines on stderr, for a terminal and for a log file alike.

On a terminal, `Progress` is a tqdm bar on stderr. Anywhere else (a log file, a pipe, a CI job) a bar would write a
carriage-return update many times a second into the file, so it writes a plain line instead every `interval`
seconds (default 30; the environment variable FINETUNE_PROGRESS_INTERVAL overrides the default) and one at the
end::

    [finetune] stage 1/1 lora: 120/2000 (6%), 35.2 step/s, ETA 0:53, loss=0.1234

`info` prints a `[finetune] ...` line without breaking a live bar. Nothing here writes to stdout, which carries only
machine-readable output (predictions, metrics).
"""

from __future__ import annotations

import numbers
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines


class Progress:
    """A progress display for `total` units (None: unknown), starting at `initial`; also a context manager.

    `stream` defaults to the current `sys.stderr`; `interval` (seconds between plain lines when `stream` is not a
    terminal) defaults to FINETUNE_PROGRESS_INTERVAL or 30 s. `disable=True` shows nothing (e.g. on all but the
    main process)."""

    def __init__(
        self,
        total: int | None,
        *,
        desc: str,
        initial: int = 0,
        unit: str = "it",
        disable: bool = False,
        stream: IO[str] | None = None,
        interval: float | None = None,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self._postfix = ""
        self._closed = disable
        self._bar = None
        if disable:
            return
        if _is_terminal(self.stream):
            # leave=None: a top-level bar stays on screen when done, a nested one (an evaluation inside a training
            # stage) disappears.
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=None
            )
            return
        self.interval = interval if interval is not None else _interval_from_env()
        self._start = self._last_line = time.monotonic()
        self._last_state: tuple | None = None

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""
        if self._closed:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_line >= self.interval:
            self._write_line()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the counts (`loss=0.1234`); floats get 4 significant digits."""
        if self._closed:
            return
        self._postfix = ", ".join(f"{key}={_format_value(value)}" for key, value in values.items())
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix, refresh=False)  # shown at the next update, rate-limited

    def close(self) -> None:
        """End the display: the bar's last state, or one final plain line. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._last_state != self._state():  # the final line, unless the last periodic one said the same
            self._write_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- plain lines ---

    def _state(self) -> tuple:
        return (self.n, self._postfix)

    def _write_line(self) -> None:
        now = time.monotonic()
        done = self.n - self._initial
        elapsed = now - self._start
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {self.unit}"]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}")
            if self.total and self.n < self.total:
                parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        elif self.total is None or self.n < self.total:
            parts.append(f"{_clock(elapsed)} elapsed")
        if self._postfix:
            parts.append(self._postfix)
        info(f"{self.desc}: {', '.join(parts)}", stream=self.stream)
        self._last_line = now
        self._last_state = self._state()


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", disable: bool = False
) -> Iterator[T]:
    """Iterate over `iterable` with a `Progress` (total: `len(iterable)` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc=desc, unit=unit, disable=disable) as bar:
        for item in iterable:
            yield item
            bar.update()


def progress_if_slow(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    disable: bool = False,
    more_than: int = 16,
    after_seconds: float = 1.0,
) -> Iterator[T]:
    """Like `progress`, but for work that is often quick: shown from the start when there are more than
    `more_than` items, otherwise only once the items after the first have taken longer than `after_seconds` (a
    handful of test samples should not print a progress line)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or (total is not None and total > more_than):
        yield from progress(iterable, desc=desc, total=total, unit=unit, disable=disable)
        return
    start, done, bar = None, 0, None
    try:
        for item in iterable:
            yield item
            done += 1
            if bar is not None:
                bar.update()
            elif start is None:  # timed from the end of the first item: one-off warm-up (imports, caches) aside
                start = time.monotonic()
            elif time.monotonic() - start > after_seconds:
                bar = Progress(total, desc=desc, initial=done, unit=unit)
    finally:
        if bar is not None:
            bar.close()


def info(message: str, *, stream: IO[str] | None = None) -> None:
    """Print `[finetune] message` on stderr (or `stream`), clearing and redrawing a live bar around it."""
    tqdm.write(f"[finetune] {message}", file=stream if stream is not None else sys.stderr)


def is_main_process() -> bool:
    """Whether this is the process that reports (rank 0), for code that has no `Accelerator` at hand: the process
    group's rank once it exists, else the RANK variable every torch / Accelerate launcher sets."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _interval_from_env() -> float:
    value = os.environ.get("FINETUNE_PROGRESS_INTERVAL")
    if not value:
        return DEFAULT_INTERVAL
    try:
        return max(0.0, float(value))
    except ValueError:
        from finetune.errors import UserError

        raise UserError(f"FINETUNE_PROGRESS_INTERVAL={value!r}: expected a number of seconds") from None


def _format_value(value: Any) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # numpy floats too
        return f"{float(value):.4g}"
    return str(value)


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
