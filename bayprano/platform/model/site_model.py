"""The adapted per-site model (:class:`SiteModel`) and what it says about an image (:class:`ImageResult`):
scoring in ``resize`` or ``tile`` mode, with or without a region of interest, to image statistics,
p-values, decisions and anomaly maps. Built by ``site.adapt``; saved and loaded by ``site_artifact``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.data.imageio import resize_square
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.model.anomaly_map import anomaly_map
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.extractor import PatchFeatureExtractor
from bayprano.platform.model.niw import NIWPrototype, StudentT
from bayprano.platform.model.scoring import Calibration, LogNormalCalibration, decide, decision_sd, image_statistic
from bayprano.platform.model.site_artifact import load_site_model, save_site_model
from bayprano.platform.model.tiling import (
    DEFAULT_SCORING,
    DEFAULT_TILE_OVERLAP,
    RegionOfInterest,
    TilePlan,
    check_scoring,
    crop_grid,
    plan_tiles,
    split,
    stitch,
    stitched_cells,
)


@dataclass
class ImageResult:
    """What scoring says about one image."""

    score: float  # image statistic T = max patch Mahalanobis / d
    p_value: float
    threshold: float
    decision: str  # normal | anomalous | review
    uncertainty: float  # 0 = certain, 1 = a coin flip
    anomaly_map: np.ndarray | None = None  # (H, W) float32, patch scores (-log density relative to mode)
    map_threshold: float | None = None  # the anomaly map value that corresponds to the threshold

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "anomaly_map"}


def image_results(
    stat: np.ndarray,
    p_values: np.ndarray,
    threshold: float,
    rel_sd: np.ndarray,
    z_review: float,
    maps: np.ndarray | None,
    map_threshold: float | None,
) -> list[ImageResult]:
    """One result per image statistic: its p-value, its decision and uncertainty at ``threshold``, and, when
    ``maps`` is given, its anomaly map with the map value of the threshold."""
    decisions, uncertainty = decide(stat, threshold, rel_sd, z_review)
    return [
        ImageResult(
            float(stat[i]),
            float(p_values[i]),
            threshold,
            decisions[i],
            float(uncertainty[i]),
            None if maps is None else maps[i],
            None if maps is None else map_threshold,
        )
        for i in range(len(stat))
    ]


class SiteModel:
    """An adapted per-site model: adapted head, the NIW prototype fitted on the support, calibrated threshold."""

    def __init__(
        self,
        model: BayesianPatchModel,
        prototype: NIWPrototype,
        calibration: Calibration | LogNormalCalibration,
        target_fpr: float,
        image_size: int,
        info: dict,
        extractor: PatchFeatureExtractor | None = None,
        z_review: float = 1.0,
        scoring: str = DEFAULT_SCORING,
        tile_overlap: float = DEFAULT_TILE_OVERLAP,
        roi: RegionOfInterest | None = None,
    ):
        if not 0 < target_fpr < 1:
            raise ConfigError(f"target_fpr must be between 0 and 1, got {target_fpr}")
        check_scoring(scoring, tile_overlap)
        self.scoring = scoring
        self.tile_overlap = float(tile_overlap)
        self.roi = roi
        self.model = model.eval()
        self.prototype = prototype
        self.calibration = calibration
        self.target_fpr = float(target_fpr)
        self.image_size = int(image_size)
        self.info = dict(info)
        self.z_review = float(z_review)
        self._extractor = extractor
        self.threshold = calibration.threshold(self.target_fpr, self.df)

    # ---------------------------------------------------------------------------------- properties

    @property
    def predictive(self) -> StudentT:
        return self.prototype.predictive_

    @property
    def nu_n(self) -> float:
        return self.prototype.nu_n

    @property
    def kappa_n(self) -> float:
        return self.prototype.kappa_n

    @property
    def df(self) -> float:
        return self.prototype.df

    @property
    def grid(self) -> tuple[int, int]:
        _, rows, cols = self.prototype.shape_
        return rows, cols

    @property
    def backbone(self) -> str:
        return self.info["backbone"]

    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = build_backbone(self.backbone)
        return self._extractor

    def with_target_fpr(self, target_fpr: float) -> "SiteModel":
        return SiteModel(
            self.model,
            self.prototype,
            self.calibration,
            target_fpr,
            self.image_size,
            self.info,
            self._extractor,
            self.z_review,
            self.scoring,
            self.tile_overlap,
            self.roi,
        )

    def decision_sd(self, statistic) -> np.ndarray:
        """The review band's standard deviation (log T) at image statistics ``statistic``."""
        return decision_sd(
            statistic, self.model.dim, self.nu_n, self.kappa_n, self.calibration, self.target_fpr, self.df
        )

    def tile_plan(self, height: int, width: int) -> TilePlan:
        """The tiles of an image of this size (tile mode)."""
        return plan_tiles(int(height), int(width), self.image_size, self.extractor.stride, self.tile_overlap)

    # ------------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def mahalanobis(self, features: Tensor) -> Tensor:
        """Squared Mahalanobis maps (B, h, w) of backbone features (B, C, h, w)."""
        z = self.model.embed(features.to(self.predictive.loc.device))
        h, w = z.shape[-2:]
        if (h, w) != self.grid:
            raise DataError(f"feature grid {h}x{w} does not match the model's {self.grid[0]}x{self.grid[1]}")
        return self.prototype.distance(z)

    def patch_scores(self, maha: Tensor) -> Tensor:
        return self.prototype.score_from_distance(maha)

    def results_from_mahalanobis(
        self, maha: Tensor, size: tuple[int, int] | None = None, inside: Tensor | None = None
    ) -> list[ImageResult]:
        """Results of Mahalanobis grids (B, rows, cols); ``inside`` (rows, cols) or (B, rows, cols): the cells of
        the region of interest (the map is zero outside them), None for all of them."""
        stat = image_statistic(maha, self.model.dim, inside=inside).cpu().numpy()
        maps = None
        map_threshold = None
        if size is not None:
            scores = self.patch_scores(maha)
            if inside is not None:
                scores = scores.masked_fill(~inside.to(scores.device), 0.0)
            maps = _to_host(anomaly_map(scores, size).float()).numpy()
            map_threshold = float(self.patch_scores(torch.tensor(self.threshold * self.model.dim)))
        return image_results(
            stat,
            self.calibration.p_value(stat, self.df),
            self.threshold,
            self.decision_sd(stat),
            self.z_review,
            maps,
            map_threshold,
        )

    def score(
        self, images: np.ndarray | Sequence[np.ndarray], maps: bool = True, batch_size: int = 16
    ) -> list[ImageResult]:
        """Score uint8 RGB images of any size: resized to the model's image size (``resize``; maps at that
        size) or as stitched tiles (``tile``; maps at each image's own size)."""
        if self.scoring == "tile":
            return self._score_tiled(images, maps, batch_size)
        features = self.extractor.extract(images, size=self.image_size, batch_size=batch_size)
        maha = self.mahalanobis(features)
        inside = None
        if self.roi is not None:
            rows, cols = maha.shape[-2:]
            inside = torch.stack(
                [RegionOfInterest.cells(self.roi.mask(*im.shape[:2]), rows, cols) for im in _image_list(images)]
            )
        results = self.results_from_mahalanobis(maha, (self.image_size, self.image_size) if maps else None, inside)
        if maps and self.roi is not None:
            for image, result in zip(_image_list(images), results):
                result.anomaly_map = result.anomaly_map * resize_square(
                    self.roi.mask(*image.shape[:2]), self.image_size, mask=True
                )
        return results

    def _score_tiled(self, images, maps: bool, batch_size: int) -> list[ImageResult]:
        images = _image_list(images)
        plans = [self.tile_plan(*im.shape[:2]) for im in images]
        tiles = [split(im, plan) for im, plan in zip(images, plans)]
        features = self.extractor.extract(
            [t for group in tiles for t in group], size=self.image_size, batch_size=batch_size
        )
        maha_tiles = self.mahalanobis(features)
        results, start = [], 0
        for image, plan, group in zip(images, plans, tiles):
            grid = crop_grid(stitch(maha_tiles[start : start + len(group)], plan), plan)[None]
            start += len(group)
            h, w = image.shape[:2]
            mask = None if self.roi is None else self.roi.mask(h, w)
            inside = None if mask is None else stitched_cells(mask, plan)
            rows, cols = grid.shape[-2:]
            size = (rows * plan.stride, cols * plan.stride) if maps else None
            result = self.results_from_mahalanobis(grid, size, inside)[0]
            if maps and result.anomaly_map is not None:
                result.anomaly_map = np.ascontiguousarray(result.anomaly_map[:h, :w])
                if mask is not None:
                    result.anomaly_map = result.anomaly_map * mask
            results.append(result)
        return results

    # ------------------------------------------------------------------------------------ artifact
    def save(self, out: str | os.PathLike) -> Path:
        """Write the artifact folder atomically (a temp folder renamed into place)."""
        return save_site_model(self, out)

    @classmethod
    def load(cls, path: str | os.PathLike, extractor: PatchFeatureExtractor | None = None) -> "SiteModel":
        return load_site_model(cls, path, extractor)


def _image_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images]
    return list(images)


def _to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU; from a GPU through page-locked memory, which the copy engine reads directly."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host
