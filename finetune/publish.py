"""Publish a run to the Hugging Face Hub: its LoRA adapter (default) or a merged model, with a model card.

    python -m finetune.publish --run runs/invoices-mississippi-800m-lora --repo my-org/invoices-reader
    python -m finetune.publish --run runs/... --repo my-org/invoices-reader-merged --merged --dry-run

The folder that is (or would be) uploaded is written first, to `<run>/publish/<adapter|merged>/`: the weights in
safetensors, processor, tokenizer and chat template, `prompt.json`, the run's resolved `training_recipe.yaml` and
a model card (`README.md`: Hub metadata with the evaluation results as `model-index`, how it was trained, the
results table and copy-paste usage for transformers and vLLM). It is built beside its place and renamed into it
when complete (an earlier one stays whole until then), with no manifest: it is uploaded exactly as it is. Remote
code (`*.py` files, `auto_map` in config.json and the tokenizer / processor configs) is left out unless the run's
recipe says `model.trust_remote_code: true`; the card's serve command says `--trust-remote-code` only then.
`--dry-run`, or an offline environment (`HF_HUB_OFFLINE=1`), stops there and says so. The upload goes through
`huggingface_hub` (`create_repo` + `upload_folder`); the token comes from the environment (`HF_TOKEN`) or
`huggingface-cli login`, and is never written to the folder, the card or the logs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from finetune.atomic import MANIFEST, atomic_folder
from finetune.cli import ArgumentParser, run_entry_point
from finetune.errors import UserError
from finetune.loading import read_json, resolve_model
from finetune.progress import info

# metrics.json keys → model-index metric types and the names shown on the Hub
CARD_METRICS = {
    "json_exact_match": "JSON exact match",
    "field_f1": "field F1 (Donut)",
    "ted_accuracy": "nTED accuracy (Donut)",
    "anls_star": "ANLS*",
    "valid_json_rate": "valid JSON rate",
}


def build_publish_folder(
    run_dir: str | Path, repo_id: str, *, merged: bool = False, license: str = "apache-2.0"
) -> Path:
    """Write the exact folder an upload sends; returns it."""
    from finetune.models.base import drop_remote_code, remote_code_files

    run = Path(run_dir)
    if run.is_dir() and not (run / "recipe.yaml").is_file():
        raise UserError(f"{run}: not a run folder (no recipe.yaml)")
    source = resolve_model(str(run))  # final/ checked whole (or its absence explained) before anything is written
    remote_code = bool((source.recipe.get("model") or {}).get("trust_remote_code", False))
    out = run / "publish" / ("merged" if merged else "adapter" if source.adapter else "model")
    # Always rebuilt from the run, so nothing stale is uploaded; no manifest: the folder is uploaded as it is.
    with atomic_folder(out, manifest=False) as tmp:
        if merged and source.adapter:
            from finetune.merge import write_merged

            write_merged(source, tmp)
        else:
            skip = ["eval-*", MANIFEST, ".*", *([] if remote_code else ["*.py"])]
            shutil.copytree(source.weights, tmp, ignore=shutil.ignore_patterns(*skip), dirs_exist_ok=True)
        if not remote_code:  # a run saved before model.trust_remote_code existed may still carry some
            drop_remote_code(tmp)
        shutil.copy2(run / "recipe.yaml", tmp / "training_recipe.yaml")
        is_adapter = source.adapter and not merged
        kind = "lora" if is_adapter else "merged" if merged else "full-fine-tune"
        card = model_card(
            run,
            source.recipe,
            repo_id=repo_id,
            adapter=is_adapter,
            kind=kind,
            license=license,
            remote_code=bool(remote_code_files(tmp)),
        )
        card.save(tmp / "README.md")
    return out


def model_card(
    run: Path, recipe: dict, *, repo_id: str, adapter: bool, kind: str, license: str, remote_code: bool = False
):
    """A `huggingface_hub.ModelCard`: metadata (base model, library, pipeline, license, datasets, tags,
    model-index with the evaluation results) and the text. `remote_code`: whether the published folder carries
    remote code (its serve command then says `--trust-remote-code`, and only then)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else {}
    after, before = metrics.get("after", {}), metrics.get("before", {})
    data = recipe.get("data", {})
    split = recipe.get("eval", {}).get("split", "val")
    dataset = data.get(split) or data.get("train") or "custom"
    if isinstance(dataset, dict):  # a format mapping (finetune/data/formats.py): a Hub id reads as `hf:`
        from finetune.data.formats import source_location

        dataset = source_location(dataset)
    dataset = str(dataset)
    dataset_id = dataset[3:].split(":")[0] if dataset.startswith("hf:") else None
    base = recipe.get("model", {}).get("path")
    eval_results = [
        EvalResult(
            task_type="image-text-to-text",
            task_name="document to JSON extraction",
            dataset_type=dataset_id or "custom",
            dataset_name=dataset_id or Path(dataset).name,
            dataset_split=split,
            metric_type=key,
            metric_name=name,
            metric_value=float(after[key]),
        )
        for key, name in CARD_METRICS.items()
        if isinstance(after.get(key), (int, float))
    ]
    card_data = ModelCardData(
        base_model=base,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        datasets=[dataset_id] if dataset_id else None,
        model_name=repo_id,
        tags=[
            "document-understanding",
            "json-extraction",
            "vision-language",
            recipe.get("model", {}).get("family"),
            kind,
        ],
        eval_results=eval_results or None,
    )
    body = _card_text(run, recipe, repo_id, adapter, after, before, remote_code=remote_code)
    return ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + body)


