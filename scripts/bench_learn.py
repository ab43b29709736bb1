"""Does the whole pipeline learn to read? The quickstart's tiny model, trained from scratch on a CPU budget.

    python scripts/bench_learn.py [--preset simple] [--steps 1400] [--eval-every 200] [--out runs/bench-learn]

A randomly initialised H2OVL-Mississippi of the quickstart's size (~2.5 M parameters, 64 px tiles; the 128 px
forms are read as one tile by default, `--max-tiles` allows more at more tokens per sample) trains on synthetic
forms through the real trainer (`finetune/train.py` with `recipes/quickstart.yaml` and overrides), every group
trained fully. Every `--eval-every` steps it generates JSON for a held-out split it never trains on and scores
it (field F1, exact match, nTED). The table is that learning curve against wall-clock time; the budget is 10
CPU minutes (the run says whether it kept to it).

    python scripts/bench_learn.py --dpo [--base-steps 700] [--dpo-steps 60] [--pair-samples 1024] [--reuse-base]

`--dpo`: more SFT against a DPO stage with `pairs: self`, from the same partly trained model, for the same compute.
The `simple` forms, with one line blanked out on a share of them (that field's target is null, so filling it is a
hallucination). Phase 0 trains the tiny model from scratch for `--base-steps` (until it reads some fields and confuses
others) and saves it; from that model, in this order, (b) one `kind: dpo` stage: the model answers `--pair-samples`
training forms, every answer that is not the gold JSON becomes a (gold, answer) pair, then `--dpo-steps` steps of
`--batch-size` pairs; (a) one more SFT stage, with as many steps of `--batch-size` forms as fit in (b)'s measured
wall-clock (generation and reference pass included) at phase 0's seconds per step. Held-out field F1,
hallucinated- and missed-field rates and exact match of the three models are the table.
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


def train_command(overrides: dict) -> list[str]:
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
        str(os.cpu_count()),
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
    parser.add_argument("--out", default="runs/bench-learn")
    dpo = parser.add_argument_group("--dpo: more SFT vs a DPO stage (pairs: self) from the same partly trained model")
    dpo.add_argument("--dpo", action="store_true", help="run this comparison instead of the learning curve")
    dpo.add_argument("--base-steps", type=int, default=700, help="phase 0: SFT steps from scratch (shared)")
    dpo.add_argument("--dpo-steps", type=int, default=60, help="(b): optimizer steps of --batch-size pairs")
    dpo.add_argument("--pair-samples", type=int, default=1024, help="(b): training forms the model answers")
    dpo.add_argument("--dpo-beta", type=float, default=0.1)
    dpo.add_argument("--dpo-lr", type=float, default=None, help="(b)'s learning rate (default: --stage-lr)")
    dpo.add_argument("--stage-lr", type=float, default=3e-4, help="(a)'s learning rate (and (b)'s by default)")
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
        if args.preset != "simple":
            parser.error("--dpo blanks lines of the simple forms: --preset simple only")
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
    subprocess.run(train_command(overrides), check=True, env=TRAIN_ENV)
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
        f"{args.batch_size}, lr {args.lr:g}; {machine()}"
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
# The simple form's two lines (PIL's default font at 22 px, drawn from y = 28 and y = 72) lie in these pixel rows.
LINE_ROWS = {"number": (0, 64), "total": (64, 128)}
GROUPS = {"vision": "full", "projector": "full", "llm": "full"}


def blank_lines(source: Path, out: Path, share: float) -> Path:
    """The forms of `source` with `share` of them missing their number line and as many others their total line
    (painted over in the page's white); that field's target is null. Deterministic per form."""
    from PIL import Image, ImageDraw

    if (out / "train.jsonl").exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split in ("val", "test", "train"):  # train.jsonl last: it marks the folder complete
        lines = []
        for line in (source / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            draw = random.Random(f"blank/{record['image']}").random()
            field = "number" if draw < share else "total" if draw < 2 * share else None
            image = Image.open(source / record["image"]).convert("RGB")
            if field is not None:
                top, bottom = LINE_ROWS[field]
                ImageDraw.Draw(image).rectangle((0, top, image.width - 1, bottom - 1), fill=(255, 255, 255))
                record["target"][field] = None
            image.save(out / record["image"])
            lines.append(json.dumps(record) + "\n")
        (out / f"{split}.jsonl").write_text("".join(lines))
    return out


def run_trainer(overrides: dict) -> tuple[float, list[tuple[float, str]]]:
    """The trainer as `train_command` runs it; its stderr passes through, each line kept with the seconds since the
    start. Returns the run's seconds and those lines."""
    started = time.perf_counter()
    child = subprocess.Popen(train_command(overrides), env=TRAIN_ENV, stderr=subprocess.PIPE, text=True, bufsize=1)
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
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def compare_dpo(args) -> None:
    """Phase 0 (shared), then (b) a DPO stage and (a) more SFT from its model; the table of the three models."""
    out = Path(args.out)
    source = forms(out / f"data-simple-{args.train_samples}-val{args.eval_samples}", args)
    data = blank_lines(source, out / f"{source.name}-blank{args.blank_share:g}", args.blank_share)
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
    base_settings = {
        k: v
        for k, v in vars(args).items()
        if k in ("base_steps", "batch_size", "lr", "train_samples", "eval_samples", "model", "max_tiles", "blank_share")
    }
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
                "output.dir": base,
                "output.if_exists": "overwrite",
            }
        )
        recorded.write_text(json.dumps(base_settings, indent=2) + "\n")
    base_log = read_log(base)
    base_s_per_step = sum(r["seconds"] for r in base_log) / base_log[-1]["step"]
    shared = json.loads((base / "metrics.json").read_text())["after"]

    def arm(name: str, stage: dict, steps: int, lr: float) -> dict:
        run = out / f"dpo-{name}"
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
        seconds, lines = run_trainer(overrides)
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
            "pairs_seconds": 0.0,
            "before": metrics["before"],
            "after": metrics["after"],
            "last_log": log[-1],
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

    dpo_lr = args.dpo_lr or args.stage_lr
    dpo_settings = {"beta": args.dpo_beta, "loss": "sigmoid", "pairs": "self", "sampled": args.sampled}
    b = arm("dpo", {"kind": "dpo", "dpo": dpo_settings, "data": {"train": str(pair_data)}}, args.dpo_steps, dpo_lr)
    b_pairs = b["pair_summary"]["pairs"]
    # (a)'s rows: one forward + backward per form; (b)'s: chosen + rejected per pair, besides building the pairs.
    pairs_per_step = min(args.batch_size, b_pairs)
    b["rows"] = b["steps"] * 2 * pairs_per_step
    if args.sft_steps:
        sft_steps = args.sft_steps
    elif args.same == "rows":  # as many forward + backward rows as (b)'s training steps; its pair building free
        sft_steps = max(1, round(b["rows"] / args.batch_size))
    else:  # as many steps as phase 0's pace fits in (b)'s stage: pairs built, then trained
        sft_steps = max(1, round(b["stage_seconds"] / base_s_per_step))
    a = arm("sft", {}, sft_steps, args.stage_lr)
    a["rows"] = a["steps"] * args.batch_size

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
        [
            f"(b) + DPO, pairs: self (β {args.dpo_beta:g}, lr {b['lr']:g})",
            f"{b['steps']} × {pairs_per_step} pairs",
            f"{b['rows']:,} fwd+bwd + answers to {args.pair_samples} forms + reference fwd",
            f"{b['stage_seconds'] / 60:.2f} ({b['pairs_seconds'] / 60:.2f} of it building pairs)",
            *scores(b["after"]),
        ],
    ]
    print(
        f"\nsimple forms, {args.blank_share:.0%} without their number line and {args.blank_share:.0%} without their "
        f"total (null in the target); {args.train_samples} training / {args.eval_samples} held-out; every group full, "
        f"batch {args.batch_size}; phase 0 lr {args.lr:g} ({base_s_per_step:.2f} s/step); {machine()}"
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
    for label, m in (("phase 0", shared), ("(a) more SFT", a["after"]), ("(b) DPO", b["after"])):
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
    last = b["last_log"]
    print(
        f"(b)'s last logged step: loss {last['loss']:.4f}, reward margin "
        f"{last.get('rewards/margin', float('nan')):.3f}, ranked right {last.get('rewards/accuracy', float('nan')):.0%}"
    )
    same_start = all(
        a["before"][k] == b["before"][k] == shared[k] for k in ("field_f1", "json_exact_match", "per_field")
    )
    print(
        f"both arms start from phase 0's model: {'yes' if same_start else 'NO'} (their `before` scores "
        f"{'equal' if same_start else 'differ from'} phase 0's `after`)"
    )
    how = f"--sft-steps {args.sft_steps}" if args.sft_steps else f"same {args.same}"
    print(
        f"stage 2 ({how}): (a) {a['steps']} steps in {a['stage_seconds']:.0f} s ({a['train_seconds'] / a['steps']:.2f} "
        f"s/step; phase 0 {base_s_per_step:.2f}); (b) {b['stage_seconds']:.0f} s = {b['pairs_seconds']:.0f} s "
        f"building {b_pairs} pairs + {b['steps']} steps in {b['train_seconds']:.0f} s "
        f"({b['train_seconds'] / b['steps']:.2f} s/step)"
    )
    (out / "results-dpo.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": machine(),
                "base_seconds_per_step": base_s_per_step,
                "shared": shared,
                "sft": a,
                "dpo": b,
                "same_start": same_start,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
