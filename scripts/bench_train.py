"""Training throughput: our trainer vs a bare PyTorch loop vs TRL's SFTTrainer on the same model, data and machine.

    python scripts/bench_train.py [--model small] [--tuning lora|full] [--checkpointing] [--batch-size 4]
                                  [--preset invoices|form] [--steps 4] [--rounds 3] [--trainers ours,bare,trl]
                                  [--out runs/bench-train]
    # GPU (not run yet): --device cuda --precision bf16 --model 0.8b|2b|ovis2-1b --trainers ours,ours-4bit
    #                    [--attn sdpa|flash_attention_2] [--checkpointing]

Each trainer runs in a fresh process on the same checkpoint (a Mississippi-shaped model, random init, real
448 px tiling: scripts/bench_common.py) and the same synthetic invoices, for `warmup + steps` optimizer steps of
`batch-size` samples, with the same optimisation (AdamW, constant lr, gradient clipping at 1.0, the same LoRA or
full set of trainable weights, checkpointing on or off alike), on the same batches:
- ours: `finetune.training.runner` from a recipe, timed from the per-step lines of its own `train_log.jsonl`;
- bare: a plain loop over our dataset, length-grouped sampler and collator: forward (transformers' loss) /
  backward / clip / step — what the runner computed before it learnt to skip work;
- ours-4bit, ours-8bit (QLoRA; only when named in --trainers): ours with `tuning.quantization.bits` 4 or 8, the
  frozen base quantised by bitsandbytes; compared with ours for peak memory, weight memory and loss;
- trl: `trl.SFTTrainer` set up as TRL documents for vision-language models (a prompt/completion dataset with
  images, completion-only loss, the processor as `processing_class`), timed by a callback at each step's end.
  Its sampler is replaced by ours' order (nothing else changes) so that all three compute the same samples:
  per-token speed depends strongly on sequence length, so other samples would blur the comparison. The padding
  TRL's own random batches would have is measured separately (collation only). TRL accepts only a transformers
  `ProcessorMixin`, which the H2OVL processor is not (its Hub code predates one), so it gets a thin
  ProcessorMixin that forwards to ours; TRL's collator, padding, loss and loop do the rest.
The trainers take turns for `--rounds` rounds and each rate is the median over its rounds (with the range of
real tokens/s): this VM's speed drifts by 10-20% over minutes, so one run each would compare different machines.

Reported over the steps after the warm-up: samples/s, tokens/s over all positions the batches computed, real
(non-padding) tokens/s, the padding share, achieved FLOP/s and MFU; peak memory over training (set-up excluded).
FLOPs are model FLOPs: the forward and backward of each sample alone (no padding, full attention scores, logits at
every position, no checkpoint recomputation), counted by `torch.utils.flop_counter` on eager attention for the
trainable set at hand; work a trainer skips (the causal half of the scores, logits without a label) still counts, as
MFU conventionally does, so model FLOP/s exceeds what the hardware executes for ours. The peak is the best fp32 (or
bf16) matmul rate measured in this run; on a GPU the table also gives MFU against the card's datasheet dense bf16
peak (bench_common.DATASHEET_BF16_PEAKS, by device name), the conventional denominator. Peak memory is VmHWM on the
CPU and torch.cuda.max_memory_allocated on a GPU (the allocator's, not the driver's: the CUDA context and the
allocator's cached blocks come on top). A setting this machine cannot run (no GPU, flash-attn or bitsandbytes
missing, flash attention without bf16) is one line and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODELS, build_model, datasheet_peak_flops, machine, markdown_table, model_family, run_child
from bench_trainers import CHILDREN, GROUPS

TRAINERS = ("ours", "bare", "trl", "ours-4bit", "ours-8bit")  # the last two: QLoRA, ours with the base quantised
DEFAULT_TRAINERS = ("ours", "bare", "trl")


# ---------------------------------------------------------------------------------------------------- main
def unmet_requirement(args, trainers: list[str]) -> str | None:
    """Why this machine cannot run the requested setting, in one line; None when it can."""
    import importlib.util

    cuda = args.device == "cuda"
    if args.attn == "flash_attention_2":
        if not cuda or args.precision != "bf16":
            return (
                "--attn flash_attention_2 needs --device cuda --precision bf16 (flash-attn has no CPU or fp32 kernels)"
            )
        try:
            import flash_attn  # noqa: F401
        except ImportError as err:
            return f"--attn flash_attention_2 needs the flash-attn package, which does not import here ({err})"
    quantized = [t for t in trainers if t in ("ours-4bit", "ours-8bit")]
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        return f"trainers {','.join(quantized)} need bitsandbytes: pip install bitsandbytes"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            return f"--device cuda, but torch {torch.__version__} sees no CUDA device"
    return None


def summarise(name: str, result: dict, warmup: int, flops: dict, peak_flops: float, datasheet: float | None) -> dict:
    timed = result["steps"][warmup:]
    seconds = sum(s["seconds"] for s in timed)
    samples, tokens, positions = (sum(s[k] for s in timed) for k in ("samples", "tokens", "positions"))
    if flops["coefficients"]:  # the FLOPs of the samples (real tokens, tiles) each trainer's batches held
        v, a, b = flops["coefficients"]
        model_flops = sum(v * n + a * t + b * t * t for s in timed for t, n in s["rows"])
    else:
        model_flops = tokens * flops["flops_per_token"]
    achieved = model_flops / seconds
    return {
        "trainer": name,
        "steps": len(timed),
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": positions / seconds,
        "real_tokens_per_s": tokens / seconds,
        "padding": (positions - tokens) / positions,
        "tokens_per_sample": tokens / samples,
        "peak_mib": result["peak_mib"],
        **({"weights_mib": result["weights_mib"]} if "weights_mib" in result else {}),
        "flops_per_s": achieved,
        "mfu": achieved / peak_flops,
        **({"mfu_datasheet": achieved / datasheet} if datasheet else {}),
        "first_loss": result["steps"][0]["loss"],
        "last_loss": result["steps"][-1]["loss"],
        **({"default_order_padding": result["default_order_padding"]} if "default_order_padding" in result else {}),
    }


def combine(runs: list[dict]) -> dict:
    """One trainer's rounds: the median of each figure (memory peak included), with the range of real tokens/s."""
    row = {
        key: (statistics.median(r[key] for r in runs) if isinstance(value, float) else value)
        for key, value in runs[0].items()
    }
    row["real_tokens_per_s_range"] = (
        min(r["real_tokens_per_s"] for r in runs),
        max(r["real_tokens_per_s"] for r in runs),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=tuple(MODELS))
    parser.add_argument("--tuning", default="lora", choices=tuple(GROUPS))
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (all trainers)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="as the recipes (InternVL's LoRA recipe)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per round")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="each trainer runs this many times, in turn (ours, bare, trl, ours, ...): the machine's "
        "speed drifts over minutes, so one run per trainer would compare different machines",
    )
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--samples",
        type=int,
        default=400,
        help="training set size: length grouping sorts mega-batches of up to 50 batches, which a "
        "set of only steps × batch samples would not fill",
    )
    parser.add_argument(
        "--preset", default="invoices", help="synthetic documents: invoices (A4, 7 tiles) or form (1 tile)"
    )
    parser.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS), help=f"any of {','.join(TRAINERS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per process")
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config = json.loads(args.child)
        print(json.dumps(CHILDREN[config["role"]](config)))
        return

    trainers = args.trainers.split(",")
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        parser.error(f"unknown trainers {sorted(unknown)}; choose from {TRAINERS}")
    unmet = unmet_requirement(args, trainers)
    if unmet:
        print(f"{Path(__file__).name}: {unmet}", file=sys.stderr)
        raise SystemExit(2)
    from finetune.synthetic.invoices import write_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = build_model(out, args.model)
    total = args.warmup_steps + args.steps
    samples = max(args.samples, total * args.batch_size)
    data_dir = out / f"{args.preset}-{samples}"
    if not (data_dir / "train.jsonl").exists():  # deterministic by seed: the same data every run
        write_dataset(data_dir, seed=0, n_train=samples, n_val=1, n_test=1, preset=args.preset)
    config = {
        "checkpoint": str(checkpoint),
        "family": model_family(args.model),
        "data": str(data_dir / "train.jsonl"),
        "out": str(out),
        "tuning": args.tuning,
        "checkpointing": args.checkpointing,
        "batch_size": args.batch_size,
        "total_steps": total,
        "device": args.device,
        "precision": args.precision,
        "attn": args.attn,
        "threads": args.threads,
        "lora_dropout": args.lora_dropout,
    }
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.device == "cpu":  # the runner's Accelerator would otherwise take a GPU that the other trainers leave
        env["ACCELERATE_USE_CPU"] = "true"
    peak = run_child(__file__, {**config, "role": "peak"}, env)
    flops = run_child(__file__, {**config, "role": "flops"}, env)
    datasheet = None
    if args.device == "cuda":
        import torch

        card = torch.cuda.get_device_name()
        datasheet = datasheet_peak_flops(card) if args.precision == "bf16" else None
        print(
            f"{card}: datasheet dense bf16 peak "
            + (
                f"{datasheet[1] / 1e12:,.1f} TFLOP/s (as {datasheet[0]})" if datasheet else "not known for this setting"
            ),
            file=sys.stderr,
        )
    print(
        f"matmul peak {peak['flops'] / 1e9:,.1f} GFLOP/s ({args.precision}, {peak['size']}²); model "
        f"{flops['flops_per_token'] / 1e6:,.2f} MFLOP per token for forward + backward "
        f"({flops['samples']} samples, {flops['tiles']} tiles, {flops['tokens']:,} tokens)",
        file=sys.stderr,
    )
    runs = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name in trainers:
            result = run_child(__file__, {**config, "role": name}, env)
            runs[name].append(
                summarise(name, result, args.warmup_steps, flops, peak["flops"], datasheet[1] if datasheet else None)
            )
    rows = [combine(runs[name]) for name in trainers]

    lora = f" (dropout {args.lora_dropout:g})" if args.tuning == "lora" else ""
    print(
        f"\n{args.model} model, {args.tuning}{lora}, checkpointing {'on' if args.checkpointing else 'off'}, batch "
        f"{args.batch_size}, {args.steps} timed steps after {args.warmup_steps}, median of {args.rounds} rounds; "
        f"{machine()}"
    )
    base = next((r for r in rows if r["trainer"] == "bare"), rows[0])
    table = []
    for r in rows:
        table.append(
            [
                r["trainer"],
                f"{r['samples_per_s']:.2f}",
                f"{r['tokens_per_s']:,.0f}",
                "{:,.0f} ({:,.0f}–{:,.0f})".format(r["real_tokens_per_s"], *r["real_tokens_per_s_range"]),
                f"{r['padding']:.1%}",
                f"{r['tokens_per_sample']:,.0f}",
                f"{r['peak_mib']:,.0f}",
                f"{r['weights_mib']:,.0f}" if "weights_mib" in r else "",
                f"{r['flops_per_s'] / 1e9:,.1f}",
                f"{r['mfu']:.1%}",
                *([f"{r['mfu_datasheet']:.1%}"] if datasheet else []),
                (
                    f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}× / "
                    f"{r['flops_per_s'] / base['flops_per_s']:.2f}×"
                ),
                f"{r['first_loss']:.3f} → {r['last_loss']:.3f}",
            ]
        )
    print(
        markdown_table(
            [
                "trainer",
                "samples/s",
                "tokens/s",
                "real tokens/s (range)",
                "padding",
                "real tokens per sample",
                "peak memory (MiB, " + ("CUDA max allocated)" if args.device == "cuda" else "VmHWM)"),
                "weights (MiB)",
                "model GFLOP/s",
                "MFU (measured matmul peak)",
                *([f"MFU (datasheet {datasheet[1] / 1e12:g} TFLOP/s)"] if datasheet else []),
                f"vs {base['trainer']}: real tokens/s / FLOP/s",
                "loss first → last",
            ],
            table,
        )
    )
    by_name = {r["trainer"]: r for r in rows}
    if "ours" in by_name and "trl" in by_name:
        ours, trl = by_name["ours"], by_name["trl"]
        print(
            f"ours / trl: real tokens/s {ours['real_tokens_per_s'] / trl['real_tokens_per_s']:.2f}×, model "
            f"FLOP/s {ours['flops_per_s'] / trl['flops_per_s']:.2f}×, peak memory "
            f"{ours['peak_mib'] / trl['peak_mib']:.2f}×; TRL's default random batches of these data would be "
            f"{trl['default_order_padding']:.1%} padding (ours {ours['padding']:.1%})"
        )
    (out / "results.json").write_text(
        json.dumps(
            {"args": vars(args), "machine": machine(), "peak": peak, "flops": flops, "rows": rows, "runs": runs},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
