"""Ovis's page preprocessing (`BaseVisualTokenizer.preprocess_image` in the original code), as pure functions.

A page is cut into a grid of at most `max_partition` crops — the fewest crops whose *covering ratio* exceeds 0.9
(ties broken by the higher ratio), else the grid with the highest ratio. The covering ratio sums, over the crops, the
area each keeps when its long side is shrunk to S (a crop that fits keeps all of it), divided by the page's area.
Crops are cut from the original page (`H // rows` by `W // cols`; the last row and column take the remainder). Each
crop is resized keeping its aspect (long side S, short side `int(short / long · S)`, bicubic) and centred in a
zero-filled S×S square ((S − short) // 2 from the top or left; the zero is after normalisation). When there is more
than one crop, the whole page, treated the same way, goes first as a thumbnail.

S = 384 (Ovis1.6, SigLIP, mean = std = 0.5) or 448 (Ovis2, AIMv2, CLIP's mean / std).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from finetune.models.base import largest_reduction, source_box, source_size

COVERING_THRESHOLD = 0.9


def candidate_grids(max_partition: int) -> list[tuple[int, int]]:
    """(rows, cols) with rows · cols ≤ max_partition, in the original's order (rows outer, cols inner)."""
    return [(i, j) for i in range(1, max_partition + 1) for j in range(1, max_partition + 1) if i * j <= max_partition]


def partition(width: int, height: int, grid: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, upper, right, lower), row by row; the last row / column takes the remainder."""
    rows, cols = grid
    row_height, col_width = height // rows, width // cols
    boxes = []
    for row in range(rows):
        for col in range(cols):
            right = width if col == cols - 1 else (col + 1) * col_width
            lower = height if row == rows - 1 else (row + 1) * row_height
            boxes.append((col * col_width, row * row_height, right, lower))
    return boxes


def covering_area(box: tuple[int, int, int, int], side: int) -> float:
    """The area of a crop that survives shrinking its long side to `side` (all of it when it fits)."""
    left, upper, right, lower = box
    long, short = max(right - left, lower - upper), min(right - left, lower - upper)
    if long > side:
        short, long = short / long * side, side
    return long * short


def covering_ratio(width: int, height: int, grid: tuple[int, int], side: int) -> float:
    return sum(covering_area(box, side) for box in partition(width, height, grid)) / (width * height)


def best_grid(width: int, height: int, side: int, max_partition: int = 9) -> tuple[int, int]:
    """The (rows, cols) the original picks for a `width` × `height` page."""
    scored = [(grid, covering_ratio(width, height, grid, side)) for grid in candidate_grids(max_partition)]
    good = [(grid, ratio) for grid, ratio in scored if ratio > COVERING_THRESHOLD]
    if good:  # fewest crops, then the higher ratio (a stable sort keeps the candidates' order among equals)
        return sorted(good, key=lambda x: (x[0][0] * x[0][1], -x[1]))[0][0]
    return sorted(scored, key=lambda x: (-x[1], x[0][0] * x[0][1]))[0][0]


def resize_target(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) of a crop resized to fit `side`, aspect kept, the short side truncated."""
    if width == height:
        return side, side
    if width > height:
        return side, int(height / width * side)
    return int(width / height * side), side


def placement(width: int, height: int, side: int) -> tuple[int, int]:
    """(left, top) of a resized crop of this size inside the `side` × `side` square: centred on its short axis."""
    return (side - width) // 2, (side - height) // 2


def num_crops(grid: tuple[int, int]) -> int:
    """Images the backbone sees for one page: the grid's crops, plus the thumbnail when there are several."""
    cells = grid[0] * grid[1]
    return cells + 1 if cells > 1 else cells


@dataclass(frozen=True)
class Normalisation:
    side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    resample: int = Image.BICUBIC  # the image processor's `resample` (3, bicubic, in every Ovis checkpoint)


def square(crop: Image.Image, norm: Normalisation) -> torch.Tensor:
    """One crop as the backbone's [3, S, S] input: aspect-keeping resize (bicubic), then normalised as transformers'
    image processors do (float64 rescale cast to float32, then (x − mean) / std in float32), centred on zeros."""
    return _centred(crop.resize(resize_target(*crop.size, norm.side), resample=norm.resample), norm)


def _centred(resized: Image.Image, norm: Normalisation) -> torch.Tensor:
    side = norm.side
    width, height = resized.size
    pixels = (np.asarray(resized, dtype=np.float64) * norm.rescale_factor).astype(np.float32)
    pixels = (pixels - np.asarray(norm.mean, dtype=np.float32)) / np.asarray(norm.std, dtype=np.float32)
    out = torch.zeros(3, side, side, dtype=torch.float32)
    left, top = placement(width, height, side)
    out[:, top : top + height, left : left + width] = torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    return out


def preprocess(image: Image.Image, norm: Normalisation, max_partition: int = 9) -> tuple[torch.Tensor, tuple[int, int]]:
    """A page as [crops, 3, S, S] (thumbnail first when there are several crops) and its grid."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    full = source_size(image)
    grid = best_grid(*full, norm.side, max_partition)
    if full != image.size:  # decoded reduced by a whole factor: the full page's crops, each sized as from the full page
        return _preprocess_reduced(image, full, grid, norm), grid
    crops = [image.crop(box) for box in partition(*image.size, grid)]
    if len(crops) > 1:
        crops.insert(0, image)
    return torch.stack([square(crop, norm) for crop in crops]), grid


def _preprocess_reduced(image: Image.Image, full: tuple[int, int], grid: tuple[int, int], norm: Normalisation):
    """`preprocess` of a page decoded at 1/factor of its `full` size: the crop boxes are the full page's, divided by
    the factor (fractional: PIL resamples from a fractional box), and each crop is resized to the size the full page's
    crop gets, so the geometry is the full decode's exactly; only the resampling's input differs."""
    x0, y0, x1, y1 = source_box(image)  # where the full page lies in the reduced image
    sx, sy = (x1 - x0) / full[0], (y1 - y0) / full[1]
    boxes = [(0, 0, *full), *partition(*full, grid)] if grid[0] * grid[1] > 1 else partition(*full, grid)
    out = []
    for left, upper, right, lower in boxes:
        target = resize_target(right - left, lower - upper, norm.side)
        box = (x0 + left * sx, y0 + upper * sy, x0 + right * sx, y0 + lower * sy)
        out.append(_centred(image.resize(target, resample=norm.resample, box=box), norm))
    return torch.stack(out)


def decode_size(width: int, height: int, side: int, max_partition: int = 9) -> tuple[int, int]:
    """The least size a `width` × `height` page can be decoded at for `preprocess` (the grid comes from the full size):
    every crop (and the thumbnail) keeps at least the size it is resized to, so each resampling stays a downscale."""
    grid = best_grid(width, height, side, max_partition)
    boxes = partition(width, height, grid) + ([(0, 0, width, height)] if grid[0] * grid[1] > 1 else [])
    # (crop width, crop height, resized width, resized height); a crop the full page already upscales never shrinks.
    crops = [(r - left, b - u, *resize_target(r - left, b - u, side)) for left, u, r, b in boxes]
    most = min(min(w / tw, h / th) for w, h, tw, th in crops)  # the largest factor that keeps every crop's size
    return largest_reduction((width, height), lambda size: round(width / size[0]) <= most)
