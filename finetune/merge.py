"""Merge a LoRA adapter into its base model and save the result as a standalone model.

    python -m finetune.merge --model runs/invoices-mississippi-800m-lora --out runs/invoices-merged

The merged model is saved the way a full fine-tune is (the family's `save_pretrained`): natively in transformers'
layout with processor, tokenizer and chat template, and for Mississippi also in the original H2OVL layout
(`original/`, read by the original `model.chat` code and vLLM's H2OVL loader). `prompt.json` comes along.
Weights trained fully beside the adapter (PEFT `modules_to_save`, e.g. a projector) are part of the merge.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.errors import UserError
from finetune.loading import load_model_and_processor, resolve_model


def merge_adapter(
    model: str, out_dir: str | Path, *, base: str | None = None, family: str | None = None, overwrite: bool = False
) -> Path:
    """Base + adapter → one model in `out_dir`; returns `out_dir`."""
    source = resolve_model(model, family=family, base=base)
    if not source.adapter:
        raise UserError(f"{source.weights}: not a LoRA adapter (no adapter_config.json); nothing to merge")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    fam, processor, peft_model = load_model_and_processor(source)
    merged = peft_model.merge_and_unload()  # LoRA folded into the weights; modules_to_save copies put in place
    fam.save_pretrained(merged, processor, out, source_path=source.base)
    prompt = Path(source.weights) / "prompt.json"
    if prompt.is_file():
        shutil.copy2(prompt, out / "prompt.json")
    return out


def main(argv: list[str] | None = None) -> Path:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run folder or adapter folder")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base checkpoint (default: the one the run or adapter records)")
    parser.add_argument("--family", help="model family (default: from the run's recipe or the base config)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = merge_adapter(args.model, args.out, base=args.base, family=args.family, overwrite=args.overwrite)
    print(f"merged model saved to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (UserError, FileExistsError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
