"""Generated-JSON evaluation: batched greedy generation with left padding, JSON parsing, scoring, report.

Teacher-forced loss says little about whether the JSON a model writes is right, so evaluation always
generates. Left padding, because a decoder-only model continues from the last position of each row. The metrics
are in `finetune.metrics` (exact match strict / normalized, Donut's field F1 and nTED accuracy, ANLS*, per-field
accuracy, valid-JSON and schema-conformance rates); `finetune.report` renders `report.html`.

An answer whose generation stopped at `max_new_tokens` without an end token was cut by the budget: it is marked
`truncated` and scored as invalid (no prediction, 0 on every metric), even where the cut text happens to parse;
`truncated_rate` is the share of such answers.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from finetune import metrics as scoring
from finetune.data.dataset import Collator, DocumentDataset, Sample
from finetune.data.pdf import PdfPage
from finetune.data.prompt import derive_skeleton
from finetune.data.target_stats import target_field_stats
from finetune.metrics import json_exact_match  # noqa: F401  (the headline metric, importable from here too)
from finetune.models.base import ModelFamily
from finetune.progress import progress_if_slow


def parse_json(text: str) -> tuple[Any, bool]:
    """(object, True) when `text` is one JSON value (surrounding whitespace allowed), else (None, False)."""
    try:
        return json.loads(text.strip(), parse_constant=_reject_constant), True
    except (json.JSONDecodeError, ValueError):
        return None, False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json would accept NaN / Infinity


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]  # one JSON-serialisable record per sample
    images: list[list[Any]] = field(default_factory=list)  # image references per sample, for the report
    # Per field of the skeleton, how often the gold targets miss it or hold it empty / null (target_stats.py).
    target_fields: dict[str, dict[str, int]] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    samples: list[Sample],
    *,
    family: ModelFamily,
    processor,
    instruction_text: str,
    accelerator: Accelerator,
    batch_size: int,
    max_new_tokens: int,
    synced_ranks: bool = False,
    constraint=None,
    skeleton: dict | None = None,
    headline: str = "strict",
    schema: dict | None = None,
) -> EvalResult:
    """Generate for every sample (sharded across processes), gather on every process, and score. `synced_ranks`:
    every rank keeps running forwards until all are done (needed when weights are sharded, ZeRO-3);
    `constraint`: a `finetune.constrained.JsonConstraint` (schema-constrained decoding); `skeleton`: the prompt
    skeleton, for the schema-conformance rate (or `schema`, e.g. refined by the training targets); `headline`: the
    exact-match mode reported as json_exact_match."""
    dataset = DocumentDataset(
        samples, family=family, processor=processor, instruction_text=instruction_text, with_answer=False
    )
    tokenizer = processor.tokenizer
    collate = Collator(family, tokenizer.pad_token_id, padding_side="left")
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    # Padded so every rank runs the same number of batches (sharded engines need every rank in every forward);
    # the duplicated samples are dropped after the gather.
    with accelerator.split_between_processes(list(range(len(dataset))), apply_padding=True) as indices:
        rows = _generate(
            unwrapped,
            dataset,
            indices,
            collate,
            family,
            processor,
            accelerator,
            batch_size,
            max_new_tokens,
            synced_ranks,
            constraint,
        )
    if was_training:
        unwrapped.train()
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    rows = sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"])
    return score(samples, rows, skeleton=skeleton, headline=headline, schema=schema)


def _generate(
    model,
    dataset,
    indices,
    collate,
    family,
    processor,
    accelerator,
    batch_size,
    max_new_tokens,
    synced_ranks,
    constraint,
    options: dict | None = None,
):
    """Rows {"index", "text", "truncated", "ids"} for the samples at `indices` (`ids`: the generated token ids up to
    and including the first stop token). `options`: generate() arguments beside greedy decoding's (sampling, and
    `num_return_sequences`: that many rows per sample, in order)."""
    tokenizer = processor.tokenizer
    stop_ids = family.stop_token_ids(processor)
    decoding = {"do_sample": False, **(options or {})}
    per_sample = decoding.get("num_return_sequences", 1)
    rows = []
    starts = range(0, len(indices), batch_size)
    # Generation is the slow part of an evaluation (seconds per batch for a real model); the main process shows how
    # far its share has got.
    batches = progress_if_slow(starts, desc="generating", unit="batch", disable=not accelerator.is_main_process)
    with contextlib.closing(batches):  # the display ends here, also when generation fails
        for start in batches:
            batch = collate([dataset[i] for i in indices[start : start + batch_size]])
            index = batch.pop("index")
            batch.pop("labels")
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                output = model.generate(
                    **batch,
                    **decoding,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=synced_ranks,
                    logits_processor=[constraint.logits_processor()] if constraint else None,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            cut = cut_by_budget(new_tokens, stop_ids, max_new_tokens)
            index = index.repeat_interleave(per_sample)
            for i, text, truncated, ids in zip(index.tolist(), texts, cut, new_tokens.tolist(), strict=True):
                end = next((k for k, token in enumerate(ids) if token in stop_ids), len(ids) - 1)
                rows.append({"index": i, "text": text, "truncated": truncated, "ids": ids[: end + 1]})
    return rows


def cut_by_budget(new_tokens: torch.Tensor, stop_token_ids, max_new_tokens: int) -> list[bool]:
    """Per row of generated tokens: whether generation ran the whole budget without writing an end token (a row
    that ended early is padded after its end token, so it holds one)."""
    stop = torch.tensor(list(stop_token_ids), device=new_tokens.device)
    ended = torch.isin(new_tokens, stop).any(dim=1)
    return [bool(not e and new_tokens.shape[1] >= max_new_tokens) for e in ended.tolist()]


def score(
    samples: list[Sample],
    rows: list[dict[str, Any]],
    *,
    skeleton: dict | None = None,
    headline: str = "strict",
    schema: dict | None = None,
) -> EvalResult:
    """Metrics and per-sample records from generated texts (rows: {"index", "text"} and "truncated" when the
    answer was cut by the budget: scored as invalid)."""
    parsed = [(None, False) if row.get("truncated") else parse_json(row["text"]) for row in rows]
    chosen = [samples[row["index"]] for row in rows]
    aggregate, per_sample = scoring.score(
        [s.target for s in chosen],
        [obj if ok else None for obj, ok in parsed],
        skeleton=skeleton,
        headline=headline,
        schema=schema,
    )
    records = []
    for row, sample, (obj, ok), sample_scores in zip(rows, chosen, parsed, per_sample, strict=True):
        records.append(
            {
                "index": row["index"],
                "origin": sample.origin,
                "target": sample.target,
                "prediction": obj,
                "text": row["text"],
                "valid_json": ok,
                "truncated": bool(row.get("truncated")),
                **sample_scores,
            }
        )
    aggregate["truncated_rate"] = sum(bool(row.get("truncated")) for row in rows) / len(rows) if rows else 0.0
    golds = [s.target for s in chosen]
    fields = target_field_stats(skeleton or derive_skeleton(golds), golds)
    return EvalResult(aggregate, records, images=[s.images for s in chosen], target_fields=fields)


def write_eval(
    result: EvalResult,
    out_dir: Path,
    prefix: str = "",
    *,
    report: bool = True,
    title: str = "Evaluation report",
    train_fields: dict[str, dict[str, int]] | None = None,
) -> None:
    """`{prefix}predictions.jsonl`, `{prefix}metrics.json` and (with `report`) `{prefix}report.html`, whose target
    statistics show the evaluated split's gold targets (and the training targets', `train_fields`, when given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{prefix}predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row, images in zip(result.predictions, result.images or [[]] * len(result.predictions), strict=True):
            # Files (and PDF pages, `file.pdf#page=2`) by name; dataset images (bytes) stay out of the file.
            paths = [str(ref) for ref in images if isinstance(ref, (str, Path, PdfPage))]
            handle.write(json.dumps({**row, **({"images": paths} if paths else {})}, ensure_ascii=False) + "\n")
    (out_dir / f"{prefix}metrics.json").write_text(json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n")
    if report:
        from finetune.report import write_report

        records = [{**row, "images": images} for row, images in zip(result.predictions, result.images, strict=True)]
        stats = {"evaluated": result.target_fields, **({"train": train_fields} if train_fields else {})}
        write_report(out_dir / f"{prefix}report.html", records, result.metrics, title=title, target_stats=stats)
