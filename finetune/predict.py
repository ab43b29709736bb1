"""Read documents with a fine-tuned model: one JSON object per image, as JSON Lines on stdout.

    finetune predict --model runs/invoices-mississippi-800m-lora scans/*.png
    finetune predict --model runs/x/final --constrained scans/            # a folder: every image in it
    finetune predict --model runs/x invoice.pdf                           # a PDF: its pages, one prompt
    finetune predict --model runs/merged --family mississippi "inbox/**/*.jpg"

`--model` is anything `finetune.eval` takes (a run folder, an adapter, a merged model). Images are generated for
in batches with the prompt the model was trained with (its prompt.json); a base checkpoint without one takes
`--instruction` and/or `--skeleton` (a JSON object or JSON file: the answer's keys). `--constrained` decodes with the
answer schema and bounds the model folder was saved with (prompt.json `answer`; else 64 characters, 16 items), and
max_new_tokens is checked against the longest answer they allow (`finetune.constrained.fit_token_budget`). Each
output line: `{"image": ..., "prediction": {...} or null, "valid_json": true/false, "truncated": true/false,
"text": raw output}` (`truncated`: cut by max_new_tokens, then no prediction); nothing else goes to stdout.
`python -m finetune.predict` is the same command.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from finetune.cli import ArgumentParser, positive_int, run_entry_point
from finetune.errors import UserError

# .pdf: every page is one image of the document's prompt (finetune/data/pdf.py), at the run's data.pdf_dpi
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".pdf"}


def collect_images(inputs: list[str]) -> list[str]:
    """Files, folders (their images and PDFs, sorted) and glob patterns → paths, in order, without repeats."""
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
    skeleton: str | dict | None = None,
    constrained: bool = False,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_pdf_pages: int | None = None,
    max_string_length: int | None = None,
    max_items: int | None = None,
) -> list[dict]:
    """One record per image: the parsed prediction (None when not valid JSON or truncated) and the raw text."""
    from accelerate import Accelerator

    from finetune.constrained import DEFAULT_MAX_NEW_TOKENS, JsonConstraint, fit_token_budget, trained_answer
    from finetune.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, prepare_samples
    from finetune.data.pdf import pdf_settings
    from finetune.data.prompt import render_instruction
    from finetune.eval import DEFAULT_INSTRUCTION
    from finetune.evaluation import evaluate
    from finetune.loading import load_model_and_processor, resolve_model
    from finetune.progress import info
    from finetune.schema import read_skeleton

    given_skeleton = read_skeleton(skeleton) if skeleton is not None else None
    source = resolve_model(model, family=family, base=base)
    if source.prompt is None and instruction is None and given_skeleton is None:
        raise UserError(
            f"{model}: no prompt.json to say how the model was prompted; pass --skeleton (and/or --instruction)"
        )
    if given_skeleton is not None and source.prompt:
        raise UserError(f"--skeleton: {source.weights} has the skeleton it was trained with (prompt.json); drop it")
    if source.prompt:
        skeleton = source.prompt["skeleton"]
        instruction_text = render_instruction(instruction, skeleton) if instruction else source.prompt["instruction"]
    else:
        skeleton = given_skeleton or {}
        instruction_text = render_instruction(instruction or DEFAULT_INSTRUCTION, skeleton)
    trained = trained_answer(source.prompt)
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
        **pdf_settings(source.recipe, max_pdf_pages=max_pdf_pages),
    )
    if len(samples) != len(images):
        raise UserError(f"some images could not be read: {report.summary()}")
    accelerator = Accelerator()
    say = info if accelerator.is_main_process else lambda message: None  # one line per run, not per process
    net = accelerator.prepare(net)
    constraint = None
    if constrained:
        constraint = JsonConstraint.for_model(
            accelerator.unwrap_model(net),
            fam,
            processor,
            skeleton,
            max_string_length=max_string_length or (trained and trained["max_string_length"]),
            max_items=max_items or (trained and trained["max_items"]),
            answer_schema=trained["schema"] if trained else None,
        )
        say(
            f"constrained decoding: strings up to {constraint.max_string_length} characters, lists up to "
            f"{constraint.max_items} items"
        )
        max_new_tokens = fit_token_budget(max_new_tokens, constraint.token_budget, say=say)
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS
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
        {
            "image": images[r["index"]],
            "prediction": r["prediction"],
            "valid_json": r["valid_json"],
            "truncated": r["truncated"],
            "text": r["text"],
        }
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
    parser.add_argument(
        "--skeleton", help="answer skeleton for a model without prompt.json: a JSON object or a JSON file"
    )
    parser.add_argument("--constrained", action="store_true", help="schema-constrained decoding (xgrammar)")
    parser.add_argument(
        "--max-string-length",
        type=positive_int,
        help="constrained: longest string (default: the model's saved bound, else 64)",
    )
    parser.add_argument(
        "--max-items", type=positive_int, help="constrained: longest list (default: the model's saved bound, else 16)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument(
        "--max-pdf-pages",
        type=positive_int,
        help="most PDF pages per sample (default: the run's data.max_pdf_pages, else 8); more is an error",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="generation budget (default 512; constrained: raised to fit the longest answer the bounds allow, up to "
        "4096; given, it is kept and a warning says when it is too small)",
    )
    args = parser.parse_args(argv)
    from finetune.schema import read_skeleton

    skeleton = read_skeleton(args.skeleton) if args.skeleton is not None else None  # a bad one before the images
    records = predict(
        args.model,
        collect_images(args.images),
        family=args.family,
        base=args.base,
        instruction=args.instruction,
        skeleton=skeleton,
        constrained=args.constrained,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_pdf_pages=args.max_pdf_pages,
        max_string_length=args.max_string_length,
        max_items=args.max_items,
    )
    for record in records:
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    return records


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
