"""Validated, tokenised training samples.

`prepare_samples` runs once before training: it opens every image (a corrupt file fails here, not at step
9,000), checks every target, computes each sample's exact token count without processing pixels, and drops
over-length samples — never truncating, because a cut inside the image tokens or the JSON teaches garbage.
What was skipped and why is counted in a :class:`DataReport`, which the trainer prints before step 1; so are
duplicate samples (kept: repeating a sample may be deliberate oversampling).

Images are size-checked from their header before they are decoded: one with more pixels than `max_pixels`
(`data.max_image_pixels`) is a bad sample, whatever PIL's own process-wide `Image.MAX_IMAGE_PIXELS` says.

The check never decodes a page at full size to learn its size (:func:`image_size`): the size comes from the header,
EXIF orientation applied (a JPEG rotated by its EXIF tag swaps width and height). What is decoded to find a truncated
or corrupt file before step 1 depends on the format, costs measured on a 4960×7016 (35 MP) scan, one core
(BENCHMARKS.md, "Large scans"):
- JPEG: decoded at 1/8 scale (DCT scaling, `Image.draft`): every entropy-coded byte is still read, so truncation and
  most corruption raise, at ~16 ms instead of ~145 ms for the full decode.
- PNG: `Image.verify()`: every chunk read and its CRC checked, nothing inflated: ~1 ms instead of ~500 ms. A
  truncated file or a changed byte (the CRC) is found; deflate data that is wrong under a right CRC is not.
- Any other format (TIFF, WebP, BMP, GIF, ...): decoded in full, as before.
What the check cannot see is found when the batch is built, as a `file:line: unreadable image PATH: reason`
:class:`DataError` (`DocumentDataset`), not a traceback from inside PIL. A PNG's EXIF orientation counts when its eXIf
chunk comes before the pixel data (PIL would decode the whole file to look after it), at check and load time alike.

When a batch is built, a page is decoded only as large as its model family's tiling can use
(`ModelFamily.decode_size`, given the full size): a JPEG at 1/2, 1/4 or 1/8 scale by its DCT scaling, any format
reduced by a whole factor (`Image.reduce`), a PDF page rendered at 1/n of its DPI — so a sample's memory is bounded by
the tiling, not by the scan. The full size travels with the image (`source_size`) and the grid is chosen from it.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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
from finetune.models.base import IGNORE_INDEX, SOURCE_BOX_KEY, SOURCE_SIZE_KEY, ModelFamily, reduced_size
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


# ImageOps.exif_transpose's transposition for each EXIF orientation (1: as stored).
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_MAX_REDUCTION = 64


def _open(ref: Any) -> Image.Image:
    """The image a reference names, header read, nothing decoded (an in-memory image as it is)."""
    if isinstance(ref, Image.Image):
        return ref
    # Image.open reads only the header; PIL's own check (which warns above its limit, and refuses above twice that) is
    # lifted for it so that ours decides, with a message giving the size.
    with _pil_pixel_limit_lifted():
        if isinstance(ref, dict):  # datasets' Image feature with decode=False
            return Image.open(io.BytesIO(ref["bytes"])) if ref.get("bytes") else Image.open(ref["path"])
        return Image.open(Path(ref))


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) from what the header holds, decoding nothing: PIL's own `PngImageFile.getexif`
    decodes the whole PNG to look for an eXIf chunk after the pixels, so a PNG's counts only before them."""
    try:
        value = Image.Image.getexif(image).get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block is no reason to refuse a page (exif_transpose ignores it too)
        return 1
    return value if value in _TRANSPOSE else 1


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _decode_lifted(image: Image.Image, ref: Any, max_pixels: int | None, decode) -> None:
    # Some formats check PIL's limit again while decoding (GIF frames, TIFF tiles): lifted where ours is higher.
    pil_limit = Image.MAX_IMAGE_PIXELS
    lift = pil_limit is not None and (max_pixels is None or max_pixels > pil_limit)
    try:
        with _pil_pixel_limit_lifted() if lift else contextlib.nullcontext():
            decode()
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"image {_image_name(ref)}: {err}") from None


