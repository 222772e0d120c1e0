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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_directory
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.meta.inner import adapt_head
from bayprano.platform.meta.outer import MetaConfig
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.niw import NIWPrototype, StudentT
from bayprano.platform.model.scoring import (
    Calibration,
    LogNormalCalibration,
    anomaly_map,
    calibration_from_dict,
    decide,
    image_statistic,
    relative_sd,
    shift_covariate,
)

ARTIFACT_FORMAT = 1
ARTIFACT_KIND = "bayprano-site-model"


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
    ):
        if not 0 < target_fpr < 1:
            raise ConfigError(f"target_fpr must be between 0 and 1, got {target_fpr}")
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
                         self._extractor, self.z_review)

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

    def results_from_mahalanobis(self, maha: Tensor, size: tuple[int, int] | None = None) -> list[ImageResult]:
        stat = image_statistic(maha, self.model.dim).cpu().numpy()
        p = self.calibration.p_value(stat, self.df)
        decisions, uncertainty = decide(stat, self.threshold, relative_sd(stat, self.model.dim, self.nu_n, self.kappa_n),
                                        self.z_review)
        maps = None
        map_threshold = None
        if size is not None:
            maps = _to_host(anomaly_map(self.patch_scores(maha), size).float()).numpy()
            map_threshold = float(self.patch_scores(torch.tensor(self.threshold * self.model.dim)))
        return [
            ImageResult(float(stat[i]), float(p[i]), self.threshold, decisions[i], float(uncertainty[i]),
                        None if maps is None else maps[i], map_threshold)
            for i in range(len(stat))
        ]

    def score(self, images: np.ndarray | Sequence[np.ndarray], maps: bool = True, batch_size: int = 16) -> list[ImageResult]:
        """Score uint8 RGB images (any size; resized to the model's image size)."""
        features = self.extractor.extract(images, size=self.image_size, batch_size=batch_size)
        maha = self.mahalanobis(features)
        return self.results_from_mahalanobis(maha, (self.image_size, self.image_size) if maps else None)

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
            "model_sha256": hashlib.sha256(data).hexdigest(),
        }
        with atomic_directory(out) as staging:
            (staging / "model.pt").write_bytes(data)
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
            return cls(model, prototype, calibration_from_dict(meta["calibration"]), meta["target_fpr"],
                       meta["image_size"], info, extractor, meta.get("z_review", 1.0))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise DataError(f"{path}: artifact is incomplete or inconsistent ({exc.__class__.__name__}: {exc})") from None


_INFO_KEYS = ("backbone", "backbone_fingerprint", "created", "support_size", "support_sha256", "inner_steps",
              "checkpoint_sha256", "loo_statistics", "shift_covariate", "version", "model_sha256", "adapt_seconds",
              "adapt_stage_seconds", "inner_positions")

INNER_POSITIONS_SEED = 0


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
) -> SiteModel:
    """Adapt a meta-checkpoint to a site's K good images (uint8 RGB arrays) and calibrate it.

    ``inner_positions``: how many patch positions (drawn once, with a fixed seed, so adaptation is
    deterministic) the inner loop's leave-one-out loss is evaluated on; None takes the checkpoint's
    meta-training setting, 0 uses every position.
    """
    start = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, MetaCheckpoint) else load_checkpoint(checkpoint)
    if len(support_images) < 1:
        raise ConfigError("adaptation needs at least one good support image")
    _adapt_settings(ckpt, target_fpr, steps, inner_positions)
    extractor = extractor or build_backbone(ckpt.backbone)
    if extractor.fingerprint() != ckpt.backbone_fingerprint:
        raise ConfigError(
            f"checkpoint was meta-trained on backbone {ckpt.backbone_fingerprint}, not {extractor.fingerprint()}"
        )
    clock = _StageClock(extractor.device)
    features = extractor.extract(list(support_images), size=ckpt.image_size)
    features_seconds = clock.lap()
    site = adapt_features(ckpt, features, steps, target_fpr, z_review, calibration_strength, inner_positions,
                          support_ids=[_image_hash(im) for im in support_images], extractor=extractor)
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
) -> SiteModel:
    """``adapt`` on the support's backbone features (K, C, h, w), already extracted at the checkpoint's
    image size; ``support_ids`` are recorded as the support's hashes."""
    start = time.perf_counter()
    ckpt = checkpoint
    if features.shape[0] < 1:
        raise ConfigError("adaptation needs at least one good support image")
    steps, inner_positions = _adapt_settings(ckpt, target_fpr, steps, inner_positions)
    stages, clock = {}, _StageClock(features.device)
    shots = features.shape[0]
    model = _copy_model(ckpt.model).to(features.device)
    h, w = features.shape[-2:]
    positions = None
    if steps and inner_positions and inner_positions < h * w:
        gen = torch.Generator().manual_seed(INNER_POSITIONS_SEED)
        positions = torch.randperm(h * w, generator=gen)[:inner_positions].to(features.device)
    adapted = adapt_head(model, features, steps, positions)
    proto, z = adapted.prototype, adapted.support_embeddings
    with torch.no_grad():
        model.head.weight.copy_(adapted.params["weight"])
        model.head.bias.copy_(adapted.params["bias"])
    stages["inner_loop"] = clock.lap()
    with torch.no_grad():
        covariate = shift_covariate(proto.distance, z, model.dim)
        if ckpt.normality is not None:
            # The covariate-conditioned prior where the support has no leave-one-out statistic; with them, the
            # plain prior, which defers more to the site's own evidence (measured in the README's table).
            calibration = ckpt.normality.for_shots(shots, covariate if shots < 2 else None)
        else:
            calibration = Calibration.from_prior(model.dim, ckpt.calibration.effective_patches, calibration_strength)
        loo = []
        if shots >= 2:
            for i in range(shots):
                rest = model.prototype(torch.cat([z[:i], z[i + 1 :]]))
                stat = float(image_statistic(rest.distance(z[i : i + 1]), model.dim)[0])
                loo.append((stat, rest.df))
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
