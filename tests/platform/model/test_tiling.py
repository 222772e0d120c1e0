"""Tiles over a large image: the plan covers it on the stride grid, stitched grids equal the untiled grid
of a position-independent feature, and a region of interest selects pixels and patch cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.model.tiling import RegionOfInterest, crop_grid, masked_max, plan_tiles, split, stitch


def block_means(images: np.ndarray, stride: int) -> torch.Tensor:
    """A stand-in feature with no receptive field beyond its cell: the mean of each stride x stride block."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(x, stride)


@pytest.mark.parametrize("shape", [(256, 4096), (300, 500), (256, 256), (100, 700)])
def test_plan_covers_the_image_on_the_stride_grid(shape):
    h, w = shape
    plan = plan_tiles(h, w, tile=256, stride=8, overlap=0.25)
    covered = np.zeros((plan.padded_height, plan.padded_width), dtype=int)
    for y, x in plan.origins:
        assert y % 8 == 0 and x % 8 == 0
        covered[y : y + 256, x : x + 256] += 1
    assert covered.min() >= 1
    assert plan.padded_height >= max(h, 256) and plan.padded_width >= max(w, 256)
    assert plan.padded_height % 8 == 0 and plan.padded_width % 8 == 0


def test_a_strip_gets_one_row_of_overlapping_tiles():
    plan = plan_tiles(256, 4096, tile=256, stride=8, overlap=0.25)
    assert {y for y, _ in plan.origins} == {0}
    xs = [x for _, x in plan.origins]
    assert xs[0] == 0 and xs[-1] == 4096 - 256 and len(xs) == 21
    assert all(b - a <= 192 for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("shape,stride", [((256, 4096), 8), ((150, 333), 14), ((256, 256), 8)])
def test_stitched_grid_equals_the_untiled_grid(shape, stride):
    h, w = shape
    tile = 18 * stride if stride == 14 else 256
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    plan = plan_tiles(h, w, tile=tile, stride=stride, overlap=0.3)
    tiles = split(image, plan)
    assert tiles.shape == (len(plan.origins), tile, tile, 3)
    stitched = crop_grid(stitch(block_means(tiles, stride), plan), plan)
    padded = np.pad(image, ((0, plan.padded_height - h), (0, plan.padded_width - w), (0, 0)), mode="reflect")
    whole = crop_grid(block_means(padded[None], stride)[0], plan)
    assert stitched.shape == (3, -(-h // stride), -(-w // stride))
    assert torch.allclose(stitched, whole, atol=1e-4)


def test_stitch_refuses_grids_of_another_plan():
    plan = plan_tiles(256, 1024, tile=256, stride=8)
    with pytest.raises(DataError, match=rf"expected {len(plan.origins)} tile grids of 32x32"):
        stitch(torch.zeros(len(plan.origins) + 1, 32, 32), plan)
    with pytest.raises(ConfigError, match="not a multiple of the backbone's stride 14"):
        plan_tiles(256, 1024, tile=256, stride=14)
    with pytest.raises(ConfigError, match=r"overlap must be in \[0, 1\)"):
        plan_tiles(256, 1024, tile=256, stride=8, overlap=1.0)


def test_region_of_interest_rectangle_and_mask():
    roi = RegionOfInterest.parse("600,0,4096,256")
    mask = roi.mask(256, 4096)
    assert mask.sum() == (4096 - 600) * 256 and not mask[:, :600].any()
    cells = RegionOfInterest.cells(mask, 32, 512)
    assert cells.shape == (32, 512) and not cells[:, :75].any() and cells[:, 75:].all()
    grids = torch.zeros(1, 32, 512)
    grids[0, 5, 10] = 9.0  # outside: ignored
    grids[0, 7, 300] = 2.0
    assert masked_max(grids, cells).item() == 2.0
    from_array = RegionOfInterest.from_mask(mask)
    assert np.array_equal(from_array.mask(256, 4096), mask)
    with pytest.raises(DataError, match="region of interest mask is 4096x256 px, the image 512x256 px"):
        from_array.mask(256, 512)
    with pytest.raises(ConfigError, match="x1 must exceed x0"):
        RegionOfInterest.parse("10,0,5,20")
    with pytest.raises(ConfigError, match="neither x0,y0,x1,y1 nor an existing mask image"):
        RegionOfInterest.parse("no-such-mask.png")
    with pytest.raises(DataError, match="lies outside"):
        RegionOfInterest.rectangle(5000, 0, 6000, 10).mask(256, 4096)
