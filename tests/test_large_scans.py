"""Large scans: sizes from headers at check time, pages decoded only as large as each family's tiling uses.

What is checked, on pages of 12-16 MP (synthetic invoices stretched to scan sizes, JPEG and PNG, portrait and
landscape, and a JPEG stored sideways with an EXIF rotation):
- the data check learns sizes from headers (EXIF rotation applied) and never decodes a page at full size, yet still
  finds a truncated or corrupt file before step 1 (JPEG: a 1/8-scale decode; PNG: `verify`); what it cannot see is a
  `file:line: unreadable image ...` DataError when the batch is built;
- per family (Mississippi with and without MSAC, Ovis2 and Ovis1.6, LLaVA-OneVision, each at its real image size), the
  reduced decode gives the same grid and the same tokens (DocumentDataset raises if the count disagrees) and pixel
  values within the tolerance below of the full decode's, while decoding the page at a fraction of its size;
- `decode_size` never picks a reduction that changes a grid, on a sweep of sizes.

Tolerance (normalised pixel values, i.e. in units of the normaliser's std: ~0.23-0.5 of the 0-1 range): mean
|difference| ≤ 0.005 (about 0.3 of a grey level) and max ≤ 0.5, measured at 0.0005-0.003 mean and 0.05-0.4 max. The
difference is the resampling's own: a reduced decode (JPEG DCT scaling or `Image.reduce`, a box average) followed by
a bicubic downscale instead of one bicubic downscale from the full page, with the same geometry (the grid from the full
size, the exact box the page covers); it peaks at the edges of glyphs, never over a region. A PDF page rendered at 1/n
of its DPI differs by PDFium's own resampling of its embedded image (as a lower `data.pdf_dpi` would): mean ≤ 0.04.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from finetune.data.dataset import DataError, DocumentDataset, image_size, load_image, prepare_samples
from finetune.models import get_family
from finetune.models.base import SOURCE_SIZE_KEY, reduced_size, source_size
from finetune.models.mississippi import image as hi
from finetune.models.ovis import image as oi
from finetune.models.ovis.processor import OvisProcessor

MEAN_TOLERANCE = 0.005
MAX_TOLERANCE = 0.5
SKELETON = {"total": ""}
INSTRUCTION = "Read the total."


def document(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A synthetic invoice stretched to `size` (text edges as sharp as a scan's)."""
    from finetune.synthetic.invoices import make_document

    page, _ = make_document(random.Random(f"large/{seed}"), "invoices")
    return page.convert("RGB").resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("large-pages")
    portrait, landscape = document((3400, 4800), 1), document((4800, 3000), 2)
    files = {
        "portrait.jpg": (portrait, {"quality": 90}),
        "landscape.jpg": (landscape, {"quality": 90}),
        "portrait.png": (portrait, {"compress_level": 1}),
        "landscape.png": (landscape, {"compress_level": 1}),
    }
    for name, (image, options) in files.items():
        image.save(folder / name, **options)
    # Stored sideways (4800×3400), shown upright (3400×4800) by its EXIF orientation 6 (rotate 90° clockwise).
    exif = Image.Exif()
    exif[0x0112] = 6
    portrait.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", quality=90, exif=exif.tobytes())
    return {name: folder / name for name in [*files, "rotated.jpg"]}


