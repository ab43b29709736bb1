"""Merge a LoRA adapter into its base model and save the result as a standalone model.

    finetune merge --model runs/invoices-mississippi-800m-lora --out runs/invoices-merged

The merged model is saved the way a full fine-tune is (the family's `save_pretrained`): natively in transformers'
layout with processor, tokenizer and chat template, and for Mississippi also in the original H2OVL layout
(`original/`, read by the original `model.chat` code and vLLM's H2OVL loader). `prompt.json` comes along (with the
answer schema and decoding bounds the run saved in it, which eval and predict use).
Weights trained fully beside the adapter (PEFT `modules_to_save`, e.g. a projector) are part of the merge.
An adapter trained on a quantised base (QLoRA, `tuning.quantization`) is merged into the base's original,
unquantised weights, as the QLoRA paper and PEFT do, and the command says so: merging into the 4-bit weights would
round the adapter's update away, and the merged model computes what the adapter on the unquantised base computes
(`finetune eval` on the adapter), not what the training run's quantised model computed.
The base's remote code (`*.py`, `auto_map`) is not carried into the merged model unless the run's recipe says
`model.trust_remote_code: true`. The folder is written beside `--out` and renamed into place with a manifest, so an
earlier one (`--overwrite`) stays whole until the new one is complete.
Stdout gets the output folder's path alone; `python -m finetune.merge` is the same command.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from finetune.atomic import atomic_folder
from finetune.cli import ArgumentParser, run_entry_point
from finetune.errors import UserError
from finetune.loading import ModelSource, load_model_and_processor, resolve_model
from finetune.progress import info


def merge_adapter(
    model: str, out_dir: str | Path, *, base: str | None = None, family: str | None = None, overwrite: bool = False
) -> Path:
    """Base + adapter → one model in `out_dir` (written atomically, with a manifest); returns `out_dir`."""
    source = resolve_model(model, family=family, base=base)
    if not source.adapter:
        raise UserError(f"{source.weights}: not a LoRA adapter (no adapter_config.json); nothing to merge")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_folder(out) as tmp:
        write_merged(source, tmp)
    return out


def write_merged(source: ModelSource, out: Path) -> None:
    """The merged model of the adapter `source` saved into the folder `out`, with its prompt.json; remote code only
    if the run's recipe opts in (`model.trust_remote_code`)."""
    quantization = (source.recipe.get("tuning") or {}).get("quantization")
    if quantization:
        info(
            f"the adapter was trained on a {quantization['bits']}-bit quantised base; merging it into the base's "
            f"unquantised weights ({source.base})"
        )
    fam, processor, peft_model = load_model_and_processor(source)
    merged = peft_model.merge_and_unload()  # LoRA folded into the weights; modules_to_save copies put in place
    remote_code = bool((source.recipe.get("model") or {}).get("trust_remote_code", False))
    fam.save_pretrained(merged, processor, out, source_path=source.base, remote_code=remote_code)
    prompt = Path(source.weights) / "prompt.json"
    if prompt.is_file():
        shutil.copy2(prompt, out / "prompt.json")


def main(argv: list[str] | None = None, *, prog: str | None = None) -> Path:
    """Command line: see the module docstring."""
    parser = ArgumentParser(
        prog=prog or "python -m finetune.merge",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="run folder or adapter folder")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base checkpoint (default: the one the run or adapter records)")
    parser.add_argument("--family", help="model family (default: from the run's recipe or the base config)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = merge_adapter(args.model, args.out, base=args.base, family=args.family, overwrite=args.overwrite)
    info(f"merged model saved to {out}")
    print(out)  # stdout: the folder alone, for scripts (`out=$(finetune merge ...)`)
    return out


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
