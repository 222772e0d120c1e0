"""Centralised meta-training: one process, one MVTec-layout root, a meta-checkpoint at the end.

``train_centralised(cfg)`` reads only ``<root>/<category>/train/good`` of the selected categories (a
category's test split is never listed or opened), turns each category into a task bank of backbone
features of its normals and of synthetic anomalies made from them, meta-trains the head and prior with
Proto-MAML, calibrates the effective patch count and writes the checkpoint atomically. The checkpoint
records the categories it saw and the pixel hashes of its training pool, so that an evaluation can prove
that none of its support or test images were seen in training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bayprano.config import TrainConfig
from bayprano.platform.data.anomalies import TRAINING_KINDS, AnomalyInjector
from bayprano.platform.data.imageio import is_image_file, load_image
from bayprano.platform.data.mvtec import GOOD, list_categories
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.data.imageio import resize_square
from bayprano.platform.evaluation_data import pixel_hashes
from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.meta.protomaml import (
    MetaConfig,
    TaskBank,
    build_task_bank,
    calibrate,
    calibrate_normality,
    feature_statistics,
    meta_train,
)
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel


@dataclass
class TrainingPool:
    """The images meta-training may use: each selected category's train/good, resized, with their paths."""

    images: dict[str, np.ndarray]  # category -> (N, S, S, 3) uint8
    paths: dict[str, list[str]]

    def hashes(self) -> set[str]:
        return set().union(*(pixel_hashes(im) for im in self.images.values()))


def meta_config(cfg: TrainConfig) -> MetaConfig:
    return MetaConfig.from_settings(cfg, episodes=cfg.episodes).validate()


def select_categories(cfg: TrainConfig) -> list[str]:
    available = list_categories(cfg.data_root)
    for option, names in (("--categories", cfg.categories or []), ("--exclude", cfg.exclude)):
        for name in names:
            if name not in available:
                raise ConfigError(
                    f"{option}: unknown category {name!r} in {cfg.data_root} (available: {', '.join(available)})"
                )
    chosen = [c for c in dict.fromkeys(cfg.categories or available) if c not in cfg.exclude]
    if not chosen:
        raise ConfigError(f"no category left to train on in {cfg.data_root} after --exclude {','.join(cfg.exclude)}")
    return chosen


def train_good_files(root: Path, category: str) -> list[Path]:
    """The image files of ``<root>/<category>/train/good``, sorted; nothing else of the category is listed."""
    folder = Path(root) / category / "train" / GOOD
    if not folder.is_dir():
        raise DataError(f"{folder}: missing folder (every category needs train/good/)")
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name.lower() in ("thumbs.db", "desktop.ini"):
            continue
        if p.is_dir() or not is_image_file(p):
            raise DataError(f"{p}: not an image file (expected .png, .jpg, .jpeg or .bmp)")
        files.append(p)
    if not files:
        raise DataError(f"{folder}: empty category, no normal training images")
    return files


def load_pool(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainingPool:
    """Check that every selected category has enough good images for an episode, then load them."""
    need = cfg.shots + max(cfg.n_query_normal, cfg.n_query_anomalous)
    files = {c: train_good_files(cfg.data_root, c) for c in select_categories(cfg)}
    for c, paths in files.items():
        if len(paths) < need:
            raise ConfigError(
                f"category {c!r} has {len(paths)} train/good images; an episode needs {need} "
                f"(--shots {cfg.shots} + {max(cfg.n_query_normal, cfg.n_query_anomalous)} query images)"
            )
    images, names = {}, {}
    for c, paths in files.items():
        images[c] = np.stack([resize_square(load_image(p), cfg.image_size) for p in paths])
        names[c] = [str(p) for p in paths]
        if progress:
            progress(f"loaded {c}: {len(paths)} train/good images at {cfg.image_size} px")
    return TrainingPool(images, names)


def build_banks(
    cfg: TrainConfig,
    pool: TrainingPool,
    extractor: PatchFeatureExtractor,
    progress: Callable[[str], None] | None = None,
) -> dict[str, TaskBank]:
    """One task bank per category: backbone features of its normals and of synthetic anomalies of them."""
    injector = AnomalyInjector(TRAINING_KINDS)

    def extract(images: np.ndarray) -> torch.Tensor:
        return extractor.extract(images, size=cfg.image_size).cpu()

    banks = {}
    for c in pool.images:
        t0 = time.perf_counter()
        banks[c] = build_task_bank(c, pool.images[c], pool.paths[c], extract, injector, seed=cfg.seed)
        if progress:
            progress(
                f"task bank {c}: {len(banks[c])} normals + {banks[c].anomalies.shape[0]} synthetic anomalies "
                f"({time.perf_counter() - t0:.1f}s)"
            )
    return banks


def train_centralised(cfg: TrainConfig, progress: Callable[[str], None] | None = None) -> MetaCheckpoint:
    """Meta-train on ``cfg.data_root``'s train/good images, calibrate, save to ``cfg.out``; returns the checkpoint."""
    start = time.perf_counter()
    if Path(cfg.out).is_dir():
        raise ConfigError(f"--out {cfg.out}: is a folder; name the checkpoint file to write")
    mcfg = meta_config(cfg)
    pool = load_pool(cfg, progress)
    extractor = build_backbone(cfg.backbone, device=cfg.device)
    if cfg.dim > extractor.out_channels:
        raise ConfigError(
            f"--dim {cfg.dim}: must be at most the backbone's {extractor.out_channels} channels ({extractor.name})"
        )
    banks = build_banks(cfg, pool, extractor, progress)

    model = BayesianPatchModel(extractor.out_channels, cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
    model.set_feature_statistics(*feature_statistics(banks))
    log_every = cfg.log_every or max(1, cfg.episodes // 10)

    def report(row: dict) -> None:
        if progress:
            progress(
                f"episode {row['episode']}/{cfg.episodes} loss {row['loss']:.3f} (pixel {row['pixel_bce']:.3f}, "
                f"image {row['image_bce']:.3f}, supcon {row['supcon']:.3f}) {row['seconds']:.1f}s"
            )

    history = meta_train(model, banks, mcfg, progress=report, log_every=log_every)
    calibration = calibrate(model, banks, mcfg)
    normality = calibrate_normality(model, banks, mcfg)
    if progress:
        levels = ", ".join(f"K={k}: {e['mean']:.2f}" for k, e in sorted(normality.table.items()))
        rules = ", ".join(
            f"K={k}: {'covariate' if r['use_covariate'] else 'plain'} prior, strength {r['strength']:g}, "
            f"{r['within']} spread{', shifted leave-one-out' if r['loo_shift'] else ''}"
            for k, r in ((k, normality.rule(k)) for k in sorted(normality.table))
        )
        progress(
            f"calibrated: effective patch count {calibration.effective_patches:.1f}; "
            f"normal log-statistic per support size {levels}; threshold rule (leave-one-category-out) {rules}"
        )
    settings = dict(mcfg.__dict__)
    settings.update(
        data_root=str(cfg.data_root),
        pool_size=sum(len(p) for p in pool.paths.values()),
        pool_sha256=sorted(pool.hashes()),
        seconds=time.perf_counter() - start,
    )
    ckpt = MetaCheckpoint(
        model.eval(),
        extractor.name,
        extractor.fingerprint(),
        cfg.image_size,
        calibration,
        meta_config=settings,
        categories=sorted(banks),
        history=history,
        normality=normality,
    )
    ckpt.save(cfg.out)
    return ckpt
