"""The Accelerate side of a run: building the Accelerator (DDP, DeepSpeed, FSDP as launched) and checks that
only make sense across processes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, GradientAccumulationPlugin, gather_object

from finetune.atomic import write_error
from finetune.config import Recipe
from finetune.errors import UserError

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(recipe: Recipe, project_dir: str) -> Accelerator:
    """An Accelerator for however the job was launched (`accelerate launch --config_file recipes/accelerate/...`).

    Under DeepSpeed the recipe stays the one source of truth: gradient accumulation and clipping come from it
    (the checked-in DeepSpeed configs say "auto" for both)."""
    deepspeed_plugin = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if not torch.cuda.is_available():
            # Without a GPU, Accelerate drops DeepSpeed (or its gathers fail) unless the process state is
            # created for CPU before the Accelerator (gloo backend).
            PartialState(cpu=True)
        deepspeed_plugin = DeepSpeedPlugin(
            gradient_accumulation_steps=recipe.train.grad_accum, gradient_clipping=recipe.optim.max_grad_norm or 0.0
        )
    accelerator = Accelerator(
        # An optimizer step is always grad_accum micro-batches, also across epoch ends (our data stream runs on
        # over them), so the end of the loader must not force a sync.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=recipe.train.grad_accum, sync_with_dataloader=False
        ),
        mixed_precision=MIXED_PRECISION[recipe.train.precision],
        log_with=recipe.tracking.report_to or None,
        project_dir=project_dir,
        step_scheduler_with_optimizer=False,  # we step the schedule once per optimizer step, not per process
        # Never-used parameters are always frozen (ModelFamily.never_used_parameters), so DDP need not search
        # the graph for unused ones every step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        deepspeed_plugin=deepspeed_plugin,
    )
    # Accelerate falls back to plain data parallel without a word when an engine cannot run (FSDP on CPUs):
    # a run launched with an engine's config must run under that engine or stop.
    for engine in ("DEEPSPEED", "FSDP"):
        if (
            os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"
            and accelerator.distributed_type.name != engine
        ):
            raise UserError(
                f"launched with {engine} but Accelerate runs {accelerator.distributed_type.name} "
                f"(Accelerate runs FSDP on GPUs / accelerators only; on CPUs use a DeepSpeed config)"
            )
    return accelerator


def zero_stage(accelerator: Accelerator) -> int | None:
    """DeepSpeed's ZeRO stage, or None when DeepSpeed is not in use."""
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type.name == "DEEPSPEED" else None
    return plugin.zero_stage if plugin else None


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")


def replica_digests(accelerator: Accelerator, model: torch.nn.Module) -> list[str]:
    """One sha256 per rank over the trainable weights (data-parallel replicas must end bit-identical)."""
    digest = hashlib.sha256()
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return gather_object([digest.hexdigest()])


def check_replicas_agree(accelerator: Accelerator, model: torch.nn.Module) -> str | None:
    """Data-parallel replicas must end bit-identical (a silent divergence would make the saved model depend on
    which rank wrote it): returns the shared digest, None when there is nothing to compare."""
    if accelerator.num_processes == 1 or is_sharded(accelerator):
        return None  # sharded engines hold different shards by design
    digests = replica_digests(accelerator, model)
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel replicas diverged: weight hashes per rank {digests}")
    return digests[0][:12]


def run_info(accelerator: Accelerator, *, seconds: float, steps: int) -> dict:
    """The hardware and software a run used (no paths, user names or tokens)."""
    import platform

    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return {
        "device": device,
        "processes": accelerator.num_processes,
        "engine": accelerator.distributed_type.name,
        "mixed_precision": accelerator.mixed_precision,
        "optimizer_steps": steps,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def decided_on_main(accelerator: Accelerator, decide):
    """`decide()` run on the main process only, its result (or the `UserError` it raised) shared with every process,
    so that all of them go on, or all stop with the same line, instead of the others waiting forever."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    box = [None]
    failure = None
    if accelerator.is_main_process:
        try:
            box = [("ok", decide())]
        except UserError as err:
            box = [("user", str(err))]
        except OSError as err:
            refused = write_error(err, Path(getattr(err, "filename", None) or "."))
            failure, box = err, [("user", refused) if refused else ("bug", f"{type(err).__name__} on the main process")]
        except BaseException as err:
            failure, box = err, [("bug", f"{type(err).__name__} on the main process")]
    broadcast_object_list(box, from_process=0)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "user":
        raise UserError(value)
    if kind == "bug":
        raise RuntimeError(value)
    return value


def raise_if_any_failed(accelerator: Accelerator, failure: str | None) -> None:
    """Every process reports how its part of a collective write went (None: fine; else one line); if any failed,
    every process raises the same `UserError`, so that none is left waiting for the others at the next barrier."""
    if accelerator.num_processes == 1:
        if failure:
            raise UserError(failure)
        return
    failures = [f for f in gather_object([failure]) if f]
    if failures:
        raise UserError(failures[0] if len(set(failures)) == 1 else f"{failures[0]} (and on other processes)")
