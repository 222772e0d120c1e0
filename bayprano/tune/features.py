"""The backbone-feature cache that every trial of a sweep shares, one per feature-changing setting."""

from __future__ import annotations

import io
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bayprano.platform.model.names import DEFAULT_BACKBONE, default_image_size
from bayprano.sweep_config import SweepConfig
from bayprano.platform.fileio import atomic_write_bytes
from bayprano.tune.spec import FEATURE_SETTINGS


def feature_key(settings: Mapping[str, Any]) -> str:
    backbone = settings.get("backbone", DEFAULT_BACKBONE)
    return f"{backbone}-{int(settings.get('image_size') or default_image_size(backbone))}px"


def _feature_variants(spec: SweepConfig) -> list[dict[str, Any]]:
    from bayprano.config import TrainConfig

    fields = TrainConfig.model_fields
    options = []
    for name in FEATURE_SETTINGS:
        if name in spec.search_space:
            options.append(list(spec.search_space[name].values))
        elif name == "image_size":
            options.append([spec.fixed.get(name)])  # None: the backbone's own side
        else:
            options.append([spec.fixed.get(name, fields[name].default)])
    variants = [dict(zip(FEATURE_SETTINGS, combo)) for combo in itertools.product(*options)]
    return [{**v, "image_size": v["image_size"] or default_image_size(v["backbone"])} for v in variants]


def build_feature_cache(
    spec: SweepConfig, root: Path, categories: dict[str, list[str]], folder: Path, log: Callable[[str], None]
) -> dict[str, str]:
    """One file per feature variant: training task banks (central trials) and the validation categories'
    images, features and labels. An existing file is reused (a resumed sweep)."""
    import torch

    from bayprano.platform.data.anomalies import TRAINING_KINDS, AnomalyInjector
    from bayprano.platform.evaluation_data import load_category
    from bayprano.platform.meta.protomaml import build_task_bank
    from bayprano.platform.model.backbone import build_backbone

    seed = int(spec.fixed.get("seed", 0))
    device = str(spec.fixed.get("device", "cpu"))
    files = {}
    for variant in _feature_variants(spec):
        key = feature_key(variant)
        path = folder / f"{key}.pt"
        files[key] = str(path)
        if path.is_file():
            continue
        t0 = time.perf_counter()
        size = int(variant["image_size"])
        extractor = build_backbone(variant["backbone"], device=device)

        def extract(images: np.ndarray):
            return extractor.extract(images, size=size).cpu()

        payload: dict[str, Any] = {
            "backbone": extractor.name,
            "fingerprint": extractor.fingerprint(),
            "image_size": size,
            "in_channels": extractor.out_channels,
            "banks": {},
            "validation": {},
        }
        if spec.trainer == "central":
            injector = AnomalyInjector(TRAINING_KINDS)
            for c in categories["train"]:
                images, ids = train_good(root, c, size)
                bank = build_task_bank(c, images, ids, extract, injector, seed=seed)
                payload["banks"][c] = {
                    "normals": bank.normals,
                    "normal_ids": bank.normal_ids,
                    "anomalies": bank.anomalies,
                    "anomaly_masks": bank.anomaly_masks,
                    "anomaly_sources": bank.anomaly_sources,
                }
        for c in categories["validation"]:
            d = load_category(root, c, size)
            payload["validation"][c] = {
                "train_features": extract(d.train_images).half(),
                "test_features": extract(d.test_images).half(),
                "test_labels": torch.from_numpy(d.test_labels),
            }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())
        log(
            f"features {key}: {len(payload['banks'])} training and {len(payload['validation'])} validation "
            f"categories in {time.perf_counter() - t0:.1f}s"
        )
    return files


def train_good(root: Path, category: str, size: int) -> tuple[np.ndarray, list[str]]:
    """A training category's train/good images at ``size`` px (its test split is never opened)."""
    from bayprano.platform.data.imageio import load_image
    from bayprano.platform.data.imageio import resize_square
    from bayprano.platform.train import train_good_files

    files = train_good_files(root, category)
    return np.stack([resize_square(load_image(p), size) for p in files]), [str(p) for p in files]


def load_cache(path: str):
    import torch

    from bayprano.platform.meta.protomaml import TaskBank

    payload = torch.load(path, map_location="cpu", weights_only=True)
    banks = {
        c: TaskBank(c, b["normals"], list(b["normal_ids"]), b["anomalies"], b["anomaly_masks"], b["anomaly_sources"])
        for c, b in payload["banks"].items()
    }
    return payload, banks
