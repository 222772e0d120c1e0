"""Scoring images larger than the model's tile: overlapping tiles, stitched patch grids, a region of interest.

A 4096 x 256 line-scan strip or a 2k camera frame resized to one 256 px square loses its small defects;
scored as overlapping tiles it keeps them. :func:`plan_tiles` lays tiles of the model's side over the
image so that every tile origin is a multiple of the backbone's stride: the tiles' patch grids then sit
on one grid of the whole image, and :func:`stitch` averages them where they overlap into a patch grid of
the image's own size (the image is reflect-padded up to a multiple of the stride and at least one tile;
the padding is cropped from the maps). Anomaly maps and the image statistic are taken over that grid.

A :class:`RegionOfInterest` (a rectangle or a mask image) says which pixels belong to the product: the
anomaly map is zero outside it and the image statistic ignores the patches outside it, so a strip's
non-fabric edge or a fixture in the frame cannot dominate the image's score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError

SCORING_MODES = ("resize", "tile")  # an image resized to one tile, or scored as stitched tiles
DEFAULT_SCORING = "resize"
DEFAULT_TILE_OVERLAP = 0.25


def check_scoring(scoring: str, tile_overlap: float) -> None:
    if scoring not in SCORING_MODES:
        raise ConfigError(f"scoring mode {scoring!r} is not one of {', '.join(SCORING_MODES)}")
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, (int, float)) or not 0 <= tile_overlap < 1:
        raise ConfigError(f"tile overlap must be a number in [0, 1), got {tile_overlap!r}")


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image size go: the padded size and each tile's (y, x) origin in pixels."""

    height: int
    width: int
    tile: int
    stride: int
    padded_height: int
    padded_width: int
    origins: tuple[tuple[int, int], ...]

    @property
    def grid(self) -> tuple[int, int]:
        """The stitched patch grid (rows, columns) of the padded image."""
        return self.padded_height // self.stride, self.padded_width // self.stride

    @property
    def tile_grid(self) -> int:
        return self.tile // self.stride


def _axis_origins(length: int, tile: int, step: int) -> list[int]:
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / step) + 1
    last = length - tile
    return sorted({min(i * step, last) for i in range(count)})


