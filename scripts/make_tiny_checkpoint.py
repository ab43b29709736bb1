"""Write a tiny randomly initialised checkpoint in the exact Hub file layout, offline.

    python scripts/make_tiny_checkpoint.py --family mississippi --preset quickstart --out checkpoints/tiny-mississippi

Used by the quickstart and the tests: the real loading code runs on it exactly as on a Hub checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.models import family_names, get_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    families = family_names()  # the registry, in the order it lists families to users
    parser.add_argument("--family", default=families[0], choices=families)
    parser.add_argument(
        "--preset", default="quickstart", help="size preset (auto: one per proven model, e.g. qwen2_5_vl)"
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    family = get_family(args.family)
    if args.preset not in family.tiny_presets:
        parser.error(f"--preset: {args.family} has presets {sorted(family.tiny_presets)}")
    if (args.out / "config.json").exists() and not args.overwrite:
        print(f"{args.out}: checkpoint exists, kept (pass --overwrite to rebuild)")
        return
    if args.out.exists():
        shutil.rmtree(args.out)  # --overwrite: no file of an older build may survive beside the new one
    family.build_tiny_checkpoint(args.out, seed=args.seed, **family.tiny_presets[args.preset])
    print(f"{args.family} tiny checkpoint ({args.preset}) -> {args.out}")


if __name__ == "__main__":
    main()
