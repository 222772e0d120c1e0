"""One evaluated category: every method fitted on every support draw and scored on the test set, one record
per (method, K, seed), the image statistic each method uses (chosen on meta-validation), and the pictures
(heatmap overlays and ROC curves) written beside the results."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bayprano.platform.evaluation_data import CategoryData, check_disjoint, pixel_hashes, support_indices
from bayprano.platform.figures import new_figure, save_figure
from bayprano.platform.data.augment import augment_support
from bayprano.platform.errors import ConfigError
from bayprano.platform.methods import Method, MethodContext, get_method
from bayprano.platform.methods.base import fit_on
from bayprano.platform.methods.postprocess import all_statistics, choose_statistic
from bayprano.platform.metrics import (
    decision_rates,
    f1_at_threshold,
    fpr_at_threshold,
    image_auroc,
    pixel_metrics,
    plot_roc,
    roc_curve,
)
from bayprano.platform.model.anomaly_map import anomaly_map

RECORD_KEYS = (
    "category",
    "method",
    "augment",
    "shots",
    "seed",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1",
    "target_fpr",
    "measured_fpr",
    "decision_rates",
    "adapt_seconds",
    "score_images_per_second",
    "statistic",
    "own_image_auroc",
    "statistic_aurocs",
    "validation_aurocs",
    "calibration",
)
OWN_STATISTIC = "own (no meta-validation category)"


def choose_statistics(
    methods: list[str], context: MethodContext, validation_sets: dict[str, tuple], shots: Sequence[int], image_size: int
) -> dict[tuple[str, int], tuple[str, dict]]:
    """{(method, K): (statistic, its meta-validation AUROCs)} on the given meta-validation categories."""
    choices: dict[tuple[str, int], tuple[str, dict]] = {}
    for method in methods:
        spec = get_method(method)
        for k in shots:
            if not validation_sets:
                choices[(method, k)] = (OWN_STATISTIC, {})
                continue
            tasks = [(sup[:k].float(), query.float(), labels) for sup, query, labels in validation_sets.values()]
            choices[(method, k)] = choose_statistic(
                tasks, lambda s, q: spec.build(context).fit(s).score(q).patches, image_size
            )
    return choices


def variant(record: dict) -> str:
    """A record's method with its support augmentation: ``bayes``, ``bayes+flips``."""
    augment = record.get("augment") or "none"
    return record["method"] if augment == "none" else f"{record['method']}+{augment}"


def augmented_support(
    images: np.ndarray,
    idx: np.ndarray,
    mode: str,
    extract: Callable[[np.ndarray], torch.Tensor],
    cache: dict[tuple[int, str], torch.Tensor],
) -> tuple[torch.Tensor, list[int]]:
    """The features of every view of the support ``images[idx]`` under augmentation ``mode`` and each view's
    original (its first view the image itself); an image's views are extracted once, into ``cache``, for
    every support draw it is in."""
    feats: list[torch.Tensor] = []
    groups: list[int] = []
    for i, j in enumerate(idx.tolist()):
        if (j, mode) not in cache:
            cache[(j, mode)] = extract(np.stack(augment_support([images[j]], mode))).float()
        feats.append(cache[(j, mode)])
        groups += [i] * feats[-1].shape[0]
    return torch.cat(feats), groups


def evaluate_category(
    d: CategoryData,
    methods: list[str],
    context: MethodContext,
    train_feats: torch.Tensor,
    test_feats: torch.Tensor,
    test_seconds: float,
    shots: Sequence[int],
    seeds: int,
    image_size: int,
    target_fpr: float,
    test_pool: set[str],
    output: Path,
    records: list[dict],
    progress: Callable[[str], None],
    choices: dict | None = None,
    augments: Sequence[str] = ("none",),
    extract: Callable[[np.ndarray], torch.Tensor] | None = None,
) -> list[str]:
    """Every method on every support draw of one category, under each support augmentation of ``augments``
    (every method gets the same views; ``extract`` gives their features): records appended to ``records``;
    returns the pictures written (the first method's overlays and every method's ROC, at the largest K,
    first draw, first augmentation)."""
    c = d.name
    pictures: list[str] = []
    curves: dict[str, tuple] = {}
    views: dict[tuple[int, str], torch.Tensor] = {}
    for k in shots:
        for s in range(seeds):
            idx = support_indices(len(d.train_images), k, s, c)
            check_disjoint({"support": pixel_hashes(d.train_images[idx]), "test": test_pool})
            for augment in augments:
                if augment == "none":
                    support, groups = train_feats[idx].float(), None
                elif extract is None:
                    raise ConfigError(f"support augmentation {augment!r} needs the backbone (extract)")
                else:
                    support, groups = augmented_support(d.train_images, idx, augment, extract, views)
                for method in methods:
                    statistic, validation = (choices or {}).get((method, k), (OWN_STATISTIC, {}))
                    rec, maps, scores = _run_method(
                        get_method(method).build(context),
                        support,
                        test_feats,
                        test_seconds,
                        d,
                        image_size,
                        target_fpr,
                        statistic,
                        groups,
                    )
                    rec.update(
                        category=c,
                        method=method,
                        augment=augment,
                        shots=k,
                        seed=s,
                        target_fpr=target_fpr,
                        statistic=statistic,
                        validation_aurocs=validation,
                    )
                    records.append({key: rec.get(key) for key in RECORD_KEYS})
                    progress(_record_line(records[-1]))
                    if s == 0 and k == max(shots) and augment == augments[0]:
                        curves[method] = roc_curve(d.test_labels, scores)
                        if method == methods[0]:
                            pictures.append(str(_write_overlays(output, c, method, d, maps, scores)))
    if curves:
        pictures.append(
            str(plot_roc(curves, output.with_name(f"{output.stem}_roc_{c}.png"), f"{c}: image ROC, K={max(shots)}"))
        )
    return pictures


