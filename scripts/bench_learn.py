"""Does the whole pipeline learn to read? The quickstart's tiny model, trained from scratch on a CPU budget.

    python scripts/bench_learn.py [--preset simple] [--steps 1400] [--eval-every 200] [--out runs/bench-learn]

A randomly initialised H2OVL-Mississippi of the quickstart's size (~2.5 M parameters, 64 px tiles; the 128 px
forms are read as one tile by default, `--max-tiles` allows more at more tokens per sample) trains on synthetic
forms through the real trainer (`finetune/train.py` with `recipes/quickstart.yaml` and overrides), every group
trained fully. Every `--eval-every` steps it generates JSON for a held-out split it never trains on and scores
it (field F1, exact match, nTED). The table is that learning curve against wall-clock time; the budget is 10
CPU minutes (the run says whether it kept to it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="simple", choices=tuple(INSTRUCTIONS))
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-samples", type=int, default=64, help="held-out forms scored at each point")
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--model", default="quickstart", help="size preset of the tiny Mississippi")
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=1,
        help="tiles per image (the 128 px form is read as one 64 px tile; more cost more tokens)",
    )
    parser.add_argument("--out", default="runs/bench-learn")
    args = parser.parse_args()

    from finetune.models import get_family
    from finetune.synthetic.invoices import write_dataset

    out = Path(args.out)
    data = out / f"data-{args.preset}-{args.train_samples}"
    if not (data / "train.jsonl").exists():
        write_dataset(data, seed=0, n_train=args.train_samples, n_val=args.eval_samples, n_test=1, preset=args.preset)
    checkpoint = out / f"model-{args.model}"
    family = get_family("mississippi")
    family.build_tiny_checkpoint(checkpoint, **family.tiny_presets[args.model])  # deterministic, ~1 s
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
    threads = str(os.cpu_count())
    command = [
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
        threads,
        str(REPO / "finetune" / "train.py"),
        "recipe=quickstart",
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
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


if __name__ == "__main__":
    main()