# --- sizes from headers -------------------------------------------------------------------------------------------


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image PIL decodes from a file while the test runs."""
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self):
        if self.tile:
            sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_the_check_reads_sizes_from_headers_never_a_full_decode(pages, decoded_sizes):
    assert image_size(pages["portrait.jpg"]) == (3400, 4800)
    assert image_size(pages["rotated.jpg"]) == (3400, 4800)  # stored 4800×3400: the EXIF rotation swaps the sides
    assert image_size(pages["landscape.png"]) == (4800, 3000)
    # The JPEGs are decoded at 1/8 scale (to find truncation), the PNG not at all (its chunks are verified).
    assert decoded_sizes == [(425, 600), (600, 425)]


def test_the_pixel_limit_is_checked_before_anything_is_decoded(family_cases, pages, decoded_sizes, tmp_path):
    case = family_cases["mississippi"]
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"image": str(pages["portrait.jpg"]), "target": {"total": "1"}}) + "\n")
    samples, report = case.prepare(source, on_bad_sample="skip", max_image_pixels=10_000_000)
    assert not samples and report.skipped == {"image too large": 1} and decoded_sizes == []


def _truncated(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def _png_with_a_changed_byte(path: Path, out: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[data.index(b"IDAT") + 500] ^= 0x55  # inside the first IDAT chunk: its CRC no longer matches
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("fault", ["truncated.jpg", "truncated.png", "changed-byte.png"])
def test_a_corrupt_file_is_found_before_step_one(family_cases, pages, tmp_path, fault):
    bad = {
        "truncated.jpg": lambda: _truncated(pages["portrait.jpg"], tmp_path / fault),
        "truncated.png": lambda: _truncated(pages["portrait.png"], tmp_path / fault),
        "changed-byte.png": lambda: _png_with_a_changed_byte(pages["portrait.png"], tmp_path / fault),
    }[fault]()
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"image": str(bad), "target": {"total": "1"}}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1: field 'image': unreadable image"):
        family_cases["mississippi"].prepare(source)
    _, report = family_cases["mississippi"].prepare(source, on_bad_sample="skip")
    assert report.skipped == {"unreadable image": 1}


def test_what_the_check_cannot_see_is_a_clear_error_when_the_batch_is_built(family_cases, pages, tmp_path):
    case = family_cases["mississippi"]
    page = tmp_path / "page.png"
    page.write_bytes(pages["portrait.png"].read_bytes())
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"image": str(page), "target": {"total": "1"}}) + "\n")
    samples, _ = case.prepare(source)
    dataset = case.dataset(samples)
    # The file changed after the check (here: cut short, as by a copy that did not finish).
    _truncated(pages["portrait.png"], page)
    with pytest.raises(DataError, match=rf"^{re.escape(str(source))}:1: unreadable image {re.escape(str(page))}: "):
        dataset[0]
    page.unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(source))}:1: image not found: {re.escape(str(page))}"):
        dataset[0]


# --- reduced decoding, per family -------------------------------------------------------------------------------


@dataclasses.dataclass
class FamilyCase:
    family: object
    processor: object

    def prepare(self, source, **options):
        return prepare_samples(
            source,
            split="train",
            family=self.family,
            processor=self.processor,
            instruction_text=INSTRUCTION,
            skeleton=SKELETON,
            max_length=100_000,
            **options,
        )

    def dataset(self, samples) -> DocumentDataset:
        return DocumentDataset(samples, family=self.family, processor=self.processor, instruction_text=INSTRUCTION)

    def encode_full(self, sample):
        """Today's path: every page decoded at full size."""
        images = [load_image(ref, max_pixels=None) for ref in sample.images]
        text = self.family.render_prompt(self.processor, INSTRUCTION, len(images))
        return self.family.encode_prompt(self.processor, images, text)


def _ovis_processor(processor: OvisProcessor, side: int, mean, std) -> OvisProcessor:
    settings = dataclasses.replace(processor.settings, side=side, image_mean=list(mean), image_std=list(std))
    return OvisProcessor(copy.deepcopy(processor.tokenizer), settings, processor.token_ids)


