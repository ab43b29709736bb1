"""The `finetune` command: `finetune train | eval | predict | merge | publish`, and the error boundary of every entry
point (`finetune ...`, `python -m finetune.<command>`, `accelerate launch finetune/train.py`).

    finetune train recipe=invoices train.max_steps=200           # one process, in this one
    finetune train --num-processes 4 recipe=invoices             # four, through Accelerate's launcher
    finetune eval --model runs/invoices --data test
    finetune predict --model runs/invoices scans/ > predictions.jsonl

Exit codes: 0 done; 2 a mistake the user can fix (a recipe key, a missing file, bad data, a wrong option), shown as
one line `error: ...` on stderr; 130 stopped by Ctrl-C (one line: what was saved and how to resume); anything else
is a bug and keeps its traceback (exit 1). Stdout carries only machine-readable output (predict's JSON Lines,
eval's metrics); logs, warnings and progress go to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable

from finetune.atomic import WRITE_ERRNOS, describe_errno
from finetune.errors import Interrupted, UserError

COMMANDS = {
    "train": ("finetune.train", "fine-tune a model on a recipe (recipe=NAME key.path=value ...)"),
    "eval": ("finetune.eval", "generate JSON for a split or a file and score it"),
    "predict": ("finetune.predict", "read images with a model: JSON Lines on stdout"),
    "merge": ("finetune.merge", "fold a LoRA adapter into its base model"),
    "publish": ("finetune.publish", "write a run's upload folder and model card, and upload it to the Hub"),
}

# Set by `finetune train` for the processes it launches: under several processes a user error's line goes to the
# process's torch elastic error file (TORCHELASTIC_ERROR_FILE) instead of stderr, and the launcher prints the first
# one, so N processes failing on the same bad sample print one line, not N.
LAUNCHED_ENV = "FINETUNE_LAUNCHED"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's convention for a usage mistake: one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse `type` for counts and budgets: a whole number of at least 1 (argparse reports anything else)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} (must be at least 1)")
    return value


def main(argv: list[str] | None = None) -> int:
    """`finetune COMMAND [ARGS]`: run one command behind the error boundary; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stderr.write(f"error: finetune: missing COMMAND ({', '.join(COMMANDS)}; see finetune --help)\n")
        return 2
    if argv[0] in ("-h", "--help"):
        try:
            print(_usage(), flush=True)
        except BrokenPipeError:
            return _stdout_closed()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"error: finetune: unknown command '{command}' (choose from {', '.join(COMMANDS)})\n")
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run_entry_point(lambda args: module.main(args, prog=f"finetune {command}"), rest)


def run_entry_point(entry: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run `entry(argv)` (a module's `main`) behind the error boundary and return the exit code:
    `UserError` → `error: <message>` on one line, 2; `Interrupted` → its one-line message, 130; Ctrl-C elsewhere →
    `interrupted`, 130; anything else propagates with its traceback."""
    quiet_third_party()
    try:
        entry(argv)
        sys.stdout.flush()  # here, so that a closed pipe is reported below, not at interpreter exit
    except BrokenPipeError:
        return _stdout_closed()
    except UserError as err:
        return _report(f"error: {_one_line(err)}", err.exit_code)
    except Interrupted as err:
        return _report(_one_line(err.message), err.exit_code)
    except KeyboardInterrupt:
        return _report("interrupted", Interrupted.exit_code)
    except OSError as err:
        # The machine, not the code: a full disk, a quota, a read-only or forbidden folder. One line with the path
        # and the errno; anything else an OSError can mean keeps its traceback.
        if err.errno not in WRITE_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        return _report(f"error: {where}{describe_errno(err.errno)}", UserError.exit_code)
    return 0


def quiet_third_party() -> None:
    """Silence the libraries' messages that tell the user nothing, by message or logger, nothing wholesale.

    - transformers' FutureWarning that `is_gradient_checkpointing` is deprecated: raised inside the libraries
      (PEFT asks for it when it wraps a model), nothing the user can change.
    - DeepSpeed's "Setting accelerator to CPU" warning: DeepSpeed logs it to *stdout* (its logger has a stdout
      handler) when it is first imported, which Accelerate does on a CPU machine to check whether a model is a
      DeepSpeed engine; it would become the first line of `finetune predict ... > predictions.jsonl`. A filter on
      the "DeepSpeed" logger drops that one message; set before the import, it survives DeepSpeed's logger set-up
      (`logging.getLogger` returns the same logger, and the set-up adds a handler, not filters).
    - bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" warning, logged when it is first
      imported (PEFT imports it whenever it is installed, so on every run) on a CPU with AVX512-BF16: an optional
      kernel from the Hub that bitsandbytes replaces by its own; nothing is wrong. Likewise `kernels`' "Skipping
      publisher trust check ... offline mode" warning for the same optional kernel.
    - Download / weight-loading progress bars of huggingface_hub and transformers, when stderr is not a terminal:
      in a log file they are carriage-return updates (HF_HUB_DISABLE_PROGRESS_BARS, if the user set it, decides).
    Idempotent; warnings filters and logger filters are process-wide by nature, nothing else is kept."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_NOISE)  # the same object again: no duplicate
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_BITSANDBYTES_NOISE)
    logging.getLogger("kernels._internals.hf_hub").addFilter(_KERNELS_NOISE)
    if not _stderr_is_terminal() and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()  # transformers reads this when it is imported ...
        if "transformers.utils.logging" in sys.modules:  # ... and has its own switch once it has been
            sys.modules["transformers.utils.logging"].disable_progress_bar()


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_DEEPSPEED_NOISE = _DropMessages("Setting accelerator to CPU")
_BITSANDBYTES_NOISE = _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community")
# kernels (bitsandbytes' optional Hub kernels) warns, offline, that it skips a publisher check it cannot make.
_KERNELS_NOISE = _DropMessages("Skipping publisher trust check for ")


def _report(line: str, code: int) -> int:
    """Print the boundary's one line; in a process launched by `finetune train` among several, hand a user error
    to the launcher instead (it prints the first), and print an interruption only on rank 0 (every rank stops
    with the same resume hint)."""
    if os.environ.get(LAUNCHED_ENV) == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if code == UserError.exit_code and error_file:
            try:
                with open(error_file, "w", encoding="utf-8") as handle:
                    # torch elastic's error-file format with a plain-string message (ProcessFailure reads it)
                    json.dump({"message": line, "timestamp": int(time.time())}, handle)
                return code
            except OSError:
                pass  # fall back to printing it
        elif code != UserError.exit_code and os.environ.get("RANK", "0") != "0":
            return code
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return code


def _stdout_closed() -> int:
    """The reader of stdout went away (`finetune predict ... | head -1`): not an error of ours, so no traceback.
    Python's documented handling: point stdout at devnull so that the flush at exit does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, what a shell reports for a program stopped by a closed pipe


def _one_line(err: BaseException | str) -> str:
    text = str(err)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: finetune COMMAND [ARGS]   (finetune COMMAND --help for its options)",
        "",
        "Fine-tune small vision-language models to read documents into JSON.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "Each also runs as `python -m finetune.COMMAND`; `accelerate launch finetune/train.py recipe=...` trains too.",
        "Exit codes: 0 done, 2 a mistake in the input (one line on stderr), 130 stopped by Ctrl-C.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
