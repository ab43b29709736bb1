"""Convert a dataset in a published layout (donut, sroie, funsd, imagefolder, hf, jsonl) into our JSONL.

    python scripts/convert_dataset.py --format sroie --path data/SROIE2019 --split train --out data/sroie/train.jsonl

Images are referenced by their path relative to the output file, or copied beside it with `--copy-images` (into
`<out stem>_images/`); images held as bytes in a Hugging Face dataset are always written there. Reading is the
toolkit's own (finetune/data/formats.py), so the JSONL trains exactly as the source would. A malformed record stops
the conversion with one line naming it, or with `--on-bad-sample skip` is skipped and counted. An existing output
is never replaced unless `--overwrite`. Stdout: one JSON object with the counts; messages go to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.cli import ArgumentParser, run_entry_point
from finetune.errors import UserError


def main(argv: list[str] | None = None) -> None:
    from finetune.config import DATA_FORMATS

    parser = ArgumentParser(prog="convert_dataset.py", description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=DATA_FORMATS, help="the source's layout")
    parser.add_argument("--path", required=True, help="folder, file or Hub dataset id")
    parser.add_argument("--split", help="split subfolder (donut, sroie, imagefolder, funsd: train / test) or hf split")
    parser.add_argument("--image-column", help="donut / imagefolder / hf / jsonl: the image column")
    parser.add_argument("--target-column", help="donut / imagefolder / hf / jsonl: the target column")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--copy-images", action="store_true", help="copy the images beside the output")
    parser.add_argument("--on-bad-sample", choices=["error", "skip"], default="error")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    summary = convert(args)
    print(json.dumps(summary))


def convert(args: argparse.Namespace) -> dict:
    from pydantic import ValidationError

    from finetune.config import DataSource
    from finetune.data.sources import read_records

    columns = {"image": args.image_column, "target": args.target_column}
    raw = {"format": args.format, "path": args.path, "split": args.split}
    if any(columns.values()):
        raw["columns"] = columns
    try:
        spec = DataSource.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"--{'-'.join(str(p) for p in first['loc'][:1]) or 'format'}: {first['msg']}") from None
    out: Path = args.out
    images_dir = out.parent / f"{out.stem}_images"
    if out.exists() and not args.overwrite:
        raise UserError(f"{out}: exists (give --overwrite to replace it)")
    if out.suffix != ".jsonl":
        raise UserError(f"{out}: the output must be a .jsonl file")
    out.parent.mkdir(parents=True, exist_ok=True)
    if images_dir.exists() and args.overwrite:
        shutil.rmtree(images_dir)
    counts: Counter = Counter()
    skipped: Counter = Counter()
    written_names: set[str] = set()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            for record in read_records(spec):
                counts["read"] += 1
                problem, reason = record.problem, record.reason
                if problem is None and not isinstance(record.target, dict):
                    problem = f"target must be a JSON object, got {type(record.target).__name__}"
                    reason = "target not a JSON object"
                if problem is None:
                    try:
                        images = [
                            _place(ref, counts["written"], i, out, images_dir, args.copy_images, written_names, counts)
                            for i, ref in enumerate(record.images)
                        ]
                    except FileNotFoundError as err:
                        problem, reason = f"image not found: {err.filename}", "missing image"
                    except (OSError, ValueError) as err:  # bytes PIL cannot identify
                        problem, reason = f"unreadable image: {err}", "unreadable image"
                if problem is not None:
                    if args.on_bad_sample == "error":
                        raise UserError(f"{record.origin}: {problem}")
                    skipped[reason] += 1
                    print(f"skipped {record.origin}: {problem}", file=sys.stderr)
                    continue
                row = {"image": images[0] if len(images) == 1 else images, "target": record.target}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["written"] += 1
        if not counts["written"]:
            raise UserError(f"{spec}: no samples to write ({counts['read']} read, {sum(skipped.values())} skipped)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {counts['written']} samples to {out}", file=sys.stderr)
    return {
        "out": str(out),
        "read": counts["read"],
        "written": counts["written"],
        "skipped": dict(skipped),
        "images_written": counts["images_written"],
    }


def _place(ref, index: int, image_index: int, out: Path, images_dir: Path, copy: bool, names: set, counts) -> str:
    """The output's reference to one image: a path relative to the output, after writing or copying it there."""
    from PIL import Image

    if isinstance(ref, dict) and ref.get("bytes"):  # datasets' Image feature, undecoded
        data = ref["bytes"]
        with Image.open(io.BytesIO(data)) as image:
            suffix = "." + (image.format or "png").lower().replace("jpeg", "jpg")
        return _write(images_dir, f"{index:06d}-{image_index}{suffix}", data, out, names, counts)
    if isinstance(ref, Image.Image):
        buffer = io.BytesIO()
        ref.save(buffer, format="PNG")
        return _write(images_dir, f"{index:06d}-{image_index}.png", buffer.getvalue(), out, names, counts)
    path = Path(ref["path"] if isinstance(ref, dict) else ref)
    if copy:
        name = path.name if path.name not in names else f"{index:06d}-{image_index}-{path.name}"
        return _write(images_dir, name, path.read_bytes(), out, names, counts)
    return Path(os.path.relpath(path.resolve(), out.parent.resolve())).as_posix()


def _write(folder: Path, name: str, data: bytes, out: Path, names: set, counts) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    names.add(name)
    counts["images_written"] += 1
    return f"{folder.name}/{name}"


if __name__ == "__main__":
    sys.exit(run_entry_point(main))
