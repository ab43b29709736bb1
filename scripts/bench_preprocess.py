"""Image preprocessing throughput: tiling + normalisation per page size, and where the time goes.

    python scripts/bench_preprocess.py [--repeats 5] [--out runs/bench-preprocess]

Pages: a thermal receipt photo, A4 scans at 150 and 300 dpi, and a wide digital table, each a synthetic document
scaled to that size and saved the way such pages usually arrive (JPEG for photos and scans, PNG for the digital
table). For H2OVL-Mississippi (448 px tiles, up to 6 + thumbnail) each phase of what the training dataset does per
image is timed on its own — decode, grid resize, crop, thumbnail, to-tensor + normalise — and the whole (decode +
the family's `preprocess`, which also converts to RGB) is timed once more as one call. LLaVA-OneVision's image
processor (transformers' PIL implementation, anyres tiles of 384 px) is timed whole for comparison. One thread, as
in a data-loader worker; the best of `--repeats` runs per phase (the least disturbed by other work on the machine).

    python scripts/bench_preprocess.py --images scans/ "inbox/*.jpg" page.png [--repeats 5]

Real files instead of the synthetic pages (files, folders: their images, globs). Either way "decode" is what the
training dataset does: `load_image` with the family's `decode_size` (a large page decoded reduced: JPEG DCT scaling,
`Image.reduce`), so the same command run on an older checkout (`PYTHONPATH=/tmp/before python
scripts/bench_preprocess.py ...`, code without `decode_size`) times the full decode, for a before / after.

    python scripts/bench_preprocess.py --pdf [--pages 8] [--repeats 5]

PDF input instead: a PDF of `--pages` A4 pages (synthetic invoices embedded as JPEG, as a scanner writes them), its
check-time cost (open, count pages, page sizes: what `prepare_samples` does, no rendering) and its rendering
(`load_image` of each page, pdfium through pypdfium2, to RGB) in pages/s at several DPIs."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import machine, markdown_table

# name → (width, height, format)
PAGES = {
    "receipt (80 mm, 203 dpi photo)": (576, 1600, "JPEG"),
    "A4 scan, 150 dpi": (1240, 1754, "JPEG"),
    "A4 scan, 300 dpi": (2480, 3508, "JPEG"),
    "wide table (digital)": (3300, 1100, "PNG"),
    "A4 scan, 600 dpi (35 MP)": (4960, 7016, "JPEG"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def image_files(inputs: list[str]) -> dict[str, Path]:
    """`--images`: files, folders (their images, sorted) and glob patterns → {name: path}, in order."""
    import glob

    found: dict[str, Path] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            paths = sorted(Path(p) for p in glob.glob(item, recursive=True))
        else:
            paths = [path]
        for p in paths:
            if not p.is_file():
                raise SystemExit(f"--images: {p}: no such file")
            found.setdefault(p.name, p)
    if not found:
        raise SystemExit("--images: no image found")
    return found


def page_loader(least=None):
    """`path → RGB image` as the training dataset decodes it: reduced to `least(full size)` where this checkout's
    `load_image` can (it has `decode_size`), else in full (an older checkout: the before of a before / after)."""
    import inspect

    from finetune.data.dataset import load_image

    if least is not None and "decode_size" in inspect.signature(load_image).parameters:
        return lambda path: load_image(path, decode_size=least)
    return lambda path: load_image(path)


def _source_size_and_box(image):
    try:
        from finetune.models.base import source_box, source_size
    except ImportError:  # an older checkout: pages are decoded in full
        return image.size, None
    return source_size(image), source_box(image)


def write_pages(out: Path, scale: float = 1.0) -> dict[str, Path]:
    """One file per page size: a synthetic invoice (or receipt) stretched to the size, deterministic."""
    from PIL import Image

    from finetune.synthetic.invoices import make_document

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for index, (name, (width, height, fmt)) in enumerate(PAGES.items()):
        width, height = max(32, int(width * scale)), max(32, int(height * scale))
        path = out / f"page{index}-{width}x{height}.{fmt.lower().replace('jpeg', 'jpg')}"
        if not path.exists():
            page, _ = make_document(random.Random(f"bench/{index}"), "invoices")
            page.resize((width, height), Image.Resampling.BICUBIC).save(
                path, fmt, **({"quality": 90} if fmt == "JPEG" else {})
            )
        files[name] = path
    return files


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def mississippi_phases(path: Path, repeats: int) -> dict[str, float]:
    """Seconds per phase of `DocumentDataset` + `h2ovl_image.preprocess` for one page (default settings)."""
    from PIL import Image

    from finetune.models.mississippi import image as hi

    tile = 448
    load = page_loader((lambda size: hi.decode_size(*size)) if hasattr(hi, "decode_size") else None)
    decode, image = best_of(repeats, lambda: load(path))
    full, box = _source_size_and_box(image)
    grid = hi.choose_grid(*full, hi.target_grids(1, 6), tile)
    cols, rows = grid
    bicubic = Image.Resampling.BICUBIC
    resize, resized = best_of(repeats, lambda: image.resize((tile * cols, tile * rows), bicubic, box=box))
    crop, tiles = best_of(
        repeats,
        lambda: [
            resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
        ],
    )
    thumbnail, thumb = best_of(
        repeats, lambda: image.resize((tile, tile), bicubic, box=box) if cols * rows > 1 else None
    )
    tiles = tiles + ([thumb] if thumb is not None else [])
    normalise, _ = best_of(repeats, lambda: hi._to_tensor(tiles))
    whole, (pixels, _) = best_of(repeats, lambda: hi.preprocess([load(path)]))
    return {
        "tiles": int(pixels.shape[0]),
        "decoded": list(image.size),
        "decode": decode,
        "resize": resize,
        "crop": crop,
        "thumbnail": thumbnail,
        "normalise": normalise,
        "whole": whole,
    }


def llava_whole(path: Path, repeats: int, processor) -> tuple[float, int]:
    from finetune.models import get_family

    family = get_family("llava_onevision")
    least = (lambda size: family.decode_size(processor, size, 1)) if hasattr(family, "decode_size") else None
    load = page_loader(least)
    seconds, out = best_of(repeats, lambda: processor.image_processor(images=[load(path)], return_tensors="pt"))
    return seconds, int(out["pixel_values"].shape[1])


def llava_processor(folder: Path):
    """A LLaVA-OneVision processor with the real 0.5B checkpoint's image settings (384 px, anyres_max_9 grids)."""
    from finetune.models import get_family

    family = get_family("llava_onevision")
    family.build_tiny_checkpoint(
        folder, image_size=384, patch_size=14, grid=(1, 2, 3, 4, 5, 6), vision_layers=1, text_layers=1
    )
    return family.load_processor(str(folder))


