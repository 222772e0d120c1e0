"""bayprano.platform.metrics against scikit-learn.

The image-level numbers are scikit-learn's (on the ranks of the scores), so they must equal scikit-learn's
on the raw scores, with its ``score >= threshold`` thresholds translated to the house rule
``score > threshold``. The pixel AUROC and AUPRO are computed here (memory-lean, exact): they are checked
against scikit-learn on maps sub-sampled to a size that scikit-learn's float64 curves handle in a moment,
the AUPRO by an independent re-computation (scikit-learn's ROC thresholds and false-positive rates, the
overlap of each region counted by brute force).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as sk

from bayprano.platform import metrics as M

LABELS = [0, 0, 0, 1, 1]
SCORES = [0.1, 0.5, 0.6, 0.9, 0.5]


def image_sets():
    """Labels and scores with many ties, few ties, and a lopsided class balance."""
    rng = np.random.default_rng(20)
    out = []
    for n, p, levels in ((40, 0.4, 6), (80, 0.2, None), (31, 0.9, 4), (12, 0.5, 2)):
        y = rng.random(n) < p
        y[:2] = [True, False]
        s = y * 0.8 + rng.normal(size=n)
        if levels is not None:
            s = np.round(s * levels / 3) / levels
        out.append((y, s))
    return out


@pytest.mark.parametrize("case", range(4))
def test_image_auroc_roc_and_pr_curves_equal_scikit_learns(case):
    y, s = image_sets()[case]
    assert M.image_auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-15)
    assert M.auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-15)

    fpr, tpr, thresholds = M.roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    # scikit-learn flags score >= its threshold, here score > the threshold: the same samples at every point
    for ours, theirs in zip(thresholds, sk_thresholds):
        np.testing.assert_array_equal(s > ours, s >= theirs)
    assert thresholds[0] == s.max() and thresholds[-1] == -np.inf

    precision, recall, pr_thresholds = M.precision_recall_curve(y, s)
    sk_precision, sk_recall, sk_pr_thresholds = sk.precision_recall_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(precision, sk_precision)
    np.testing.assert_array_equal(recall, sk_recall)
    for ours, theirs in zip(pr_thresholds[:-1], sk_pr_thresholds):
        np.testing.assert_array_equal(s > ours, s >= theirs)
    assert pr_thresholds[-1] == s.max() and not np.any(s > pr_thresholds[-1])


@pytest.mark.parametrize("case", range(4))
def test_thresholded_metrics_and_best_f1_equal_scikit_learns(case):
    y, s = image_sets()[case]
    f1s = []
    for t in np.r_[np.unique(s), -np.inf, s.max() + 1]:
        flagged = s > t
        tn, fp, fn, tp = sk.confusion_matrix(y, flagged).ravel()
        f1s.append(sk.f1_score(y, flagged, zero_division=0.0))
        assert M.f1_at_threshold(y, s, t) == pytest.approx(f1s[-1], abs=1e-15)
        assert M.fpr_at_threshold(y, s, t) == fp / (fp + tn)
        assert M.tpr_at_threshold(y, s, t) == sk.recall_score(y, flagged, zero_division=0.0)
    f1, threshold = M.best_f1(y, s, return_threshold=True)
    assert f1 == pytest.approx(max(f1s), abs=1e-15)
    assert M.f1_at_threshold(y, s, threshold) == pytest.approx(f1, abs=1e-15)
    # the highest threshold that reaches it: any higher distinct score gives less
    assert all(M.f1_at_threshold(y, s, t) < f1 - 1e-12 for t in np.unique(s) if t > threshold)


def test_the_threshold_rule_differs_from_scikit_learns_at_a_tied_score():
    # scikit-learn's point (1/3, 1/2) flags score >= 0.6; here it is "score > 0.5", which leaves the anomalous 0.5
    fpr, tpr, thresholds = M.roc_curve(LABELS, SCORES)
    _, _, sk_thresholds = sk.roc_curve(LABELS, SCORES, drop_intermediate=False)
    np.testing.assert_array_equal(thresholds, [0.9, 0.6, 0.5, 0.1, -np.inf])
    np.testing.assert_array_equal(sk_thresholds, [np.inf, 0.9, 0.6, 0.5, 0.1])
    assert M.tpr_at_threshold(LABELS, SCORES, 0.5) == 0.5 and M.fpr_at_threshold(LABELS, SCORES, 0.5) == 1 / 3
    precision, recall, pr_thresholds = M.precision_recall_curve(LABELS, SCORES)
    np.testing.assert_array_equal(pr_thresholds, [-np.inf, 0.1, 0.5, 0.6, 0.9])
    np.testing.assert_allclose(precision, [2 / 5, 2 / 4, 1 / 2, 1, 1])
    np.testing.assert_allclose(recall, [1, 1, 1 / 2, 1 / 2, 0])


def test_infinite_scores_which_scikit_learn_refuses_are_ranked():
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([-np.inf, np.inf, 0.5, 0.5, 2.0, 0.1])
    finite = np.array([-1e9, 1e9, 0.5, 0.5, 2.0, 0.1])  # the same order
    with pytest.raises(ValueError, match="Input contains .*infinity"):
        sk.roc_auc_score(y, s)
    assert M.image_auroc(y, s) == sk.roc_auc_score(y, finite)
    fpr, tpr, thresholds = M.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk.roc_curve(y, finite, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    assert thresholds[0] == np.inf and M.best_f1(y, s) == pytest.approx(
        max(sk.f1_score(y, finite >= t) for t in np.unique(finite))
    )


# --------------------------------------------------------------------------- pixel metrics


def defect_maps(seed: int, n: int = 6, side: int = 128, stride: int = 2):
    """Maps of blob and line defects with noisy scores (ties from rounding), sub-sampled by ``stride``."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, side, side), bool)
    yy, xx = np.mgrid[:side, :side]
    for i in range(1, n):  # image 0 is defect-free
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(8, side - 8), rng.integers(8, side - 8), rng.integers(3, 12)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        row = rng.integers(0, side)
        masks[i, row, rng.integers(0, side // 2) :] = True  # a thin scratch to the border
    maps = ndimage.gaussian_filter(masks.astype(np.float32), (0, 2, 2)) * rng.uniform(0.5, 2.0, (n, 1, 1))
    maps = np.round(maps + rng.normal(0, 0.3, maps.shape), 2).astype(np.float32)
    return masks[:, ::stride, ::stride], maps[:, ::stride, ::stride]


def aupro_with_sklearn_roc(masks, maps, limit: float) -> float:
    """AUPRO re-computed: scikit-learn's ROC over all pixels gives the thresholds (>=) and the FPR axis; the
    overlap of each 8-connected region is counted at every threshold; trapezoid to ``limit`` over ``limit``."""
    fpr, _, thresholds = sk.roc_curve(masks.ravel(), maps.ravel().astype(np.float64), drop_intermediate=False)
    overlaps = []
    for mask, amap in zip(masks, maps):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            region = np.sort(amap[labeled == k].astype(np.float64))
            overlaps.append((region.size - np.searchsorted(region, thresholds, side="left")) / region.size)
    pro = np.mean(overlaps, axis=0)
    inside = fpr <= limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < limit:
        j = int(np.argmax(~inside))
        x = np.r_[x, limit]
        y = np.r_[y, pro[j - 1] + (pro[j] - pro[j - 1]) * (limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])]
    return sk.auc(x, y) / limit


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_equals_scikit_learns_on_sub_sampled_maps(seed):
    masks, maps = defect_maps(seed)
    assert M.pixel_auroc(masks, maps) == pytest.approx(sk.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    # a random sample of pixels, as one flat image
    rng = np.random.default_rng(seed)
    pick = rng.choice(masks.size, 3000, replace=False)
    m, a = masks.ravel()[pick][None, None], maps.ravel()[pick][None, None]
    assert M.pixel_auroc(m, a) == pytest.approx(sk.roc_auc_score(m.ravel(), a.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_a_recomputation_on_scikit_learns_roc(seed, limit):
    masks, maps = defect_maps(seed)
    expected = aupro_with_sklearn_roc(masks, maps, limit)
    assert 0.2 < expected < 1.0  # a map that finds most of the defects, not a trivial one
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert M.pixel_metrics(masks, maps, fpr_limit=limit)["aupro"] == pytest.approx(expected, abs=1e-12)
