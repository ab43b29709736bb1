"""A preference stage's pairs: built when the stage starts, saved in the run folder, never rebuilt on resume.

`pairs: self` — the model as the stage starts answers every training sample of the stage (batched greedy decoding,
plus `sampled` answers per image at `temperature`). An answer that is not the gold JSON (strict exact match: a wrong
or missing value, a field filled that should be empty, invalid or cut-off JSON) becomes a rejected answer, exactly
as the model wrote it (its token ids up to its end-of-turn token), with the gold answer as the chosen one; right
answers and repeats of an answer already kept for the sample make no pair. What was wrong is counted per field
(`summary.json`: right / wrong / missed / filled-but-should-be-empty, finetune.metrics.field_outcomes).

`pairs: preference` — `data.preference` records {image, chosen, rejected}: the chosen answer is read like a target
(checked, measured, over-length pairs dropped and counted); the rejected one is a JSON object (written in the
chosen answers' canonical form) or the text of an answer.

Then the reference log-probabilities of both answers of every pair are computed with the same model, in eval mode
(finetune/training/dpo.py explains why they are computed once). Both steps are sharded across processes and
gathered, so every process holds every pair. The main process writes `preference/<stage>/pairs.jsonl` and
`summary.json` atomically; a resumed run reads them back, so its pairs and reference are the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import torch
from accelerate.utils import gather_object

from finetune import metrics as scoring
from finetune.atomic import atomic_folder
from finetune.data.dataset import Collator, DocumentDataset, Sample
from finetune.data.prompt import canonical_json
from finetune.data.sources import read_records
from finetune.errors import UserError
from finetune.evaluation import _generate, parse_json
from finetune.progress import progress_if_slow
from finetune.training.dpo import PreferenceCollator, PreferenceDataset, PreferencePair, sequence_logps

PAIRS_FILE, SUMMARY_FILE = "pairs.jsonl", "summary.json"


def pairs_folder(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "preference" / f"stage{index + 1}-{name}"


def load_pairs(folder: Path) -> tuple[list[PreferencePair], dict] | None:
    """The pairs a run saved for a stage, or None when it has not built them yet."""
    if not (folder / SUMMARY_FILE).is_file():
        return None
    records = [json.loads(line) for line in (folder / PAIRS_FILE).read_text().splitlines() if line]
    pairs = [
        PreferencePair(r["sample"], r["rejected_ids"], r["kind"], r["ref_chosen"], r["ref_rejected"]) for r in records
    ]
    return pairs, json.loads((folder / SUMMARY_FILE).read_text())


def save_pairs(folder: Path, pairs: list[PreferencePair], samples: list[Sample], summary: dict, tokenizer) -> None:
    """`pairs.jsonl` (one pair a line, with the sample's origin and both answers' text, for reading) and
    `summary.json`, written into place together."""
    with atomic_folder(folder) as staging:
        with (staging / PAIRS_FILE).open("w") as handle:
            for pair in pairs:
                sample = samples[pair.sample]
                record = {
                    "sample": pair.sample,
                    "origin": sample.origin,
                    "kind": pair.kind,
                    "chosen": tokenizer.decode(sample.answer_ids, skip_special_tokens=True),
                    "rejected": tokenizer.decode(pair.rejected_ids, skip_special_tokens=True),
                    "rejected_ids": pair.rejected_ids,
                    "ref_chosen": pair.ref_chosen,
                    "ref_rejected": pair.ref_rejected,
                }
                handle.write(json.dumps(record) + "\n")
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")


@contextlib.contextmanager
def _evaluating(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


def _sharded(accelerator, count: int, work) -> list:
    """`work(indices)` → rows with an "key", on each process's share of range(count); gathered and de-duplicated
    (the padding that keeps every process in every forward repeats a few indices)."""
    with accelerator.split_between_processes(list(range(count)), apply_padding=True) as indices:
        rows = work(indices)
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return sorted({row["key"]: row for row in rows}.values(), key=lambda row: row["key"])


@torch.no_grad()
def self_pairs(
    model,
    samples: list[Sample],
    *,
    family,
    processor,
    instruction_text: str,
    accelerator,
    settings,
    batch_size: int,
    max_new_tokens: int,
    synced_ranks: bool,
    skeleton: dict,
) -> tuple[list[PreferencePair], dict]:
    """Pairs from the model's own wrong answers to `samples` (module docstring), and their summary."""
    dataset = DocumentDataset(
        samples, family=family, processor=processor, instruction_text=instruction_text, with_answer=False
    )
    collate = Collator(family, processor.tokenizer.pad_token_id, padding_side="left")
    unwrapped = accelerator.unwrap_model(model)
    decodings = [("greedy", {})]
    if settings.sampled:
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0}
        decodings.append(("sampled", {**sampling, "num_return_sequences": settings.sampled}))
    answers: dict[str, list[dict]] = {}
    with _evaluating(unwrapped):
        for kind, options in decodings:

            def work(indices, options=options):
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
                    None,
                    options,
                )
                seen = Counter()
                for row in rows:  # (sample, n-th answer to it on this process): the same on every process
                    row["key"] = (row["index"], seen[row["index"]])
                    seen[row["index"]] += 1
                return rows

            answers[kind] = _sharded(accelerator, len(samples), work)

    pairs = pairs_from_answers(answers, samples)
    greedy = answers["greedy"]
    parsed = [(None, False) if row["truncated"] else parse_json(row["text"]) for row in greedy]
    predictions = [obj if ok else None for obj, ok in parsed]
    golds = [samples[row["index"]].target for row in greedy]
    outcomes = scoring.field_outcomes(predictions, golds, skeleton)
    summary = {
        "pairs_from": "self",
        "samples": len(samples),
        "answers": sum(len(rows) for rows in answers.values()),
        "greedy_right": sum(scoring.json_exact_match(p, g, "strict") for p, g in zip(predictions, golds, strict=True)),
        "greedy_invalid": sum(p is None for p in predictions),
        "pairs": len(pairs),
        "pairs_by_kind": dict(Counter(pair.kind for pair in pairs)),
        "fields": outcomes,
    }
    return pairs, summary


