"""H2OVL-Mississippi / InternVL image preprocessing: dynamic 448-px tiling, MSAC, ImageNet normalisation.

Written from the algorithm (InternVL `dynamic_preprocess`, H2OVL `dynamic_preprocess2`, vLLM `h2ovl.py`);
pure PIL + numpy + torch, no torchvision.

Decisions where the reference is loose:
- Candidate order. The reference sorts a `set` by tile count; ties inside one count follow the set's hash order.
  We use (tile count, cols) instead. The order only matters when two grids with the same tile count are both
  the closest aspect ratio; for min_tiles 1-3, max_tiles <= 12 and any MSAC prior that can only happen with
  min >= 2 and max <= 3, for (1,2)/(2,1) at aspect 1.25 (both orders agree) and (1,3)/(3,1) at 5/3 (no float
  w/h hits it exactly), so the chosen grid equals the reference's for every image (checked in the tests).
- MSAC pass 2 with no candidate (e.g. pass 1 chose (2,2), (1,6) or (6,1) with max 6): the reference's
  closest-ratio search falls back to (1,1), i.e. one whole-image tile that lands where the thumbnail goes.
  We skip pass 2 and return pass 1 with its thumbnail, which is the same pixels and the same count.
- MSAC when pass 1 is a single tile: that tile is the whole image at tile_size², identical to the thumbnail,
  so (as in the reference's `pixel_values1[:-1]`) it appears once, as the final thumbnail.
- `max_tiles_per_image` caps the grid size (max_tiles); the thumbnail and MSAC's second pass come on top.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from finetune.models.base import largest_reduction, source_box, source_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
TOKENS_PER_TILE = 256  # (448/14)² patches, pixel-shuffled by 0.5 → 16 × 16
MSAC_PASS2_MIN_TILES = 3

Grid = tuple[int, int]  # (cols, rows)


def target_grids(min_tiles: int, max_tiles: int, prior: Grid | None = None) -> list[Grid]:
    """Grids (cols, rows) with min_tiles <= cols*rows <= max_tiles, ordered by (tile count, cols).

    With `prior` (MSAC pass 2) keep only grids where neither side divides the prior's matching side, so the
    second view never re-cuts the image along the first view's tile borders. Empty when min > max.
    """
    if min_tiles < 1 or max_tiles < 1:
        raise ValueError(f"tile counts must be >= 1, got min={min_tiles} max={max_tiles}")
    grids = [
        (c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles // c + 1) if min_tiles <= c * r <= max_tiles
    ]
    grids.sort(key=lambda g: (g[0] * g[1], g[0]))
    if prior is not None:
        grids = [g for g in grids if prior[0] % g[0] != 0 and prior[1] % g[1] != 0]
    return grids


def choose_grid(width: int, height: int, grids: list[Grid], tile_size: int = 448) -> Grid:
    """The grid whose cols/rows is closest to width/height.

    On an exact tie (float equality, as in the reference) the later candidate wins only when the image area
    exceeds half the later grid's pixel area, so small images are not blown up onto more tiles.
    """
    if not grids:
        raise ValueError("no candidate grid")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = grids[0], float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def _n_tiles(grid: Grid, use_thumbnail: bool) -> int:
    n = grid[0] * grid[1]
    return n + 1 if use_thumbnail and n > 1 else n


def _effective_range(min_tiles: int, max_tiles: int, cap: int | None) -> tuple[int, int]:
    """Apply the per-image cap to max_tiles (and pull min_tiles down with it so a grid always exists)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min={min_tiles} max={max_tiles}")
    if cap is not None:
        if cap < 1:
            raise ValueError(f"max_tiles_per_image must be >= 1, got {cap}")
        max_tiles = min(max_tiles, cap)
    return min(min_tiles, max_tiles), max_tiles


def _msac_grids(width: int, height: int, tile_size: int, max_tiles: int) -> tuple[Grid, Grid | None]:
    """(pass-1 grid, pass-2 grid or None when pass 2 has no candidate)."""
    a1 = choose_grid(width, height, target_grids(1, max_tiles), tile_size)
    second = target_grids(MSAC_PASS2_MIN_TILES, max_tiles, prior=a1) if max_tiles >= MSAC_PASS2_MIN_TILES else []
    return a1, (choose_grid(width, height, second, tile_size) if second else None)


def _cut(image: Image.Image, grid: Grid, tile_size: int, use_thumbnail: bool) -> list[Image.Image]:
    cols, rows = grid
    box = source_box(image)  # None for a full decode; a reduced one resamples exactly the part the page covers
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC, box=box)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]  # row-major: left→right, then top→bottom
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC, box=box))
    return tiles


def tile_image(
    image: Image.Image,
    min_tiles: int,
    max_tiles: int,
    tile_size: int = 448,
    use_thumbnail: bool = True,
    prior: Grid | None = None,
) -> tuple[list[Image.Image], Grid]:
    """Resize onto the closest grid, cut row-major, append a thumbnail when there is more than one tile. The grid is
    chosen from the full page's size (`source_size`: the same as the image's unless it was decoded reduced)."""
    grid = choose_grid(*source_size(image), target_grids(min_tiles, max_tiles, prior), tile_size)
    return _cut(image, grid, tile_size, use_thumbnail), grid


