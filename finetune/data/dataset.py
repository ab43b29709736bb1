"""Validated, tokenised training samples.

`prepare_samples` runs once before training: it opens every image (a corrupt file fails here, not at step
9,000), checks every target, computes each sample's exact token count without processing pixels, and drops
over-length samples — never truncating, because a cut inside the image tokens or the JSON teaches garbage.
What was skipped and why is counted in a :class:`DataReport`, which the trainer prints before step 1; so are
duplicate samples (kept: repeating a sample may be deliberate oversampling).

Images are size-checked from their header before they are decoded: one with more pixels than `max_pixels`
(`data.max_image_pixels`) is a bad sample, whatever PIL's own process-wide `Image.MAX_IMAGE_PIXELS` says.

A PDF where an image is expected becomes its pages, one image each (finetune/data/pdf.py): expanded to
:class:`~finetune.data.pdf.PdfPage` references when the samples are prepared (page count and sizes from the PDF,
nothing rendered), rendered when a batch is built. The pixel limit applies to the rendered size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from finetune.data.pdf import (
    DEFAULT_MAX_PDF_PAGES,
    DEFAULT_PDF_DPI,
    PdfError,
    PdfPage,
    PdfTooManyPages,
    expand_pdfs,
    render_page,
)
from finetune.data.prompt import canonical_json
from finetune.data.sources import RawRecord, count_records, read_records
from finetune.data.target_stats import missing_or_empty_warning, target_field_stats
from finetune.errors import UserError
from finetune.models.base import IGNORE_INDEX, ModelFamily
from finetune.progress import is_main_process, progress_if_slow

# PIL's default Image.MAX_IMAGE_PIXELS (and data.max_image_pixels's): a quarter GiB of 24-bit (3-byte) pixels.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class DataError(UserError):
    """A bad sample in strict mode; the message names the file and line (or row) and the reason."""


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (a decompression bomb, or a scan at a resolution nobody trains on)."""


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
    duplicates: int = 0  # kept samples with the same images and target as an earlier kept one (still kept)
    duplicate_examples: list[str] = field(default_factory=list)  # the first two, "file:9 duplicates file:2"
    # Per skeleton field, over the kept targets: how often missing / empty / null / present (target_stats.py).
    fields: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.split}: {self.read} read, {self.kept} kept"]
        for reason, count in sorted(self.skipped.items()):
            parts.append(f"{count} skipped ({reason}; first at {self.examples[reason]})")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate{'s' if self.duplicates > 1 else ''} kept")
        return ", ".join(parts)

    def duplicates_warning(self) -> str | None:
        """One line about the duplicate samples, or None when there are none."""
        if not self.duplicates:
            return None
        many = self.duplicates > 1
        return (
            f"{self.split}: {self.duplicates} sample{'s' if many else ''} repeat{'' if many else 's'} an earlier one "
            f"(same images and target): {', '.join(self.duplicate_examples)}; kept, as repeating a sample may be "
            f"deliberate oversampling"
        )

    def fields_warning(self, *, shapes_schema: bool = False) -> str | None:
        """One line naming the fields missing or empty in some kept targets, or None when there are none."""
        return missing_or_empty_warning(self.split, self.fields, shapes_schema=shapes_schema)


_PIL_LIMIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _pil_pixel_limit_lifted():
    """PIL's decompression-bomb check (the process-wide `Image.MAX_IMAGE_PIXELS`) off for the duration, then
    restored: the limit that applies is the caller's. Locked, so that two threads cannot restore each other's
    value and leave it changed."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _image_name(ref: Any) -> str:
    if isinstance(ref, dict):
        return str(ref["path"]) if ref.get("path") else "(embedded bytes)"
    if isinstance(ref, Image.Image):
        return "(in-memory image)"
    return str(ref)  # a PdfPage: file.pdf#page=2


def _check_pixels(ref: Any, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(
            f"image {_image_name(ref)} is {width}×{height} = {width * height:,} pixels, over "
            f"data.max_image_pixels={max_pixels:,}"
        )


def image_size(ref: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image reference, checked as :func:`load_image` checks it; a PDF page's without
    rendering it (its size is known from the page box and the DPI)."""
    if isinstance(ref, PdfPage):
        _check_pixels(ref, *ref.size, max_pixels)
        return ref.size
    return load_image(ref, max_pixels=max_pixels).size


