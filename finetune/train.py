"""Fine-tune a vision-language model on image→JSON pairs, as a recipe says.

    finetune train recipe=invoices [key.path=value ...]                 # one process, in this one
    finetune train --num-processes 4 recipe=invoices                    # 4 processes (GPUs), through Accelerate
    finetune train --config-file recipes/accelerate/zero2.yaml --num-processes 4 recipe=mississippi-800m-paper
    finetune train --cpu --num-processes 2 recipe=quickstart            # 2 CPU processes (gloo)
    accelerate launch finetune/train.py recipe=invoices [key.path=value ...]

`recipe` is a YAML path or a bare name under recipes/; each `key.path=value` overrides one recipe key, its value
parsed as YAML (`train.max_steps=50`, `tuning.groups.vision=full`, `tracking.report_to=[tensorboard]`,
`stages.1.lr.llm=1e-4`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

# Accelerate runs this file as a script, and then Python puts finetune/ itself first on sys.path, where its modules
# (config, data, ...) would shadow top-level packages of the same names. Import the package from its parent instead.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from finetune.cli import LAUNCHED_ENV, ArgumentParser, run_entry_point
from finetune.errors import UserError
from finetune.recipe import load_recipe, parse_cli

LAUNCH_HELP = """\
Any of these runs the training through Accelerate's launcher (`accelerate.commands.launch`), which starts the
processes; without them the run is this one process. The recipe is validated first, before any process starts.
Without --config-file every setting Accelerate would fill in with a default is given explicitly: one machine, no
dynamo, mixed precision from the recipe (train.precision), data parallel (DDP) over --num-processes."""

EXIT_CODES = """\
exit codes: 0 done; 2 a mistake in the recipe, the data or the run folder (one line on stderr); 130 stopped by
Ctrl-C (the line says which checkpoint was saved and how to resume); anything else is a bug (its traceback)."""


def build_parser(prog: str | None = None) -> ArgumentParser:
    """The command line of `finetune train` / `python -m finetune.train` / `accelerate launch finetune/train.py`."""
    parser = ArgumentParser(
        prog=prog or "finetune train",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recipe_args",
        nargs="*",
        metavar="recipe=NAME key.path=value",
        help="the recipe (a YAML path or a name under recipes/), then any overrides",
    )
    launch = parser.add_argument_group("launch options", LAUNCH_HELP)
    launch.add_argument("--num-processes", type=int, metavar="N", help="training processes (one per GPU)")
    launch.add_argument(
        "--config-file",
        metavar="PATH",
        help="an Accelerate config (recipes/accelerate/: ddp, zero2, zero3, fsdp)",
    )
    launch.add_argument(
        "--cpu", action="store_true", help="train on the CPU (with --num-processes N: N processes over gloo)"
    )
    launch.add_argument("--gpu-ids", metavar="IDS", help="the GPUs to use, e.g. 0,1 (default: all)")
    launch.add_argument(
        "--main-process-port",
        type=int,
        metavar="PORT",
        help="rendezvous port (0: a free one; default 29500)",
    )
    for name, kind in (("num_processes", int), ("config_file", str), ("gpu_ids", str), ("main_process_port", int)):
        # accelerate launch's spellings, so that its users' habits work (not listed in the help)
        launch.add_argument(f"--{name}", dest=name, type=kind, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> dict | None:
    """Parse `[launch options] recipe=NAME key.path=value ...`; without launch options run the recipe in this
    process and return the before / after metrics, with them launch the processes and exit with their code."""
    args, unknown = build_parser(prog).parse_known_intermixed_args(sys.argv[1:] if argv is None else argv)
    recipe_args = [*args.recipe_args, *unknown]  # `--recipe=NAME` is accepted too (parse_cli strips the dashes)
    recipe_name, overrides = parse_cli(recipe_args)
    launch_options = (args.num_processes, args.config_file, args.gpu_ids, args.main_process_port)
    if args.cpu or any(option is not None for option in launch_options):
        code = launch(
            recipe_name,
            overrides,
            num_processes=args.num_processes,
            config_file=args.config_file,
            cpu=args.cpu,
            gpu_ids=args.gpu_ids,
            main_process_port=args.main_process_port,
        )
        if code:
            raise SystemExit(code)  # the processes have said why (one line, or a bug's traceback)
        return None

    from finetune.training.runner import FineTuneRecipe

    job = FineTuneRecipe(load_recipe(recipe_name, overrides))
    job.setup()
    return job.run()


def launch(
    recipe_name: str,
    overrides: list[str],
    *,
    num_processes: int | None = None,
    config_file: str | None = None,
    cpu: bool = False,
    gpu_ids: str | None = None,
    main_process_port: int | None = None,
) -> int:
    """Validate the recipe here, then start the training processes with Accelerate's launcher; returns the exit
    code (0, 2 a user error that one process has printed or this one prints, 130 interrupted)."""
    load_recipe(recipe_name, overrides)  # a recipe mistake is one line now, not one per process after start-up
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: must be at least 1")
    if config_file is not None:
        if cpu:
            raise UserError("--cpu with --config-file: the config file chooses the hardware (use_cpu: true in it)")
        if not Path(config_file).is_file():
            raise UserError(f"--config-file {config_file}: no such file")

    from accelerate.commands.launch import launch_command, launch_command_parser
    from accelerate.utils import patch_environment
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    options: list[str] = []
    env = {
        LAUNCHED_ENV: "1",
        # On Ctrl-C torch's agent passes SIGINT on to the workers, which then save a checkpoint; it waits this long
        # before SIGKILL (its default, 30 s, is short for a large model's checkpoint).
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300"),
    }
    if config_file is not None:
        options += ["--config_file", config_file]
        if num_processes is not None:
            options += ["--num_processes", str(num_processes)]
    else:
        num_processes = num_processes or 1
        # Precision is the recipe's (train.precision, given to the Accelerator), so the launcher's stays 'no'.
        options += ["--num_processes", str(num_processes), "--num_machines", "1"]
        options += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            # `accelerate launch --cpu --num_processes 2` silently runs one process; multi-GPU mode with
            # ACCELERATE_USE_CPU runs two over gloo.
            options.append("--multi_gpu")
            if main_process_port is None:
                main_process_port = 0  # one machine: any free port (29500 may be another job's)
            if cpu:
                env["ACCELERATE_USE_CPU"] = "true"
        elif cpu:
            options.append("--cpu")
    if num_processes is not None:
        options += ["--num_cpu_threads_per_process", str(_threads_per_process(num_processes, cpu))]
    if gpu_ids is not None:
        options += ["--gpu_ids", gpu_ids]
    if main_process_port is not None:
        options += ["--main_process_port", str(main_process_port)]
    recipe_args = [f"recipe={recipe_name}", *overrides]
    args = launch_command_parser().parse_args([*options, str(Path(__file__).resolve()), *recipe_args])
    try:
        with patch_environment(**env), _quiet_torch_elastic(), _children_handle_ctrl_c():
            launch_command(args)
    except subprocess.CalledProcessError as err:  # one process (accelerate's simple launcher)
        return _child_exit_code(err.returncode)
    except ChildFailedError as err:  # several (torch elastic): report the first user error, keep bugs' reports
        code = _user_failure(err)
        if code is None:
            raise
        return code
    except SignalException as err:  # Ctrl-C reached torch's agent, which passed it on and waited for the workers
        if err.sigval != signal.SIGINT:
            raise
        return 130
    return 0


def _threads_per_process(num_processes: int, cpu: bool) -> int:
    """Accelerate's own choice (OMP_NUM_THREADS, else on the CPU the physical cores shared out, else 1), passed
    explicitly so that it does not print it as a default it filled in."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    if not cpu:
        return 1
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // num_processes)


