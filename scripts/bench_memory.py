"""Peak memory of one large page: the data check, one training step and a prediction, each in a fresh process.

    python scripts/bench_memory.py [--code /tmp/before] [--repeats 2] [--out runs/bench-memory]

Pages: a 144-megapixel page of one colour (12000×12000 white, as PNG and as JPEG) and a 35-megapixel A4 scan at
600 dpi (4960×7016 JPEG, a synthetic invoice), with a 1-megapixel page as the baseline. For each page and each step a
new Python process (so that no earlier allocation counts) runs, on a tiny H2OVL-Mississippi model with the real
checkpoints' 448-px tiles (up to 6 + thumbnail; a 1-layer 32-wide tower, a 2-layer 64-wide LLM):
- `check`: `prepare_samples` of a one-sample JSONL (`data.max_image_pixels` raised to 200 M for the 144 MP page);
- `train`: the check, then one training step on a batch of that one page (`DocumentDataset`, `Collator`, forward,
  backward, AdamW step);
- `predict`: the check, then generation of 4 tokens for the page (left-padded batch of one, as `finetune predict`).
Each reports its peak resident memory (`VmHWM` of /proc/self/status, read by the process itself as it ends: not
`ru_maxrss`, which Linux carries over an exec from the forking parent, so every child would start at this script's
own peak); the least of `--repeats` runs, and its excess over the same step on the 1 MP page (the page's own cost).

`--code DIR` runs the steps against another checkout of the toolkit (e.g. `git archive HEAD | tar -x -C /tmp/before`):
the before of a before / after. The checkpoint is built once, by this checkout, into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
PAGES = {
    "1 MP page (baseline)": ("baseline.jpg", (848, 1200)),
    "144 MP one colour, PNG": ("white-144mp.png", (12000, 12000)),
    "144 MP one colour, JPEG": ("white-144mp.jpg", (12000, 12000)),
    "35 MP scan, JPEG": ("scan-35mp.jpg", (4960, 7016)),
}
STEPS = ("check", "train", "predict")
SKELETON = {"total": ""}
INSTRUCTION = "Read the total."


def write_pages(folder: Path, scale: float = 1.0) -> dict[str, Path]:
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from finetune.synthetic.invoices import make_document

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, (file, size) in PAGES.items():
        size = (max(32, int(size[0] * scale)), max(32, int(size[1] * scale)))
        path = folder / (file if scale == 1 else f"{scale:g}-{file}")
        if not path.exists():
            if file.startswith("white"):
                Image.new("RGB", size, "white").save(path, **({"quality": 90} if file.endswith(".jpg") else {}))
            else:
                page, _ = make_document(random.Random("bench/memory"), "invoices")
                page.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
        files[name] = path
    return files


def build_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from finetune.models import get_family

    if not (folder / "config.json").exists():
        get_family("mississippi").build_tiny_checkpoint(
            folder, image_size=448, patch_size=14, vision_hidden=32, vision_layers=1, text_hidden=64
        )
    return folder


def child(step: str, page: Path, checkpoint: Path, work: Path) -> None:
    """One measurement, in this (fresh) process; prints its peak RSS in MiB as the last line."""
    import torch

    import finetune
    from finetune.data.dataset import Collator, DocumentDataset, prepare_samples

    assert Path(finetune.__file__).resolve().is_relative_to(Path.cwd().resolve()), finetune.__file__
    from finetune.models import get_family

    torch.set_num_threads(1)
    family = get_family("mississippi")
    processor = family.load_processor(str(checkpoint))
    source = work / f"{step}-{page.stem}.jsonl"
    source.write_text(json.dumps({"image": str(page), "target": {"total": "12.50"}}) + "\n")
    samples, report = prepare_samples(
        source,
        split="train",
        family=family,
        processor=processor,
        instruction_text=INSTRUCTION,
        skeleton=SKELETON,
        max_length=100_000,
        max_image_pixels=200_000_000,
    )
    assert report.kept == 1, report.summary()
    if step in ("train", "predict"):
        model = family.load_model(str(checkpoint))
        training = step == "train"
        dataset = DocumentDataset(
            samples, family=family, processor=processor, instruction_text=INSTRUCTION, with_answer=training
        )
        pad = processor.tokenizer.pad_token_id
        batch = Collator(family, pad, padding_side="right" if training else "left")([dataset[0]])
        batch.pop("index")
        if training:
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
        else:
            model.eval()
            batch.pop("labels")
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=4, do_sample=False)
    from bench_common import peak_memory_mib  # VmHWM on the CPU

    print(peak_memory_mib())


def measure(code: Path, step: str, page: Path, checkpoint: Path, work: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", step, str(page), str(checkpoint), str(work)],
        capture_output=True,
        text=True,
        cwd=code,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{step} on {page.name} ({code}) failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose code runs the steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-memory"))
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the pages (smoke tests)")
    parser.add_argument("--child", nargs=4, metavar=("STEP", "PAGE", "CHECKPOINT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, page, checkpoint, work = args.child
        child(step, Path(page), Path(checkpoint), Path(work))
        return
    from bench_common import machine, markdown_table

    out = args.out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    pages = write_pages(out / "pages", args.scale)
    checkpoint = build_checkpoint(out / "tiny-mississippi-448")
    code = args.code.resolve()
    peaks: dict[str, dict[str, float]] = {}
    for name, page in pages.items():
        peaks[name] = {}
        for step in args.steps:
            peaks[name][step] = min(measure(code, step, page, checkpoint, work) for _ in range(args.repeats))
            print(f"{name}: {step} {peaks[name][step]:.0f} MiB", file=sys.stderr)
    base = peaks[next(iter(PAGES))]
    rows = [[name, *(f"{peaks[name][s]:.0f} (+{peaks[name][s] - base[s]:.0f})" for s in args.steps)] for name in pages]
    print(f"\n{machine()}; code: {code}; least of {args.repeats}; peak RSS MiB (+ over the 1 MP page)")
    print(markdown_table(["page", *args.steps], rows))
    label = "before" if code != ROOT else "after"
    (out / f"results-{label}.json").write_text(
        json.dumps({"machine": machine(), "code": str(code), "peak_rss_mib": peaks}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
