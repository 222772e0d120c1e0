"""The support set as the adaptation sees it: the views of each good image (its augmentations, or the
tiles of those in tile mode, restricted to the region of interest) and :class:`SupportLayout`, which
records which original each view comes from and how a held-out original is scored in the
leave-one-out calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.data.augment import augment_support
from bayprano.platform.errors import ConfigError
from bayprano.platform.model.scoring import image_statistic
from bayprano.platform.model.tiling import (
    RegionOfInterest,
    TilePlan,
    crop_grid,
    plan_tiles,
    split,
    stitch,
    stitched_cells,
)

if TYPE_CHECKING:
    from bayprano.platform.model.bayes import BayesianPatchModel, Prototype

# The inner loop's leave-one-out loss refits the prototype once per view, with gradients: its time and
# memory grow with the square of the views (105 tiles of five 4096 x 256 strips: 151 s and 18 GB).
# Augmented or tiled supports adapt the head on at most this many views (or K, if more), spread over
# the original images; the posterior and the calibration then use every view.
INNER_VIEWS = 8


def inner_views(groups: Sequence[int], limit: int) -> list[int] | None:
    """At most ``limit`` view indices, taken in turn from each original image's views (evenly spaced
    among them), or None when there are no more views than that."""
    if len(groups) <= limit:
        return None
    by_image: dict[int, list[int]] = {}
    for v, g in enumerate(groups):
        by_image.setdefault(g, []).append(v)
    originals = sorted(by_image)
    quota = {g: limit // len(originals) + (1 if r < limit % len(originals) else 0) for r, g in enumerate(originals)}
    chosen = []
    for g in originals:
        views, n = by_image[g], min(quota[g], len(by_image[g]))
        chosen += [views[int(j * len(views) / n)] for j in range(n)] if n else []
    return sorted(chosen)


class SupportLayout:
    """Which original support image each fitted view comes from, and how a held-out original is scored.

    ``groups[v]``: the original image of fitted view ``v``; ``fit_inside`` (V, g, g) or None: the views'
    cells inside the region of interest; ``queries[i]`` (after ``bind``): the backbone features of original
    ``i`` as it is scored (its tiles, or the image itself), None when view ``i`` is original ``i`` itself.
    """

    def __init__(
        self,
        groups: Sequence[int],
        fit_index: Sequence[int] | None = None,
        query_index: Sequence[Sequence[int]] | None = None,
        plans: Sequence[TilePlan | None] | None = None,
        fit_masks: Sequence[np.ndarray | None] | None = None,
        query_masks: Sequence[np.ndarray | None] | None = None,
    ):
        self.groups = list(groups)
        self.originals = len(set(self.groups))
        if sorted(set(self.groups)) != list(range(self.originals)):
            raise ConfigError(f"support layout: groups must number the originals 0..K-1, got {sorted(set(groups))}")
        self.fit_index = list(range(len(self.groups))) if fit_index is None else list(fit_index)
        self.query_index = query_index
        self.plans = plans
        self.fit_masks = fit_masks
        self.query_masks = query_masks
        self.queries: list[Tensor] | None = None
        self.fit_inside: Tensor | None = None
        self.query_inside: list[Tensor | None] | None = None

    @classmethod
    def plain(cls, shots: int) -> "SupportLayout":
        return cls(range(shots))

    def bind(self, features: Tensor) -> None:
        """Take the queries' features and the cells inside the region from all extracted ``features``."""
        rows, cols = features.shape[-2:]
        if self.query_index is not None:
            self.queries = [features[list(idx)] for idx in self.query_index]
        if self.fit_masks is not None and any(m is not None for m in self.fit_masks):
            fit_masks = [m for m in self.fit_masks if m is not None]
            if len(fit_masks) != len(self.fit_masks) or self.query_masks is None or self.plans is None:
                raise ConfigError("support layout: a region of interest needs a mask for every view and every query")
            self.fit_inside = torch.stack([RegionOfInterest.cells(m, rows, cols) for m in fit_masks]).to(
                features.device
            )
            self.query_inside = [
                None
                if m is None
                else (stitched_cells(m, plan) if plan is not None else RegionOfInterest.cells(m, rows, cols))
                for m, plan in zip(self.query_masks, self.plans)
            ]

    def held_out_statistic(self, i: int, maha: Tensor, dim: int) -> float:
        """The statistic of original ``i`` from its Mahalanobis grids (its tiles, or the one image)."""
        plan = None if self.plans is None else self.plans[i]
        if plan is not None:
            maha = crop_grid(stitch(maha, plan), plan)[None]
        inside = None if self.query_inside is None else self.query_inside[i]
        return float(image_statistic(maha, dim, inside=inside)[0])

    def leave_one_out(self, model: BayesianPatchModel, z: Tensor) -> list[tuple[float, Prototype]]:
        """For each original: its statistic under the prototype fitted on every view of the others (its own
        views, augmentations and tiles, leave with it; only the original is scored), and that prototype."""
        groups = torch.as_tensor(self.groups, device=z.device)
        out = []
        for i in range(self.originals):
            rest = model.prototype(z[groups != i])
            query = z[i : i + 1] if self.queries is None else model.embed(self.queries[i])
            out.append((self.held_out_statistic(i, rest.distance(query), model.dim), rest))
        return out