def _child_exit_code(code: int) -> int:
    if code < 0:  # killed by a signal, so it printed nothing: say so (an out-of-memory kill is SIGKILL)
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        sys.stderr.write(f"error: the training process was killed by {name}\n")
        return 128 - code
    return code  # it printed its one line (2, 130) or its traceback (1)


def _user_failure(err) -> int | None:
    """The exit code for a ChildFailedError caused by a user error (2) or a stop (130), after printing the first
    user error's line from the workers' error files; None for anything else (a bug, a crash)."""
    chosen = [(f.timestamp, rank, f) for rank, f in err.failures.items() if f.exitcode in (2, 130)]
    if not chosen:
        return None
    _, rank, failure = min(chosen, key=lambda item: item[:2])
    if failure.exitcode == 2:
        message = failure.message if isinstance(failure.message, str) and failure.message.startswith("error:") else ""
        sys.stderr.write((message or f"error: process {rank} stopped on a user error") + "\n")
    return failure.exitcode  # 130: rank 0 has printed the resume hint


class _DropElasticNoise:
    """torch elastic's log lines about a worker failing or being stopped, which `launch` reports itself."""

    def filter(self, record) -> bool:
        message = str(record.msg)
        if message.startswith("failed (exitcode: %s)"):
            return record.args[0] not in (2, 130)
        if message.startswith("Received %s death signal"):
            return record.args[0] != signal.SIGINT
        return not message.startswith("Sending process %s closing signal")


@contextmanager
def _quiet_torch_elastic():
    import logging

    loggers = [
        logging.getLogger(name)
        for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")
    ]
    noise = _DropElasticNoise()
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


@contextmanager
def _children_handle_ctrl_c():
    """A single training process shares this process's terminal, so Ctrl-C reaches it too: it finishes its step,
    saves a checkpoint and exits 130. This process waits for that instead of dying at once and leaving it behind;
    a second Ctrl-C stops it now. (Several processes run under torch's agent, which installs its own handler.)"""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield  # signals reach the main thread only; a handler someone else installed is theirs
        return
    presses = 0

    def on_sigint(signum, frame):
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
