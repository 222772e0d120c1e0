"""Adaptation of a meta-checkpoint to a site's K good images: the inner loop on the head, the NIW
posterior fit on every support view, and the calibration of the decision threshold by leave-one-out on
the support (see ``site`` for the whole story). Returns a :class:`~site_model.SiteModel`."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.data.augment import check_augmentation
from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.meta.inner import adapt_head, site_positions
from bayprano.platform.meta.outer import MetaConfig
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel, Prototype
from bayprano.platform.model.extractor import PatchFeatureExtractor
from bayprano.platform.model.niw import NIWPrototype
from bayprano.platform.model.scoring import Calibration, LogNormalCalibration, shift_covariate
from bayprano.platform.model.site_model import SiteModel
from bayprano.platform.model.site_support import INNER_VIEWS, SupportLayout, inner_views, support_views
from bayprano.platform.model.tiling import DEFAULT_SCORING, DEFAULT_TILE_OVERLAP, RegionOfInterest, check_scoring


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
    see the docstring of ``bayprano.platform.model.site``.
    """
    start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, MetaCheckpoint) else load_checkpoint(checkpoint)
    if len(support_images) < 1:
        raise ConfigError("adaptation needs at least one good support image")
    _adapt_settings(ckpt, target_fpr, steps, inner_positions)
    check_scoring(scoring, tile_overlap)
    check_augmentation(augment)
    extractor = extractor or build_backbone(ckpt.backbone)
    if extractor.fingerprint() != ckpt.backbone_fingerprint:
        raise ConfigError(
            f"checkpoint was meta-trained on backbone {ckpt.backbone_fingerprint}, not {extractor.fingerprint()}"
        )
    clock = _StageClock(extractor.device)
    crops, layout = support_views(
        list(support_images), ckpt.image_size, extractor.stride, scoring, tile_overlap, roi, augment
    )
    features = extractor.extract(crops, size=ckpt.image_size)
    features_seconds = clock.lap()
    layout.bind(features)
    site = adapt_features(
        ckpt,
        features[layout.fit_index],
        steps,
        target_fpr,
        z_review,
        calibration_strength,
        inner_positions,
        support_ids=[_image_hash(im) for im in support_images],
        extractor=extractor,
        layout=layout,
    )
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
    layout: "SupportLayout | None" = None,
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
    layout = layout or SupportLayout.plain(features.shape[0])
    if len(layout.groups) != features.shape[0]:
        raise ConfigError(f"support layout has {len(layout.groups)} views, the features {features.shape[0]}")
    shots = layout.originals
    model = _copy_model(ckpt.model).to(features.device)
    h, w = features.shape[-2:]
    positions = site_positions(h, w, steps, inner_positions, features.device)
    inner = inner_views(layout.groups, max(INNER_VIEWS, shots))
    adapted = adapt_head(model, features if inner is None else features[inner], steps, positions)
    proto, z = _niw(adapted.prototype, model), adapted.support_embeddings
    with torch.no_grad():
        model.head.weight.copy_(adapted.params["weight"])
        model.head_bias.copy_(adapted.params["bias"])
        if inner is not None:  # the posterior is fitted on every view
            z = model.embed(features)
            proto = _niw(model.prototype(z), model)
    stages["inner_loop"] = clock.lap()
    with torch.no_grad():
        covariate = shift_covariate(proto.distance, z, model.dim, inside=layout.fit_inside)
        loo = [(s, _niw(rest, model).df) for s, rest in layout.leave_one_out(model, z)] if shots >= 2 else []
        calibration: Calibration | LogNormalCalibration
        if ckpt.normality is not None:
            calibration = ckpt.normality.site_calibration(shots, covariate, [s for s, _ in loo])
        else:
            calibration = Calibration.from_prior(model.dim, ckpt.calibration.effective_patches, calibration_strength)
            if loo:
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
        "calibration_rule": None if ckpt.normality is None else ckpt.normality.rule(shots),
        "adapt_seconds": time.perf_counter() - start,
        "adapt_stage_seconds": stages,
    }
    return SiteModel(model, proto, calibration, target_fpr, ckpt.image_size, info, extractor, z_review)


def _adapt_settings(
    ckpt: MetaCheckpoint, target_fpr: float, steps: int | None, inner_positions: int | None
) -> tuple[int, int]:
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


def _niw(prototype: Prototype, model: BayesianPatchModel) -> NIWPrototype:
    """``prototype`` as the Bayesian (NIW) prototype that a site model's calibration and artifact need."""
    if not isinstance(prototype, NIWPrototype):
        raise ConfigError(f"a site model needs a checkpoint with the NIW prototype, not {model.prototype_kind!r}")
    return prototype