def plan_tiles(height: int, width: int, tile: int, stride: int, overlap: float = 0.25) -> TilePlan:
    """Tiles of side ``tile`` covering a ``height`` x ``width`` image, overlapping by about ``overlap``."""
    for name, value in (("height", height), ("width", width), ("tile", tile), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if tile % stride:
        raise ConfigError(f"tile side {tile} is not a multiple of the backbone's stride {stride}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"tile overlap must be in [0, 1), got {overlap!r}")
    padded_h = max(tile, math.ceil(height / stride) * stride)
    padded_w = max(tile, math.ceil(width / stride) * stride)
    step = max(stride, int(tile * (1 - overlap)) // stride * stride)
    ys = _axis_origins(padded_h, tile, step)
    xs = _axis_origins(padded_w, tile, step)
    return TilePlan(height, width, tile, stride, padded_h, padded_w, tuple((y, x) for y in ys for x in xs))


def split(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """The tiles (N, tile, tile, C) of a uint8 (H, W, C) image, reflect-padded to the plan's size."""
    if image.shape[:2] != (plan.height, plan.width):
        raise DataError(f"image of shape {image.shape} does not match the tile plan's {plan.height}x{plan.width}")
    pad_h, pad_w = plan.padded_height - plan.height, plan.padded_width - plan.width
    if pad_h or pad_w:
        widths = ((0, pad_h), (0, pad_w), (0, 0))
        if pad_h < plan.height and pad_w < plan.width:
            image = np.pad(image, widths, mode="reflect")
        else:
            image = np.pad(image, widths, mode="edge")
    t = plan.tile
    return np.stack([image[y : y + t, x : x + t] for y, x in plan.origins])


def stitch(grids: Tensor, plan: TilePlan) -> Tensor:
    """Tile patch grids (N, ..., g, g) averaged where they overlap into one (..., rows, cols) grid."""
    g = plan.tile_grid
    if grids.shape[0] != len(plan.origins) or tuple(grids.shape[-2:]) != (g, g):
        raise DataError(
            f"expected {len(plan.origins)} tile grids of {g}x{g}, got a tensor of shape {tuple(grids.shape)}"
        )
    rows, cols = plan.grid
    total = grids.new_zeros((*grids.shape[1:-2], rows, cols))
    count = grids.new_zeros((rows, cols))
    s = plan.stride
    for k, (y, x) in enumerate(plan.origins):
        total[..., y // s : y // s + g, x // s : x // s + g] += grids[k]
        count[y // s : y // s + g, x // s : x // s + g] += 1
    return total / count


def crop_grid(grid: Tensor, plan: TilePlan) -> Tensor:
    """The stitched grid without the rows and columns that lie wholly in the padding."""
    rows = math.ceil(plan.height / plan.stride)
    cols = math.ceil(plan.width / plan.stride)
    return grid[..., :rows, :cols]


class RegionOfInterest:
    """The pixels of an image that belong to the product: a rectangle or a mask, at the image's own size.

    ``RegionOfInterest.rectangle(x0, y0, x1, y1)`` (pixels, x1 and y1 exclusive) or
    ``RegionOfInterest.from_mask(path_or_array)`` (non-zero = inside). ``mask(h, w)`` is the bool pixel
    mask for an image of that size (a rectangle is clipped to it; a mask must have that size), and
    ``cells(mask, rows, cols)`` says which patch cells are mostly inside.
    """

    def __init__(self, rect: tuple[int, int, int, int] | None = None, mask: np.ndarray | None = None) -> None:
        if (rect is None) == (mask is None):
            raise ConfigError("a region of interest is a rectangle or a mask, exactly one of them")
        self.rect = rect
        self._mask = mask

    @classmethod
    def rectangle(cls, x0: int, y0: int, x1: int, y1: int) -> "RegionOfInterest":
        values = (x0, y0, x1, y1)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ConfigError(f"region of interest: x0, y0, x1, y1 must be integers >= 0, got {values}")
        if x1 <= x0 or y1 <= y0:
            raise ConfigError(f"region of interest {values}: x1 must exceed x0 and y1 must exceed y0")
        return cls(rect=(x0, y0, x1, y1))

    @classmethod
    def parse(cls, text: str) -> "RegionOfInterest":
        """``"x0,y0,x1,y1"`` (a rectangle) or the path of a mask image."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) == 4 and all(p.lstrip("-").isdigit() for p in parts):
            return cls.rectangle(*(int(p) for p in parts))
        return cls.from_mask(text)

    @classmethod
    def from_mask(cls, source: str | Path | np.ndarray) -> "RegionOfInterest":
        if isinstance(source, np.ndarray):
            array = source
        else:
            from bayprano.platform.data.imageio import load_mask

            path = Path(source)
            if not path.is_file():
                raise ConfigError(f"region of interest: {path} is neither x0,y0,x1,y1 nor an existing mask image")
            array = load_mask(path)
        array = np.asarray(array)
        if array.ndim != 2 or not array.any():
            raise ConfigError(f"region of interest mask must be a 2-D image with some pixels inside, got {array.shape}")
        return cls(mask=array.astype(bool))

    def mask(self, height: int, width: int) -> np.ndarray:
        if self._mask is not None:
            if self._mask.shape != (height, width):
                raise DataError(
                    f"region of interest mask is {self._mask.shape[1]}x{self._mask.shape[0]} px, "
                    f"the image {width}x{height} px"
                )
            return self._mask
        x0, y0, x1, y1 = self.rect  # type: ignore[misc]
        out = np.zeros((height, width), dtype=bool)
        out[min(y0, height) : min(y1, height), min(x0, width) : min(x1, width)] = True
        if not out.any():
            raise DataError(f"region of interest {self.rect} lies outside the {width}x{height} px image")
        return out

    @staticmethod
    def cells(mask: np.ndarray, rows: int, cols: int) -> Tensor:
        """Patch cells (rows, cols) at least half inside ``mask`` (at least one cell)."""
        fraction = F.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], (rows, cols))[0, 0]
        inside = fraction >= 0.5
        if not inside.any():
            inside = fraction >= fraction.max()
        return inside

    def describe(self) -> dict:
        if self.rect is not None:
            return {"rectangle": list(self.rect)}
        return {"mask_pixels": int(self._mask.sum()), "mask_shape": list(self._mask.shape)}  # type: ignore[union-attr]


def masked_max(grids: Tensor, inside: Tensor) -> Tensor:
    """The maximum of each (B, rows, cols) grid over the cells inside the region."""
    return grids.masked_fill(~inside.to(grids.device), float("-inf")).flatten(1).max(dim=1).values


def stitched_cells(mask: np.ndarray, plan: TilePlan) -> Tensor:
    """The cells of a stitched, cropped grid that lie mostly inside the pixel ``mask`` (at the image's size)."""
    rows, cols = math.ceil(plan.height / plan.stride), math.ceil(plan.width / plan.stride)
    padded = np.zeros((rows * plan.stride, cols * plan.stride), dtype=bool)
    padded[: plan.height, : plan.width] = mask
    return RegionOfInterest.cells(padded, rows, cols)
