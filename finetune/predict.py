"""Read documents with a fine-tuned model: one JSON object per image, as JSON Lines on stdout.

    finetune predict --model runs/invoices-mississippi-800m-lora scans/*.png
    finetune predict --model runs/x/final --constrained scans/            # a folder: every image in it
    finetune predict --model runs/merged --family mississippi "inbox/**/*.jpg"

`--model` is anything `finetune.eval` takes (a run folder, an adapter, a merged model). Images are generated for
in batches with the prompt the model was trained with (its prompt.json). Each output line:
`{"image": ..., "prediction": {...} or null, "valid_json": true/false, "text": raw output}`; nothing else goes to
stdout. `python -m finetune.predict` is the same command.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from finetune.cli import ArgumentParser, run_entry_point
from finetune.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def collect_images(inputs: list[str]) -> list[str]:
    """Files, folders (their images, sorted) and glob patterns → image paths, in order, without repeats."""
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no file matches")
            found += [m for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserError(f"{item}: no such file or folder")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError("no images to read")
    return unique


def predict(
    model: str,
    images: list[str],
    *,
    family: str | None = None,
    base: str | None = None,
    instruction: str | None = None,
    constrained: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    max_string_length: int = 64,
    max_items: int = 16,
) -> list[dict]:
    """One record per image: the parsed prediction (None when not valid JSON) and the raw text."""
    from accelerate import Accelerator

    from finetune.constrained import JsonConstraint
    from finetune.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, prepare_samples
    from finetune.data.prompt import render_instruction
    from finetune.evaluation import evaluate
    from finetune.loading import load_model_and_processor, resolve_model

    source = resolve_model(model, family=family, base=base)
    if source.prompt is None and instruction is None:
        raise UserError(f"{model}: no prompt.json to say how the model was prompted; pass --instruction")
    skeleton = source.prompt["skeleton"] if source.prompt else {}
    instruction_text = render_instruction(instruction, skeleton) if instruction else source.prompt["instruction"]
    fam, processor, net = load_model_and_processor(source)
    rows = [{"image": path, "target": {}} for path in images]
    samples, report = prepare_samples(
        rows,
        split="predict",
        family=fam,
        processor=processor,
        instruction_text=instruction_text,
        skeleton=skeleton,
        max_length=1 << 20,
        # the run's own limit, so that it reads the pages it was trained on
        max_image_pixels=source.recipe.get("data", {}).get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS,
    )
    if len(samples) != len(images):
        raise UserError(f"some images could not be read: {report.summary()}")
    accelerator = Accelerator()
    net = accelerator.prepare(net)
    constraint = None
    if constrained:
        constraint = JsonConstraint.for_model(
            accelerator.unwrap_model(net),
            fam,
            processor,
            skeleton,
            max_string_length=max_string_length,
            max_items=max_items,
        )
    result = evaluate(
        net,
        samples,
        family=fam,
        processor=processor,
        instruction_text=instruction_text,
        accelerator=accelerator,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        constraint=constraint,
    )
    return [
        {"image": images[r["index"]], "prediction": r["prediction"], "valid_json": r["valid_json"], "text": r["text"]}
        for r in result.predictions
    ]


def main(argv: list[str] | None = None, *, prog: str | None = None) -> list[dict]:
    """Command line: see the module docstring."""
    parser = ArgumentParser(
        prog=prog or "python -m finetune.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="run folder, adapter or merged model folder")
    parser.add_argument("--family", help="model family (default: from the run's recipe or the checkpoint config)")
    parser.add_argument("--base", help="base checkpoint of an adapter (default: the one it records)")
    parser.add_argument("--instruction", help="reword the instruction (the trained skeleton stays)")
    parser.add_argument("--constrained", action="store_true", help="schema-constrained decoding (xgrammar)")
    parser.add_argument("--max-string-length", type=int, default=64, help="constrained: longest string")
    parser.add_argument("--max-items", type=int, default=16, help="constrained: longest list")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    records = predict(
        args.model,
        collect_images(args.images),
        family=args.family,
        base=args.base,
        instruction=args.instruction,
        constrained=args.constrained,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_string_length=args.max_string_length,
        max_items=args.max_items,
    )
    for record in records:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
