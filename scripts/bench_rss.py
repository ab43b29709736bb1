"""Resident memory over a long CPU run, fp32 against bf16: does it grow without a plateau, and why?

    python scripts/bench_rss.py [--model small] [--steps 300] [--variants default,...] [--out runs/bench-rss]

Each variant trains `--steps` optimizer steps of the same LoRA run (a Mississippi-shaped model, random init, real
448-px tiling: scripts/bench_common.py; synthetic invoices, length-grouped batches of 4) in a fresh process through
`finetune.training.runner`, whose `train_log.jsonl` records the process's resident memory (`rss_mib`) at every
step. Reported: RSS after the first 10 steps, at the end, and the growth of its envelope per 100 steps (the highest
reading of the second half against the highest of steps 10 to N/2; a plateau reads ~0). Variants (environment of
the training process):
- fp32, bf16: as a user runs them;
- bf16-onednn-cache-0: `ONEDNN_PRIMITIVE_CACHE_CAPACITY=0`, oneDNN keeps no compiled kernels (bf16 matmuls on the
  CPU go through oneDNN, one kernel per shape; length-grouped batches bring new shapes for many steps), and
  bf16-onednn-cache-128 keeps 128 (its default is 1024);
- bf16-arena-2: `MALLOC_ARENA_MAX=2`, glibc keeps fewer malloc arenas (fragmentation across threads);
- bf16-mmap-1mb, fp32-mmap-1mb: `MALLOC_MMAP_THRESHOLD_=1048576`, every block of 1 MiB or more its own mapping,
  returned to the system when freed (glibc otherwise raises the threshold as large blocks are freed, and keeps
  them in its heap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import build_model, machine, markdown_table

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "fp32": ("fp32", {}),
    "bf16": ("bf16", {}),
    "bf16-onednn-cache-0": ("bf16", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}),
    "bf16-onednn-cache-128": ("bf16", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}),
    "bf16-arena-2": ("bf16", {"MALLOC_ARENA_MAX": "2"}),
    "bf16-mmap-1mb": ("bf16", {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
    "fp32-mmap-1mb": ("fp32", {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
    "bf16-mmap-8mb": ("bf16", {"MALLOC_MMAP_THRESHOLD_": str(8 * 2**20)}),
    "bf16-cache-128-mmap-1mb": (
        "bf16",
        {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "MALLOC_MMAP_THRESHOLD_": "1048576"},
    ),
}


def train(checkpoint: Path, data: Path, out: Path, precision: str, steps: int, env: dict) -> list[dict]:
    overrides = {
        "model.path": str(checkpoint),
        "data.train": str(data),
        "data.val": "null",
        "data.test": "null",
        "data.max_length": 16384,
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "optim.lr": 1e-4,
        "train.max_steps": steps,
        "train.batch_size": 4,
        "train.precision": precision,
        "train.log_every": 1,
        "train.checkpoint_every": "null",
        "eval.before_training": "false",
        "eval.after_training": "false",
        "output.dir": str(out),
        "output.if_exists": "overwrite",
    }
    command = [sys.executable, str(ROOT / "finetune" / "train.py"), "recipe=quickstart"]
    command += [f"{k}={v}" for k, v in overrides.items()]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"training failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=400, help="training samples (epochs repeat them)")
    parser.add_argument("--preset", default="invoices", help="synthetic documents: simple, form, invoices")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {','.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rss"))
    args = parser.parse_args()
    from finetune.synthetic.invoices import write_dataset

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = build_model(out, args.model)
    data_dir = out / f"{args.preset}-{args.samples}"
    if not (data_dir / "train.jsonl").exists():
        write_dataset(data_dir, seed=0, n_train=args.samples, n_val=1, n_test=1, preset=args.preset)
    rows, curves = [], {}
    for name in args.variants.split(","):
        precision, env = VARIANTS[name]
        log = train(checkpoint, data_dir / "train.jsonl", out / name, precision, args.steps, env)
        rss = [row["rss_mib"] for row in log]
        curves[name] = rss
        # The envelope: RSS can fall back when large blocks are returned to the system, so compare the highest
        # reading of the second half with the highest of the first (after 10 warm-up steps).
        half = len(rss) // 2
        growth = (max(rss[half:]) - max(rss[min(10, half - 1) : half])) / max(1, len(rss) - half) * 100
        seconds = sum(row["seconds"] for row in log) / len(log)
        rows.append([name, f"{rss[min(9, len(rss) - 1)]:,.0f}", f"{rss[-1]:,.0f}", f"{growth:+.1f}", f"{seconds:.2f}"])
        print(f"{name}: {rss[-1]:,.0f} MiB after {len(rss)} steps", file=sys.stderr)
    print(f"\n{args.model} model, LoRA, batch 4, {args.steps} steps; {machine()}")
    print(
        markdown_table(
            ["variant", "RSS at step 10 (MiB)", f"at step {args.steps}", "MiB per 100 steps (2nd half)", "s/step"],
            rows,
        )
    )
    (out / "results.json").write_text(json.dumps({"machine": machine(), "rss_mib": curves}, indent=2) + "\n")


if __name__ == "__main__":
    main()