@pytest.fixture(scope="module")
def family_cases(tmp_path_factory) -> dict[str, FamilyCase]:
    """Each family's tiny checkpoint with its real checkpoints' image settings (tile / crop size, grids)."""
    cases = {}
    miss = get_family("mississippi")
    path = str(miss.build_tiny_checkpoint(tmp_path_factory.mktemp("miss"), **miss.tiny_presets["test"]))
    cases["mississippi"] = FamilyCase(miss, miss.load_processor(path, tile_size=448, max_tiles=6))
    cases["mississippi-msac"] = FamilyCase(miss, miss.load_processor(path, tile_size=448, max_tiles=6, use_msac=True))
    ovis = get_family("ovis")
    path = str(ovis.build_tiny_checkpoint(tmp_path_factory.mktemp("ovis"), **ovis.tiny_presets["test-ovis2"]))
    base = ovis.load_processor(path)
    clip = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    cases["ovis2"] = FamilyCase(ovis, _ovis_processor(base, 448, *clip))
    cases["ovis1.6"] = FamilyCase(ovis, _ovis_processor(base, 384, (0.5,) * 3, (0.5,) * 3))
    llava = get_family("llava_onevision")
    path = llava.build_tiny_checkpoint(
        tmp_path_factory.mktemp("llava"), image_size=384, patch_size=14, grid=(1, 2, 3, 4, 5, 6), vision_layers=1
    )
    cases["llava_onevision"] = FamilyCase(llava, llava.load_processor(str(path)))
    return cases


FAMILIES = ["mississippi", "mississippi-msac", "ovis2", "ovis1.6", "llava_onevision"]
PAGES = ["portrait.jpg", "landscape.jpg", "portrait.png", "landscape.png", "rotated.jpg"]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("name", FAMILIES)
def test_a_reduced_decode_gives_the_same_grid_and_tokens_and_the_same_pixels_within_tolerance(
    family_cases, pages, tmp_path, name, page
):
    case = family_cases[name]
    source = tmp_path / "data.jsonl"
    source.write_text(json.dumps({"image": str(pages[page]), "target": {"total": "12.50"}}) + "\n")
    samples, report = case.prepare(source)
    assert report.kept == 1
    sample = samples[0]
    full_size = image_size(pages[page])
    least = case.family.decode_size(case.processor, full_size, 1)
    assert least[0] < full_size[0] / 1.9, "a 12-16 MP page is more than any family's tiling uses"
    reduced = case.dataset(samples)[0]  # raises when the tokens differ from the check's count
    full = case.encode_full(sample)
    assert reduced["input_ids"][: len(full.input_ids)] == full.input_ids  # the same grid: the same tokens
    a, b = full.image_inputs["pixel_values"], reduced["pixel_values"]
    assert a.shape == b.shape
    difference = (a - b).abs()
    assert difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE, (
        f"mean {difference.mean():.4f}, max {difference.max():.3f}"
    )


def test_pages_are_decoded_reduced_and_keep_their_full_size(family_cases, pages, decoded_sizes):
    case = family_cases["mississippi"]
    for page in ("portrait.jpg", "rotated.jpg", "portrait.png"):
        decoded_sizes.clear()
        image = load_image(pages[page], decode_size=lambda s: case.family.decode_size(case.processor, s, 1))
        assert source_size(image) == (3400, 4800) and image.size == reduced_size(
            (3400, 4800), 3 if "png" in page else 2
        )
        if page.endswith(".jpg"):  # DCT-scaled: never decoded at full size
            assert max(w * h for w, h in decoded_sizes) <= 3400 * 4800 / 4


def test_a_stale_source_size_is_ignored():
    image = Image.new("RGB", (400, 300))
    image.info[SOURCE_SIZE_KEY] = (4000, 3000)
    assert source_size(image) == (4000, 3000)
    assert source_size(image.resize((333, 250))) == (333, 250)  # resized since: not a whole-factor reduction


def test_an_in_memory_image_is_reduced_without_being_changed():
    page = document((3000, 4000))
    image = load_image(page, decode_size=lambda s: (1000, 1000))
    assert image.size == (1000, 1334) and source_size(image) == (3000, 4000)
    assert SOURCE_SIZE_KEY not in page.info and page.size == (3000, 4000)