def _check_decodable(image: Image.Image, ref: Any, max_pixels: int | None) -> None:
    """Find a truncated or corrupt file now, as cheaply as its format allows (the module docstring has the costs):
    a JPEG decoded at 1/8 scale, a PNG's chunks and checksums verified, any other format decoded fully."""
    if image.format == "JPEG" and image.draft(None, (max(1, image.width // 8), max(1, image.height // 8))):
        _decode_lifted(image, ref, max_pixels, image.load)
    elif image.format == "PNG":
        image.verify()
    else:
        _decode_lifted(image, ref, max_pixels, image.load)


def image_size(ref: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image reference as :func:`load_image` will return it (EXIF orientation applied), from
    its header, checked against `max_pixels` before anything is decoded; the file is then checked for truncation or
    corruption (`_check_decodable`). A PDF page's without rendering it (from its page box and the DPI)."""
    if isinstance(ref, PdfPage):
        _check_pixels(ref, *ref.size, max_pixels)
        return ref.size
    image = _open(ref)
    try:
        _check_pixels(ref, *image.size, max_pixels)
        size = _oriented(image.size, _orientation(image))
        if image is not ref:
            _check_decodable(image, ref, max_pixels)
        return size
    finally:
        if image is not ref:
            image.close()


def _reduction(size: tuple[int, int], least: tuple[int, int]) -> int:
    """The largest whole factor that reduces `size` (sides rounded up) to no less than `least` in either side."""
    factor = 1
    while factor < _MAX_REDUCTION:
        width, height = reduced_size(size, factor + 1)
        if width < least[0] or height < least[1]:
            break
        factor += 1
    return factor


def _to_8bit(image: Image.Image) -> Image.Image:
    """L or RGB, each as `convert("RGB")` would see it: greyscale kept single-channel (a third of the memory)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bit instead of clipping (convert("RGB") would saturate to white)
        return image.point(lambda v: v / 256).convert("L")
    if image.mode == "1":
        return image.convert("L")
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def load_image(
    ref: Any,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    decode_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode an image reference into an RGB PIL image (EXIF rotation applied; CMYK, palette, 16-bit handled).

    Raises ImageTooLarge, before decoding (the size comes from the header), for more than `max_pixels` pixels;
    `max_pixels=None` for an image already checked (a prepared sample's). A :class:`PdfPage` is rendered (after
    the same check, on the size it will render to).

    `decode_size` (a model family's `ModelFamily.decode_size` for the prompt): the least size the page is needed at,
    given its full size. The page is then decoded reduced by the largest whole factor n that keeps it at least that
    large — a JPEG at 1/2, 1/4 or 1/8 by its DCT scaling (`Image.draft`), then `Image.reduce` for what is left; other
    formats decoded and reduced at once; a PDF page rendered at 1/n of its DPI — and its full size is kept in
    `image.info[SOURCE_SIZE_KEY]`, from which the family picks its grid."""
    if isinstance(ref, PdfPage):
        _check_pixels(ref, *ref.size, max_pixels)
        factor = _reduction(ref.size, decode_size(ref.size)) if decode_size else 1
        if factor == 1:
            return render_page(ref)
        return _with_source(render_page(ref, factor), ref.size, (ref.size[0] / factor, ref.size[1] / factor), 1)
    image = _open(ref)
    try:
        _check_pixels(ref, *image.size, max_pixels)
    except ImageTooLarge:
        if image is not ref:
            image.close()
        raise
    orientation = _orientation(image)
    full = _oriented(image.size, orientation)
    factor = _reduction(full, decode_size(full)) if decode_size else 1
    drafted = 1  # the factor JPEG's DCT scaling reduced by
    if factor > 1 and image is not ref and image.format == "JPEG":
        scale, stored_width = next(s for s in (8, 4, 2, 1) if s <= factor), image.width
        if scale > 1 and image.draft(None, (image.width // scale, image.height // scale)):
            drafted = round(stored_width / image.width)
    _decode_lifted(image, ref, max_pixels, image.load)  # decoded now: truncated / corrupt files raise here
    left = factor // drafted
    if left > 1:  # converted first: palette indices, 1-bit, alpha or 16-bit values would not average right
        image = _to_8bit(image).reduce(left)
    stored = image.size  # what the stored (un-rotated) page covers of it: its size / the factor, sides not rounded
    covered = (_oriented(full, orientation)[0] / (drafted * left), _oriented(full, orientation)[1] / (drafted * left))
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    image = _to_8bit(image).convert("RGB")
    return _with_source(image, full, covered, orientation, stored) if drafted * left > 1 else image


def _covered_box(stored: tuple[int, int], covered: tuple[float, float], orientation: int) -> tuple[float, ...]:
    """Where the box (0, 0, *covered) of an image of size `stored` lands once transposed for `orientation`."""
    (w, h), (cw, ch) = stored, covered
    return {
        1: (0, 0, cw, ch),
        2: (w - cw, 0, w, ch),
        3: (w - cw, h - ch, w, h),
        4: (0, h - ch, cw, h),
        5: (0, 0, ch, cw),
        6: (h - ch, 0, h, cw),
        7: (h - ch, w - cw, h, w),
        8: (0, w - cw, ch, w),
    }[orientation]


def _with_source(
    image: Image.Image,
    full: tuple[int, int],
    covered: tuple[float, float],
    orientation: int,
    stored: tuple[int, int] | None = None,
) -> Image.Image:
    """`image` marked as a reduced decode of a page of `full` size (`source_size`, `source_box`)."""
    if image.size != full:
        image.info[SOURCE_SIZE_KEY] = full
        image.info[SOURCE_BOX_KEY] = tuple(float(v) for v in _covered_box(stored or image.size, covered, orientation))
    return image


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
    # Every image is opened and checked here, before step 1: thousands of pages take a while, so this shows progress,
    # on the reporting process only, and only when it is more than a handful of samples or takes more than a second.
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
        images = self._load_images(sample)
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

    def _load_images(self, sample: Sample) -> list[Image.Image]:
        """The sample's pages, each decoded only as large as the family can use (`ModelFamily.decode_size`). Sizes and
        pixel limits were checked when the sample was prepared; what that check could not see (a JPEG corrupt past
        what a 1/8-scale decode reads, a PNG whose data inflates wrong, a file changed since) is a DataError naming
        the sample and the file, not a traceback from inside PIL."""
        count = len(sample.images)

        def needed(size: tuple[int, int]) -> tuple[int, int]:
            return self.family.decode_size(self.processor, size, count)

        images = []
        for ref in sample.images:
            try:
                images.append(load_image(ref, max_pixels=None, decode_size=needed))
            except FileNotFoundError as err:
                raise DataError(f"{sample.origin}: image not found: {err.filename or _image_name(ref)}") from None
            except (OSError, ValueError, SyntaxError) as err:  # PIL's (and PdfError's) for unreadable files
                raise DataError(f"{sample.origin}: unreadable image {_image_name(ref)}: {err}") from None
        return images


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
        batch.update(self.family.token_inputs(batch, features))
        return batch
