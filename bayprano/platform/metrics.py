"""Evaluation metrics for anomaly detection: image AUROC, pixel AUROC, AUPRO, F1 and FPR at a threshold.

These are the numbers of the leave-one-category-out protocol and of every baseline run on
the same harness, so they are exact rather than approximate wherever that is affordable:

- Image-level numbers (``roc_curve``, ``auroc``, ``image_auroc``, ``precision_recall_curve``, F1, FPR
  and TPR at a threshold, ``best_f1``) come from scikit-learn, on checked inputs. scikit-learn refuses
  infinite scores, and ROC and precision-recall depend only on the order of the scores, so it is given
  each score's rank among the distinct scores, and its thresholds are mapped back to scores. AUROC is
  then the Mann-Whitney U statistic divided by (positives x negatives), a tie between a normal and an
  anomalous score counting 1/2, the trapezoidal area under ``roc_curve``.
- Pixel AUROC is the same exact statistic over all pixels, computed here from two sorted copies of the
  scores (normal and defect pixels) in the maps' own dtype, so its extra memory is about one copy of
  the maps plus a boolean mask: no argsort, no float64 upcast of float32 maps. scikit-learn's
  ``roc_auc_score`` on the same pixels argsorts them in float64 and builds curves as long as the
  pixels (several copies of the maps), which a test set of full-size maps cannot afford.
- AUPRO follows the MVTec AD evaluation code: ground-truth regions are the connected components of
  each mask (8-connectivity by default, as ``np.ones((3, 3))`` there), PRO at a threshold is the mean
  over all regions of all images of the fraction of the region's pixels flagged, FPR is the fraction
  of all normal pixels flagged, and the curve is integrated with the trapezoidal rule from FPR 0 to
  ``fpr_limit``, interpolated at ``fpr_limit``, and divided by ``fpr_limit``. By default every
  distinct score is a threshold (exact); ``num_thresholds`` switches to evenly spaced thresholds over
  the score range, a histogram pass that needs no sort and memory for one image at a time.
  scikit-learn has no per-region overlap curve.

One convention throughout: a sample (image or pixel) is flagged anomalous when its score is strictly
greater than the threshold. ``roc_curve`` and ``precision_recall_curve`` return thresholds in that
convention (scikit-learn's own flag ``score >= threshold``; they are translated), so any of them can be
passed to ``f1_at_threshold``, ``fpr_at_threshold`` or ``tpr_at_threshold`` to get the same point.

Labels and masks are boolean, or numeric with only the values 0 (normal) and 1 (anomalous). Scores
are real; NaN is refused, infinities are allowed. Problems with the inputs raise ``DataError``, a
``ValueError``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal, Mapping, Sequence, overload

import numpy as np
from scipy import ndimage

from bayprano.platform.errors import DataError

__all__ = [
    "roc_curve",
    "precision_recall_curve",
    "auroc",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_at_threshold",
    "fpr_at_threshold",
    "tpr_at_threshold",
    "best_f1",
    "image_metrics",
    "pixel_metrics",
    "plot_roc",
]

_CHUNK = 1 << 18

_STRUCTURES = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


# --------------------------------------------------------------------------- input checks


def _as_bool(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{name} must be boolean or 0/1, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise DataError(
            f"{name} must be boolean or 0/1, found the value {arr[bad].flat[0]!r} (binarise masks before evaluation)"
        )
    return arr.astype(bool)


def _as_scores(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if np.isnan(arr).any():
        raise DataError(f"{name} contains NaN ({int(np.isnan(arr).sum())} of {arr.size} values)")
    return arr


def _as_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise DataError(f"threshold must be a number, got {threshold!r}") from None
    if math.isnan(t):
        raise DataError("threshold is NaN")
    return t


def _pair(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = _as_bool(labels, "labels")
    s = _as_scores(scores, "scores")
    if y.shape != s.shape:
        raise DataError(f"{what}: labels have shape {y.shape} but scores have shape {s.shape}")
    return y.ravel(), s.ravel()


def _need_both(n_pos: int, n_neg: int, what: str, unit: str = "samples") -> None:
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"{what} needs both normal and anomalous {unit}; got {n_neg} normal and {n_pos} anomalous")


def _image_pair(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y, s = _pair(labels, scores, what)
    if np.ndim(labels) != 1:
        raise DataError(f"{what}: expected one label and one score per image (1-D), got {np.shape(labels)}")
    return y, s


def _pixel_pair(masks, maps, what: str) -> tuple[np.ndarray, np.ndarray]:
    m = _as_bool(masks, "masks")
    a = _as_scores(maps, "maps")
    if m.shape != a.shape:
        raise DataError(f"{what}: masks have shape {m.shape} but maps have shape {a.shape}")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise DataError(f"{what}: expected masks and maps of shape (N, H, W) or (H, W), got {m.shape}")
    return m, a


# --------------------------------------------------------------------------- ROC and AUROC


def _auc_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC of ``pos`` against ``neg``; ``neg`` must be sorted ascending."""
    twice_u = 0
    for start in range(0, pos.size, _CHUNK):
        chunk = pos[start : start + _CHUNK]
        twice_u += int(np.searchsorted(neg, chunk, side="left").sum(dtype=np.int64))
        twice_u += int(np.searchsorted(neg, chunk, side="right").sum(dtype=np.int64))
    return twice_u / (2 * pos.size * neg.size)


