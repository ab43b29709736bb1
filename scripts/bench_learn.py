"""Does the whole pipeline learn to read? The quickstart's tiny model, trained from scratch on a CPU budget.

    python scripts/bench_learn.py [--preset simple] [--steps 1400] [--eval-every 200] [--out runs/bench-learn]

A randomly initialised H2OVL-Mississippi of the quickstart's size (~2.5 M parameters, 64 px tiles; the 128 px
forms are read as one tile by default, `--max-tiles` allows more at more tokens per sample) trains on synthetic
forms through the real trainer (`finetune/train.py` with `recipes/quickstart.yaml` and overrides), every group
trained fully. Every `--eval-every` steps it generates JSON for a held-out split it never trains on and scores
it (field F1, exact match, nTED). The table is that learning curve against wall-clock time; the budget is 10
CPU minutes (the run says whether it kept to it).

    python scripts/bench_learn.py --dpo [--threads 1] [--base-steps 1200] [--dpo-lr 3e-4 3e-5 3e-6] [--reuse-base]

`--dpo`: more SFT against a DPO stage with `pairs: self`, from the same partly trained model, for the same compute.
The forms are the script's own: 64 px, the `digits` preset's font at native resolution, a 5-digit number above an
amount; a share of them lack one of the two lines, and that field's target is null, so filling it in is a
hallucination (the presets never leave a field empty, and the 128 px `simple` forms, read as one 64 px tile, did not
leave the loss plateau within 1,000 steps once lines were blanked). Phase 0 trains the tiny model from scratch for
`--base-steps` (cosine schedule; a learning-curve point every `--base-eval-every` steps) until it reads some fields
and confuses others, and saves it. From that model, in this order: (b) one `kind: dpo` stage per `--dpo-lr`: the
model answers the first `--pair-samples` training forms, every answer that is not the gold JSON becomes a (gold,
answer) pair, then `--dpo-steps` steps of `--batch-size` pairs; (a) one more SFT stage on the whole training set,
with as many steps of `--batch-size` forms as fit in the first DPO run's measured time (building its pairs included)
at phase 0's seconds per step (`--same rows`: as many forward + backward rows as its training steps instead).
Every run is `finetune/train.py` with overrides, one stage of every group full. The table: held-out field F1,
hallucinated- and missed-field rates, exact match, per-field outcomes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, markdown_table  # noqa: E402 (after the sys.path set-up)

BUDGET_MINUTES = 10.0
INSTRUCTIONS = {
    "simple": "Extract the number and the total from the form image and structure them into JSON format:",
    "digits": "Extract the number from the form image and structure it into JSON format:",
    "form": "Extract the name, date and total from the form image and structure them into JSON format:",
}


def forms(data: Path, args) -> Path:
    """The synthetic forms (written once; deterministic)."""
    from finetune.synthetic.invoices import write_dataset

    if not (data / "train.jsonl").exists():
        write_dataset(data, seed=0, n_train=args.train_samples, n_val=args.eval_samples, n_test=1, preset=args.preset)
    return data


def tiny_model(out: Path, size: str) -> Path:
    """The randomly initialised tiny Mississippi (deterministic, ~1 s)."""
    from finetune.models import get_family

    checkpoint = out / f"model-{size}"
    family = get_family("mississippi")
    family.build_tiny_checkpoint(checkpoint, **family.tiny_presets[size])
    return checkpoint


TRAIN_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train_command(overrides: dict, threads: int) -> list[str]:
    """The real trainer on one process: `accelerate launch finetune/train.py recipe=quickstart key=value ...`."""
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        str(threads),
        str(REPO / "finetune" / "train.py"),
        "recipe=quickstart",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="simple", choices=tuple(INSTRUCTIONS))
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument(
        "--eval-samples", type=int, default=None, help="held-out forms scored at each point (64; --dpo: 256)"
    )
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--model", default="quickstart", help="size preset of the tiny Mississippi")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=1,
        help="tiles per image (the 128 px form is read as one 64 px tile; more cost more tokens)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="the trainer's CPU threads (fewer than the cores when other jobs share the machine: torch's threads "
        "wait for each other at every operation, so one that is descheduled stalls them all)",
    )
    parser.add_argument("--out", default="runs/bench-learn")
    dpo = parser.add_argument_group("--dpo: more SFT vs a DPO stage (pairs: self) from the same partly trained model")
    dpo.add_argument("--dpo", action="store_true", help="run this comparison instead of the learning curve")
    dpo.add_argument("--base-steps", type=int, default=1200, help="phase 0: SFT steps from scratch (shared)")
    dpo.add_argument("--base-eval-every", type=int, default=100, help="phase 0's learning curve: steps between points")
    dpo.add_argument("--dpo-steps", type=int, default=60, help="(b): optimizer steps of --batch-size pairs")
    dpo.add_argument("--pair-samples", type=int, default=1024, help="(b): training forms the model answers")
    dpo.add_argument("--dpo-beta", type=float, default=0.1)
    dpo.add_argument(
        "--dpo-lr",
        type=float,
        nargs="+",
        default=[3e-4, 3e-5, 3e-6],
        help="(b)'s learning rates, one DPO run each: (a)'s, a tenth and a hundredth of it by default",
    )
    dpo.add_argument("--dpo-sft-weight", type=float, default=0.0, help="(b): weight of an NLL term on the chosen")
    dpo.add_argument("--stage-lr", type=float, default=3e-4, help="(a)'s learning rate")
    dpo.add_argument("--sampled", type=int, default=0, help="(b): sampled answers per form besides the greedy one")
    dpo.add_argument(
        "--sft-steps", type=int, default=None, help="(a)'s steps (default: as many as fit in (b)'s wall-clock)"
    )
    dpo.add_argument(
        "--blank-share",
        type=float,
        default=0.2,
        help="share of forms without their number line, and as many again without their total line",
    )
    dpo.add_argument(
        "--same",
        choices=("wall-clock", "rows"),
        default="wall-clock",
        help="(a)'s steps: as many as fit in (b)'s stage wall-clock at phase 0's pace (pair building included), or "
        "as many forward + backward rows as (b)'s training steps",
    )
    dpo.add_argument("--reuse-base", action="store_true", help="reuse phase 0's model if its settings match")
    args = parser.parse_args()
    if args.eval_samples is None:
        args.eval_samples = 256 if args.dpo else 64
    if args.dpo:
        compare_dpo(args)
        return

    out = Path(args.out)
    data = forms(out / f"data-{args.preset}-{args.train_samples}", args)
    checkpoint = tiny_model(out, args.model)
    run = out / "run"
    overrides = {
        "model.path": checkpoint,
        "model.processor": f"{{max_tiles_per_image: {args.max_tiles}}}",
        "data.train": data / "train.jsonl",
        "data.val": data / "val.jsonl",
        "data.test": "null",
        "data.prompt.instruction": json.dumps(INSTRUCTIONS[args.preset]),
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.checkpoint_every": "null",
        # A log line at every evaluation step, for its clock time.
        "train.log_every": math.gcd(10, args.eval_every),
        "optim.lr": args.lr,
        "eval.every_steps": args.eval_every,
        "eval.during_training_samples": args.eval_samples,
        "eval.max_new_tokens": 64,
        "eval.best_metric": "field_f1",
        "eval.before_training": "false",
        "eval.after_training": "false",
        "output.dir": run,
    }
    started = time.perf_counter()
    subprocess.run(train_command(overrides, args.threads), check=True, env=TRAIN_ENV)
    minutes = (time.perf_counter() - started) / 60

    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    clock, elapsed = {}, 0.0
    for record in log:  # cumulative training time (evaluations included) at each logged step
        elapsed += record["seconds"]
        clock[record["step"]] = (elapsed, record["loss"])
    rows, curve = [], []
    for point in json.loads((run / "metrics.json").read_text())["during"]:
        step = point["step"]
        seconds, loss = clock.get(step, (float("nan"), float("nan")))
        m = point
        curve.append(
            {
                "step": step,
                "minutes": seconds / 60,
                "loss": loss,
                "field_f1": m["field_f1"],
                "json_exact_match": m["json_exact_match"],
                "ted_accuracy": m["ted_accuracy"],
                "valid_json_rate": m["valid_json_rate"],
            }
        )
        rows.append(
            [
                str(step),
                f"{seconds / 60:.1f}",
                f"{loss:.3f}",
                f"{m['field_f1']:.3f}",
                f"{m['json_exact_match']:.1%}",
                f"{m['ted_accuracy']:.3f}",
                f"{m['valid_json_rate']:.0%}",
            ]
        )
    print(
        f"\n{args.preset} forms, {args.train_samples} training / {args.eval_samples} held-out, "
        f"{args.max_tiles} tile(s) per image, batch "
        f"{args.batch_size}, lr {args.lr:g}; {machine().rsplit(', ', 1)[0]}, trainer threads {args.threads}"
    )
    print(
        markdown_table(
            ["step", "minutes", "train loss", "field F1", "exact match", "nTED accuracy", "valid JSON"], rows
        )
    )
    within = "within" if minutes <= BUDGET_MINUTES else "OVER"
    print(
        f"training run {minutes:.1f} min ({within} the {BUDGET_MINUTES:.0f}-minute budget; loading and data checks "
        f"included, writing the synthetic data before it not); "
        f"best field F1 {max(c['field_f1'] for c in curve):.3f}"
    )
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "machine": machine(), "minutes": minutes, "curve": curve}, indent=2) + "\n"
    )


# --dpo ---------------------------------------------------------------------------------------------------------------
GROUPS = {"vision": "full", "projector": "full", "llm": "full"}
# What phase 0's model depends on: `--reuse-base` reuses it only when they are unchanged.
BASE_SETTINGS = (
    "base_steps",
    "base_eval_every",
    "batch_size",
    "lr",
    "train_samples",
    "eval_samples",
    "model",
    "max_tiles",
    "blank_share",
    "threads",
)


def two_line_forms(out: Path, *, n_train: int, n_val: int, share: float) -> Path:
    """64 px forms with two lines at native resolution, the `digits` preset's font and size: a 5-digit number above
    an amount (`{"number": "60494", "total": "63.05"}`). `share` of the forms have no number line and as many others
    no total line: that field's target is null. Deterministic per form; written once."""
    from finetune.synthetic.render import Page, load_font

    if (out / "train.jsonl").exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    font = load_font(None, 20)
    for split, count in (("val", n_val), ("train", n_train)):  # train.jsonl last: it marks the folder complete
        lines = []
        for index in range(count):
            rng = random.Random(f"two-line/{split}/{index}")
            target = {"number": str(rng.randint(10000, 99999)), "total": f"{rng.randint(1000, 9999) / 100:.2f}"}
            draw = rng.random()
            blank = "number" if draw < share else "total" if draw < 2 * share else None
            page = Page(64, 64, (255, 255, 255), (0, 0, 0))
            for field, y in (("number", 4), ("total", 34)):  # glyphs in rows 10-24 and 40-53
                if field == blank:
                    target[field] = None
                else:
                    page.text(4, y, target[field], font)
            name = f"images/{split}_{index:05d}.png"
            page.image.save(out / name)
            lines.append(json.dumps({"image": name, "target": target}) + "\n")
        (out / f"{split}.jsonl").write_text("".join(lines))
    return out