def write_pdf(out: Path, pages: int, scale: float = 1.0) -> Path:
    """A PDF of `pages` A4 pages (595×842 pt), each a synthetic invoice embedded at 150 dpi as a JPEG."""
    from PIL import Image

    from finetune.synthetic.invoices import make_document

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"a4-{pages}-pages-{scale:g}.pdf"
    if not path.exists():
        width, height = max(32, int(1240 * scale)), max(32, int(1754 * scale))
        images = [
            make_document(random.Random(f"bench/pdf/{i}"), "invoices")[0]
            .convert("RGB")
            .resize((width, height), Image.Resampling.BICUBIC)
            for i in range(pages)
        ]
        images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=150 * scale, quality=90)
    return path


def pdf_bench(args) -> None:
    from finetune.data.dataset import load_image
    from finetune.data.pdf import expand_pdf

    out = Path(args.out)
    path = write_pdf(out / "pages", args.pages, args.scale)
    expand_pdf(path, max_pages=args.pages)  # warm-up: loads pdfium
    rows, results = [], []
    for dpi in (72, 144, 200):
        check, pages = best_of(args.repeats, lambda dpi=dpi: expand_pdf(path, dpi=dpi, max_pages=args.pages))
        render, images = best_of(args.repeats, lambda pages=pages: [load_image(p) for p in pages])
        assert [im.size for im in images] == [p.size for p in pages]
        width, height = pages[0].size
        per_page = render / len(pages)
        results.append({"dpi": dpi, "pages": len(pages), "size": [width, height], "check": check, "render": render})
        rows.append(
            [
                str(dpi),
                f"{width}×{height}",
                f"{check / len(pages) * 1e3:.2f}",
                f"{per_page * 1e3:.1f}",
                f"{1 / per_page:.1f}",
            ]
        )
    print(f"\n{machine()}; {path.name} ({path.stat().st_size / 1e6:.1f} MB); best of {args.repeats}")
    print(markdown_table(["dpi", "page pixels", "check ms/page", "render ms/page", "pages/s"], rows))
    (out / "results-pdf.json").write_text(json.dumps({"machine": machine(), "rows": results}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the pages (smoke tests)")
    parser.add_argument("--out", default="runs/bench-preprocess")
    parser.add_argument("--pdf", action="store_true", help="time PDF page checking and rendering instead")
    parser.add_argument("--pages", type=int, default=8, help="--pdf: pages in the PDF")
    parser.add_argument("--images", nargs="+", metavar="PATH", help="real files (files, folders, globs) to time")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.pdf:
        pdf_bench(args)
        return
    out = Path(args.out)
    files = image_files(args.images) if args.images else write_pages(out / "pages", args.scale)
    llava = llava_processor(out / "llava-processor")
    rows, results = [], []
    for name, path in files.items():
        from PIL import Image

        with Image.open(path) as image:
            size = f"{image.width}×{image.height} {image.format}"
            megapixels = image.width * image.height / 1e6
        phases = mississippi_phases(path, args.repeats)
        llava_seconds, llava_tiles = llava_whole(path, args.repeats, llava)
        parts = sum(phases[k] for k in ("decode", "resize", "crop", "thumbnail", "normalise"))
        results.append(
            {
                "page": name,
                "size": size,
                **phases,
                "images_per_s": 1 / phases["whole"],
                "llava_onevision": llava_seconds,
                "llava_tiles": llava_tiles,
            }
        )
        shares = [
            f"{phases[k] * 1e3:.1f} ({phases[k] / parts:.0%})"
            for k in ("decode", "resize", "crop", "thumbnail", "normalise")
        ]
        rows.append(
            [
                name,
                f"{size} ({megapixels:.1f} MP)",
                "×".join(map(str, phases["decoded"])),
                str(phases["tiles"]),
                f"{1 / phases['whole']:.1f}",
                *shares,
                f"{phases['whole'] * 1e3:.1f}",
                f"{1 / llava_seconds:.1f} ({llava_tiles} tiles)",
            ]
        )
    print(f"\n{machine()}; best of {args.repeats}")
    print(
        markdown_table(
            [
                "page",
                "pixels",
                "decoded at",
                "Mississippi tiles",
                "images/s",
                "decode ms",
                "grid resize ms",
                "crop ms",
                "thumbnail ms",
                "to tensor + normalise ms",
                "whole ms",
                "LLaVA-OneVision images/s",
            ],
            rows,
        )
    )
    (out / "results.json").write_text(json.dumps({"machine": machine(), "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
