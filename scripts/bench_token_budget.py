"""Token budget against fixed-size batches: how far the worst step's memory is above the mean step's (CPU).

    python scripts/bench_token_budget.py [--model small] [--short 20] [--long 20] [--steps N] [--max-samples 16]
                                         [--out runs/bench-token-budget]

A Mississippi-shaped model (scripts/bench_common.py, random init, real 448-px tiling) trains LoRA on its LLM (fp32,
vision and projector frozen) on a mix of short documents (synthetic `form` cards, 1 tile: the receipts) and A4
invoices (`invoices`, up to 6 tiles + thumbnail), concatenated into one train.jsonl. Two settings, each in a fresh
process through the runner's own set-up (`FineTuneRecipe.setup`: recipe, TrainData, its batch sampler and collator,
LoRA, AdamW, Accelerate) and its model call (`causal_lm_loss` on `family.training_inputs(batch)`):
- fixed: `train.batch_size` 4, length-grouped, as today;
- budget: `train.max_tokens_per_batch` = the fixed setting's mean padded tokens per batch (raised to the longest
  sample if that is longer), with up to `--max-samples` samples a batch (`train.batch_size` is then the cap).
For every batch of one epoch (or the first `--steps`): one forward + backward + optimizer step, measuring (a) the
bytes autograd keeps for backward, exactly (every saved tensor that is not a weight, once per storage, through
`torch.autograd.graph.saved_tensors_hooks`, as scripts/bench_stage_memory.py does), and (b) the step's resident
high-water mark above the resident size before it (glibc `malloc_trim(0)`, then VmHWM reset, read after the step).
No warm-up step (it would cost a minute): step 1's one-off allocations (Adam's state of the LoRA weights, 7 MiB,
and whatever a first call sets up) count in it, as in a real run; both samplers put their costliest batch first.
Reported per setting: samples and padded tokens per batch, both memories' mean, worst and worst / mean (the target:
worst ≤ 1.2 × mean), seconds per step; then every step. Results JSON (per-step readings, sample lengths) in
`--out`/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import build_model, machine, markdown_table, memory_kib, peak_memory_mib, reset_peak_memory, run_child

MIB = 2**20


def mixed_dataset(out: Path, short: int, long: int) -> Path:
    """`short` form cards and `long` invoices in one train.jsonl, each set's images in its own folder (both name
    theirs images/train_00000.png...), the paths rewritten relative to the combined file."""
    from finetune.synthetic.invoices import write_dataset

    combined = out / f"mix-{short}-{long}.jsonl"
    lines = []
    for preset, count in (("form", short), ("invoices", long)):
        folder = out / f"{preset}-{count}"
        if not (folder / "train.jsonl").exists():
            write_dataset(folder, seed=0, n_train=count, n_val=1, n_test=1, preset=preset)
        for line in (folder / "train.jsonl").read_text().splitlines():
            record = json.loads(line)
            record["image"] = f"{folder.name}/{record['image']}"
            if not (out / record["image"]).is_file():
                raise SystemExit(f"{record['image']}: missing under {out}")
            lines.append(json.dumps(record))
    combined.write_text("\n".join(lines) + "\n")
    return combined


def child(config: dict) -> dict:
    """One setting, in this process: the runner's set-up, then one measured step per batch of the epoch."""
    import torch

    from finetune.recipe import load_recipe
    from finetune.training.cpu_memory import _malloc_trim
    from finetune.training.loss import causal_lm_loss
    from finetune.training.runner import FineTuneRecipe

    overrides = {
        "model.path": config["checkpoint"],
        "data.train": config["data"],
        "data.val": "null",
        "data.test": "null",
        "data.max_length": 16384,
        "tuning.groups": "{vision: frozen, projector: frozen, llm: lora}",
        "optim.lr": 1e-4,
        "train.max_steps": 1000,
        "train.precision": "fp32",
        "train.checkpoint_every": "null",
        "eval.before_training": "false",
        "eval.after_training": "false",
        "output.dir": config["run_dir"],
        "output.if_exists": "overwrite",
        **config["batching"],
    }
    job = FineTuneRecipe(load_recipe("quickstart", [f"{k}={v}" for k, v in overrides.items()]))
    job.setup()  # accelerator, TrainData, model, LoRA, optimizer, schedule, the stage-0 loader: as `finetune train`
    model, optimizer, acc, r = job.model, job.optimizer, job.accelerator, job.recipe
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    trim = _malloc_trim()

    def step(batch: dict) -> int:
        """The runner's micro-batch (grad_accum 1); returns the bytes kept for backward."""
        kept: dict[int, int] = {}

        def keep(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # frozen weights saved by the LoRA-wrapped matmuls are not new
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        label_tokens = (batch["labels"] != -100).sum()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = causal_lm_loss(model, job.family.training_inputs(batch), label_tokens)
        acc.backward(loss)
        if r.optim.max_grad_norm:
            acc.clip_grad_norm_(model.parameters(), r.optim.max_grad_norm)
        optimizer.step()
        job.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(kept.values())

    model.train()
    job.train_loader.set_epoch(0)
    rows = []
    for index, batch in enumerate(job.train_loader):
        if index == config["steps"]:
            break
        batch.pop("index")
        # Give the heap's free pages back, so the resident size before the step is what is alive, and the
        # high-water mark counts what this step needs on top (the runner trims on growth: cpu_memory.py).
        if trim is not None:
            trim(0)
        before = memory_kib("VmRSS") / 1024
        reset_peak_memory()
        started = time.perf_counter()
        kept = step(batch)
        seconds = time.perf_counter() - started
        mask = batch["attention_mask"]
        rows.append(
            {
                "samples": int(mask.shape[0]),
                "tiles": int(batch["pixel_values"].shape[0]),
                "real_tokens": int(mask.sum()),
                "padded_tokens": int(mask.numel()),
                "kept_mib": kept / MIB,
                "resident_before_mib": before,
                "peak_above_mib": peak_memory_mib() - before,
                "seconds": seconds,
            }
        )
        print(f"{config['name']} step {index + 1}: " + json.dumps(rows[-1]), file=sys.stderr)
    lengths = [sample.length for sample in job.data.train_samples]
    job.close()
    return {"name": config["name"], "batching": config["batching"], "lengths": lengths, "steps": rows}


def summary(result: dict) -> list[str]:
    steps = result["steps"]

    def spread(key: str) -> str:
        values = [s[key] for s in steps]
        mean = sum(values) / len(values)
        return f"{mean:,.0f} / {max(values):,.0f} / {max(values) / mean:.2f}×"

    samples = [s["samples"] for s in steps]
    padded = [s["padded_tokens"] for s in steps]
    batching = ", ".join(f"{k.removeprefix('train.')} {v}" for k, v in result["batching"].items())
    return [
        f"{result['name']} ({batching})",
        str(len(steps)),
        f"{min(samples)}–{max(samples)}",
        f"{sum(padded) / len(padded):,.0f} / {max(padded):,}",
        spread("kept_mib"),
        spread("peak_above_mib"),
        f"{sum(s['seconds'] for s in steps) / len(steps):.2f}",
    ]


def per_step(result: dict) -> str:
    rows = [
        [
            str(i + 1),
            str(s["samples"]),
            str(s["tiles"]),
            f"{s['real_tokens']:,} / {s['padded_tokens']:,}",
            f"{s['kept_mib']:,.0f}",
            f"{s['peak_above_mib']:,.0f}",
            f"{s['seconds']:.2f}",
        ]
        for i, s in enumerate(result["steps"])
    ]
    header = ["step", "samples", "tiles", "tokens real / padded", "kept (MiB)", "peak above (MiB)", "s"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--short", type=int, default=20, help="form cards (1 tile), standing in for receipts")
    parser.add_argument("--long", type=int, default=20, help="A4 invoices (several tiles)")
    parser.add_argument("--steps", type=int, default=0, help="measure only the first N batches (0: the epoch)")
    parser.add_argument("--max-samples", type=int, default=16, help="train.batch_size under the token budget")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-token-budget"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "checkpoint": str(build_model(out, args.model)),
        "data": str(mixed_dataset(out, args.short, args.long)),
        "steps": args.steps or -1,
    }
    fixed = run_child(
        __file__, {**config, "name": "fixed", "batching": {"train.batch_size": 4}, "run_dir": str(out / "fixed")}
    )
    # The budget: what a fixed batch holds on average, so both settings train on as many tokens per step overall
    # (every sample must fit it: a sample longer than the mean raises it to that sample).
    mean_padded = sum(s["padded_tokens"] for s in fixed["steps"]) / len(fixed["steps"])
    budget = max(round(mean_padded), max(fixed["lengths"]))
    batching = {"train.batch_size": args.max_samples, "train.max_tokens_per_batch": budget}
    tokens = run_child(__file__, {**config, "name": "budget", "batching": batching, "run_dir": str(out / "budget")})

    print(
        f"\n{args.model} model, LoRA on the LLM, fp32; {args.short} form cards + {args.long} A4 invoices; "
        f"budget {budget:,} tokens (fixed batches' mean {mean_padded:,.0f}, longest sample "
        f"{max(fixed['lengths']):,}); {machine()}"
    )
    header = [
        "setting",
        "batches",
        "samples / batch",
        "padded tokens / batch (mean / max)",
        "kept for backward MiB (mean / worst / ratio)",
        "step peak above baseline MiB (mean / worst / ratio)",
        "s / step",
    ]
    print(markdown_table(header, [summary(fixed), summary(tokens)]))
    for result in (fixed, tokens):
        print(f"\n{result['name']}, per step:\n{per_step(result)}")
    results = {"machine": machine(), "budget": budget, "settings": [fixed, tokens]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
