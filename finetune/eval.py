"""Evaluate a base model, a LoRA adapter or a merged / fully trained model on a split or a JSONL file.

    finetune eval --model runs/invoices/final --data test
    finetune eval --model runs/invoices --data data/invoices/test.jsonl --constrained
    finetune eval --model h2oai/h2ovl-mississippi-800m --family mississippi --data data/test.jsonl \\
        --instruction "Extract the details from the invoice image and structure them into JSON format:"

`--model` is a run folder (its `final/` and `recipe.yaml` are used), a saved model or adapter folder, or a Hub id
/ local base checkpoint. The prompt comes from the model's `prompt.json` (what it was trained with), else from
`--instruction` with the skeleton given by `--skeleton` (a JSON object or JSON file) or derived from the data. With
`--constrained`, a model folder's saved answer schema and bounds (prompt.json `answer`) are used unless
`--max-string-length` / `--max-items` say otherwise, and max_new_tokens is checked against the longest answer the
bounds allow (`finetune.constrained.fit_token_budget`). Writes `metrics.json`, `predictions.jsonl` and
`report.html` to `--out` (default: `eval-<data name>` inside the evaluated model folder, e.g. `runs/x/final/`).
An earlier evaluation in that folder is never replaced silently: the command refuses before loading anything unless
`--overwrite` is given, and even then the earlier folder stays whole until the new one is complete.
The scalar metrics go to stdout as one JSON object, everything else to stderr. `python -m finetune.eval` is the
same command; through Python: `evaluate_model(...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finetune.cli import ArgumentParser, positive_int, run_entry_point
from finetune.errors import UserError

DEFAULT_INSTRUCTION = "Extract the details from the document image and structure them into JSON format:"


def _local_source(source, missing_source) -> bool:
    """A recorded recipe's data source is here to read: a path that exists, or a format mapping whose folder does."""
    if isinstance(source, dict):
        from finetune.config import DataSource

        return source.get("format") != "hf" and missing_source(DataSource.model_validate(source)) is None
    return Path(source).exists()


def evaluate_model(
    model: str,
    data: str,
    *,
    out_dir: str | Path | None = None,
    family: str | None = None,
    base: str | None = None,
    instruction: str | None = None,
    skeleton: str | dict | None = None,
    constrained: bool = False,
    max_string_length: int | None = None,
    max_items: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    max_pdf_pages: int | None = None,
    headline: str = "strict",
    max_samples: int | None = None,
    report: bool = True,
    overwrite: bool = False,
) -> dict:
    """Generate and score; returns the metrics and writes metrics.json, predictions.jsonl and report.html. An
    existing evaluation in the output folder is replaced only with `overwrite` (else `UserError`, before any work)."""
    from accelerate import Accelerator

    from finetune.atomic import atomic_folder
    from finetune.constrained import DEFAULT_MAX_NEW_TOKENS, JsonConstraint, fit_token_budget, trained_answer
    from finetune.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, prepare_samples
    from finetune.data.formats import missing_source, source_stem
    from finetune.data.pdf import pdf_settings
    from finetune.data.prompt import derive_skeleton, render_instruction
    from finetune.data.sources import read_records
    from finetune.evaluation import evaluate, write_eval
    from finetune.loading import load_model_and_processor, resolve_model
    from finetune.progress import info
    from finetune.schema import read_skeleton, schema_from_skeleton

    given_skeleton = read_skeleton(skeleton) if skeleton is not None else None
    source = resolve_model(model, family=family, base=base)
    if given_skeleton is not None and source.prompt:
        raise UserError(f"--skeleton: {source.weights} has the skeleton it was trained with (prompt.json); drop it")
    if data in ("train", "val", "test"):
        data = source.split(data)
    out = Path(out_dir) if out_dir else Path(source.weights) / f"eval-{source_stem(data)}"
    check_eval_out(out, overwrite=overwrite)
    fam, processor, net = load_model_and_processor(source)
    if source.prompt:  # the skeleton the model was trained with; --instruction may only reword the instruction
        skeleton = source.prompt["skeleton"]
        instruction_text = render_instruction(instruction, skeleton) if instruction else source.prompt["instruction"]
    else:
        skeleton = given_skeleton or derive_skeleton(r.target for r in read_records(data) if isinstance(r.target, dict))
        instruction_text = render_instruction(instruction or DEFAULT_INSTRUCTION, skeleton)
    # The answer schema and bounds the model folder was saved with; else the training targets, when the run's recipe
    # tells where they are: they refine the answer schema and size the decoding bounds (never the gold answers).
    trained = trained_answer(source.prompt)
    train_data = source.recipe.get("data", {}).get("train")
    examples = (
        [r.target for r in read_records(train_data) if isinstance(r.target, dict)]
        if trained is None and train_data and _local_source(train_data, missing_source)
        else None
    )
    answer_schema = trained["schema"] if trained else schema_from_skeleton(skeleton, examples)
    if trained:
        max_string_length = max_string_length or trained["max_string_length"]
        max_items = max_items or trained["max_items"]
    samples, report_ = prepare_samples(
        data,
        split="eval",
        family=fam,
        processor=processor,
        instruction_text=instruction_text,
        skeleton=skeleton,
        max_length=1 << 20,
        limit=max_samples,
        # the run's own limit, so that it reads the pages it was trained on
        max_image_pixels=source.recipe.get("data", {}).get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS,
        **pdf_settings(source.recipe, max_pdf_pages=max_pdf_pages),  # PDFs rendered as in training
    )
    if not samples:
        raise UserError(f"{data}: no usable samples ({report_.summary()})")
    accelerator = Accelerator()
    say = info if accelerator.is_main_process else lambda message: None  # one line per run, not per process
    net = accelerator.prepare(net.eval())
    constraint = None
    if constrained:
        constraint = JsonConstraint.for_model(
            accelerator.unwrap_model(net),
            fam,
            processor,
            skeleton,
            examples=examples,
            max_string_length=max_string_length,
            max_items=max_items,
            answer_schema=answer_schema,
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
        skeleton=skeleton,
        headline=headline,
        schema=answer_schema,
    )
    if accelerator.is_main_process:
        with atomic_folder(out, manifest=False) as tmp:  # an earlier evaluation stays whole until this one is
            write_eval(result, tmp, report=report, title=f"{model} on {data}")
        info(f"metrics, predictions{' and report' if report else ''} written to {out}")
    return result.metrics


