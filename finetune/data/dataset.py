"""Validated, tokenised training samples.

`prepare_samples` runs once before training: it opens every image (a corrupt file fails here, not at step
9,000), checks every target, computes each sample's exact token count without processing pixels, and drops
over-length samples — never truncating, because a cut inside the image tokens or the JSON teaches garbage.
What was skipped and why is counted in a :class:`DataReport`, which the trainer prints before step 1.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from finetune.data.prompt import canonical_json
from finetune.data.sources import RawRecord, count_records, read_records
from finetune.errors import UserError
from finetune.models.base import IGNORE_INDEX, ModelFamily
from finetune.progress import is_main_process, progress_if_slow


class DataError(UserError):
    """A bad sample in strict mode; the message names the file and line (or row) and the reason."""


@dataclass
class Sample:
    images: list[Any]
    target: dict
    origin: str
    answer_ids: list[int]
    length: int  # prompt (with expanded image tokens) + answer + end-of-turn


@dataclass
class DataReport:
    """How many samples were read, kept and skipped (by reason) for one split."""

    split: str
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason → first origin, to help find it

    def summary(self) -> str:
        parts = [f"{self.split}: {self.read} read, {self.kept} kept"]
        for reason, count in sorted(self.skipped.items()):
            parts.append(f"{count} skipped ({reason}; first at {self.examples[reason]})")
        return ", ".join(parts)


def load_image(ref: Any) -> Image.Image:
    """Decode an image reference into an RGB PIL image (EXIF rotation applied; CMYK, palette, 16-bit handled)."""
    if isinstance(ref, Image.Image):
        image = ref
    elif isinstance(ref, dict):  # datasets' Image feature with decode=False
        image = Image.open(io.BytesIO(ref["bytes"])) if ref.get("bytes") else Image.open(ref["path"])
    else:
        image = Image.open(Path(ref))
    image.load()  # decode fully now: truncated / corrupt files raise here
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bit instead of clipping (convert("RGB") would saturate to white)
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def prepare_samples(
    source,
    *,
    split: str,
    family: ModelFamily,
    processor,
    instruction_text: str,
    skeleton: dict,
    max_length: int,
    on_bad_sample: str = "error",
    image_column: str = "image",
    target_column: str = "target",
    limit: int | None = None,
) -> tuple[list[Sample], DataReport]:
    """Read, validate and measure one split. Strict (`on_bad_sample="error"`) raises DataError on the first bad
    sample; lenient (`"skip"`) skips it and counts it. Over-length samples are always dropped and counted."""
    report = DataReport(split=split)
    tokenizer = processor.tokenizer
    eot_id = tokenizer.convert_tokens_to_ids(family.end_of_turn_token(processor))
    samples: list[Sample] = []

    def skip(record: RawRecord, reason: str, detail: str) -> None:
        if on_bad_sample == "error":
            raise DataError(f"{record.origin}: {detail}")
        report.skipped[reason] += 1
        report.examples.setdefault(reason, record.origin)

    records: Iterable[RawRecord] = read_records(source, image_column=image_column, target_column=target_column)
    total = count_records(source)
    if total is not None and limit is not None:
        total = min(total, limit)
    # Every image is decoded here, before step 1: thousands of pages take minutes, so this shows progress, on the
    # reporting process only, and only when it is more than a handful of samples or takes more than a second.
    # (closing: the display ends here, also on a bad sample, before the error is reported.)
    checking = progress_if_slow(
        records, desc=f"checking {split} data", total=total, unit="sample", disable=not is_main_process()
    )
    with contextlib.closing(checking):
        for record in checking:
            if limit is not None and report.read >= limit:
                break
            report.read += 1
            if record.problem:
                skip(record, "malformed record", record.problem)
                continue
            if not isinstance(record.target, dict):
                skip(
                    record,
                    "target not a JSON object",
                    f"field '{target_column}' must be a JSON object, got {type(record.target).__name__}",
                )
                continue
            try:
                sizes = [load_image(ref).size for ref in record.images]
            except FileNotFoundError as err:
                skip(record, "missing image", f"field '{image_column}': image not found: {err.filename}")
                continue
            except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for unreadable / corrupt files
                skip(record, "unreadable image", f"field '{image_column}': unreadable image: {err}")
                continue
            prompt_text = family.render_prompt(processor, instruction_text, len(sizes))
            answer_ids = tokenizer(canonical_json(record.target, skeleton), add_special_tokens=False)["input_ids"]
            length = family.count_prompt_tokens(processor, prompt_text, sizes) + len(answer_ids) + 1
            if length > max_length:
                # Always skipped (never an error, never truncated): the recipe's max_length is a budget, not a bug.
                report.skipped[f"longer than max_length={max_length}"] += 1
                report.examples.setdefault(f"longer than max_length={max_length}", f"{record.origin} ({length} tokens)")
                continue
            samples.append(Sample(record.images, record.target, record.origin, [*answer_ids, eot_id], length))
    report.kept = len(samples)
    return samples, report


class DocumentDataset(torch.utils.data.Dataset):
    """Samples → model inputs. Labels cover only the answer's JSON tokens and the end-of-turn token."""

    def __init__(
        self, samples: list[Sample], *, family: ModelFamily, processor, instruction_text: str, with_answer: bool = True
    ):
        self.samples = samples
        self.family = family
        self.processor = processor
        self.instruction_text = instruction_text
        self.with_answer = with_answer

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        images = [load_image(ref) for ref in sample.images]
        text = self.family.render_prompt(self.processor, self.instruction_text, len(images))
        encoded = self.family.encode_prompt(self.processor, images, text)
        input_ids, labels = encoded.input_ids, encoded.labels
        if self.with_answer:
            input_ids = input_ids + sample.answer_ids
            labels = labels + sample.answer_ids
            if len(input_ids) != sample.length:
                raise RuntimeError(
                    f"{sample.origin}: {len(input_ids)} tokens but {sample.length} were counted; "
                    f"{self.family.name}.count_prompt_tokens disagrees with its processor"
                )
        return {"input_ids": input_ids, "labels": labels, "index": index, **encoded.image_inputs}


@dataclass
class Collator:
    """Pads text fields (right for training, left for generation) and lets the family batch image tensors."""

    family: ModelFamily
    pad_token_id: int
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids, labels, attention = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids, lab, mask = f["input_ids"], f["labels"], [1] * len(f["input_ids"])
            if self.padding_side == "left":
                ids, lab, mask = [self.pad_token_id] * pad + ids, [IGNORE_INDEX] * pad + lab, [0] * pad + mask
            else:
                ids, lab, mask = ids + [self.pad_token_id] * pad, lab + [IGNORE_INDEX] * pad, mask + [0] * pad
            input_ids.append(ids)
            labels.append(lab)
            attention.append(mask)
        batch = {
            "input_ids": torch.tensor(input_ids),
            "attention_mask": torch.tensor(attention),
            "labels": torch.tensor(labels),
            "index": torch.tensor([f["index"] for f in features]),
        }
        batch.update(self.family.collate_images(features))
        return batch
