"""Peak memory of one training stage with the vision tower frozen vs trainable (CPU, resident memory).

    python scripts/bench_stage_memory.py [--steps 3] [--batch-size 4] [--out runs/bench-stage-memory]

A Mississippi-shaped model (InternViT-style tower, pixel-shuffle projector, Llama LLM; random init, smaller
widths than the real 0.8B so it runs on a laptop CPU) trains on synthetic invoices tiled the real way. Each
configuration runs in a fresh process: the stage {vision: X, projector: full, llm: full}, with gradient
checkpointing off and on. Reported per configuration: resident memory after the first step (weights + optimizer
state), the peak above that during the next steps (activations kept for backward + gradients), and seconds per
step. The peak is read from the kernel's high-water mark (VmHWM), reset before the measured steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import memory_kib, reset_peak_memory  # noqa: E402 (after the sys.path set-up)

# Tiles of 224 px, patch 14: 256 patches per tile, 64 image tokens after the pixel shuffle.
MODEL = {
    "llm": "llama",
    "image_size": 224,
    "patch_size": 14,
    "vision_hidden": 384,
    "vision_layers": 6,
    "text_hidden": 512,
    "text_layers": 4,
}


def child(config: dict) -> dict:
    """One configuration, in this process: load, tune, warm up one step, measure the next ones."""
    import torch

    from finetune.config import TuningSection
    from finetune.data.dataset import Collator, DocumentDataset, prepare_samples
    from finetune.data.prompt import derive_skeleton, render_instruction
    from finetune.data.sources import read_records
    from finetune.models import get_family
    from finetune.training.tuning import apply_tuning, enable_gradient_checkpointing, optimizer_groups

    torch.manual_seed(0)
    family = get_family("mississippi")
    processor = family.load_processor(config["checkpoint"], max_tiles_per_image=6)
    skeleton = derive_skeleton(record.target for record in read_records(config["data"]))
    instruction = render_instruction(
        "Extract the details from the invoice image and structure them into JSON format:", skeleton
    )
    samples, _ = prepare_samples(
        config["data"],
        split="train",
        family=family,
        processor=processor,
        instruction_text=instruction,
        skeleton=skeleton,
        max_length=8192,
    )
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=instruction)
    batch = Collator(family, processor.tokenizer.pad_token_id)([dataset[i] for i in range(config["batch_size"])])
    batch.pop("index")

    model = family.load_model(config["checkpoint"])
    if config["checkpointing"]:
        enable_gradient_checkpointing(model)
    groups = {"vision": config["vision"], "projector": "full", "llm": "full"}
    model, plan = apply_tuning(model, family, TuningSection(), groups=groups)
    if config.get("input_grad_hooks"):
        # What transformers and PEFT do by default with checkpointing (and we undo): every input embedding's
        # output requires grad, the vision tower's patch embedding included.
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW(optimizer_groups(model, family, lambda g: 1e-5, 0.0))

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates the optimizer state

    # What the forward keeps for backward (activations; the weights it saves are not counted), exact bytes.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    grad_bytes = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.zero_grad(set_to_none=True)
    state_bytes = sum(t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))

    settled = memory_kib("VmRSS")
    reset_peak_memory()  # the high-water mark back to the current resident size
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    seconds = (time.perf_counter() - start) / config["steps"]
    peak = memory_kib("VmHWM")
    return {
        "vision": config["vision"],
        "checkpointing": config["checkpointing"],
        "input_grad_hooks": bool(config.get("input_grad_hooks")),
        "trainable_params": sum(plan.trainable.values()),
        "tiles": int(batch["pixel_values"].shape[0]),
        "tokens": int(batch["attention_mask"].sum()),
        "settled_mib": settled / 1024,
        "saved_for_backward_mib": sum(kept.values()) / 2**20,
        "gradients_mib": grad_bytes / 2**20,
        "optimizer_state_mib": state_bytes / 2**20,
        "step_peak_above_mib": (peak - settled) / 1024,
        "peak_mib": peak / 1024,
        "s_per_step": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="runs/bench-stage-memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from finetune.models import get_family
    from finetune.synthetic.invoices import write_dataset

    out = Path(args.out)
    checkpoint, data = out / "model", out / "data"
    if not (checkpoint / "config.json").exists():
        get_family("mississippi").build_tiny_checkpoint(checkpoint, **MODEL)
    if not (data / "train.jsonl").exists():
        write_dataset(data, seed=0, n_train=args.batch_size, n_val=1, n_test=1, preset="invoices")

    rows = []
    runs = [(checkpointing, vision, False) for checkpointing in (False, True) for vision in ("frozen", "full")]
    runs.append((True, "frozen", True))  # the frozen tower with the input-grad hooks left in place
    for checkpointing, vision, hooks in runs:
        config = {
            "checkpoint": str(checkpoint),
            "data": str(data / "train.jsonl"),
            "vision": vision,
            "checkpointing": checkpointing,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "input_grad_hooks": hooks,
        }
        # Tensors above 64 KiB get their own mmap, so freed memory leaves the process and the resident size
        # follows what is alive (glibc would otherwise keep freed arenas and blur the peaks).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(config)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        "| vision | grad. checkpointing | trainable params | tiles / tokens per batch | kept for backward (MiB) "
        "| gradients (MiB) | Adam state (MiB) | resident after step 1 (MiB) | step peak above it (MiB) | s / step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hooks = " (input-grad hooks kept)" if r["input_grad_hooks"] else ""
        print(
            f"| {r['vision']}{hooks} | {'on' if r['checkpointing'] else 'off'} | {r['trainable_params'] / 1e6:.1f} M "
            f"| {r['tiles']} / {r['tokens']:,} | {r['saved_for_backward_mib']:,.0f} | {r['gradients_mib']:,.0f} "
            f"| {r['optimizer_state_mib']:,.0f} | {r['settled_mib']:,.0f} | {r['step_peak_above_mib']:,.0f} "
            f"| {r['s_per_step']:.2f} |"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