def _ranks(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct scores, ascending, and each score's index among them (as float64, for scikit-learn)."""
    distinct, index = np.unique(s, return_inverse=True)
    return distinct.astype(np.float64), index.astype(np.float64)


def _strictly_above(distinct: np.ndarray, rank_thresholds: np.ndarray) -> np.ndarray:
    """For scikit-learn's rank thresholds r (flag ``rank >= r``), the score t with ``score > t`` alike: the
    next lower distinct score, or ``-inf`` below the lowest."""
    below = rank_thresholds.astype(np.int64) - 1
    return np.where(below >= 0, distinct[np.maximum(below, 0)], -np.inf)


def _roc(y: np.ndarray, s: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve as sk_roc_curve

    n_pos = int(y.sum())
    _need_both(n_pos, y.size - n_pos, what)
    distinct, ranks = _ranks(s)
    fpr, tpr, rank_thresholds = sk_roc_curve(y, ranks, drop_intermediate=False)
    # scikit-learn's first point flags nothing (threshold +inf): here, "above the largest score"
    thresholds = np.r_[distinct[-1], _strictly_above(distinct, rank_thresholds[1:])]
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score, from (0, 0) to (1, 1) (scikit-learn's).

    Point ``i`` is the false- and true-positive rate of flagging ``score > thresholds[i]``.
    ``thresholds`` runs from the largest score (nothing flagged) down through every distinct score to
    ``-inf`` (everything flagged). Returns float64 arrays ``(fpr, tpr, thresholds)``.
    """
    y, s = _pair(labels, scores, "roc_curve")
    return _roc(y, s, "roc_curve")


def precision_recall_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve with one point per distinct score (scikit-learn's), plus its end point.

    Point ``i`` is the precision and recall of flagging ``score > thresholds[i]``; ``thresholds``
    ascends from ``-inf`` (everything flagged) to the largest score, where nothing is flagged and, by
    scikit-learn's convention, precision is 1 and recall 0. Returns float64 arrays
    ``(precision, recall, thresholds)`` of equal length. Needs at least one anomalous sample.
    """
    from sklearn.metrics import precision_recall_curve as sk_pr_curve

    y, s = _pair(labels, scores, "precision_recall_curve")
    if not y.any():
        raise DataError("precision_recall_curve needs at least one anomalous sample; got none")
    distinct, ranks = _ranks(s)
    precision, recall, rank_thresholds = sk_pr_curve(y, ranks, drop_intermediate=False)
    thresholds = np.r_[_strictly_above(distinct, rank_thresholds), distinct[-1]]
    return precision.astype(np.float64), recall.astype(np.float64), thresholds


def auroc(labels, scores) -> float:
    """Exact area under the ROC curve: P(anomalous score > normal score) + P(tie) / 2 (scikit-learn's)."""
    from sklearn.metrics import roc_auc_score

    y, s = _pair(labels, scores, "auroc")
    n_pos = int(y.sum())
    _need_both(n_pos, y.size - n_pos, "auroc")
    return float(roc_auc_score(y, _ranks(s)[1]))


def image_auroc(labels, image_scores) -> float:
    """Exact image-level AUROC; ``labels`` and ``image_scores`` hold one value per image."""
    y, s = _image_pair(labels, image_scores, "image_auroc")
    return auroc(y, s)


def pixel_auroc(masks, maps) -> float:
    """Exact pixel-level AUROC over all pixels of all images.

    ``masks`` (N, H, W) marks defect pixels, ``maps`` (N, H, W) holds their anomaly scores. Exact
    (ties count 1/2); the extra memory is one copy of ``maps`` in its own dtype plus a boolean mask.
    """
    m, a = _pixel_pair(masks, maps, "pixel_auroc")
    pos = a[m]
    neg = a[~m]
    _need_both(pos.size, neg.size, "pixel_auroc", unit="pixels")
    neg.sort()
    pos.sort()
    return _auc_sorted(pos, neg)


# --------------------------------------------------------------------------- AUPRO


def _regions(mask: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Per defect pixel (in ``mask`` order), 1 / size of its connected region; and the region count."""
    labeled, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return np.empty(0), 0
    sizes = np.bincount(labeled.ravel())
    return 1.0 / sizes[labeled[mask]], n


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoidal area under a curve with non-decreasing ``fpr``, from fpr[0] to ``limit``."""
    inside = int(np.searchsorted(fpr, limit, side="right"))
    x, y = fpr[:inside], pro[:inside]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    if inside < fpr.size and x[-1] < limit:
        x0, y0, x1, y1 = fpr[inside - 1], pro[inside - 1], fpr[inside], pro[inside]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_lim) / 2
    return area


def _aupro_exact(m: np.ndarray, a: np.ndarray, structure: np.ndarray, limit: float) -> float:
    defect_scores, weights = [], []
    n_regions = 0
    for mask, amap in zip(m, a):
        w, n = _regions(mask, structure)
        if n:
            defect_scores.append(amap[mask])
            weights.append(w)
            n_regions += n
    if n_regions == 0:
        raise DataError("aupro needs at least one defect pixel in the masks; none found")
    neg = a[~m]
    if neg.size == 0:
        raise DataError("aupro needs at least one normal pixel; every pixel is marked defective")
    neg.sort()
    ds = np.concatenate(defect_scores)
    order = np.argsort(ds, kind="stable")
    ds = ds[order]
    # tail[j] / n_regions is the PRO of flagging exactly the defect pixels ds[j:]
    tail = np.r_[np.cumsum(np.concatenate(weights)[order][::-1])[::-1], 0.0]
    del order

    n_neg = neg.size
    limit_count = limit * n_neg
    # Each tie group of normal scores v is one segment of the curve, from (FPR, PRO) of "score > v" to
    # that of "score >= v"; only groups with fewer than limit * n_neg normals above them reach below
    # the limit, and all of those lie in the top floor(limit * n_neg) + 1 sorted normal scores.
    top = neg[max(0, n_neg - 1 - math.floor(limit_count)) :]
    values = top[np.r_[True, top[1:] != top[:-1]]]
    area = 0.0
    for start in range(0, values.size, _CHUNK):
        v = values[start : start + _CHUNK]
        above = n_neg - np.searchsorted(neg, v, side="right")
        keep = above < limit_count
        v, above = v[keep], above[keep]
        at_or_above = n_neg - np.searchsorted(neg, v, side="left")
        pro_above = tail[np.searchsorted(ds, v, side="right")] / n_regions
        pro_at_or_above = tail[np.searchsorted(ds, v, side="left")] / n_regions
        whole = at_or_above <= limit_count
        widths = (at_or_above[whole] - above[whole]) / n_neg
        area += float(np.sum(widths * (pro_above[whole] + pro_at_or_above[whole]) / 2))
        if not whole.all():
            # the one group that straddles the limit: interpolate along its segment
            k = int(np.argmin(whole))
            x0, x1 = above[k] / n_neg, at_or_above[k] / n_neg
            y0, y1 = pro_above[k], pro_at_or_above[k]
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area / limit


def _aupro_binned(m: np.ndarray, a: np.ndarray, structure: np.ndarray, limit: float, num: int) -> float:
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DataError("aupro with num_thresholds needs finite scores; use num_thresholds=None")
    thresholds = np.linspace(lo, hi, num)
    # bin b of a pixel = number of thresholds strictly below its score: it is flagged at thresholds[:b]
    normal_hist = np.zeros(num + 1, dtype=np.int64)
    pro_hist = np.zeros(num + 1)
    n_regions = 0
    for mask, amap in zip(m, a):
        w, n = _regions(mask, structure)
        n_regions += n
        normal_hist += np.bincount(np.searchsorted(thresholds, amap[~mask], side="left"), minlength=num + 1)
        if n:
            bins = np.searchsorted(thresholds, amap[mask], side="left")
            pro_hist += np.bincount(bins, weights=w, minlength=num + 1)
    n_neg = int(normal_hist.sum())
    if n_regions == 0:
        raise DataError("aupro needs at least one defect pixel in the masks; none found")
    if n_neg == 0:
        raise DataError("aupro needs at least one normal pixel; every pixel is marked defective")
    # point j (thresholds from high to low) counts bins above thresholds[num - 1 - j]; then (1, 1)
    fpr = np.r_[np.cumsum(normal_hist[::-1])[:num] / n_neg, 1.0]
    pro = np.r_[np.cumsum(pro_hist[::-1])[:num] / n_regions, 1.0]
    return _area_to_limit(fpr, pro, limit) / limit


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None, connectivity: int = 8) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD definition).

    ``masks`` (N, H, W) marks defect pixels, ``maps`` (N, H, W) holds anomaly scores. A perfect map
    scores 1.0; a constant map scores ``fpr_limit / 2``. Images without defects contribute only
    normal pixels. Each connected defect region (``connectivity`` 8, as in the MVTec AD code, or 4)
    weighs the same whatever its size.

    ``num_thresholds=None`` (default) is exact: every distinct score is a threshold. An integer uses
    that many evenly spaced thresholds from the lowest to the highest score; its error shrinks as
    fewer pixels share a bin, and it equals the exact value when every distinct score is one of them.
    """
    if not 0 < fpr_limit <= 1:
        raise DataError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if connectivity not in _STRUCTURES:
        raise DataError(f"connectivity must be 4 or 8, got {connectivity}")
    if num_thresholds is not None:
        is_int = isinstance(num_thresholds, (int, np.integer)) and not isinstance(num_thresholds, bool)
        if not is_int or num_thresholds < 2:
            raise DataError(f"num_thresholds must be None or an integer >= 2, got {num_thresholds!r}")
    m, a = _pixel_pair(masks, maps, "aupro")
    structure = _STRUCTURES[connectivity]
    if num_thresholds is None:
        return _aupro_exact(m, a, structure, float(fpr_limit))
    return _aupro_binned(m, a, structure, float(fpr_limit), int(num_thresholds))


# --------------------------------------------------------------------------- thresholded metrics


def _counts(labels, scores, threshold, what: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Labels, flags (``score > threshold``) and the numbers of anomalous and normal samples."""
    y, s = _image_pair(labels, scores, what)
    flagged = s > _as_threshold(threshold)
    n_pos = int(y.sum())
    return y, flagged, n_pos, y.size - n_pos


def _confusion(y: np.ndarray, flagged: np.ndarray) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp), scikit-learn's confusion matrix read in that order."""
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y, flagged, labels=[False, True]).ravel()
    return int(tn), int(fp), int(fn), int(tp)