def msac_tiles(image: Image.Image, tile_size: int = 448, max_tiles: int = 6) -> list[Image.Image]:
    """Multi-scale adaptive cropping: pass-2 tiles, pass-1 tiles, thumbnail (n1 + n2 - 1 tiles).

    Pass 1: min 1 / max `max_tiles`. Pass 2: min 3 / max `max_tiles`, restricted by pass 1's grid.
    No pass-2 candidate → pass 1 alone (with thumbnail). A single pass-1 tile equals the thumbnail and is
    only emitted once, as the thumbnail. See the module docstring.
    """
    a1, a2 = _msac_grids(*source_size(image), tile_size, max_tiles)
    first = _cut(image, a1, tile_size, use_thumbnail=True)
    if a2 is None:
        return first
    second = _cut(image, a2, tile_size, use_thumbnail=True)  # a2 has >= 3 tiles, so it ends in a thumbnail
    pass1_tiles = first[:-1] if len(first) > 1 else []  # a lone pass-1 tile duplicates the thumbnail
    return second[:-1] + pass1_tiles + second[-1:]


def count_tiles(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 6,
    use_msac: bool = False,
    num_images: int = 1,
    tile_size: int = 448,
    max_tiles_per_image: int | None = None,
) -> int:
    """Tiles `preprocess` produces for one image of this size, without touching pixels."""
    min_tiles, max_tiles = _effective_range(min_tiles, max_tiles, max_tiles_per_image)
    if use_msac and num_images == 1:
        a1, a2 = _msac_grids(width, height, tile_size, max_tiles)
        n1 = _n_tiles(a1, True)
        return n1 if a2 is None else _n_tiles(a2, True) + n1 - 1
    return _n_tiles(choose_grid(width, height, target_grids(min_tiles, max_tiles), tile_size), True)


def decode_size(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 6,
    use_msac: bool = False,
    num_images: int = 1,
    tile_size: int = 448,
    max_tiles_per_image: int | None = None,
) -> tuple[int, int]:
    """The least size a `width` × `height` page can be decoded at for `preprocess` (the grid comes from the full size):
    at least every grid image it is resized onto (cols · tile × rows · tile, both MSAC passes) and the thumbnail, so
    that each resampling stays a downscale."""
    min_tiles, max_tiles = _effective_range(min_tiles, max_tiles, max_tiles_per_image)
    if use_msac and num_images == 1:
        grids = [g for g in _msac_grids(width, height, tile_size, max_tiles) if g is not None]
    else:
        grids = [choose_grid(width, height, target_grids(min_tiles, max_tiles), tile_size)]
    need_w = tile_size * max(1, *(cols for cols, _ in grids))
    need_h = tile_size * max(1, *(rows for _, rows in grids))
    return largest_reduction((width, height), lambda size: size[0] >= need_w and size[1] >= need_h)


# (x / 255 - mean) / std folded into x · scale - shift: one pass from uint8 and two in place, instead of numpy's
# float copy, three broadcast passes and a transposing copy (the largest share of a page's preprocessing before;
# BENCHMARKS.md). Equal to the unfolded form within float rounding (5e-7).
_SCALE = torch.tensor([1 / (255 * s) for s in IMAGENET_STD], dtype=torch.float32, device="cpu").view(1, 3, 1, 1)
_SHIFT = torch.tensor(
    [m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], dtype=torch.float32, device="cpu"
).view(1, 3, 1, 1)


def _to_tensor(tiles: list[Image.Image]) -> torch.Tensor:
    """uint8 HWC tiles → normalised float32 NCHW (what torchvision's ToTensor + Normalize would give)."""
    pixels = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles]))  # N H W C, uint8, CPU
    out = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_(_SCALE).sub_(_SHIFT)


def preprocess(
    images: list[Image.Image],
    *,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 6,
    use_msac: bool = False,
    max_tiles_per_image: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Images → (pixel_values (total_tiles, 3, tile_size, tile_size) float32, tiles per image).

    MSAC applies only to single-image prompts (vLLM's rule); it ignores `min_tiles` (its passes use 1 and 3).
    `max_tiles_per_image` lowers max_tiles before tiling; it never drops tiles afterwards.
    """
    if not images:
        raise ValueError("no images")
    min_tiles, max_tiles = _effective_range(min_tiles, max_tiles, max_tiles_per_image)
    msac = use_msac and len(images) == 1
    all_tiles: list[Image.Image] = []
    counts: list[int] = []
    for image in images:
        rgb = image.convert("RGB")  # before resizing: palette/"1" images would otherwise resize with NEAREST
        if msac:
            tiles = msac_tiles(rgb, tile_size, max_tiles)
        else:
            tiles, _ = tile_image(rgb, min_tiles, max_tiles, tile_size, use_thumbnail=True)
        all_tiles.extend(tiles)
        counts.append(len(tiles))
    return _to_tensor(all_tiles), counts


def image_token_count(num_tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """`<IMG_CONTEXT>` tokens for an image of `num_tiles` tiles (the <img>/</img> wrappers not included)."""
    return num_tiles * tokens_per_tile


def expand_image_placeholder(num_tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> str:
    """`<img>` + `<IMG_CONTEXT>` × tokens + `</img>`: the text that replaces one image in a user turn."""
    return IMG_START + IMG_CONTEXT * image_token_count(num_tiles, tokens_per_tile) + IMG_END
