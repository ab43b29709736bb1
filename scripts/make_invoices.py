"""Generate a synthetic invoice / receipt / form dataset (images + train/val/test JSONL).

    python scripts/make_invoices.py --out data/invoices --seed 0 \
        --n-train 200 --n-val 32 --n-test 32 --preset invoices [--overwrite]

Presets: "invoices" (realistic pages and receipts), "form" (256x256 cards), "simple"
(128x128, two lines; learnable by a tiny model on CPU). Same seed + preset -> identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import finetune.synthetic  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.synthetic.invoices import PRESETS, write_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--preset", choices=PRESETS, default="invoices")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/val/test.jsonl in --out")
    args = parser.parse_args(argv)

    try:
        paths = write_dataset(
            args.out,
            seed=args.seed,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            preset=args.preset,
            overwrite=args.overwrite,
        )
    except FileExistsError as err:
        parser.exit(1, f"error: {err}\n")
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    for split, path in paths.items():
        print(f"{split}: {counts[split]} samples -> {path}")


if __name__ == "__main__":
    main()