def f1_at_threshold(labels, scores, threshold: float) -> float:
    """F1 of flagging ``score > threshold`` as anomalous (scikit-learn's); needs an anomalous image."""
    from sklearn.metrics import f1_score

    y, flagged, n_pos, _ = _counts(labels, scores, threshold, "f1_at_threshold")
    if n_pos == 0:
        raise DataError("f1_at_threshold needs at least one anomalous sample; got none")
    return float(f1_score(y, flagged, zero_division=0.0))


def fpr_at_threshold(labels, scores, threshold: float) -> float:
    """Fraction of normal images with ``score > threshold``; needs at least one normal image."""
    y, flagged, _, n_neg = _counts(labels, scores, threshold, "fpr_at_threshold")
    if n_neg == 0:
        raise DataError("fpr_at_threshold needs at least one normal sample; got none")
    return _confusion(y, flagged)[1] / n_neg


def tpr_at_threshold(labels, scores, threshold: float) -> float:
    """Fraction of anomalous images with ``score > threshold``; needs at least one anomalous image."""
    y, flagged, n_pos, _ = _counts(labels, scores, threshold, "tpr_at_threshold")
    if n_pos == 0:
        raise DataError("tpr_at_threshold needs at least one anomalous sample; got none")
    return _confusion(y, flagged)[3] / n_pos