def load_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image reference into an RGB PIL image (EXIF rotation applied; CMYK, palette, 16-bit handled).

    Raises ImageTooLarge, before decoding (the size comes from the header), for more than `max_pixels` pixels;
    `max_pixels=None` for an image already checked (a prepared sample's). A :class:`PdfPage` is rendered (after
    the same check, on the size it will render to)."""
    if isinstance(ref, PdfPage):
        _check_pixels(ref, *ref.size, max_pixels)
        return render_page(ref)
    if isinstance(ref, Image.Image):
        image = ref
    else:
        # Image.open reads only the header; PIL's own check (which warns above its limit, and refuses above twice
        # that) is lifted for it so that ours decides, with a message giving the size.
        with _pil_pixel_limit_lifted():
            if isinstance(ref, dict):  # datasets' Image feature with decode=False
                image = Image.open(io.BytesIO(ref["bytes"])) if ref.get("bytes") else Image.open(ref["path"])
            else:
                image = Image.open(Path(ref))
    try:
        _check_pixels(ref, *image.size, max_pixels)
    except ImageTooLarge:
        if image is not ref:
            image.close()
        raise
    # Some formats check PIL's limit again while decoding (GIF frames, TIFF tiles): lifted where ours is higher.
    pil_limit = Image.MAX_IMAGE_PIXELS
    lift = pil_limit is not None and (max_pixels is None or max_pixels > pil_limit)
    try:
        with _pil_pixel_limit_lifted() if lift else contextlib.nullcontext():
            image.load()  # decode fully now: truncated / corrupt files raise here
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image {_image_name(ref)}: {err}") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bit instead of clipping (convert("RGB") would saturate to white)
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def _image_key(ref: Any) -> Any:
    """What identifies an image for duplicate detection: its file, or a hash of its bytes / pixels."""
    if isinstance(ref, PdfPage):
        return ("pdf", os.path.realpath(ref.path), ref.index, ref.dpi)
    if isinstance(ref, Image.Image):
        return ("pixels", ref.mode, ref.size, hashlib.sha1(ref.tobytes()).hexdigest())
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return ("bytes", hashlib.sha1(ref["bytes"]).hexdigest())
        return ("file", os.path.realpath(ref["path"]))
    return ("file", os.path.realpath(ref))


def _sample_key(images: list[Any], target: dict) -> tuple:
    return (tuple(_image_key(ref) for ref in images), json.dumps(target, sort_keys=True, ensure_ascii=False))


def _empty_source(source: Any) -> str | None:
    """`source: no samples (...)` when a file or dataset named by path holds no sample at all, else None."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if str(source).startswith("hf:") or not path.is_file():
        return f"{source}: no samples (the dataset is empty)"
    if path.stat().st_size == 0:
        return f"{source}: no samples (the file is empty)"
    return f"{source}: no samples (the file is empty: blank lines only)"


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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    pdf_dpi: float = DEFAULT_PDF_DPI,
    max_pdf_pages: int = DEFAULT_MAX_PDF_PAGES,
) -> tuple[list[Sample], DataReport]:
    """Read, validate and measure one split. Strict (`on_bad_sample="error"`) raises DataError on the first bad
    sample; lenient (`"skip"`) skips it and counts it. Over-length samples are always dropped and counted;
    duplicates are kept and counted. A file (or dataset) with no sample at all is a UserError in both modes.
    A PDF image is replaced by its pages (`pdf_dpi`; more than `max_pdf_pages` pages is a bad sample)."""
    report = DataReport(split=split)
    tokenizer = processor.tokenizer
    eot_id = tokenizer.convert_tokens_to_ids(family.end_of_turn_token(processor))
    samples: list[Sample] = []
    first_seen: dict[tuple, str] = {}  # sample key → origin of its first kept occurrence

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
                skip(record, record.reason, record.problem)
                continue
            if not isinstance(record.target, dict):
                skip(
                    record,
                    "target not a JSON object",
                    f"field '{target_column}' must be a JSON object, got {type(record.target).__name__}",
                )
                continue
            try:
                images = expand_pdfs(record.images, dpi=pdf_dpi, max_pages=max_pdf_pages)
                sizes = [image_size(ref, max_pixels=max_image_pixels) for ref in images]
            except PdfTooManyPages as err:
                skip(record, f"PDF over max_pdf_pages={max_pdf_pages}", str(err))
                continue
            except PdfError as err:
                skip(record, "unreadable PDF", f"field '{image_column}': {err}")
                continue
            except ImageTooLarge as err:
                skip(record, "image too large", str(err))
                continue
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
            samples.append(Sample(images, record.target, record.origin, [*answer_ids, eot_id], length))
            key = _sample_key(images, record.target)
            if key in first_seen:
                report.duplicates += 1
                if len(report.duplicate_examples) < 2:
                    report.duplicate_examples.append(f"{record.origin} duplicates {first_seen[key]}")
            else:
                first_seen[key] = record.origin
    if report.read == 0:  # not a bad sample to skip: there is no sample at all
        empty = _empty_source(source)
        if empty is not None:
            raise UserError(empty)
    report.kept = len(samples)
    report.fields = target_field_stats(skeleton, [s.target for s in samples])
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
        images = [load_image(ref, max_pixels=None) for ref in sample.images]  # checked when prepared
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
