"""Adaptation to a site's new product, and the self-contained adapted model that scores its images.

``adapt(checkpoint, support_images, steps)`` runs the inner loop on the K good images, fits the NIW
posterior, calibrates the decision threshold for a target false-positive rate (the meta-learned prior
on normal images' log-statistic at the support's shift covariate, updated by leave-one-out on the
support) and returns a ``SiteModel``. As in
meta-training, the inner loop's loss is evaluated on a fixed random subset of patch positions (the
checkpoint's ``inner_positions``, 128 by default), which is what the meta-learned initialisation and
step size were trained with; on the full grid the inner loop costs several times more for a gradient
of nearly the same direction (cosine about 0.85 on synthetic data). The time of each stage is
recorded in the model's info.

A ``SiteModel`` saves as a folder: ``model.pt`` (tensors only, read with ``weights_only=True``) and
``meta.json`` (backbone, image size, threshold, calibration, support hashes, the checkpoint's hash and
the sha256 of ``model.pt``). It loads without any training state; a corrupt or foreign artifact is
refused with an error naming the file.

Scoring modes: ``resize`` scores the whole image resized to the model's ``image_size``; ``tile`` scores
an image larger than one tile as overlapping tiles of ``image_size`` on the backbone's stride grid
(``tiling.plan_tiles``), stitches the tiles' Mahalanobis grids into one grid of the image's own size and
takes the image statistic over all of it; the anomaly map is then at the image's own size. In tile mode
every tile of every support image is a support view for the posterior fit and the calibration.

A region of interest (``tiling.RegionOfInterest``) zeroes the map outside it and restricts the image
statistic, the leave-one-out statistics and the shift covariate to the patch cells inside it (tiles of
the support mostly outside it are not fitted). A rectangle is saved in ``meta.json``, a mask as
``roi.png`` beside ``model.pt``, hashed the same way.

Support augmentation (``data.augment``) adds views of each support image before the fit; the
calibration's leave-one-out leaves out every view (and every tile) of one original image together and
scores only the original, as a test image would be scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.data.augment import AUGMENTATIONS, augment_support
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_directory
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.meta.inner import adapt_head
from bayprano.platform.meta.outer import MetaConfig
from bayprano.platform.model.anomaly_map import anomaly_map, gaussian_blur
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.niw import NIWPrototype, StudentT
from bayprano.platform.model.scoring import (
    Calibration,
    LogNormalCalibration,
    calibration_from_dict,
    decide,
    image_statistic,
    relative_sd,
    STATISTIC_SIGMA,
    SHIFT_CELLS,
    shift_covariate,
)
from bayprano.platform.model.tiling import RegionOfInterest, TilePlan, crop_grid, masked_max, plan_tiles, split, stitch

ARTIFACT_FORMAT = 1
ARTIFACT_KIND = "bayprano-site-model"
SCORING_MODES = ("resize", "tile")
DEFAULT_SCORING = "resize"
DEFAULT_TILE_OVERLAP = 0.25
ROI_MASK_FILE = "roi.png"


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
        _check_scoring(scoring, tile_overlap)
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
        return tuple(self.prototype.shape_[1:])

    @property
    def backbone(self) -> str:
        return self.info["backbone"]

    @property
    def extractor(self) -> PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = build_backbone(self.backbone)
        return self._extractor

    def with_target_fpr(self, target_fpr: float) -> "SiteModel":
        return SiteModel(self.model, self.prototype, self.calibration, target_fpr, self.image_size, self.info,
                         self._extractor, self.z_review, self.scoring, self.tile_overlap, self.roi)

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

    def results_from_mahalanobis(self, maha: Tensor, size: tuple[int, int] | None = None,
                                 inside: Tensor | None = None) -> list[ImageResult]:
        """Results of Mahalanobis grids (B, rows, cols); ``inside`` (rows, cols) or (B, rows, cols): the cells of
        the region of interest (the map is zero outside them), None for all of them."""
        stat = statistic(maha, self.model.dim, inside).cpu().numpy()
        p = self.calibration.p_value(stat, self.df)
        decisions, uncertainty = decide(stat, self.threshold, relative_sd(stat, self.model.dim, self.nu_n, self.kappa_n),
                                        self.z_review)
        maps = None
        map_threshold = None
        if size is not None:
            scores = self.patch_scores(maha)
            if inside is not None:
                scores = scores.masked_fill(~inside.to(scores.device), 0.0)
            maps = _to_host(anomaly_map(scores, size).float()).numpy()
            map_threshold = float(self.patch_scores(torch.tensor(self.threshold * self.model.dim)))
        return [
            ImageResult(float(stat[i]), float(p[i]), self.threshold, decisions[i], float(uncertainty[i]),
                        None if maps is None else maps[i], map_threshold)
            for i in range(len(stat))
        ]

    def score(self, images: np.ndarray | Sequence[np.ndarray], maps: bool = True, batch_size: int = 16) -> list[ImageResult]:
        """Score uint8 RGB images of any size: resized to the model's image size (``resize``; maps at that
        size) or as stitched tiles (``tile``; maps at each image's own size)."""
        if self.scoring == "tile":
            return self._score_tiled(images, maps, batch_size)
        features = self.extractor.extract(images, size=self.image_size, batch_size=batch_size)
        maha = self.mahalanobis(features)
        inside = None
        if self.roi is not None:
            rows, cols = maha.shape[-2:]
            inside = torch.stack([RegionOfInterest.cells(self.roi.mask(*im.shape[:2]), rows, cols)
                                  for im in _image_list(images)])
        results = self.results_from_mahalanobis(maha, (self.image_size, self.image_size) if maps else None, inside)
        if maps and self.roi is not None:
            for image, result in zip(_image_list(images), results):
                result.anomaly_map = result.anomaly_map * _resized_mask(self.roi.mask(*image.shape[:2]), self.image_size)
        return results

    def _score_tiled(self, images, maps: bool, batch_size: int) -> list[ImageResult]:
        images = _image_list(images)
        plans = [self.tile_plan(*im.shape[:2]) for im in images]
        tiles = [split(im, plan) for im, plan in zip(images, plans)]
        features = self.extractor.extract([t for group in tiles for t in group], size=self.image_size,
                                          batch_size=batch_size)
        maha_tiles = self.mahalanobis(features)
        results, start = [], 0
        for image, plan, group in zip(images, plans, tiles):
            grid = crop_grid(stitch(maha_tiles[start : start + len(group)], plan), plan)[None]
            start += len(group)
            h, w = image.shape[:2]
            mask = None if self.roi is None else self.roi.mask(h, w)
            inside = None if mask is None else _cells(mask, plan)
            rows, cols = grid.shape[-2:]
            size = (rows * plan.stride, cols * plan.stride) if maps else None
            result = self.results_from_mahalanobis(grid, size, inside)[0]
            if maps:
                result.anomaly_map = np.ascontiguousarray(result.anomaly_map[:h, :w])
                if mask is not None:
                    result.anomaly_map = result.anomaly_map * mask
            results.append(result)
        return results

    # ------------------------------------------------------------------------------------ artifact

    def _tensors(self) -> dict:
        return {
            "head_weight": self.model.head.weight.detach().cpu(),
            "head_bias": self.model.head.bias.detach().cpu(),
            "feature_mean": self.model.feature_mean.cpu(),
            "feature_std": self.model.feature_std.cpu(),
            "loc": self.predictive.loc.detach().cpu(),
            "scale_tril": self.predictive.scale_tril.detach().cpu(),
            "df": self.predictive.df.detach().cpu(),
        }

    def save(self, out: str | os.PathLike) -> Path:
        """Write the artifact folder atomically (a temp folder renamed into place)."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(self._tensors(), buf)
        data = buf.getvalue()
        meta = {
            "kind": ARTIFACT_KIND,
            "format": ARTIFACT_FORMAT,
            **self.info,
            "image_size": self.image_size,
            "grid": list(self.grid),
            "dim": self.model.dim,
            "in_channels": self.model.in_channels,
            "window": self.model.window,
            "nu_n": self.nu_n,
            "kappa_n": self.kappa_n,
            "df": self.df,
            "calibration": self.calibration.as_dict(),
            "target_fpr": self.target_fpr,
            "threshold": self.threshold,
            "z_review": self.z_review,
            "scoring": self.scoring,
            "tile_overlap": self.tile_overlap,
            "model_sha256": hashlib.sha256(data).hexdigest(),
        }
        roi_png = None
        if self.roi is not None and self.roi.rect is not None:
            meta["roi"] = {"rectangle": list(self.roi.rect)}
        elif self.roi is not None:
            from bayprano.platform.data.imageio import encode_png

            roi_png = encode_png(self.roi.mask(*self.roi.describe()["mask_shape"]))
            meta["roi"] = {"mask": ROI_MASK_FILE, "mask_sha256": hashlib.sha256(roi_png).hexdigest()}
        with atomic_directory(out) as staging:
            (staging / "model.pt").write_bytes(data)
            if roi_png is not None:
                (staging / ROI_MASK_FILE).write_bytes(roi_png)
            (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.info["model_sha256"] = meta["model_sha256"]
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, extractor: PatchFeatureExtractor | None = None) -> "SiteModel":
        path = Path(path)
        meta_path, model_path = path / "meta.json", path / "model.pt"
        if not path.is_dir():
            raise DataError(f"{path}: model folder does not exist")
        for p in (meta_path, model_path):
            if not p.is_file():
                raise DataError(f"{p}: missing from the model folder")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("kind") != ARTIFACT_KIND:
            raise DataError(f"{meta_path}: not a bayprano site model")
        if meta.get("format") != ARTIFACT_FORMAT:
            raise DataError(f"{meta_path}: artifact format {meta.get('format')!r} is not supported (expected {ARTIFACT_FORMAT})")
        data = model_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("model_sha256"):
            raise DataError(f"{model_path}: corrupt artifact (sha256 does not match meta.json)")
        try:
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            model = BayesianPatchModel(meta["in_channels"], meta["dim"], window=meta["window"])
            with torch.no_grad():
                model.head.weight.copy_(t["head_weight"])
                model.head.bias.copy_(t["head_bias"])
            model.set_feature_statistics(t["feature_mean"], t["feature_std"])
            prototype = NIWPrototype.from_predictive(
                StudentT(t["loc"], t["scale_tril"], t["df"]), meta["nu_n"], meta["kappa_n"],
                (meta["dim"], *meta["grid"]), meta.get("support_size"))
            info = {k: meta[k] for k in _INFO_KEYS if k in meta}
            if extractor is not None and extractor.fingerprint() != meta["backbone_fingerprint"]:
                raise DataError(
                    f"{path}: model was adapted on backbone {meta['backbone_fingerprint']}, "
                    f"not {extractor.fingerprint()}"
                )
            roi = _load_roi(path, meta.get("roi"))
            return cls(model, prototype, calibration_from_dict(meta["calibration"]), meta["target_fpr"],
                       meta["image_size"], info, extractor, meta.get("z_review", 1.0),
                       meta.get("scoring", DEFAULT_SCORING), meta.get("tile_overlap", DEFAULT_TILE_OVERLAP), roi)
        except ConfigError as exc:
            raise DataError(f"{meta_path}: {exc}") from None
        except (KeyError, TypeError, RuntimeError) as exc:
            raise DataError(f"{path}: artifact is incomplete or inconsistent ({exc.__class__.__name__}: {exc})") from None


_INFO_KEYS = ("backbone", "backbone_fingerprint", "created", "support_size", "support_sha256", "inner_steps",
              "checkpoint_sha256", "loo_statistics", "shift_covariate", "version", "model_sha256", "adapt_seconds",
              "adapt_stage_seconds", "inner_positions", "augment", "support_views")


def _check_scoring(scoring: str, tile_overlap: float) -> None:
    if scoring not in SCORING_MODES:
        raise ConfigError(f"scoring mode {scoring!r} is not one of {', '.join(SCORING_MODES)}")
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, (int, float)) or not 0 <= tile_overlap < 1:
        raise ConfigError(f"tile overlap must be a number in [0, 1), got {tile_overlap!r}")


def _load_roi(folder: Path, spec) -> RegionOfInterest | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise DataError(f"{folder / 'meta.json'}: roi must be an object, got {spec!r}")
    if "rectangle" in spec:
        rect = spec["rectangle"]
        if not isinstance(rect, list) or len(rect) != 4:
            raise DataError(f"{folder / 'meta.json'}: roi rectangle must be [x0, y0, x1, y1], got {rect!r}")
        return RegionOfInterest.rectangle(*rect)
    mask_path = folder / str(spec.get("mask"))
    if spec.get("mask") != ROI_MASK_FILE or not mask_path.is_file():
        raise DataError(f"{mask_path}: region of interest mask missing from the model folder")
    data = mask_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != spec.get("mask_sha256"):
        raise DataError(f"{mask_path}: corrupt region of interest mask (sha256 does not match meta.json)")
    from bayprano.platform.data.imageio import load_mask

    return RegionOfInterest.from_mask(load_mask(data, str(mask_path)))


def statistic(maha: Tensor, dim: int, inside: Tensor | None = None) -> Tensor:
    """The image statistic of Mahalanobis grids (B, rows, cols): ``image_statistic``, or with ``inside``
    (the region of interest's cells) the same smoothing over the inside cells only (a normalised
    convolution, so that no value outside leaks in) followed by the maximum over those cells."""
    if inside is None:
        return image_statistic(maha, dim)
    weight = inside.to(maha.device).expand_as(maha).to(maha.dtype)
    smoothed = gaussian_blur(maha / dim * weight, STATISTIC_SIGMA) / gaussian_blur(weight, STATISTIC_SIGMA).clamp_min(1e-12)
    return masked_max(smoothed, inside)


def _cells(mask: np.ndarray, plan: TilePlan) -> Tensor:
    """The cells of a stitched, cropped grid that lie mostly inside the pixel ``mask`` (at the image's size)."""
    rows, cols = math.ceil(plan.height / plan.stride), math.ceil(plan.width / plan.stride)
    padded = np.zeros((rows * plan.stride, cols * plan.stride), dtype=bool)
    padded[: plan.height, : plan.width] = mask
    return RegionOfInterest.cells(padded, rows, cols)


def _resized_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A pixel mask resized (nearest) to side x side, as float32 0/1."""
    from PIL import Image

    return (np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 0) \
        .astype(np.float32)


def _image_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images]
    return list(images)

INNER_POSITIONS_SEED = 0
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


def _to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU; from a GPU through page-locked memory, which the copy engine reads directly."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host


def _image_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def adapt(
    checkpoint: MetaCheckpoint | str | os.PathLike,
    support_images: Sequence[np.ndarray],
    steps: int | None = None,
    target_fpr: float = 0.05,
    extractor: PatchFeatureExtractor | None = None,
    z_review: float = 1.0,
    calibration_strength: float = 4.0,
    inner_positions: int | None = None,
    scoring: str = DEFAULT_SCORING,
    tile_overlap: float = DEFAULT_TILE_OVERLAP,
    roi: RegionOfInterest | None = None,
    augment: str = "none",
) -> SiteModel:
    """Adapt a meta-checkpoint to a site's K good images (uint8 RGB arrays) and calibrate it.

    ``inner_positions``: how many patch positions (drawn once, with a fixed seed, so adaptation is
    deterministic) the inner loop's leave-one-out loss is evaluated on; None takes the checkpoint's
    meta-training setting, 0 uses every position. ``scoring``, ``tile_overlap``, ``roi`` and ``augment``:
    see the module docstring.
    """
    start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, MetaCheckpoint) else load_checkpoint(checkpoint)
    if len(support_images) < 1:
        raise ConfigError("adaptation needs at least one good support image")
    _adapt_settings(ckpt, target_fpr, steps, inner_positions)
    _check_scoring(scoring, tile_overlap)
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"support augmentation {augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    extractor = extractor or build_backbone(ckpt.backbone)
    if extractor.fingerprint() != ckpt.backbone_fingerprint:
        raise ConfigError(
            f"checkpoint was meta-trained on backbone {ckpt.backbone_fingerprint}, not {extractor.fingerprint()}"
        )
    clock = _StageClock(extractor.device)
    crops, layout = _support_views(list(support_images), ckpt.image_size, extractor.stride, scoring, tile_overlap,
                                   roi, augment)
    features = extractor.extract(crops, size=ckpt.image_size)
    features_seconds = clock.lap()
    layout.bind(features)
    site = adapt_features(ckpt, features[layout.fit_index], steps, target_fpr, z_review, calibration_strength,
                          inner_positions, support_ids=[_image_hash(im) for im in support_images], extractor=extractor,
                          layout=layout)
    site.scoring, site.tile_overlap, site.roi = scoring, float(tile_overlap), roi
    site.info["augment"] = augment
    site.info["adapt_stage_seconds"] = {"features": features_seconds, **site.info["adapt_stage_seconds"]}
    site.info["adapt_seconds"] = time.perf_counter() - start
    return site


def adapt_features(
    checkpoint: MetaCheckpoint,
    features: Tensor,
    steps: int | None = None,
    target_fpr: float = 0.05,
    z_review: float = 1.0,
    calibration_strength: float = 4.0,
    inner_positions: int | None = None,
    support_ids: Sequence[str] | None = None,
    extractor: PatchFeatureExtractor | None = None,
    layout: "_SupportLayout | None" = None,
) -> SiteModel:
    """``adapt`` on the support's backbone features (K, C, h, w), already extracted at the checkpoint's
    image size; ``support_ids`` are recorded as the support's hashes. ``layout`` says which original image
    each view (row of ``features``) comes from and how a held-out original is scored; None: every row is
    an original image, scored whole."""
    start = time.perf_counter()
    ckpt = checkpoint
    if features.shape[0] < 1:
        raise ConfigError("adaptation needs at least one good support image")
    steps, inner_positions = _adapt_settings(ckpt, target_fpr, steps, inner_positions)
    stages, clock = {}, _StageClock(features.device)
    layout = layout or _SupportLayout.plain(features.shape[0])
    if len(layout.groups) != features.shape[0]:
        raise ConfigError(f"support layout has {len(layout.groups)} views, the features {features.shape[0]}")
    shots = layout.originals
    model = _copy_model(ckpt.model).to(features.device)
    h, w = features.shape[-2:]
    positions = None
    if steps and inner_positions and inner_positions < h * w:
        gen = torch.Generator().manual_seed(INNER_POSITIONS_SEED)
        positions = torch.randperm(h * w, generator=gen)[:inner_positions].to(features.device)
    inner = inner_views(layout.groups, max(INNER_VIEWS, shots))
    adapted = adapt_head(model, features if inner is None else features[inner], steps, positions)
    proto, z = adapted.prototype, adapted.support_embeddings
    with torch.no_grad():
        model.head.weight.copy_(adapted.params["weight"])
        model.head.bias.copy_(adapted.params["bias"])
        if inner is not None:  # the posterior is fitted on every view
            z = model.embed(features)
            proto = model.prototype(z)
    stages["inner_loop"] = clock.lap()
    with torch.no_grad():
        covariate = _shift_covariate(proto.distance, z, model.dim, layout.fit_inside)
        if ckpt.normality is not None:
            # The covariate-conditioned prior where the support has no leave-one-out statistic; with them, the
            # plain prior, which defers more to the site's own evidence (measured in the README's table).
            calibration = ckpt.normality.for_shots(shots, covariate if shots < 2 else None)
        else:
            calibration = Calibration.from_prior(model.dim, ckpt.calibration.effective_patches, calibration_strength)
        loo = []
        if shots >= 2:
            groups = torch.as_tensor(layout.groups, device=z.device)
            for i in range(shots):
                # Every view of image i (its augmentations, its tiles) leaves with it; only the original is scored.
                rest = model.prototype(z[groups != i])
                query = z[i : i + 1] if layout.queries is None else model.embed(layout.queries[i])
                loo.append((layout.held_out_statistic(i, rest.distance(query), model.dim), rest.df))
            if isinstance(calibration, LogNormalCalibration):
                calibration = calibration.update([s for s, _ in loo])
            else:
                calibration = calibration.update([s for s, _ in loo], [d for _, d in loo])
        stages["calibration"] = clock.lap()
    info = {
        "backbone": ckpt.backbone,
        "backbone_fingerprint": ckpt.backbone_fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "support_size": shots,
        "support_views": int(features.shape[0]),
        "support_sha256": list(support_ids or []),
        "inner_steps": steps,
        "inner_positions": 0 if not steps else h * w if positions is None else len(positions),
        "checkpoint_sha256": ckpt.sha256,
        "loo_statistics": [s for s, _ in loo],
        "shift_covariate": covariate,
        "adapt_seconds": time.perf_counter() - start,
        "adapt_stage_seconds": stages,
    }
    return SiteModel(model, proto, calibration, target_fpr, ckpt.image_size, info, extractor, z_review)


class _SupportLayout:
    """Which original support image each fitted view comes from, and how a held-out original is scored.

    ``groups[v]``: the original image of fitted view ``v``; ``fit_inside`` (V, g, g) or None: the views'
    cells inside the region of interest; ``queries[i]`` (after ``bind``): the backbone features of original
    ``i`` as it is scored (its tiles, or the image itself), None when view ``i`` is original ``i`` itself.
    """

    def __init__(self, groups: Sequence[int], fit_index: Sequence[int] | None = None,
                 query_index: Sequence[Sequence[int]] | None = None, plans: Sequence[TilePlan | None] | None = None,
                 fit_masks: Sequence[np.ndarray | None] | None = None, query_masks: Sequence[np.ndarray | None] | None = None):
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
    def plain(cls, shots: int) -> "_SupportLayout":
        return cls(range(shots))

    def bind(self, features: Tensor) -> None:
        """Take the queries' features and the cells inside the region from all extracted ``features``."""
        rows, cols = features.shape[-2:]
        if self.query_index is not None:
            self.queries = [features[list(idx)] for idx in self.query_index]
        if self.fit_masks is not None and any(m is not None for m in self.fit_masks):
            self.fit_inside = torch.stack([RegionOfInterest.cells(m, rows, cols) for m in self.fit_masks]) \
                .to(features.device)
            self.query_inside = [None if m is None else (_cells(m, plan) if plan is not None
                                                         else RegionOfInterest.cells(m, rows, cols))
                                 for m, plan in zip(self.query_masks, self.plans)]

    def held_out_statistic(self, i: int, maha: Tensor, dim: int) -> float:
        """The statistic of original ``i`` from its Mahalanobis grids (its tiles, or the one image)."""
        plan = None if self.plans is None else self.plans[i]
        if plan is not None:
            maha = crop_grid(stitch(maha, plan), plan)[None]
        inside = None if self.query_inside is None else self.query_inside[i]
        return float(statistic(maha, dim, inside)[0])


def _support_views(images: Sequence[np.ndarray], size: int, stride: int, scoring: str, tile_overlap: float,
                   roi: RegionOfInterest | None, augment: str) -> tuple[list[np.ndarray], _SupportLayout]:
    """The crops to extract (views of the support images, or their tiles) and their layout.

    In tile mode, tiles mostly outside the region of interest are not fitted (a view keeps at least its
    tile with the most inside); the originals' tiles are all scored for the leave-one-out statistic."""
    crops: list[np.ndarray] = []
    groups, fit_index, fit_masks, query_index, query_masks, plans = [], [], [], [], [], []
    for i, image in enumerate(images):
        mask = None if roi is None else roi.mask(*image.shape[:2])
        views = augment_support([image], augment)
        mask_views = [None] * len(views) if mask is None else \
            [v[..., 0] > 0 for v in augment_support([mask[..., None].astype(np.uint8)], augment)]
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
            plan = plan_tiles(*view.shape[:2], size, stride, tile_overlap)
            tiles = split(view, plan)
            if view_mask is None:
                tile_masks = [None] * len(tiles)
                keep = list(range(len(tiles)))
            else:
                padded = np.zeros((plan.padded_height, plan.padded_width), dtype=bool)
                padded[: plan.height, : plan.width] = view_mask
                tile_masks = [padded[y : y + size, x : x + size] for y, x in plan.origins]
                fractions = np.array([m.mean() for m in tile_masks])
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
    layout = _SupportLayout(groups, fit_index, query_index, plans, fit_masks, query_masks)
    if scoring == "resize" and augment == "none" and roi is None:
        layout.query_index = None  # each view is its original: score it from the fitted embeddings
    return crops, layout


def _shift_covariate(distance, z: Tensor, dim: int, inside: Tensor | None) -> float:
    """``scoring.shift_covariate``, with the statistic taken over the views' cells inside the region."""
    if inside is None:
        return shift_covariate(distance, z, dim)
    h, w = z.shape[-2:]
    s = max(1, min(SHIFT_CELLS, h - 1, w - 1))
    padded = F.pad(z, (s, s, s, s), mode="reflect")
    views = [padded[..., s + dy : s + dy + h, s + dx : s + dx + w] for dy, dx in ((0, s), (0, -s), (s, 0), (-s, 0))]
    return float(torch.log(statistic(distance(torch.cat(views)), dim, inside.repeat(4, 1, 1))).mean())


def _adapt_settings(ckpt: MetaCheckpoint, target_fpr: float, steps: int | None,
                    inner_positions: int | None) -> tuple[int, int]:
    """Checked inner steps and inner positions, None taking the checkpoint's meta-training settings."""
    if not 0 < target_fpr < 1:
        raise ConfigError(f"--target-fpr must be between 0 and 1, got {target_fpr}")
    steps = int(ckpt.meta_config.get("inner_steps", 0)) if steps is None else int(steps)
    if not 0 <= steps <= 10:
        raise ConfigError(f"--steps must be between 0 and 10, got {steps}")
    if inner_positions is None:
        inner_positions = ckpt.meta_config.get("inner_positions", MetaConfig.inner_positions)
    if isinstance(inner_positions, bool) or not isinstance(inner_positions, int) or inner_positions < 0:
        raise ConfigError(f"inner_positions must be a non-negative integer, got {inner_positions!r}")
    return steps, inner_positions


class _StageClock:
    """Seconds since the previous lap, waiting for queued CUDA work so that it is counted in its stage."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def _copy_model(model: BayesianPatchModel) -> BayesianPatchModel:
    copy = BayesianPatchModel(model.in_channels, model.dim, window=model.window)
    copy.load_state_dict(model.state_dict())
    return copy.eval()