@overload
def best_f1(labels, scores, return_threshold: Literal[False] = False) -> float: ...


@overload
def best_f1(labels, scores, return_threshold: Literal[True]) -> tuple[float, float]: ...


def best_f1(labels, scores, return_threshold: bool = False) -> float | tuple[float, float]:
    """Largest F1 over all thresholds (anomalib's F1-max).

    With ``return_threshold``, also the highest threshold reaching it, one of ``roc_curve``'s
    thresholds (``-inf`` when flagging every image is best).
    """
    y, s = _image_pair(labels, scores, "best_f1")
    fpr, tpr, thresholds = _roc(y, s, "best_f1")
    n_pos = int(y.sum())
    # the counts behind the rates, exact as integers, so that equal F1 values compare equal
    tps, fps = np.rint(tpr * n_pos), np.rint(fpr * (y.size - n_pos))
    f1 = 2 * tps / (tps + fps + n_pos)
    i = int(np.argmax(f1))
    if return_threshold:
        return float(f1[i]), float(thresholds[i])
    return float(f1[i])


# --------------------------------------------------------------------------- summaries


def image_metrics(labels, scores, threshold: float) -> dict[str, float]:
    """Image-level summary at a calibrated threshold (flagged when ``score > threshold``).

    Keys: ``image_auroc``, ``f1`` and ``tpr`` at the threshold, ``measured_fpr`` on the normal images,
    and ``f1_max`` (best F1 over all thresholds, for comparison with anomalib).
    """
    y, s = _image_pair(labels, scores, "image_metrics")
    return {
        "image_auroc": image_auroc(y, s),
        "f1": f1_at_threshold(y, s, threshold),
        "measured_fpr": fpr_at_threshold(y, s, threshold),
        "tpr": tpr_at_threshold(y, s, threshold),
        "f1_max": best_f1(y, s),
    }


