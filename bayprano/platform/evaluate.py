"""Evaluation harness: every method on the same backbone, the same support sets and the same test images.

Protocol (honest by construction): leave one category out. For each evaluated category the
meta-learned methods are meta-trained on the other categories' ``train/good`` images only (or on
another root), the support set is K images drawn from the evaluated category's ``train/good`` with a
seed, and the test set is that category's whole ``test`` split. Support, meta-training and test pools
are checked to be disjoint by pixel hash on every run.

Methods: every method of the registry (``bayprano.platform.methods``), each fitted on the same support
features and scoring the same test features: ``bayes`` (meta-trained head and prior, NIW posterior,
Student-t scores, calibrated threshold), ``bayes-frozen`` (the same model at its initialisation: no
meta-learning), ``protomaml`` (meta-trained head with a deterministic Euclidean prototype), ``patchcore``
and ``padim`` (on the raw backbone features), and any method registered beside them. F1 and measured FPR are taken at each method's own threshold for the target false-positive
rate: the calibrated one for the Bayesian methods, the largest leave-one-out support score for the
others (which have no calibration; with one shot they have no threshold at all). The Bayesian
methods' records also carry what their threshold came from (``calibration``: the support's shift
covariate and leave-one-out statistics, the site's calibration, the statistics of the test normals),
and the output holds each fold's meta-learned normality prior, so a calibration rule can be checked
again without rerunning the protocol.

Image statistics (the post-processing menu, ``bayprano.platform.methods.postprocess``): every method's
ranking metrics use the statistic of the same menu (raw patch max, max of the upsampled map after a
sigma = 4 blur, mean of the top 1% of patch scores) that scored best for that method and K on
meta-validation tasks: the meta-training pool's categories other than the evaluated one, K of their
``train/good`` images as support, others as normal queries and the same images with synthetic anomalies
of the validation families (``VALIDATION_KINDS``, never injected in meta-training) as anomalous queries.
Each record carries the chosen ``statistic``, its ``validation_aurocs``, the test AUROC of every menu
entry (``statistic_aurocs``, the ablation) and of the method's own statistic (``own_image_auroc``); F1
and measured FPR stay at the method's own statistic and threshold (the one a site model uses). Without
another category to validate on, the method's own statistic is used and ``statistic`` says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bayprano.platform.data.augment import check_augmentation
from bayprano.platform.data.anomalies import TRAINING_KINDS, VALIDATION_KINDS, AnomalyInjector
from bayprano.platform.data.mvtec import list_categories
from bayprano.platform.errors import ConfigError
from bayprano.platform.evaluation_data import CategoryData, check_disjoint, load_category, pixel_hashes
from bayprano.platform.evaluation_runs import choose_statistics, evaluate_category
from bayprano.platform.evaluation_report import ablation, summarize
from bayprano.platform.fileio import atomic_write_json, jsonable
from bayprano.platform.meta.checkpoint import MetaCheckpoint, load_checkpoint
from bayprano.platform.meta.protomaml import (
    MetaConfig,
    TaskBank,
    build_task_bank,
    calibrate,
    calibrate_normality,
    feature_statistics,
    meta_train,
)
from bayprano.platform.methods import METHODS, MethodContext, get_method
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.names import DEFAULT_BACKBONE, default_image_size
from bayprano.platform.model.scoring import Calibration, NormalityPrior

VALIDATION_QUERIES = 6  # normal (and as many anomalous) queries per meta-validation category


def meta_validation_set(
    images: np.ndarray, extract: Callable[[np.ndarray], torch.Tensor], n_support: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One meta-validation category: support candidates (``n_support`` of its normal images), and queries
    (other normal images, then the same images with one anomaly of the validation families each), as
    features; returns (support features, query features, query labels)."""
    n_query = min(VALIDATION_QUERIES, len(images) - n_support)
    if n_query < 1:
        raise ConfigError(f"meta-validation needs more than {n_support} good images per category, got {len(images)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    support, normals = images[order[:n_support]], images[order[n_support : n_support + n_query]]
    injector = AnomalyInjector(VALIDATION_KINDS)
    anomalous = np.stack([injector(im, rng)[0] for im in normals])
    query = extract(np.concatenate([normals, anomalous]))
    return extract(support), query, np.array([0] * n_query + [1] * n_query)


def _frozen_checkpoint(
    extractor: PatchFeatureExtractor, banks: dict[str, TaskBank], image_size: int, dim: int
) -> MetaCheckpoint:
    mean, std = feature_statistics(banks)
    grid = next(iter(banks.values())).normals.shape[-2:]
    return frozen_checkpoint_from_statistics(extractor, mean, std, (grid[0], grid[1]), image_size, dim)


def frozen_checkpoint_from_statistics(
    extractor: PatchFeatureExtractor,
    mean: torch.Tensor,
    std: torch.Tensor,
    grid: tuple[int, int],
    image_size: int,
    dim: int,
) -> MetaCheckpoint:
    """The ``bayes-frozen`` control's checkpoint, not meta-trained: the initial head, feature standardisation
    by the per-channel ``mean`` and ``std``, the prior calibration for a ``grid`` of patch features and the
    uninformed normality prior."""
    model = BayesianPatchModel(extractor.out_channels, dim)
    model.set_feature_statistics(mean, std)
    h, w = grid
    prior = Calibration.from_prior(dim, h * w / model.window**2, strength=1.0)
    return MetaCheckpoint(
        model.eval(),
        extractor.name,
        extractor.fingerprint(),
        image_size,
        prior,
        meta_config={"inner_steps": 0},
        normality=NormalityPrior.uninformed(),
    )


def meta_train_checkpoint(
    extractor: PatchFeatureExtractor,
    banks: dict[str, TaskBank],
    cfg: MetaConfig,
    image_size: int,
    dim: int = 64,
    prototype: str = "niw",
    progress: Callable[[str], None] | None = None,
) -> MetaCheckpoint:
    model = BayesianPatchModel(extractor.out_channels, dim, prototype=prototype, seed=cfg.seed)
    model.set_feature_statistics(*feature_statistics(banks))
    label = f"meta-train {prototype} on {', '.join(sorted(banks))}"

    def report(row: dict) -> None:
        if progress:
            progress(
                f"[{label}] episode {row['episode']}/{cfg.episodes} loss {row['loss']:.3f} "
                f"(pixel {row['pixel_bce']:.3f}, image {row['image_bce']:.3f}, supcon {row['supcon']:.3f}) "
                f"{row['seconds']:.0f}s"
            )

    history = meta_train(model, banks, cfg, progress=report, log_every=max(1, cfg.episodes // 10))
    h, w = next(iter(banks.values())).normals.shape[-2:]
    cal = calibrate(model, banks, cfg) if prototype == "niw" else Calibration.from_prior(dim, h * w / 9, 1.0)
    normality = calibrate_normality(model, banks, cfg) if prototype == "niw" else None
    return MetaCheckpoint(
        model,
        extractor.name,
        extractor.fingerprint(),
        image_size,
        cal,
        meta_config=dict(cfg.__dict__),
        categories=sorted(banks),
        history=history,
        normality=normality,
    )


def _checked_request(data_root, categories, shots, seeds, methods, target_fpr) -> tuple[list[str], list[str]]:
    """The methods (default: every registered one) and categories (default: all) after checking the request."""
    methods = list(METHODS) if methods is None else list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r} (valid: {', '.join(METHODS)})")
    if not 0 < target_fpr < 1:
        raise ConfigError(f"--target-fpr must be between 0 and 1, got {target_fpr}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if any(k < 1 for k in shots):
        raise ConfigError(f"--shots must be at least 1, got {min(shots)}")
    available = list_categories(data_root)
    categories = list(categories or available)
    for c in categories:
        if c not in available:
            raise ConfigError(
                f"--categories: unknown category {c!r} in {data_root} (available: {', '.join(available)})"
            )
    return methods, categories


def run_evaluation(
    data_root: str | Path,
    output: str | Path,
    categories: Sequence[str] | None = None,
    shots: Sequence[int] = (5,),
    seeds: int = 3,
    methods: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    meta_train_root: str | Path | None = None,
    inner_steps: int = 1,
    target_fpr: float = 0.05,
    episodes: int = 200,
    image_size: int | None = None,
    backbone: str = DEFAULT_BACKBONE,
    dim: int = 64,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] = print,
    pool_categories: Sequence[str] | None = None,
    augments: Sequence[str] = ("none",),
) -> dict:
    """Run the protocol, write ``output`` (JSON) and its pictures beside it, return the results.

    ``methods``: names in the method registry (default: every registered method). ``pool_categories``
    restricts the meta-training pool to those categories of its root (default: all). ``augments``: the
    support augmentations (``data.augment``) every method is run under, each a row of the tables
    (``bayes+flips``); the image statistic is chosen once per method and K, without augmentation.
    """
    methods, categories = _checked_request(data_root, categories, shots, seeds, methods, target_fpr)
    augments = [check_augmentation(mode) for mode in dict.fromkeys(augments)]
    output = Path(output)
    t_start = time.perf_counter()
    extractor = build_backbone(backbone, device=device)
    ckpt = load_checkpoint(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.backbone_fingerprint != extractor.fingerprint():
        raise ConfigError(
            f"{checkpoint}: meta-trained on backbone {ckpt.backbone_fingerprint}, not {extractor.fingerprint()}"
        )
    side = ckpt.image_size if ckpt is not None else image_size or default_image_size(backbone)
    pool_root = Path(meta_train_root) if meta_train_root else Path(data_root)
    available_pool = list_categories(pool_root)
    for c in pool_categories or ():
        if c not in available_pool:
            raise ConfigError(f"meta-training pool: unknown category {c!r} in {pool_root}")
    pool_categories = list(pool_categories or available_pool)

    def extract(images: np.ndarray) -> torch.Tensor:
        return extractor.extract(images, size=side).cpu()

    progress(f"loading {len(categories)} categories at {side} px and extracting {extractor.name} features")
    data: dict[str, CategoryData] = {c: load_category(data_root, c, side) for c in categories}
    train_feats = {c: extract(d.train_images).to(torch.float16) for c, d in data.items()}
    test_feats, test_seconds = {}, {}
    for c, d in data.items():
        t0 = time.perf_counter()
        test_feats[c] = extract(d.test_images)
        test_seconds[c] = time.perf_counter() - t0

    kinds = {get_method(m).checkpoint for m in methods} - {None}
    need_banks = bool(kinds - {"niw"}) or ("niw" in kinds and ckpt is None)
    banks: dict[str, TaskBank] = {}
    injector = AnomalyInjector(TRAINING_KINDS)
    if need_banks:
        for c in pool_categories:
            pool_data = data[c] if pool_root == Path(data_root) and c in data else load_category(pool_root, c, side)
            banks[c] = build_task_bank(c, pool_data.train_images, pool_data.train_ids, extract, injector, seed=seed)
            progress(f"meta-training pool: {c} ({len(pool_data.train_images)} good images + synthetic anomalies)")

    validation_sets: dict[str, tuple] = {}
    for c in pool_categories:
        pool_images = (
            data[c].train_images
            if pool_root == Path(data_root) and c in data
            else load_category(pool_root, c, side).train_images
        )
        if len(pool_images) > max(shots):
            validation_sets[c] = meta_validation_set(pool_images, extract, max(shots), seed=seed + 1)
    progress(
        f"meta-validation of the image statistic on {len(validation_sets)} categories "
        f"({', '.join(VALIDATION_KINDS)} anomalies)"
    )

    meta_cfg = MetaConfig(shots=max(shots), inner_steps=inner_steps, episodes=episodes, seed=seed)
    trained: dict[tuple, MetaCheckpoint] = {}

    def fold_checkpoint(fold: dict, prototype: str) -> MetaCheckpoint:
        """Meta-trained once per (pool, prototype): categories outside the pool share one fold."""
        key = (tuple(sorted(fold)), prototype)
        if key not in trained:
            trained[key] = meta_train_checkpoint(extractor, fold, meta_cfg, side, dim, prototype, progress)
        return trained[key]

    def checkpoint_for(kind: str, category: str, fold: dict, pools: dict) -> MetaCheckpoint:
        if kind == "niw" and ckpt is not None:
            if category in ckpt.categories:
                raise ConfigError(
                    f"{checkpoint}: meta-trained on category {category!r}; evaluating it there would leak"
                )
            check_disjoint({"checkpoint's meta-training": set(ckpt.meta_config.get("pool_sha256", ())), **pools})
            return ckpt
        if kind == "frozen":
            return _frozen_checkpoint(extractor, fold, side, dim)
        return fold_checkpoint(fold, kind)

    records: list[dict] = []
    pictures: dict[str, list[str]] = {}
    priors: dict[str, dict] = {}
    for c in categories:
        d = data[c]
        fold = {k: v for k, v in banks.items() if k != c}
        if need_banks and not fold:
            raise ConfigError(f"category {c!r}: no other category to meta-train on (pass --meta-train-root)")
        pools = {"test": pixel_hashes(d.test_images), "support candidates": pixel_hashes(d.train_images)}
        if pool_root == Path(data_root):
            pools["meta-training"] = set().union(*(pixel_hashes(data[k].train_images) for k in fold if k in data))
        check_disjoint(pools)
        fold_checkpoints: dict[str, MetaCheckpoint] = {}

        def provide(kind: str, c=c, fold=fold, pools=pools) -> MetaCheckpoint:
            if kind not in fold_checkpoints:
                fold_checkpoints[kind] = checkpoint_for(kind, c, fold, pools)
            return fold_checkpoints[kind]

        if "niw" in kinds:
            normality = provide("niw").normality
            if normality is not None:
                priors[c] = normality.as_dict()
        context = MethodContext(inner_steps, target_fpr, provide, extractor)
        choices = choose_statistics(methods, context, {k: v for k, v in validation_sets.items() if k != c}, shots, side)
        pictures[c] = evaluate_category(
            d,
            methods,
            context,
            train_feats[c],
            test_feats[c],
            test_seconds[c],
            shots,
            seeds,
            side,
            target_fpr,
            pools["test"],
            output,
            records,
            progress,
            choices,
            augments,
            extract,
        )

    summary = summarize(records)
    result = {
        "protocol": "leave-one-category-out" if pool_root == Path(data_root) else f"meta-train on {pool_root}",
        "data_root": str(data_root),
        "backbone": extractor.fingerprint(),
        "image_size": side,
        "inner_steps": inner_steps,
        "augments": augments,
        "episodes": episodes if ckpt is None else None,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "records": records,
        "summary": summary,
        "ablation": ablation(records),
        "pictures": pictures,
        "normality_priors": priors,
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(output, jsonable(result))
    return result