def _card_text(
    run: Path, recipe: dict, repo_id: str, adapter: bool, after: dict, before: dict, *, remote_code: bool
) -> str:
    from finetune.models import get_family

    model = recipe.get("model", {})
    info = read_json(run / "run_info.json") if (run / "run_info.json").is_file() else {}
    report = read_json(run / "data_report.json") if (run / "data_report.json").is_file() else {}
    prompt = read_json(run / "final" / "prompt.json")
    lines = [
        f"# {repo_id}",
        "",
        (
            f"{'A LoRA adapter for' if adapter else 'A fine-tune of'} `{model.get('path')}` that reads document "
            f"images into JSON, trained with the `finetune` toolkit."
        ),
        "",
        "## Training",
        "",
        f"- Model family: `{model.get('family')}`; base checkpoint `{model.get('path')}`.",
        (
            f"- Training samples: {report.get('train', {}).get('kept', 'n/a')} "
            f"(validated before training; {sum(report.get('train', {}).get('skipped', {}).values())} skipped)."
        ),
        (
            f"- Hardware: {info.get('device', 'n/a')} × {info.get('processes', 'n/a')} "
            f"({info.get('engine', 'n/a')}, mixed precision {info.get('mixed_precision', 'n/a')}); "
            f"{info.get('optimizer_steps', 'n/a')} optimizer steps in {info.get('seconds', 'n/a')} s."
        ),
        "",
        "| stage | groups | learning rates |",
        "|---|---|---|",
    ]
    for stage in recipe.get("stages") or []:
        groups = ", ".join(f"{g}: {m}" for g, m in stage["groups"].items())
        rates = ", ".join(f"{g} {lr:g}" for g, lr in (stage.get("lr") or {}).items())
        lines.append(f"| {stage['name']} | {groups} | {rates} |")
    lines += [
        "",
        "The full resolved recipe is `training_recipe.yaml` in this repository.",
        "",
        "## Evaluation",
        "",
        (
            f"Generated JSON on the `{recipe.get('eval', {}).get('split', 'val')}` split "
            f"({after.get('num_samples', 'n/a')} documents), before and after fine-tuning:"
        ),
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key, name in CARD_METRICS.items():
        if key in after:
            lines.append(f"| {name} | {_pct(before.get(key))} | {_pct(after.get(key))} |")
    instruction = prompt["instruction"]
    family = model.get("family")
    load = (
        f'base = family.load_model("{model.get("path")}")\nmodel = PeftModel.from_pretrained(base, "{repo_id}")'
        if adapter
        else f'model = family.load_model("{repo_id}")'
    )
    lines += [
        "",
        "## Usage",
        "",
        "The model expects the prompt it was trained with (also in `prompt.json`):",
        "",
        "```text",
        instruction,
        "```",
        "",
        ("With transformers (through the toolkit's model family, which loads the processor and chat format):"),
        "",
        "```python",
        *(["from peft import PeftModel"] if adapter else []),
        "from finetune.models import get_family",
        "",
        f'family = get_family("{family}")',
        load,
        f'processor = family.load_processor("{repo_id}")',
        "```",
        "",
        "Or from the command line: `python -m finetune.predict --model <downloaded folder> scans/*.png`.",
        "",
        "With vLLM:",
        "",
        "```bash",
    ]
    serve = get_family(family).serving_commands(
        repo_id, base=model.get("path"), adapter=adapter, remote_code=remote_code
    )
    lines += [*serve, "```"]
    if remote_code:
        lines += ["", "This repository carries its base checkpoint's remote code (`*.py`, `auto_map`), hence"]
        lines += ["`--trust-remote-code`: read that code before you run it."]
    lines += ["", "Send the prompt above with the document image as the user turn.", ""]
    return "\n".join(line for line in lines if line is not None)


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def publish(
    run_dir: str | Path,
    repo_id: str,
    *,
    merged: bool = False,
    dry_run: bool = False,
    private: bool = False,
    license: str = "apache-2.0",
) -> Path:
    """Build the folder and, unless dry-run or offline, upload it with `huggingface_hub`."""
    folder = build_publish_folder(run_dir, repo_id, merged=merged, license=license)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if dry_run or offline:
        why = "dry run" if dry_run else "offline (HF_HUB_OFFLINE)"
        info(f"{why}: nothing uploaded; {folder} is exactly what would be uploaded to {repo_id}")
        return folder
    from huggingface_hub import HfApi

    api = HfApi()  # token from HF_TOKEN or the saved login; never passed around or written here
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=f"Upload {'merged model' if merged else folder.name} from finetune",
    )
    info(f"uploaded {folder} to https://huggingface.co/{repo_id}")
    return folder


def main(argv: list[str] | None = None, *, prog: str | None = None) -> Path:
    """Command line: see the module docstring."""
    parser = ArgumentParser(
        prog=prog or "python -m finetune.publish",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="the run folder")
    parser.add_argument("--repo", required=True, help="Hub repository id, e.g. my-org/invoices-reader")
    parser.add_argument("--merged", action="store_true", help="publish base + adapter merged into one model")
    parser.add_argument("--dry-run", action="store_true", help="write the folder, upload nothing")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--license", default="apache-2.0")
    args = parser.parse_args(argv)
    folder = publish(
        args.run, args.repo, merged=args.merged, dry_run=args.dry_run, private=args.private, license=args.license
    )
    print(folder)  # stdout: the folder that was (or would be) uploaded, alone, for scripts
    return folder


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
