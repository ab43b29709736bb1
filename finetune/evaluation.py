"""Generated-JSON evaluation: batched greedy generation with left padding, JSON parsing, exact match.

Teacher-forced loss says little about whether the JSON a model writes is right, so evaluation always
generates. Left padding, because a decoder-only model continues from the last position of each row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from finetune.data.dataset import Collator, DocumentDataset, Sample
from finetune.models.base import ModelFamily


def parse_json(text: str) -> tuple[Any, bool]:
    """(object, True) when `text` is one JSON value (surrounding whitespace allowed), else (None, False)."""
    try:
        return json.loads(text.strip()), True
    except json.JSONDecodeError:
        return None, False


def json_exact_match(prediction: Any, gold: Any) -> bool:
    """Equal as JSON values: key order ignored; types must agree (true is not 1, "1" is not 1), though 1 and
    1.0 are the same JSON number. (v0: normalised variants come with the full metrics.)"""
    if isinstance(gold, bool) or isinstance(prediction, bool):
        return type(prediction) is type(gold) and prediction == gold
    if isinstance(gold, (int, float)) and isinstance(prediction, (int, float)):
        return prediction == gold
    if type(prediction) is not type(gold):
        return False
    if isinstance(gold, dict):
        return prediction.keys() == gold.keys() and all(json_exact_match(prediction[k], gold[k]) for k in gold)
    if isinstance(gold, list):
        return len(prediction) == len(gold) and all(json_exact_match(p, g) for p, g in zip(prediction, gold))
    return prediction == gold


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: list[Sample], *, family: ModelFamily, processor,
             instruction_text: str, accelerator: Accelerator, batch_size: int, max_new_tokens: int,
             synced_ranks: bool = False) -> EvalResult:
    """Generate for every sample (sharded across processes), gather on every process, and score. `synced_ranks`:
    every rank keeps running forwards until all are done (needed when weights are sharded, ZeRO-3)."""
    dataset = DocumentDataset(samples, family=family, processor=processor, instruction_text=instruction_text,
                              with_answer=False)
    tokenizer = processor.tokenizer
    collate = Collator(family, tokenizer.pad_token_id, padding_side="left")
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    # Padded so every rank runs the same number of batches (sharded engines need every rank in every forward);
    # the duplicated samples are dropped after the gather.
    with accelerator.split_between_processes(list(range(len(dataset))), apply_padding=True) as indices:
        rows = _generate(unwrapped, dataset, indices, collate, family, processor, accelerator, batch_size,
                         max_new_tokens, synced_ranks)
    if was_training:
        unwrapped.train()
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    rows = sorted({r["index"]: r for r in rows}.values(), key=lambda r: r["index"])
    return score(samples, rows)


def _generate(model, dataset, indices, collate, family, processor, accelerator, batch_size, max_new_tokens,
              synced_ranks):
    tokenizer = processor.tokenizer
    rows = []
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start:start + batch_size]])
        index = batch.pop("index")
        batch.pop("labels")
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            output = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                        eos_token_id=family.stop_token_ids(processor),
                                        pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_ranks)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text in zip(index.tolist(), texts):
            rows.append({"index": i, "text": text})
    return rows


def score(samples: list[Sample], rows: list[dict[str, Any]]) -> EvalResult:
    """Metrics and per-sample records from generated texts (rows: {"index", "text"})."""
    predictions, exact, valid = [], 0, 0
    for row in rows:
        sample = samples[row["index"]]
        parsed, ok = parse_json(row["text"])
        match = ok and json_exact_match(parsed, sample.target)
        valid += ok
        exact += match
        predictions.append({"origin": sample.origin, "target": sample.target, "prediction": parsed,
                            "text": row["text"], "valid_json": ok, "exact_match": match})
    n = max(len(rows), 1)
    metrics = {"json_exact_match": exact / n, "valid_json_rate": valid / n, "num_samples": len(rows)}
    return EvalResult(metrics, predictions)


def write_eval(result: EvalResult, out_dir: Path, prefix: str = "") -> None:
    """`{prefix}predictions.jsonl` and `{prefix}metrics.json` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{prefix}predictions.jsonl").open("w", encoding="utf-8") as handle:
        for row in result.predictions:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / f"{prefix}metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