def test_a_large_pdf_page_renders_reduced(family_cases, tmp_path):
    from finetune.data.pdf import expand_pdf

    case = family_cases["mississippi"]
    path = tmp_path / "scan.pdf"
    document((1240, 1754)).save(path, "PDF", resolution=150)  # A4
    (page,) = expand_pdf(path, dpi=400)
    least = case.family.decode_size(case.processor, page.size, 1)
    reduced = load_image(page, decode_size=lambda s: least)
    assert _at_least(page.size, reduced.size) and reduced.size != page.size and _at_least(reduced.size, least)
    assert source_size(reduced) == page.size
    a, _ = hi.preprocess([load_image(page)])
    b, _ = hi.preprocess([reduced])
    # PDFium's own resampling of the embedded scan, at a lower scale: what a lower data.pdf_dpi gives (measured 0.025
    # mean, 0.72 max), so a looser bound than a file's.
    assert a.shape == b.shape and (a - b).abs().mean() <= 0.04 and (a - b).abs().max() <= 1.0


# --- decode_size never changes a grid -------------------------------------------------------------------------------

SIZES = [(random.Random(i).randint(300, 12000), random.Random(-i).randint(300, 12000)) for i in range(150)]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_reduction_down_to_decode_size_keeps_the_grid_and_the_resolution(family_cases, name):
    case = family_cases[name]
    settings = getattr(case.processor, "settings", None)
    for size in [*SIZES, (4960, 7016), (12000, 12000), (600, 4000)]:
        least = case.family.decode_size(case.processor, size, 1)
        factor = max(n for n in range(1, 65) if _at_least(reduced_size(size, n), least))
        assert reduced_size(size, factor) == least
        for n in range(2, factor + 1):
            small = reduced_size(size, n)
            if name.startswith("mississippi"):  # the grid comes from the full size; the reduced page still covers it
                tile, most = settings.tile_size, settings.max_tiles
                if settings.use_msac:
                    grids = hi._msac_grids(*size, tile, most)
                else:
                    grids = (hi.choose_grid(*size, hi.target_grids(settings.min_tiles, most), tile),)
                for grid in filter(None, grids):
                    assert small[0] >= tile * grid[0] and small[1] >= tile * grid[1]
            elif name.startswith("ovis"):  # every crop keeps at least the size it is resized to
                grid = oi.best_grid(*size, settings.side, settings.max_partition)
                for left, upper, right, lower in [*oi.partition(*size, grid), (0, 0, *size)]:
                    target = oi.resize_target(right - left, lower - upper, settings.side)
                    assert (right - left) / n >= target[0] and (lower - upper) / n >= target[1]
            else:  # LLaVA-OneVision picks its grid from the image it is given: the same tokens at every reduction
                tokens = case.family._image_tokens
                assert tokens(case.processor, [small]) == tokens(case.processor, [size])


def _at_least(size: tuple[int, int], least: tuple[int, int]) -> bool:
    return size[0] >= least[0] and size[1] >= least[1]


def test_the_default_decode_size_is_the_full_size():
    from finetune.models.base import ModelFamily

    assert ModelFamily.decode_size(None, None, (5000, 7000), 1) == (5000, 7000)


_INVERSE = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reduces_to_the_same_tiles(tmp_path, orientation, suffix):
    """Sides not divisible by the factor: the part of the reduced page that stands for less than n pixels lands at
    the bottom / right, or (rotated) the top / left; the box the tiles are resampled from follows it."""
    from finetune.data.dataset import _TRANSPOSE

    page = document((2001, 2803), orientation)
    stored = page.transpose(_INVERSE.get(orientation, _TRANSPOSE.get(orientation))) if orientation > 1 else page
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"page{suffix}"
    stored.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {"compress_level": 1}))
    assert image_size(path) == (2001, 2803)
    full = load_image(path)
    assert full.size == (2001, 2803)
    reduced = load_image(path, decode_size=lambda s: hi.decode_size(*s))
    assert reduced.size == reduced_size((2001, 2803), 2) and source_size(reduced) == (2001, 2803)
    a, counts = hi.preprocess([full])
    b, same = hi.preprocess([reduced])
    difference = (a - b).abs()
    assert counts == same and difference.mean() <= MEAN_TOLERANCE and difference.max() <= MAX_TOLERANCE, (
        f"mean {difference.mean():.4f}, max {difference.max():.3f}"
    )
