"""H2OVL / InternVL tiling: grids, tie rule, tile order, MSAC, counts, normalisation.

Expected grids below are worked out by hand from the rule "closest cols/rows to width/height; on an exact tie the
later candidate wins iff area > 0.5 * 448² * cols * rows". T = 448² = 200704, so the (1,1)→(2,2) tie threshold is
0.5 * T * 4 = 401408 pixels. Candidates for min 1 / max 6, in order:
(1,1)=1 | (1,2)=.5 (2,1)=2 | (1,3)=.333 (3,1)=3 | (1,4)=.25 (2,2)=1 (4,1)=4 | (1,5)=.2 (5,1)=5 |
(1,6)=.1667 (2,3)=.6667 (3,2)=1.5 (6,1)=6.
MSAC pass 2 (min 3 / max 6) keeps r with a1[0] % r[0] != 0 and a1[1] % r[1] != 0; since x % 1 == 0, both sides
must be >= 2, so the only possible survivors are (2,2), (2,3), (3,2).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.models.mississippi.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    choose_grid,
    count_tiles,
    expand_image_placeholder,
    image_token_count,
    msac_tiles,
    preprocess,
    target_grids,
    tile_image,
)

# (width, height, grid without MSAC, tiles without MSAC, MSAC pass-1 grid, MSAC pass-2 grid or None, MSAC tiles)
TABLE = [
    # tall receipt: a = 600/4000 = 0.15; |.15-.1667|=.0167 (1,6) < |.15-.2|=.05 (1,5) < |.15-.25|=.1 (1,4)
    #   → (1,6): 6 tiles + thumbnail = 7.
    #   MSAC: a1=(1,6); pass 2 needs r1 ∤ 6 → r1 ∈ {4,5}, r0 >= 2 → r0*r1 >= 8 > 6: no candidate
    #   → pass 1 alone = 7 (reference: pass 2 falls back to a single (1,1) tile, n2 = 1 → 7 + 1 - 1 = 7).
    (600, 4000, (1, 6), 7, (1, 6), None, 7),
    # wide table: a = 3000/800 = 3.75; |3.75-4|=.25 (4,1) < |3.75-3|=.75 (3,1) < |3.75-5|=1.25 (5,1) → (4,1): 4+1 = 5.
    #   MSAC: a1=(4,1); r0 ∤ 4 → r0 ∈ {3,5,6}, r1 >= 2 → only (3,2) → 6+1 = 7; total 7 + 5 - 1 = 11.
    (3000, 800, (4, 1), 5, (4, 1), (3, 2), 11),
    # square: a = 1; (1,1) diff 0, then (2,2) diff 0 ties: area 1e6 > 401408 → (2,2): 4+1 = 5.
    #   MSAC: a1=(2,2); r0 ∤ 2 and r1 ∤ 2 → both >= 3 → >= 9 tiles > 6: no candidate → 5.
    (1000, 1000, (2, 2), 5, (2, 2), None, 5),
    # tiny: a = 1; (2,2) ties (1,1) but area 400 <= 401408 → (1,1): 1 tile, no thumbnail.
    #   MSAC: a1=(1,1); survivors (2,2)=1, (2,3)=.667, (3,2)=1.5 → (2,2) diff 0 → 4+1 = 5;
    #   pass 1's lone tile is the thumbnail → 5 + 1 - 1 = 5.
    (20, 20, (1, 1), 1, (1, 1), (2, 2), 5),
    # huge: a = 1; area 1e8 > 401408 → (2,2): 5. MSAC as the square: no pass-2 candidate → 5.
    (10000, 10000, (2, 2), 5, (2, 2), None, 5),
    # extra rows where both MSAC passes contribute:
    # landscape 1000x600: a = 1.667; |1.667-1.5|=.167 (3,2) < |1.667-2|=.333 (2,1) → (3,2): 6+1 = 7.
    #   MSAC: a1=(3,2); r0 ∤ 3 → r0 ∈ {2,4,5,6}, r1 ∤ 2 → r1 >= 3 → only (2,3) → 7; total 7 + 7 - 1 = 13.
    (1000, 600, (3, 2), 7, (3, 2), (2, 3), 13),
    # A4 portrait scan 1240x1754: a = .7070; |.707-.667|=.040 (2,3) < |.707-.5|=.207 (1,2) → (2,3): 7.
    #   MSAC: a1=(2,3); r0 ∤ 2 → r0 >= 3, r1 ∤ 3 → r1 ∈ {2,4,5,6} → only (3,2) → 7; total 13.
    (1240, 1754, (2, 3), 7, (2, 3), (3, 2), 13),
]


@pytest.mark.parametrize("w,h,grid,n,a1,a2,n_msac", TABLE)
def test_hand_worked_table(w, h, grid, n, a1, a2, n_msac):
    assert choose_grid(w, h, target_grids(1, 6)) == grid
    assert count_tiles(w, h) == n
    assert image_token_count(n) == 256 * n
    # MSAC passes
    assert choose_grid(w, h, target_grids(1, 6)) == a1
    second = target_grids(3, 6, prior=a1)
    assert (choose_grid(w, h, second) if second else None) == a2
    assert count_tiles(w, h, use_msac=True) == n_msac
    assert image_token_count(n_msac) == 256 * n_msac
    if w * h <= 10_000_000:  # the 10000² image would cost 300 MB; its counts are covered by count_tiles above
        img = Image.new("RGB", (w, h), (120, 30, 200))
        pv, counts = preprocess([img])
        assert counts == [n] and pv.shape == (n, 3, 448, 448) and pv.dtype == torch.float32
        assert len(msac_tiles(img)) == n_msac
        tiles, g = tile_image(img, 1, 6)
        assert g == grid and len(tiles) == n and all(t.size == (448, 448) for t in tiles)


def test_token_expansion():
    assert image_token_count(7) == 1792 and image_token_count(13) == 3328
    s = expand_image_placeholder(2)
    assert s.startswith("<img>") and s.endswith("</img>") and s.count("<IMG_CONTEXT>") == 512
    assert s == "<img>" + "<IMG_CONTEXT>" * 512 + "</img>"


def test_tie_rule_on_crafted_sizes():
    # sqrt(401408) ≈ 633.6: 633² = 400689 <= 401408 keeps (1,1); 634² = 401956 > 401408 takes (2,2).
    assert choose_grid(633, 633, target_grids(1, 6)) == (1, 1)
    assert choose_grid(634, 634, target_grids(1, 6)) == (2, 2)
    assert count_tiles(633, 633) == 1 and count_tiles(634, 634) == 5
    # 5:4 image between (1,2)=.5 and (2,1)=2: |1.25-.5| == |1.25-2| == .75 exactly in float.
    # Later candidate (2,1) wins iff area > 0.5*T*2 = 200704: 1250*1000 = 1.25e6 yes; 125*100 = 12500 no.
    assert target_grids(2, 2) == [(1, 2), (2, 1)]
    assert choose_grid(1250, 1000, target_grids(2, 2)) == (2, 1)
    assert choose_grid(125, 100, target_grids(2, 2)) == (1, 2)
    # The later candidate wins, whatever its size: [(2,2),(1,1)] on a square, threshold 0.5*T*1 = 100352.
    assert choose_grid(1000, 1000, [(2, 2), (1, 1)]) == (1, 1)
    assert choose_grid(200, 200, [(2, 2), (1, 1)]) == (2, 2)


def _reference_order(mn, mx, prior=None):
    """The reference's candidate list: a set sorted by tile count (inner order = CPython's set order)."""
    grids = set(
        (i, j) for n in range(mn, mx + 1) for i in range(1, n + 1) for j in range(1, n + 1) if mn <= i * j <= mx
    )
    grids = sorted(grids, key=lambda x: x[0] * x[1])
    if prior is not None:
        grids = [g for g in grids if prior[0] % g[0] != 0 and prior[1] % g[1] != 0]
    return grids


def test_candidate_order_matches_reference_choice():
    assert target_grids(1, 6) == [
        (1, 1),
        (1, 2),
        (2, 1),
        (1, 3),
        (3, 1),
        (1, 4),
        (2, 2),
        (4, 1),
        (1, 5),
        (5, 1),
        (1, 6),
        (2, 3),
        (3, 2),
        (6, 1),
    ]
    assert target_grids(3, 6, prior=(1, 1)) == [(2, 2), (2, 3), (3, 2)]
    assert target_grids(3, 6, prior=(2, 2)) == [] and target_grids(4, 3) == []
    configs = [(mn, mx, None) for mn in (1, 2, 3) for mx in range(mn, 13)]
    configs += [(3, mx, p) for mx in range(3, 13) for p in target_grids(1, mx)]  # every possible MSAC pass 2
    sizes = [(w * s, h * s) for w in range(1, 11) for h in range(1, 11) for s in (1, 100, 1000)]
    for mn, mx, prior in configs:
        mine, ref = target_grids(mn, mx, prior), _reference_order(mn, mx, prior)
        assert sorted(mine) == sorted(ref)
        assert [g[0] * g[1] for g in mine] == [g[0] * g[1] for g in ref]
        if mine:
            for w, h in sizes:
                assert choose_grid(w, h, mine) == choose_grid(w, h, ref), (mn, mx, prior, w, h)


def _quadrants(size):
    img = Image.new("RGB", (size, size))
    half = size // 2
    colours = {(0, 0): (255, 0, 0), (1, 0): (0, 255, 0), (0, 1): (0, 0, 255), (1, 1): (255, 255, 0)}
    for (x, y), colour in colours.items():
        img.paste(colour, (x * half, y * half, (x + 1) * half, (y + 1) * half))
    return img


def test_tiles_are_row_major_with_thumbnail_last():
    # 64x64 at tile 32: a = 1, area 4096 > 0.5*32²*4 = 2048 → (2,2); the resize is the identity, so each tile is
    # exactly one quadrant: red, green (top row), blue, yellow (bottom row), then the 32x32 thumbnail.
    tiles, grid = tile_image(_quadrants(64), 1, 6, tile_size=32)
    assert grid == (2, 2) and len(tiles) == 5
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for tile, colour in zip(tiles[:4], expected, strict=True):
        assert np.all(np.asarray(tile) == np.asarray(colour, dtype=np.uint8))
    thumb = np.asarray(tiles[4])
    assert [tuple(thumb[y, x]) for y, x in ((0, 0), (0, 31), (31, 0), (31, 31))] == expected
    pv, counts = preprocess([_quadrants(64)], tile_size=32)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert counts == [5] and torch.allclose(pv[0, :, 5, 5], red, atol=1e-5)


def test_msac_order_pass2_pass1_thumbnail():
    # 300x180 at tile 28: a = 1.667 → pass 1 (3,2) (see the 1000x600 row), pass 2 (2,3). R encodes x, G encodes y,
    # so a tile's mean (R, G)/255 is its centre: pass 2 is 2 cols x 3 rows, pass 1 is 3 cols x 2 rows.
    w, h = 300, 180
    xs = (np.arange(w) + 0.5) / w * 255
    ys = (np.arange(h) + 0.5) / h * 255
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = xs[None, :].round()
    arr[..., 1] = ys[:, None].round()
    tiles = msac_tiles(Image.fromarray(arr), tile_size=28, max_tiles=6)
    pass2 = [((c + 0.5) / 2, (r + 0.5) / 3) for r in range(3) for c in range(2)]
    pass1 = [((c + 0.5) / 3, (r + 0.5) / 2) for r in range(2) for c in range(3)]
    expected = pass2 + pass1 + [(0.5, 0.5)]
    assert len(tiles) == 13 == count_tiles(w, h, use_msac=True, tile_size=28)
    for tile, (ex, ey) in zip(tiles, expected, strict=True):
        mean = np.asarray(tile, np.float64).mean(axis=(0, 1)) / 255
        assert abs(mean[0] - ex) < 0.02 and abs(mean[1] - ey) < 0.02, (mean, ex, ey)


def test_msac_single_pass1_tile_appears_once_as_thumbnail():
    # 20x20 at 448: pass 1 (1,1) has no thumbnail; output = 4 pass-2 tiles + thumbnail (the lone pass-1 tile).
    img = _quadrants(20)
    tiles = msac_tiles(img)
    assert len(tiles) == 5
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC)))


def test_count_tiles_matches_preprocess_sweep():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 400), rng.randint(1, 400)) for _ in range(24)]
    sizes += [(s, s) for s in (27, 40, 56, 80)] + [(rng.randint(1, 40), rng.randint(300, 400)) for _ in range(2)]
    for w, h in sizes:
        img = Image.new("RGB", (w, h), (10, 20, 30))
        for use_msac in (False, True):
            for cap in (None, rng.randint(1, 7)):
                kw = dict(tile_size=28, max_tiles=6, use_msac=use_msac, max_tiles_per_image=cap)
                pv, counts = preprocess([img], **kw)
                n = count_tiles(w, h, num_images=1, **kw)
                assert counts == [n] and pv.shape[0] == n, (w, h, use_msac, cap)


def test_white_image_normalisation():
    # 50x50 at tile 28: a = 1, area 2500 > 0.5*28²*4 = 1568 → (2,2) + thumbnail = 5 tiles, all pure white.
    pv, counts = preprocess([Image.new("RGB", (50, 50), "white")], tile_size=28)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]  # ≈ 2.2489, 2.4286, 2.6400
    assert counts == [5] and pv.shape == (5, 3, 28, 28) and pv.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(pv[:, c], torch.full_like(pv[:, c], expected[c]), atol=1e-5)


def test_non_rgb_inputs_are_converted():
    # 20x20 at tile 28: area 400 <= 1568 → (1,1), one tile each; both are white once converted to RGB.
    pv, counts = preprocess(
        [Image.new("L", (20, 20), 255), Image.new("RGBA", (20, 20), (255, 255, 255, 0))], tile_size=28
    )
    assert counts == [1, 1] and pv.shape == (2, 3, 28, 28)
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(pv[:, :, 10, 10], white.expand(2, 3), atol=1e-5)


def test_multi_image_disables_msac():
    img = Image.new("RGB", (300, 180), (0, 0, 0))  # single image with MSAC: 13 tiles (see above); plain: (3,2) → 7
    assert preprocess([img], tile_size=28, use_msac=True)[1] == [13]
    pv, counts = preprocess([img, img], tile_size=28, use_msac=True)
    assert counts == [7, 7] and pv.shape[0] == 14
    assert count_tiles(300, 180, use_msac=True, num_images=2, tile_size=28) == 7


def test_cap_lowers_max_tiles():
    # 600x4000 capped at 3: a = .15 → (1,3)=.333 (diff .183) beats (1,2)=.5 → 3 + thumbnail = 4.
    # MSAC capped at 3: pass 2 range [3,3] = (1,3),(3,1), both dropped (x % 1 == 0) → pass 1 alone = 4.
    assert count_tiles(600, 4000, max_tiles_per_image=3) == 4
    assert count_tiles(600, 4000, use_msac=True, max_tiles_per_image=3) == 4
    # cap 1 → one tile, no thumbnail, even when min_tiles was higher (min follows the cap down).
    assert count_tiles(3000, 800, min_tiles=2, max_tiles_per_image=1) == 1
    assert count_tiles(3000, 800, use_msac=True, max_tiles_per_image=1) == 1
    # a cap above max_tiles changes nothing
    assert count_tiles(3000, 800, max_tiles_per_image=50) == 5


@pytest.mark.parametrize("cap", [0, -1])
def test_cap_below_one_raises(cap):
    img = Image.new("RGB", (30, 30))
    with pytest.raises(ValueError):
        preprocess([img], max_tiles_per_image=cap)
    with pytest.raises(ValueError):
        count_tiles(30, 30, max_tiles_per_image=cap)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        choose_grid(10, 10, [])
    with pytest.raises(ValueError):
        target_grids(0, 6)
    with pytest.raises(ValueError):
        count_tiles(10, 10, min_tiles=4, max_tiles=2)
    with pytest.raises(ValueError):
        preprocess([])