def run_trainer(overrides: dict, threads: int) -> tuple[float, list[tuple[float, str]]]:
    """The trainer as `train_command` runs it; its stderr passes through, each line kept with the seconds since the
    start. Returns the run's seconds and those lines."""
    started = time.perf_counter()
    child = subprocess.Popen(
        train_command(overrides, threads), env=TRAIN_ENV, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    lines = []
    for line in child.stderr:
        sys.stderr.write(line)
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
    if child.wait():
        raise subprocess.CalledProcessError(child.returncode, child.args)
    return time.perf_counter() - started, lines


def seconds_at(lines: list[tuple[float, str]], start: str) -> float:
    """When the trainer printed the first `[finetune] <start>...` line."""
    for seconds, line in lines:
        if line.startswith(f"[finetune] {start}"):
            return seconds
    raise RuntimeError(f"the trainer printed no line starting with {start!r}")


def read_log(run: Path) -> list[dict]:
    """A run's train_log.jsonl (none: a DPO stage without pairs, skipped)."""
    path = run / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def compare_dpo(args) -> None:
    """Phase 0 (shared), then (b) a DPO stage and (a) more SFT from its model; the table of the three models."""
    out = Path(args.out)
    data = out / f"data-two-line-{args.train_samples}-val{args.eval_samples}-blank{args.blank_share:g}"
    data = two_line_forms(data, n_train=args.train_samples, n_val=args.eval_samples, share=args.blank_share)
    pair_data = data / f"train-first{args.pair_samples}.jsonl"  # (b)'s stage data: forms it answers
    pair_data.write_text(
        "".join(data.joinpath("train.jsonl").read_text().splitlines(keepends=True)[: args.pair_samples])
    )
    common = {
        "model.processor": f"{{max_tiles_per_image: {args.max_tiles}}}",
        "data.train": data / "train.jsonl",
        "data.val": data / "val.jsonl",
        "data.test": "null",
        "data.prompt.instruction": json.dumps(INSTRUCTIONS["simple"]),
        # Fixed, so that every run's prompt (and schema) is the same whatever its stage data.
        "data.prompt.skeleton": json.dumps({"number": "", "total": ""}),
        "train.batch_size": args.batch_size,
        "train.checkpoint_every": "null",
        "train.log_every": 10,
        "eval.every_steps": "null",
        "eval.during_training_samples": args.eval_samples,
        "eval.max_new_tokens": 64,
        "eval.report": "false",
        "eval.after_training": "true",
    }

    # Phase 0: from scratch, every group full, until it reads some fields and confuses others.
    base = out / "dpo-base"
    base_settings = {k: v for k, v in vars(args).items() if k in BASE_SETTINGS}
    recorded = base / "bench_settings.json"
    reuse = (
        args.reuse_base
        and (base / "final").is_dir()
        and (base / "metrics.json").is_file()
        and recorded.is_file()
        and json.loads(recorded.read_text()) == base_settings
    )
    if reuse:
        print(f"phase 0: reusing {base / 'final'} (same settings)", file=sys.stderr)
    else:
        run_trainer(
            {
                **common,
                "model.path": tiny_model(out, args.model),
                "train.max_steps": args.base_steps,
                "optim.lr": args.lr,
                "eval.before_training": "false",
                # Its learning curve, on the first half of the held-out forms.
                "eval.every_steps": args.base_eval_every,
                "eval.during_training_samples": max(1, args.eval_samples // 2),
                "eval.best_metric": "field_f1",
                "output.dir": base,
                "output.if_exists": "overwrite",
            },
            args.threads,
        )
        recorded.write_text(json.dumps(base_settings, indent=2) + "\n")
    base_log = read_log(base)
    # Its pace: the median log line's seconds per step (a line after an evaluation counts that evaluation too).
    previous = [0] + [r["step"] for r in base_log[:-1]]
    paces = sorted(r["seconds"] / (r["step"] - p) for r, p in zip(base_log, previous, strict=True))
    base_s_per_step = paces[len(paces) // 2]
    base_metrics = json.loads((base / "metrics.json").read_text())
    shared, curve = base_metrics["after"], base_metrics.get("during", [])

    def arm(name: str, stage: dict, steps: int, lr: float, run: Path) -> dict:
        overrides = {
            **common,
            "model.path": base / "final",
            "tuning.groups": "null",  # the stage gives them
            "stages": json.dumps([{"name": name, "groups": GROUPS, "max_steps": steps, "lr": lr, **stage}]),
            "train.max_steps": steps,
            "eval.before_training": "true",  # the start, scored again: the same model in both arms
            "output.dir": run,
            "output.if_exists": "overwrite",
        }
        seconds, lines = run_trainer(overrides, args.threads)
        metrics = json.loads((run / "metrics.json").read_text())
        log = read_log(run)
        # The stage's compute: its optimizer steps (train_log.jsonl's seconds; evaluations before and after left
        # out) and, for DPO, building its pairs (answers and reference pass, from the set-up's last data line on).
        train_seconds = sum(r["seconds"] for r in log)
        result = {
            "run": str(run),
            "steps": steps,
            "lr": lr,
            "run_seconds": seconds,
            "train_seconds": train_seconds,
            "rows": sum(r["samples"] for r in log),  # sequences through forward + backward (a pair is two)
            "pairs_seconds": 0.0,
            "before": metrics["before"],
            "after": metrics["after"],
            "last_log": log[-1] if log else {},
        }
        if "preference" in metrics:
            built = seconds_at(lines, f"stage '{name}': the model answered")
            data_read = max(t for t, line in lines if line.startswith("[finetune] data ") and t <= built)
            result["pairs_seconds"] = built - data_read
            result["preference"] = metrics["preference"]
            summary = run / "preference" / f"stage1-{name}" / "summary.json"
            result["pair_summary"] = json.loads(summary.read_text())
        result["stage_seconds"] = result["pairs_seconds"] + train_seconds
        return result

    dpo_settings = {"beta": args.dpo_beta, "loss": "sigmoid", "pairs": "self", "sampled": args.sampled}
    dpo_settings["sft_weight"] = args.dpo_sft_weight
    dpo_stage = {"kind": "dpo", "dpo": dpo_settings, "data": {"train": str(pair_data)}}
    dpo_arms = [arm("dpo", dpo_stage, args.dpo_steps, lr, out / f"dpo-dpo-lr{lr:g}") for lr in args.dpo_lr]
    b = dpo_arms[0]  # (a)'s compute is matched to the first
    b_pairs = b["pair_summary"]["pairs"]
    if args.sft_steps:
        sft_steps = args.sft_steps
    elif args.same == "rows":  # as many forward + backward rows as (b)'s training steps; its pair building free
        sft_steps = max(1, round(b["rows"] / args.batch_size))
    else:  # as many steps as phase 0's pace fits in (b)'s stage: pairs built, then trained
        sft_steps = max(1, round(b["stage_seconds"] / base_s_per_step))
    a = arm("sft", {}, sft_steps, args.stage_lr, out / "dpo-sft")

    def scores(m: dict) -> list[str]:
        return [
            f"{m['field_f1']:.3f}",
            f"{m['hallucinated_field_rate']:.1%}",
            f"{m['missed_field_rate']:.1%}",
            f"{m['json_exact_match']:.1%}",
            f"{m['valid_json_rate']:.0%}",
        ]

    rows = [
        [f"after phase 0 ({args.base_steps} SFT steps from scratch; shared)", "—", "—", "—", *scores(shared)],
        [
            f"(a) + more SFT (lr {a['lr']:g})",
            f"{a['steps']} × {args.batch_size} forms",
            f"{a['rows']:,} fwd+bwd",
            f"{a['stage_seconds'] / 60:.2f}",
            *scores(a["after"]),
        ],
        *[
            [
                f"(b) + DPO, pairs: self (β {args.dpo_beta:g}, lr {d['lr']:g}"
                + (f", sft_weight {args.dpo_sft_weight:g})" if args.dpo_sft_weight else ")"),
                f"{d['steps'] if b_pairs else 0} × {min(args.batch_size, b_pairs)} pairs",
                f"{d['rows']:,} fwd+bwd + answers to {args.pair_samples} forms + reference fwd",
                f"{d['stage_seconds'] / 60:.2f} ({d['pairs_seconds'] / 60:.2f} of it building pairs)",
                *scores(d["after"]),
            ]
            for d in dpo_arms
        ],
    ]
    print(
        f"\ntwo-line 64 px forms, {args.blank_share:.0%} without their number line and {args.blank_share:.0%} without "
        f"their total (null in the target); {args.train_samples} training / {args.eval_samples} held-out; every group "
        f"full, batch {args.batch_size}; phase 0 lr {args.lr:g} ({base_s_per_step:.2f} s/step); "
        f"{machine().rsplit(', ', 1)[0]}, trainer threads {args.threads}"
    )
    print(
        f"phase 0's learning curve (field F1 / filled but should be empty, first {args.eval_samples // 2} held-out "
        "forms): "
        + ", ".join(f"step {c['step']} {c['field_f1']:.3f} / {c['hallucinated_field_rate']:.0%}" for c in curve)
    )
    print(
        markdown_table(
            [
                "model",
                "stage 2",
                "stage-2 rows",
                "stage-2 minutes",
                "field F1",
                "filled but should be empty",
                "missed",
                "exact match",
                "valid JSON",
            ],
            rows,
        )
    )
    outcomes = ("right", "wrong", "missed", "hallucinated", "empty")
    field_rows = []
    models = [("phase 0", shared), ("(a) more SFT", a["after"])]
    models += [(f"(b) DPO lr {d['lr']:g}", d["after"]) for d in dpo_arms]
    for label, m in models:
        for field, counts in m["per_field"].items():
            field_rows.append([label, field, *(str(counts[k]) for k in outcomes)])
    print("\nheld-out outcomes per field (forms):")
    print(markdown_table(["model", "field", *outcomes], field_rows))
    summary = b["pair_summary"]
    print(
        f"\n(b)'s pairs: the phase-0 model answered {summary['greedy_right']}/{summary['samples']} training forms "
        f"right ({summary['greedy_invalid']} invalid JSON); {summary['pairs']} pairs; per field "
        + "; ".join(f"{f}: " + ", ".join(f"{c[k]} {k}" for k in outcomes[1:4]) for f, c in summary["fields"].items())
    )
    for d in dpo_arms:
        last = d["last_log"]
        print(
            f"(b) lr {d['lr']:g}, last logged step: loss {last.get('loss', float('nan')):.4f}, reward margin "
            f"{last.get('rewards/margin', float('nan')):.3f}, pairs ranked right "
            f"{last.get('rewards/accuracy', float('nan')):.0%}"
        )
    same_start = all(
        r["before"][k] == shared[k] for r in (a, *dpo_arms) for k in ("field_f1", "json_exact_match", "per_field")
    )
    print(
        f"both arms start from phase 0's model: {'yes' if same_start else 'NO'} (their `before` scores "
        f"{'equal' if same_start else 'differ from'} phase 0's `after`)"
    )
    how = f"--sft-steps {args.sft_steps}" if args.sft_steps else f"same {args.same}"
    print(
        f"stage 2 ({how}, to the first DPO run): (a) {a['steps']} steps in {a['stage_seconds']:.0f} s "
        f"({a['train_seconds'] / a['steps']:.2f} s/step; phase 0 {base_s_per_step:.2f}); "
        + "; ".join(
            f"(b) lr {d['lr']:g} {d['stage_seconds']:.0f} s = {d['pairs_seconds']:.0f} s building "
            f"{d['pair_summary']['pairs']} pairs + {d['steps']} steps in {d['train_seconds']:.0f} s "
            f"({d['train_seconds'] / d['steps']:.2f} s/step)"
            for d in dpo_arms
        )
    )
    (out / "results-dpo.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": machine(),
                "base_seconds_per_step": base_s_per_step,
                "base_curve": curve,
                "shared": shared,
                "sft": a,
                "dpo": dpo_arms,
                "same_start": same_start,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