def _run_method(
    method: Method,
    support_feats: torch.Tensor,
    test_feats: torch.Tensor,
    test_seconds: float,
    d: CategoryData,
    image_size: int,
    target_fpr: float,
    statistic: str = OWN_STATISTIC,
    groups: Sequence[int] | None = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Fit one method on the support's features, score the test set: its record, maps and the image scores
    of ``statistic`` (a menu entry, or the method's own).

    Feature extraction is timed once per test set; its share for the support is counted in the adaptation
    time and the whole of it in the scoring time of every method alike.
    """
    n_test = len(d.test_images)
    t0 = time.perf_counter()
    fit_on(method, support_feats, groups)
    threshold = method.threshold(target_fpr)
    adapt_seconds = time.perf_counter() - t0 + test_seconds * support_feats.shape[0] / n_test
    t1 = time.perf_counter()
    out = method.score(test_feats)
    scores = np.asarray(out.image)
    maps = anomaly_map(out.patches.float(), (image_size, image_size)).cpu().numpy()
    score_seconds = time.perf_counter() - t1 + test_seconds
    calibration = method.calibration_info()
    if calibration is not None:
        calibration = {**calibration, "normal_statistics": scores[d.test_labels == 0].tolist()}
    pix = pixel_metrics(d.test_masks, maps) if d.has_pixel_masks else {"pixel_auroc": None, "aupro": None}
    finite = threshold is not None and math.isfinite(threshold)
    decisions = method.decisions(scores, threshold) if finite else None
    menu = all_statistics(out.patches, (image_size, image_size))
    statistic_aurocs = {name: image_auroc(d.test_labels, s) for name, s in menu.items()}
    own_auroc = image_auroc(d.test_labels, scores)
    ranked = menu.get(statistic, scores)
    rec = {
        "image_auroc": statistic_aurocs.get(statistic, own_auroc),
        "own_image_auroc": own_auroc,
        "statistic_aurocs": statistic_aurocs,
        "pixel_auroc": pix["pixel_auroc"],
        "aupro": pix["aupro"],
        "f1": f1_at_threshold(d.test_labels, scores, threshold) if finite else None,
        "measured_fpr": fpr_at_threshold(d.test_labels, scores, threshold) if finite else None,
        "decision_rates": None if decisions is None else decision_rates(d.test_labels, decisions),
        "adapt_seconds": adapt_seconds,
        "score_images_per_second": n_test / score_seconds,
        "calibration": calibration,
    }
    return rec, maps, ranked


def _record_line(r: dict) -> str:
    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    good = (r.get("decision_rates") or {}).get("normal_images")
    decided = "" if good is None else f" (decided {f(good['anomalous'])}, review {f(good['review'])})"
    return (
        f"{r['category']:>14s} {variant(r):>12s} K={r['shots']} seed={r['seed']}: image AUROC {f(r['image_auroc'])} "
        f"pixel AUROC {f(r['pixel_auroc'])} AUPRO {f(r['aupro'])} F1 {f(r['f1'])} FPR {f(r['measured_fpr'])}"
        f"{decided} adapt {r['adapt_seconds']:.2f}s"
    )


def _write_overlays(
    output: Path, category: str, method: str, d: CategoryData, maps: np.ndarray, scores: np.ndarray, n: int = 6
) -> Path:
    """Heatmap overlays of the highest-scored test images, with their ground truth outlines."""
    order = np.argsort(-scores)[:n]
    fig = new_figure(2.2 * len(order), 2.6)
    lo, hi = np.percentile(maps, 1), np.percentile(maps, 99.9)
    for j, i in enumerate(order):
        ax = fig.add_subplot(1, len(order), j + 1)
        ax.imshow(d.test_images[i])
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
        if d.test_masks[i].any():
            ax.contour(d.test_masks[i], levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"{Path(d.test_ids[i]).parent.name}\nscore {scores[i]:.2f}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{category}: highest-scored test images ({method})", fontsize=9)
    return save_figure(fig, output.with_name(f"{output.stem}_overlay_{category}.png"), dpi=90)
