"""Tests for bayprano.platform.metrics on hand-computed values and brute-force references."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import ndtr

from bayprano.platform import metrics as M

LABELS = [0, 0, 0, 1, 1]
SCORES = [0.1, 0.5, 0.6, 0.9, 0.5]


# --------------------------------------------------------------------------- references


def pairwise_auc(labels, scores) -> float:
    labels, scores = np.asarray(labels, bool).ravel(), np.asarray(scores, float).ravel()
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (pos.size * neg.size)


def area_to_limit(fpr, pro, limit) -> float:
    """MVTec-style trapezoid up to ``limit``, interpolating the curve at ``limit``."""
    area = 0.0
    for i in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def brute_force_aupro(masks, maps, limit=0.3, connectivity=8) -> float:
    """The PRO curve evaluated at every distinct score, one threshold at a time."""
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    regions = []
    for mask, amap in zip(masks, maps):
        labeled, n = ndimage.label(mask, structure=structure)
        regions += [amap[labeled == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    fprs, pros = [], []
    for t in list(np.unique(maps)[::-1]) + [-np.inf]:
        fprs.append(np.mean(normal > t))
        pros.append(np.mean([np.mean(r > t) for r in regions]))
    return area_to_limit(fprs, pros, limit) / limit


def two_regions(found_left=True, missed_score=-1.0):
    """One 8x8 image with two 2x2 regions; the map finds one region fully and no normal pixel."""
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 5:7, 5:7] = True
    amap = np.zeros((1, 8, 8))
    amap[0, 1:3, 1:3] = 1.0 if found_left else missed_score
    amap[0, 5:7, 5:7] = missed_score if found_left else 1.0
    return mask, amap


# --------------------------------------------------------------------------- AUROC


def test_auroc_perfect_reversed_and_tied():
    y = [0, 0, 1, 1]
    assert M.auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auroc_two_by_three_known_fractions():
    y = [1, 1, 0, 0, 0]
    # 0.9 beats all three normals, 0.5 beats 0.1 and 0.2 but not 0.6: 5 of 6 pairs
    assert M.auroc(y, [0.9, 0.5, 0.1, 0.2, 0.6]) == pytest.approx(5 / 6, abs=1e-15)
    # 0.5 ties with a normal 0.5: 3 + 1 + 1/2 + 1 = 5.5 of 6 pairs
    assert M.auroc(y, [0.9, 0.5, 0.1, 0.5, 0.2]) == pytest.approx(11 / 12, abs=1e-15)


def test_auroc_matches_pairwise_count_and_roc_area():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(40) < 0.4
        y[:2] = [True, False]
        s = rng.integers(0, 6, 40).astype(float)  # many ties
        expected = pairwise_auc(y, s)
        assert M.auroc(y, s) == pytest.approx(expected, abs=1e-12)
        fpr, tpr, _ = M.roc_curve(y, s)
        assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(expected, abs=1e-12)


def test_auroc_with_one_class_raises_clearly():
    with pytest.raises(ValueError, match="both normal and anomalous.*3 normal and 0 anomalous"):
        M.auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        M.roc_curve([1, 1], [0.1, 0.2])


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        M.auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0/1.*255"):
        M.pixel_auroc(np.array([[0, 255]]), np.array([[0.1, 0.2]]))
    with pytest.raises(ValueError, match="1-D"):
        M.image_auroc([[0, 1]], [[0.1, 0.2]])


def test_roc_curve_hand_case_and_endpoints():
    fpr, tpr, thresholds = M.roc_curve(LABELS, SCORES)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 2, 1 / 2, 1, 1])
    np.testing.assert_array_equal(thresholds, [0.9, 0.6, 0.5, 0.1, -np.inf])
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)


def test_roc_thresholds_follow_the_score_above_threshold_rule():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(15, bool), np.ones(10, bool)]
    s = rng.integers(0, 8, 25) / 7
    fpr, tpr, thresholds = M.roc_curve(y, s)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    for f, t, th in zip(fpr, tpr, thresholds):
        assert M.fpr_at_threshold(y, s, th) == pytest.approx(f)
        assert M.tpr_at_threshold(y, s, th) == pytest.approx(t)


# --------------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_equals_auroc_on_flattened_arrays():
    rng = np.random.default_rng(2)
    masks = rng.random((3, 5, 6)) < 0.3
    maps = rng.integers(0, 5, (3, 5, 6)).astype(np.float32)
    assert M.pixel_auroc(masks, maps) == pytest.approx(pairwise_auc(masks, maps), abs=1e-12)
    assert M.pixel_auroc(masks[0], maps[0]) == pytest.approx(M.auroc(masks[0], maps[0]), abs=1e-12)


def test_pixel_auroc_of_shifted_gaussians_and_its_memory():
    rng = np.random.default_rng(3)
    masks = rng.random((20, 128, 128)) < 0.1
    maps = (masks + rng.normal(size=masks.shape)).astype(np.float32)
    tracemalloc.start()
    try:
        value = M.pixel_auroc(masks, maps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # P(X + 1 > Y) for independent standard normals is Phi(1 / sqrt(2))
    assert value == pytest.approx(ndtr(1 / np.sqrt(2)), abs=0.01)
    assert peak < 2 * maps.nbytes


def test_pixel_auroc_without_defect_pixels_raises():
    with pytest.raises(ValueError, match="normal and anomalous pixels"):
        M.pixel_auroc(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)))


# --------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_map_is_one():
    mask, _ = two_regions()
    assert M.aupro(mask, mask.astype(float)) == pytest.approx(1.0)


def test_aupro_one_of_two_equal_regions_found_is_half():
    mask, amap = two_regions()
    assert M.aupro(mask, amap) == pytest.approx(0.5)
    assert M.aupro(*two_regions(found_left=False)) == pytest.approx(0.5)


def test_aupro_missed_region_tied_with_normals():
    # the missed region scores 0 like the normals: the curve runs (0, 1/2) -> (1, 1), so
    # PRO(f) = 1/2 + f/2 and the area to 0.3 is 0.3 * 0.5 + 0.3**2 / 4 = 0.1725
    mask, amap = two_regions(missed_score=0.0)
    assert M.aupro(mask, amap) == pytest.approx(0.1725 / 0.3)


def test_aupro_weighs_regions_not_pixels():
    mask = np.zeros((1, 16, 16), bool)
    mask[0, 1, 1] = True  # tiny region, found
    mask[0, 5:15, 5:15] = True  # 100-pixel region, missed
    amap = np.where(mask, -1.0, 0.0)
    amap[0, 1, 1] = 1.0
    assert M.aupro(mask, amap) == pytest.approx(0.5)
    assert np.sum(amap[mask] > 0.5) / mask.sum() == pytest.approx(1 / 101)
    assert M.pixel_auroc(mask, amap) == pytest.approx(1 / 101)


def test_aupro_constant_map_is_half_the_limit():
    mask, _ = two_regions()
    constant = np.full(mask.shape, 0.7)
    # one diagonal segment (0, 0) -> (1, 1): area limit**2 / 2, normalised by limit
    assert M.aupro(mask, constant) == pytest.approx(0.15)
    assert M.aupro(mask, constant, fpr_limit=0.05) == pytest.approx(0.025)
    assert M.aupro(mask, constant, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_defect_free_images_add_only_normal_pixels():
    mask = np.zeros((2, 4, 4), bool)
    mask[0, :2, :2] = True
    amap = mask.astype(float)
    assert M.aupro(mask, amap) == pytest.approx(1.0)
    # 4 of the 28 normal pixels (all in the defect-free image) outscore the region: the curve stays
    # at PRO 0 up to FPR 1/7, then jumps to 1
    amap[1, 0, :] = 2.0
    assert M.aupro(mask, amap) == pytest.approx((0.3 - 1 / 7) / 0.3)


def test_aupro_connectivity():
    mask = np.zeros((1, 6, 6), bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 3, 3] = True  # touches the block only at a corner
    amap = np.where(mask, -1.0, 0.0)
    amap[0, 3, 3] = 1.0
    # 8-connected: one 5-pixel region, 1/5 found; 4-connected: two regions, one found
    assert M.aupro(mask, amap) == pytest.approx(0.2)
    assert M.aupro(mask, amap, connectivity=4) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 10, 10), bool)
    for i in range(2):
        masks[i] = ndimage.binary_dilation(rng.random((10, 10)) < 0.06)
    masks[0, 0, 0] = True
    maps = masks * rng.random() + rng.normal(size=masks.shape)
    if seed % 2:
        maps = np.round(maps * 2) / 2  # heavy ties
    for limit in (0.05, 0.3, 1.0):
        for connectivity in (4, 8):
            expected = brute_force_aupro(masks, maps, limit, connectivity)
            got = M.aupro(masks, maps, fpr_limit=limit, connectivity=connectivity)
            assert got == pytest.approx(expected, abs=1e-9)


def test_aupro_binned_thresholds():
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 16, 16), bool)
    masks[0, 2:6, 2:9] = True
    masks[1, 10:12, 3:4] = True
    masks[2, 8:15, 8:15] = True
    integer_maps = rng.integers(0, 10, masks.shape) + 3 * masks
    exact = M.aupro(masks, integer_maps)
    # the thresholds 0, 1, ..., 12 are exactly the distinct scores
    assert M.aupro(masks, integer_maps, num_thresholds=13) == pytest.approx(exact, abs=1e-12)
    maps = (masks + rng.normal(size=masks.shape)).astype(np.float32)
    assert M.aupro(masks, maps, num_thresholds=2000) == pytest.approx(M.aupro(masks, maps), abs=1e-3)


def test_aupro_rejects_bad_arguments():
    mask, amap = two_regions()
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(mask, amap, fpr_limit=0)
    with pytest.raises(ValueError, match="connectivity"):
        M.aupro(mask, amap, connectivity=6)
    with pytest.raises(ValueError, match="num_thresholds"):
        M.aupro(mask, amap, num_thresholds=1)
    with pytest.raises(ValueError, match="finite"):
        M.aupro(mask, np.where(mask, np.inf, 0.0), num_thresholds=10)
    assert M.aupro(mask, np.where(mask, np.inf, 0.0)) == 1.0
    for num in (None, 100):
        with pytest.raises(ValueError, match="at least one defect pixel"):
            M.aupro(np.zeros_like(mask), amap, num_thresholds=num)
        with pytest.raises(ValueError, match="at least one normal pixel"):
            M.aupro(np.ones_like(mask), amap, num_thresholds=num)


# --------------------------------------------------------------------------- thresholded metrics


def test_f1_fpr_tpr_at_threshold_hand_case():
    # threshold 0.5: flagged are 0.6 (normal) and 0.9 (anomalous); the anomalous 0.5 is not (> not >=)
    assert M.f1_at_threshold(LABELS, SCORES, 0.5) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert M.fpr_at_threshold(LABELS, SCORES, 0.5) == pytest.approx(1 / 3)
    assert M.tpr_at_threshold(LABELS, SCORES, 0.5) == pytest.approx(1 / 2)
    # threshold 0.4: tp 2, fp 2, fn 0
    assert M.f1_at_threshold(LABELS, SCORES, 0.4) == pytest.approx(2 / 3)
    assert M.fpr_at_threshold(LABELS, SCORES, 0.4) == pytest.approx(2 / 3)
    assert M.tpr_at_threshold(LABELS, SCORES, 0.4) == 1.0


def test_thresholded_metrics_need_the_right_class():
    with pytest.raises(ValueError, match="normal"):
        M.fpr_at_threshold([1, 1], [0.1, 0.2], 0.0)
    with pytest.raises(ValueError, match="anomalous"):
        M.f1_at_threshold([0, 0], [0.1, 0.2], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        M.f1_at_threshold([0, 1], [0.1, 0.2], float("nan"))


def test_best_f1():
    # F1 by threshold: 0.9 -> 0, 0.6 -> 2/3, 0.5 -> 1/2, 0.1 -> 2/3, -inf -> 4/7
    assert M.best_f1(LABELS, SCORES) == pytest.approx(2 / 3)
    f1, threshold = M.best_f1(LABELS, SCORES, return_threshold=True)
    assert threshold == 0.6
    assert M.f1_at_threshold(LABELS, SCORES, threshold) == pytest.approx(f1)
    assert M.best_f1([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_image_and_pixel_summaries():
    summary = M.image_metrics(LABELS, SCORES, 0.5)
    assert summary == pytest.approx(
        {"image_auroc": 4.5 / 6, "f1": 0.5, "measured_fpr": 1 / 3, "tpr": 0.5, "f1_max": 2 / 3}
    )
    assert all(type(v) is float for v in summary.values())
    mask, amap = two_regions()
    pixels = M.pixel_metrics(mask, amap)
    assert pixels == pytest.approx({"pixel_auroc": M.pixel_auroc(mask, amap), "aupro": 0.5})
    assert all(np.isfinite(v) for v in pixels.values())
    with pytest.raises(ValueError, match="normal and anomalous pixels"):
        M.pixel_metrics(np.zeros_like(mask), amap)


def test_decision_rates_are_shares_per_image_group_and_bad_decisions_are_named():
    labels = [0, 0, 0, 0, 1, 1]
    decisions = ["normal", "normal", "review", "anomalous", "review", "anomalous"]
    assert M.decision_rates(labels, decisions) == {
        "normal_images": {"normal": 0.5, "review": 0.25, "anomalous": 0.25},
        "defective_images": {"normal": 0.0, "review": 0.5, "anomalous": 0.5},
    }
    assert set(M.decision_rates([0, 0], ["normal", "review"])) == {"normal_images"}
    with pytest.raises(M.DataError, match="3 decisions for 2 labels"):
        M.decision_rates([0, 1], ["normal"] * 3)
    with pytest.raises(M.DataError, match="unknown decision.*'maybe'"):
        M.decision_rates([0, 1], ["normal", "maybe"])


# --------------------------------------------------------------------------- plots


def test_plot_roc_writes_a_png(tmp_path):
    rng = np.random.default_rng(6)
    y = np.r_[np.zeros(20), np.ones(20)]
    curves = {"ours": M.roc_curve(y, y + rng.normal(size=40)), "baseline": M.roc_curve(y, rng.normal(size=40))[:2]}
    path = tmp_path / "plots" / "roc.png"
    assert M.plot_roc(curves, path, title="image ROC") == path
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]
    with pytest.raises(ValueError, match="at least one curve"):
        M.plot_roc({}, tmp_path / "empty.png")


def test_importing_metrics_leaves_matplotlib_alone():
    code = "import sys, bayprano.platform.metrics; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
