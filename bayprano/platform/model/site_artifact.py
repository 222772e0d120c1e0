"""A site model's artifact folder: ``model.pt`` (tensors only, read with ``weights_only=True``),
``meta.json`` (settings, calibration, hashes) and, for a mask region of interest, ``roi.png``. Written
atomically and checked on load, so that a corrupt or foreign artifact is refused with an error naming
the file (see ``site`` for what the folder holds)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_directory, check_kind_and_format
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.extractor import PatchFeatureExtractor
from bayprano.platform.model.niw import NIWPrototype, StudentT
from bayprano.platform.model.scoring import calibration_from_dict
from bayprano.platform.model.tiling import DEFAULT_SCORING, DEFAULT_TILE_OVERLAP, RegionOfInterest

if TYPE_CHECKING:
    from bayprano.platform.model.site_model import SiteModel

ARTIFACT_FORMAT = 1
ARTIFACT_KIND = "bayprano-site-model"
ROI_MASK_FILE = "roi.png"

_INFO_KEYS = (
    "backbone",
    "backbone_fingerprint",
    "created",
    "support_size",
    "support_sha256",
    "inner_steps",
    "checkpoint_sha256",
    "loo_statistics",
    "shift_covariate",
    "calibration_rule",
    "version",
    "model_sha256",
    "adapt_seconds",
    "adapt_stage_seconds",
    "inner_positions",
    "augment",
    "support_views",
)


def _tensors(site: SiteModel) -> dict:
    return {
        "head_weight": site.model.head.weight.detach().cpu(),
        "head_bias": site.model.head_bias.detach().cpu(),
        "feature_mean": site.model.feature_mean.cpu(),
        "feature_std": site.model.feature_std.cpu(),
        "loc": site.predictive.loc.detach().cpu(),
        "scale_tril": site.predictive.scale_tril.detach().cpu(),
        "df": site.predictive.df.detach().cpu(),
    }


def save_site_model(site: SiteModel, out: str | os.PathLike) -> Path:
    """Write the artifact folder atomically (a temp folder renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(_tensors(site), buf)
    data = buf.getvalue()
    meta = {
        "kind": ARTIFACT_KIND,
        "format": ARTIFACT_FORMAT,
        **site.info,
        "image_size": site.image_size,
        "grid": list(site.grid),
        "dim": site.model.dim,
        "in_channels": site.model.in_channels,
        "window": site.model.window,
        "nu_n": site.nu_n,
        "kappa_n": site.kappa_n,
        "df": site.df,
        "calibration": site.calibration.as_dict(),
        "target_fpr": site.target_fpr,
        "threshold": site.threshold,
        "z_review": site.z_review,
        "scoring": site.scoring,
        "tile_overlap": site.tile_overlap,
        "model_sha256": hashlib.sha256(data).hexdigest(),
    }
    roi_png = None
    if site.roi is not None and site.roi.rect is not None:
        meta["roi"] = {"rectangle": list(site.roi.rect)}
    elif site.roi is not None:
        from bayprano.platform.data.imageio import encode_png

        roi_png = encode_png(site.roi.mask(*site.roi.describe()["mask_shape"]))
        meta["roi"] = {"mask": ROI_MASK_FILE, "mask_sha256": hashlib.sha256(roi_png).hexdigest()}
    with atomic_directory(out) as staging:
        (staging / "model.pt").write_bytes(data)
        if roi_png is not None:
            (staging / ROI_MASK_FILE).write_bytes(roi_png)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    site.info["model_sha256"] = meta["model_sha256"]
    return out


def load_site_model(
    cls: type[SiteModel], path: str | os.PathLike, extractor: PatchFeatureExtractor | None = None
) -> SiteModel:
    """The model saved in the folder ``path``, built as ``cls``; refused with a DataError naming the file."""
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
    check_kind_and_format(meta, meta_path, ARTIFACT_KIND, "a bayprano site model", ARTIFACT_FORMAT, "artifact")
    data = model_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("model_sha256"):
        raise DataError(f"{model_path}: corrupt artifact (sha256 does not match meta.json)")
    try:
        t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model = BayesianPatchModel(meta["in_channels"], meta["dim"], window=meta["window"])
        with torch.no_grad():
            model.head.weight.copy_(t["head_weight"])
            model.head_bias.copy_(t["head_bias"])
        model.set_feature_statistics(t["feature_mean"], t["feature_std"])
        prototype = NIWPrototype.from_predictive(
            StudentT(t["loc"], t["scale_tril"], t["df"]),
            meta["nu_n"],
            meta["kappa_n"],
            (meta["dim"], *meta["grid"]),
            meta.get("support_size"),
        )
        info = {k: meta[k] for k in _INFO_KEYS if k in meta}
        if extractor is not None and extractor.fingerprint() != meta["backbone_fingerprint"]:
            raise DataError(
                f"{path}: model was adapted on backbone {meta['backbone_fingerprint']}, not {extractor.fingerprint()}"
            )
        roi = _load_roi(path, meta.get("roi"))
        return cls(
            model,
            prototype,
            calibration_from_dict(meta["calibration"]),
            meta["target_fpr"],
            meta["image_size"],
            info,
            extractor,
            meta.get("z_review", 1.0),
            meta.get("scoring", DEFAULT_SCORING),
            meta.get("tile_overlap", DEFAULT_TILE_OVERLAP),
            roi,
        )
    except ConfigError as exc:
        raise DataError(f"{meta_path}: {exc}") from None
    except (KeyError, TypeError, RuntimeError) as exc:
        raise DataError(f"{path}: artifact is incomplete or inconsistent ({exc.__class__.__name__}: {exc})") from None


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
