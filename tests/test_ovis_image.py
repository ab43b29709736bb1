"""Ovis's page partition (`finetune.models.ovis.image`) against values worked out by hand from the original
algorithm (`BaseVisualTokenizer.preprocess_image`, AIDC-AI/Ovis at bd0bfe2; unchanged since d248e34).

The rules the comments below apply (S = crop side, W × H = page):
- grid (rows, cols): crops of W // cols × H // rows; the last column / row takes the remainder;
- a crop with long side a and short side b *covers* a·b when a ≤ S, else S · (b / a · S) = S²·b / a;
- ratio = Σ covered / (W·H); the fewest crops with ratio > 0.9 win (ties: higher ratio); when no grid passes 0.9, the
  highest ratio wins (ties: fewer crops) — compared as the original computes them, in floating point;
- resize: long side → S, short → int(short / long · S); placement: (S − short) // 2 on the short axis;
- several crops: the whole page goes first (the thumbnail), treated the same way.
The same grids and (with the same Pillow) bit-identical pixel tensors came out of the original code itself, run with
transformers 4.46.3 on these page sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.models.ovis import image as oi

# (S, (W, H)): grid, first crop box, last crop box, (resize, placement) of the first and the last crop, and of the
# thumbnail (None: one crop, no thumbnail).
CASES = {
    # 600×4000 receipt, S 384. No grid reaches 0.9. With one column every crop is 600 wide; once 4000 / rows ≤ 600
    # (rows ≥ 7) the width is the long side and a crop of height h covers 384²·h / 600, so 7, 8 and 9 rows all cover
    # 384²·4000 / 600 = 983,040 of 2,400,000 = 0.4096 exactly; in floating point 8 rows sum to 0.4096, 7 rows to
    # 0.40959999999999996, 9 rows to 0.4095999999999999, so the original's sort picks (8, 1). Crops 600 × 500 →
    # (384, int(500/600·384) = 320) at (0, (384−320)//2 = 32); the last is 600 × (4000 − 7·500) = 500 too.
    # Thumbnail 600 × 4000 → (int(600/4000·384) = 57, 384) at ((384−57)//2 = 163, 0).
    (384, (600, 4000)): (
        (8, 1),
        (0, 0, 600, 500),
        (0, 3500, 600, 4000),
        ((384, 320), (0, 32)),
        ((384, 320), (0, 32)),
        ((57, 384), (163, 0)),
    ),
    # Same receipt, S 448: rows ≥ 7 again tie at 448²·4000/600 / 2.4e6 = 0.55751…; here 7 and 8 rows give the same
    # float, so fewer crops decide: (7, 1). Rows of 4000 // 7 = 571, the last 4000 − 6·571 = 574.
    # 600 × 571 → (448, int(571/600·448) = 426) at (0, 11); 600 × 574 → (448, 428) at (0, 10).
    # Thumbnail → (int(600/4000·448) = 67, 448) at ((448−67)//2 = 190, 0).
    (448, (600, 4000)): (
        (7, 1),
        (0, 0, 600, 571),
        (0, 3426, 600, 4000),
        ((448, 426), (0, 11)),
        ((448, 428), (0, 10)),
        ((67, 448), (190, 0)),
    ),
    # 3000×800 table, S 384. (2, 4): crops 750 × 400, each 384²·400/750 = 78,643.2; 8 of them = 0.262144, the best
    # (one row of k crops covers at most 384²·800/(3000/k)·k … = 0.2304 for any k ≥ 4). Crop → (384, int(204.8) =
    # 204) at (0, 90). Thumbnail 3000 × 800 → (384, int(102.4) = 102) at (0, 141).
    (384, (3000, 800)): (
        (2, 4),
        (0, 0, 750, 400),
        (2250, 400, 3000, 800),
        ((384, 204), (0, 90)),
        ((384, 204), (0, 90)),
        ((384, 102), (0, 141)),
    ),
    # S 448: (2, 4) covers 448²·400/750·8 / 2.4e6 = 0.35681 > one row's 0.3136. Crop → (448, int(238.93) = 238) at
    # (0, 105); thumbnail → (448, int(119.47) = 119) at (0, 164).
    (448, (3000, 800)): (
        (2, 4),
        (0, 0, 750, 400),
        (2250, 400, 3000, 800),
        ((448, 238), (0, 105)),
        ((448, 238), (0, 105)),
        ((448, 119), (0, 164)),
    ),
    # A4 at 200 dpi, 1653×2339, S 384. (3, 3): crops 551 × 779 (last row 2339 − 2·779 = 781), long side the height:
    # 384²·551/779 each → 0.24257, the best. 551 × 779 → (int(551/779·384) = 271, 384) at (56, 0);
    # the last, 551 × 781 → (int(270.9) = 270, 384) at (57, 0). Thumbnail → (int(1653/2339·384) = 271, 384) at (56, 0).
    (384, (1653, 2339)): (
        (3, 3),
        (0, 0, 551, 779),
        (1102, 1558, 1653, 2339),
        ((271, 384), (56, 0)),
        ((270, 384), (57, 0)),
        ((271, 384), (56, 0)),
    ),
    # S 448: same grid (0.33017). 551 × 779 → (int(316.9) = 316, 448) at (66, 0); 551 × 781 → (int(316.07) = 316,
    # 448) at (66, 0); thumbnail → (int(316.6) = 316, 448) at (66, 0).
    (448, (1653, 2339)): (
        (3, 3),
        (0, 0, 551, 779),
        (1102, 1558, 1653, 2339),
        ((316, 448), (66, 0)),
        ((316, 448), (66, 0)),
        ((316, 448), (66, 0)),
    ),
    # A4 at 600 dpi, 4961×7016, S 384: (3, 3) (0.02696, every crop shrinks ~6×). Columns 4961 // 3 = 1653 (last
    # 1655), rows 7016 // 3 = 2338 (last 2340). 1653 × 2338 → (int(271.5) = 271, 384) at (56, 0); 1655 × 2340 →
    # (int(271.6) = 271, 384) at (56, 0); thumbnail → (int(271.5) = 271, 384) at (56, 0).
    (384, (4961, 7016)): (
        (3, 3),
        (0, 0, 1653, 2338),
        (3306, 4676, 4961, 7016),
        ((271, 384), (56, 0)),
        ((271, 384), (56, 0)),
        ((271, 384), (56, 0)),
    ),
    # S 448: (3, 3). 1653 × 2338 → (int(316.7) = 316, 448) at (66, 0); 1655 × 2340 → (int(316.85) = 316, 448) at
    # (66, 0); thumbnail → (int(316.77) = 316, 448) at (66, 0).
    (448, (4961, 7016)): (
        (3, 3),
        (0, 0, 1653, 2338),
        (3306, 4676, 4961, 7016),
        ((316, 448), (66, 0)),
        ((316, 448), (66, 0)),
        ((316, 448), (66, 0)),
    ),
    # 1000×1000, S 384: a 2 × 2 grid's 500-px crops shrink (0.5898); 3 × 3 crops of 333 (last 334) fit → ratio 1.0,
    # the fewest crops above 0.9. 333 × 333 → (384, 384); 334 × 334 → (384, 384); thumbnail (384, 384); no padding.
    (384, (1000, 1000)): (
        (3, 3),
        (0, 0, 333, 333),
        (666, 666, 1000, 1000),
        ((384, 384), (0, 0)),
        ((384, 384), (0, 0)),
        ((384, 384), (0, 0)),
    ),
    # S 448: 2 × 2 crops of 500 > 448 cover 448² each → 0.8028 < 0.9; 3 × 3 fits → the same grid and boxes.
    (448, (1000, 1000)): (
        (3, 3),
        (0, 0, 333, 333),
        (666, 666, 1000, 1000),
        ((448, 448), (0, 0)),
        ((448, 448), (0, 0)),
        ((448, 448), (0, 0)),
    ),
    # 448×448 at S 384: one crop covers 384² / 448² = 0.7347; 1 × 2 crops 224 × 448 shrink too (0.7347); 2 × 2
    # crops of 224 fit → 1.0, the fewest above 0.9 (2 × 2 beats 1 × 4 / 4 × 1 on ratio: 112 × 448 strips cover
    # 384·96 each → 0.7347). Crops (384, 384); thumbnail 448 → (384, 384).
    (384, (448, 448)): (
        (2, 2),
        (0, 0, 224, 224),
        (224, 224, 448, 448),
        ((384, 384), (0, 0)),
        ((384, 384), (0, 0)),
        ((384, 384), (0, 0)),
    ),
    # At S 448 the page fits one crop (ratio 1.0): no thumbnail.
    (448, (448, 448)): ((1, 1), (0, 0, 448, 448), (0, 0, 448, 448), ((448, 448), (0, 0)), ((448, 448), (0, 0)), None),
    # 384×384 fits one crop at both sizes; at 448 it is enlarged to 448.
    (384, (384, 384)): ((1, 1), (0, 0, 384, 384), (0, 0, 384, 384), ((384, 384), (0, 0)), ((384, 384), (0, 0)), None),
    (448, (384, 384)): ((1, 1), (0, 0, 384, 384), (0, 0, 384, 384), ((448, 448), (0, 0)), ((448, 448), (0, 0)), None),
    # 20×20: one crop (1.0), square, enlarged to S.
    (384, (20, 20)): ((1, 1), (0, 0, 20, 20), (0, 0, 20, 20), ((384, 384), (0, 0)), ((384, 384), (0, 0)), None),
    (448, (20, 20)): ((1, 1), (0, 0, 20, 20), (0, 0, 20, 20), ((448, 448), (0, 0)), ((448, 448), (0, 0)), None),
    # 10000×10000, S 384: nothing fits; a k × k grid covers k²·384² (each square crop shrinks to 384²) → 3 × 3 =
    # 9·384²/1e8 = 0.01327, the most crops max_partition 9 allows as a square. Crops 3333 (last 3334): the first
    # 3333 × 3333 → (384, 384); the last 3334 × 3334 → (384, 384); thumbnail (384, 384).
    (384, (10000, 10000)): (
        (3, 3),
        (0, 0, 3333, 3333),
        (6666, 6666, 10000, 10000),
        ((384, 384), (0, 0)),
        ((384, 384), (0, 0)),
        ((384, 384), (0, 0)),
    ),
    (448, (10000, 10000)): (
        (3, 3),
        (0, 0, 3333, 3333),
        (6666, 6666, 10000, 10000),
        ((448, 448), (0, 0)),
        ((448, 448), (0, 0)),
        ((448, 448), (0, 0)),
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=[f"S{s}-{w}x{h}" for s, (w, h) in CASES])
def test_partition_matches_the_original_algorithm_worked_by_hand(case):
    side, (width, height) = case
    grid, first_box, last_box, first_crop, last_crop, thumbnail = CASES[case]
    assert oi.best_grid(width, height, side, max_partition=9) == grid
    boxes = oi.partition(width, height, grid)
    assert len(boxes) == grid[0] * grid[1] and boxes[0] == first_box and boxes[-1] == last_box
    # Boxes tile the page exactly, row by row.
    assert sum((r - left) * (b - top) for left, top, r, b in boxes) == width * height
    for box, (target, place) in ((boxes[0], first_crop), (boxes[-1], last_crop)):
        size = (box[2] - box[0], box[3] - box[1])
        assert oi.resize_target(*size, side) == target
        assert oi.placement(*target, side) == place
    if thumbnail is None:
        assert oi.num_crops(grid) == 1
    else:
        assert oi.num_crops(grid) == len(boxes) + 1
        assert oi.resize_target(width, height, side) == thumbnail[0]
        assert oi.placement(*thumbnail[0], side) == thumbnail[1]


def test_max_partition_caps_the_crops():
    # 10000×10000 with at most 4 crops: 2 × 2 (4·384² / 1e8), the best square within the cap.
    assert oi.best_grid(10000, 10000, 384, max_partition=4) == (2, 2)
    assert oi.best_grid(10000, 10000, 384, max_partition=1) == (1, 1)


def test_preprocess_centres_each_crop_on_zeros_thumbnail_first():
    """A 3000×800 page at S 384: 9 squares (thumbnail, then the 2 × 4 crops row by row); outside each resized crop
    the square is exactly zero (the padding comes after normalisation), inside it is the page's colour."""
    page = Image.new("RGB", (3000, 800), (255, 255, 255))
    norm = oi.Normalisation(384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels, grid = oi.preprocess(page, norm, max_partition=9)
    assert grid == (2, 4) and pixels.shape == (9, 3, 384, 384)
    # Thumbnail: 384 × 102 at row 141; crops: 384 × 204 at row 90. White → (1 − 0.5) / 0.5 = 1.
    for index, (top, height) in [(0, (141, 102)), *[(i, (90, 204)) for i in range(1, 9)]]:
        rows = torch.zeros(384, dtype=torch.bool)
        rows[top : top + height] = True
        assert torch.all(pixels[index][:, rows] == 1.0), index
        assert torch.all(pixels[index][:, ~rows] == 0.0), index


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16"])
def test_preprocess_converts_any_mode_to_rgb(mode):
    page = Image.fromarray(np.full((50, 60), 200, dtype=np.uint8)).convert(mode)
    pixels, grid = oi.preprocess(page, oi.Normalisation(56, (0.5,) * 3, (0.5,) * 3))
    assert pixels.shape[1:] == (3, 56, 56) and grid == (1, 2)