def support_views(
    images: Sequence[np.ndarray],
    size: int,
    stride: int,
    scoring: str,
    tile_overlap: float,
    roi: RegionOfInterest | None,
    augment: str,
) -> tuple[list[np.ndarray], SupportLayout]:
    """The crops to extract (views of the support images, or their tiles) and their layout.

    In tile mode, tiles mostly outside the region of interest are not fitted (a view keeps at least its
    tile with the most inside); the originals' tiles are all scored for the leave-one-out statistic."""
    crops: list[np.ndarray] = []
    groups: list[int] = []
    fit_index: list[int] = []
    fit_masks: list[np.ndarray | None] = []
    query_index: list[list[int]] = []
    query_masks: list[np.ndarray | None] = []
    plans: list[TilePlan | None] = []
    for i, image in enumerate(images):
        mask = None if roi is None else roi.mask(*image.shape[:2])
        views = augment_support([image], augment)
        mask_views: list[np.ndarray | None] = (
            [None] * len(views)
            if mask is None
            else [v[..., 0] > 0 for v in augment_support([mask[..., None].astype(np.uint8)], augment)]
        )
        for v, (view, view_mask) in enumerate(zip(views, mask_views)):
            if scoring == "resize":
                if v == 0:
                    query_index.append([len(crops)])
                    query_masks.append(view_mask)
                    plans.append(None)
                groups.append(i)
                fit_index.append(len(crops))
                fit_masks.append(view_mask)
                crops.append(view)
                continue
            height, width = view.shape[:2]
            plan = plan_tiles(height, width, size, stride, tile_overlap)
            tiles = split(view, plan)
            tile_masks: list[np.ndarray | None]
            if view_mask is None:
                tile_masks = [None] * len(tiles)
                keep = list(range(len(tiles)))
            else:
                padded = np.zeros((plan.padded_height, plan.padded_width), dtype=bool)
                padded[: plan.height, : plan.width] = view_mask
                inside = [padded[y : y + size, x : x + size] for y, x in plan.origins]
                fractions = np.array([m.mean() for m in inside])
                tile_masks = list(inside)
                keep = [k for k in range(len(tiles)) if fractions[k] >= 0.5] or [int(fractions.argmax())]
            if v == 0:
                query_index.append(list(range(len(crops), len(crops) + len(tiles))))
                query_masks.append(view_mask)
                plans.append(plan)
            for k in keep:
                groups.append(i)
                fit_index.append(len(crops) + k)
                fit_masks.append(tile_masks[k])
            crops.extend(tiles)
    layout = SupportLayout(groups, fit_index, query_index, plans, fit_masks, query_masks)
    if scoring == "resize" and augment == "none" and roi is None:
        layout.query_index = None  # each view is its original: score it from the fitted embeddings
    return crops, layout