def pairs_from_answers(answers: dict[str, list[dict]], samples: list[Sample]) -> list[PreferencePair]:
    """The pairs a stage learns from its model's answers ({"greedy" | "sampled": rows {"index", "text", "ids",
    "truncated"}}): one per answer that is not the gold JSON (strict exact match; an answer cut by the token budget
    never is), with its token ids as written; an answer whose ids repeat one already kept for its sample, or are
    the gold answer's own, makes none."""
    pairs, kept = [], set()
    for kind in ("greedy", "sampled"):
        for row in answers.get(kind, []):
            prediction, ok = (None, False) if row["truncated"] else parse_json(row["text"])
            gold = samples[row["index"]]
            if ok and scoring.json_exact_match(prediction, gold.target, "strict"):
                continue
            key = (row["index"], tuple(row["ids"]))
            if key not in kept and row["ids"] != gold.answer_ids:
                kept.add(key)
                pairs.append(PreferencePair(row["index"], row["ids"], kind))
    return pairs


def given_pairs(
    source, samples: list[Sample], *, tokenizer, family, processor, skeleton: dict, max_length: int
) -> tuple[list[PreferencePair], dict]:
    """Pairs from `data.preference`: `samples` are its records read with `chosen` as the target (checked like any
    split); each one's `rejected` is read here. A pair whose rejected answer is over max_length is dropped and
    counted; a record without a usable `rejected` is a one-line error naming it."""
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn_token(processor))
    rejected = {r.origin: r for r in read_records(source, target_column="rejected")}
    pairs, too_long, same = [], 0, 0
    for i, sample in enumerate(samples):
        record = rejected.get(sample.origin)
        value = None if record is None else record.text if record.text is not None else record.target
        if isinstance(value, dict):
            text = canonical_json(value, skeleton)
        elif isinstance(value, str) and value.strip():
            text = value
        else:
            raise UserError(
                f"{sample.origin}: field 'rejected' must be a JSON object or the text of an answer"
                + (f" ({record.problem})" if record is not None and record.problem and record.text is None else "")
            )
        ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], eot]
        if ids == sample.answer_ids:
            same += 1
            continue
        if sample.length - len(sample.answer_ids) + len(ids) > max_length:
            too_long += 1
            continue
        pairs.append(PreferencePair(i, ids, "given"))
    summary = {
        "pairs_from": "preference",
        "samples": len(samples),
        "pairs": len(pairs),
        "dropped": {f"rejected longer than max_length={max_length}": too_long, "rejected equals chosen": same},
    }
    return pairs, summary


@torch.no_grad()
def fill_reference(
    model,
    pairs: list[PreferencePair],
    samples: list[Sample],
    *,
    family,
    processor,
    instruction_text: str,
    accelerator,
    batch_size: int,
) -> None:
    """Every pair's reference log-probabilities: the current model's, in eval mode (no dropout)."""
    dataset = PreferenceDataset(pairs, samples, family=family, processor=processor, instruction_text=instruction_text)
    collate = PreferenceCollator(Collator(family, processor.tokenizer.pad_token_id, padding_side="right"))
    unwrapped = accelerator.unwrap_model(model)

    def work(indices):
        rows = []
        starts = range(0, len(indices), batch_size)
        batches = progress_if_slow(starts, desc="reference", unit="batch", disable=not accelerator.is_main_process)
        with contextlib.closing(batches):
            for start in batches:
                batch = collate([dataset[i] for i in indices[start : start + batch_size]])
                batch.pop("ref_logps")
                index = batch.pop("index")
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    logps, _ = sequence_logps(unwrapped, family.training_inputs(batch))
                chosen, rejected = logps.float().cpu().chunk(2)
                for i, c, r in zip(index.tolist(), chosen.tolist(), rejected.tolist(), strict=True):
                    rows.append({"key": i, "chosen": c, "rejected": r})
        return rows

    with _evaluating(unwrapped):
        rows = _sharded(accelerator, len(pairs), work)
    for row in rows:
        pairs[row["key"]].ref_chosen, pairs[row["key"]].ref_rejected = row["chosen"], row["rejected"]


def summary_line(stage_name: str, summary: dict) -> str:
    """One line for the log: how many pairs, from what, and the fields the model got wrong most."""
    if summary["pairs_from"] == "preference":
        dropped = ", ".join(f"{n} {why}" for why, n in summary["dropped"].items() if n)
        return f"stage '{stage_name}': {summary['pairs']} preference pairs" + (
            f" ({dropped} dropped)" if dropped else ""
        )
    fields = summary["fields"]
    worst = sorted(fields, key=lambda f: -(fields[f]["wrong"] + fields[f]["missed"] + fields[f]["hallucinated"]))
    shown = ", ".join(
        f"{f} {fields[f]['wrong']} wrong / {fields[f]['missed']} missed / {fields[f]['hallucinated']} filled but empty"
        for f in worst[:3]
        if fields[f]["wrong"] + fields[f]["missed"] + fields[f]["hallucinated"]
    )
    return (
        f"stage '{stage_name}': the model answered {summary['greedy_right']}/{summary['samples']} training samples "
        f"right; {summary['pairs']} pairs from its {summary['answers']} answers"
        + (f"; most wrong: {shown}" if shown else "")
    )