DECISION_NAMES = ("normal", "review", "anomalous")


def decision_rates(labels, decisions: Sequence[str]) -> dict[str, dict[str, float]]:
    """The share of each decision among the normal images (label 0) and among the defective ones (label 1):
    ``{"normal_images": {"normal": .., "review": .., "anomalous": ..}, "defective_images": {...}}``; a
    group with no image is left out."""
    y = _as_bool(labels, "labels")
    d = np.asarray(list(decisions), dtype=object)
    if d.shape != y.shape:
        raise DataError(f"decision_rates: {d.size} decisions for {y.size} labels")
    unknown = sorted(set(d.tolist()) - set(DECISION_NAMES))
    if unknown:
        raise DataError(f"decision_rates: unknown decision(s) {unknown}; expected {list(DECISION_NAMES)}")
    out = {}
    for group, mask in (("normal_images", ~y), ("defective_images", y)):
        if mask.any():
            out[group] = {name: float(np.mean(d[mask] == name)) for name in DECISION_NAMES}
    return out


def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel-level summary: ``pixel_auroc`` and ``aupro`` (exact, up to ``fpr_limit``).

    Raises ``DataError`` when the masks hold no defect pixel or no normal pixel.
    """
    return {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps, fpr_limit=fpr_limit)}


# --------------------------------------------------------------------------- plots


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def plot_roc(curves: Mapping[str, Sequence[np.ndarray]], path: str | os.PathLike, title: str = "ROC") -> Path:
    """Write a PNG with one ROC line per method, its AUROC in the legend; returns the path.

    ``curves`` maps a method name to ``(fpr, tpr)`` (a ``roc_curve`` result also works: only its first
    two arrays are used). The file is replaced atomically; pyplot and the global backend are untouched.
    """
    from bayprano.platform.figures import new_figure, save_figure

    if not curves:
        raise DataError("plot_roc needs at least one curve")
    fig = new_figure(5, 5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    for name, curve in curves.items():
        fpr = np.asarray(curve[0], dtype=np.float64)
        tpr = np.asarray(curve[1], dtype=np.float64)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size < 2:
            raise DataError(f"plot_roc: curve {name!r} needs 1-D fpr and tpr of equal length >= 2")
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {_trapezoid(fpr, tpr):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(fig, path)