EVAL_FILES = ("metrics.json", "predictions.jsonl")


def check_eval_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that holds an earlier evaluation (unless `overwrite`) or anything else (always: the
    whole folder would be replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is a file; choose another --out")
    if not any(out.iterdir()):
        return
    if not any((out / name).is_file() for name in EVAL_FILES):
        raise UserError(f"{out}: exists and holds no evaluation (no metrics.json) to replace; choose another --out")
    if not overwrite:
        raise UserError(
            f"{out}: an earlier evaluation is there; pass --overwrite to replace it, or choose another --out"
        )


def main(argv: list[str] | None = None, *, prog: str | None = None) -> dict:
    """Command line: see the module docstring."""
    parser = ArgumentParser(
        prog=prog or "python -m finetune.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="run folder, saved model / adapter folder, or base checkpoint")
    parser.add_argument("--data", required=True, help="val / test (with a run folder) or a JSONL file / dataset")
    parser.add_argument(
        "--data-format",
        choices=["jsonl", "imagefolder", "hf", "donut", "sroie", "funsd"],
        help="read --data in this published layout (finetune/data/formats.py), e.g. a SROIE or FUNSD folder",
    )
    parser.add_argument("--out", help="output folder (default: <model>/eval-<data name>)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier evaluation in the output folder (without it, the command refuses to)",
    )
    parser.add_argument("--family", help="model family (default: from the run's recipe or the checkpoint config)")
    parser.add_argument("--base", help="base checkpoint of an adapter (default: the one it records)")
    parser.add_argument("--instruction", help="prompt instruction when the model has no prompt.json")
    parser.add_argument(
        "--skeleton",
        help="answer skeleton when the model has no prompt.json: a JSON object or a JSON file (default: from the data)",
    )
    parser.add_argument("--constrained", action="store_true", help="schema-constrained decoding (xgrammar)")
    parser.add_argument(
        "--max-string-length",
        type=positive_int,
        help="constrained: longest string (default: the model folder's saved bound, else from the run's training "
        "targets, else 64)",
    )
    parser.add_argument(
        "--max-items", type=positive_int, help="constrained: longest list (default: as --max-string-length, else 16)"
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
    parser.add_argument("--headline", choices=["strict", "normalized"], default="strict")
    parser.add_argument("--max-samples", type=positive_int)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args(argv)
    metrics = evaluate_model(
        args.model,
        {"format": args.data_format, "path": args.data} if args.data_format else args.data,
        out_dir=args.out,
        family=args.family,
        base=args.base,
        instruction=args.instruction,
        skeleton=args.skeleton,
        constrained=args.constrained,
        max_string_length=args.max_string_length,
        max_items=args.max_items,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_pdf_pages=args.max_pdf_pages,
        headline=args.headline,
        max_samples=args.max_samples,
        report=not args.no_report,
        overwrite=args.overwrite,
    )
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    return metrics


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
