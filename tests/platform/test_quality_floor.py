"""Quality floors a broken detector fails: image AUROC and the calibrated false-positive rate of site models
adapted on the real default backbone (EfficientNet-Lite2, packaged weights) from a meta-checkpoint that was
not meta-trained, on a small fixed synthetic set at 160 px.

The checkpoint is built as the evaluation harness builds its ``bayes-frozen`` control: the initial head,
per-channel feature standardisation from good images of other categories (screw, pcb, hex_nut) than the
ones tested, and the uninformed normality prior. Every image comes from its own seeded stream and the
support, test and held-out pools use disjoint streams (checked by pixel hash), so the numbers below are
fixed; the floors were set from measurements over several seeds, with margin.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from bayprano.platform.data.synth import DEFECT_TYPES, render_defective, render_good
from bayprano.platform.evaluate import frozen_checkpoint_from_statistics
from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.metrics import image_auroc
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.names import LITE2_BACKBONE
from bayprano.platform.model.scoring import DECISIONS, decide, relative_sd
from bayprano.platform.model.site import adapt

SIZE = 160
DIM = 64
SHOTS = 5
TEST_PER_CLASS = 20
FLOOR_CATEGORIES = ("wood", "brushed_metal", "bottle")
STATISTICS_CATEGORIES = ("screw", "pcb", "hex_nut")

# Mean image AUROC over FLOOR_CATEGORIES (K = 5, 20 good + 20 defective each), measured for support/test
# seeds 0-7: 0.83, 0.90, 0.85, 0.83, 0.84, 0.89, 0.92, 0.80; seed 0 (this test): 0.832 (wood 0.805,
# brushed metal 0.915, bottle 0.775). Chance is 0.5; negated scores give 0.08-0.20, shuffled channels 0.44-0.58.
AUROC_FLOOR = 0.75
CATEGORY_AUROC_FLOOR = 0.68  # each category alone; lowest measured over seeds 0-7: 0.715 (wood, seed 3)
SEED = 0

# streams of render_good / render_defective: (purpose, seed, index)
_STATS, _SUPPORT, _TEST_GOOD, _TEST_DEFECT, _HELD_OUT = range(5)


def good_images(category: str, purpose: int, seed: int, n: int) -> list[np.ndarray]:
    return [render_good(category, np.random.default_rng([purpose, seed, i]), SIZE) for i in range(n)]


def defective_images(category: str, seed: int, n: int) -> list[np.ndarray]:
    """``n`` defective images cycling through the category's defect types, severity drawn per image."""
    defects = DEFECT_TYPES[category]
    return [
        render_defective(category, defects[i % len(defects)], np.random.default_rng([_TEST_DEFECT, seed, i]), SIZE)[0]
        for i in range(n)
    ]


def pixel_hashes(images) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


@pytest.fixture(scope="module")
def lite2():
    extractor = build_backbone(LITE2_BACKBONE)
    assert extractor.name == "efficientnet_lite2"
    return extractor


def build_frozen_checkpoint(extractor) -> MetaCheckpoint:
    pool = [im for c in STATISTICS_CATEGORIES for im in good_images(c, _STATS, 0, 2)]
    features = extractor.extract(np.stack(pool), size=SIZE)
    mean, std = features.mean((0, 2, 3)), features.var((0, 2, 3), unbiased=False).clamp_min(1e-12).sqrt()
    h, w = features.shape[-2:]
    return frozen_checkpoint_from_statistics(extractor, mean, std, (h, w), SIZE, DIM)


@pytest.fixture(scope="module")
def frozen_checkpoint(lite2) -> MetaCheckpoint:
    return build_frozen_checkpoint(lite2)


def image_scores(site, features: torch.Tensor) -> np.ndarray:
    """Image scores of backbone features, through the site model's public scoring path."""
    return np.array([r.score for r in site.results_from_mahalanobis(site.mahalanobis(features))])


def floor_run(extractor, checkpoint: MetaCheckpoint, category: str, seed: int) -> dict:
    """The site model adapted on K good images, the test features (good first), labels, and ``score``'s results."""
    support = good_images(category, _SUPPORT, seed, SHOTS)
    normals = good_images(category, _TEST_GOOD, seed, TEST_PER_CLASS)
    defective = defective_images(category, seed, TEST_PER_CLASS)
    assert not pixel_hashes(support) & pixel_hashes(normals + defective), f"{category}: support leaks into test"
    site = adapt(checkpoint, support, target_fpr=0.1, extractor=extractor)
    test = normals + defective
    results = site.score(test, maps=False)
    return {
        "site": site,
        "features": extractor.extract(np.stack(test), size=SIZE),
        "labels": np.r_[np.zeros(TEST_PER_CLASS, bool), np.ones(TEST_PER_CLASS, bool)],
        "scores": np.array([r.score for r in results]),
        "results": results,
    }


@pytest.fixture(scope="module")
def floor_runs(lite2, frozen_checkpoint) -> dict:
    return {c: floor_run(lite2, frozen_checkpoint, c, SEED) for c in FLOOR_CATEGORIES}


def mean_auroc(runs: dict, scores_of) -> tuple[float, dict[str, float]]:
    per_category = {c: image_auroc(r["labels"], scores_of(r)) for c, r in runs.items()}
    return float(np.mean(list(per_category.values()))), per_category


# --- image AUROC floor --------------------------------------------------------------------------------


def test_adapted_site_models_rank_defects_above_normals(floor_runs):
    mean, per_category = mean_auroc(floor_runs, lambda r: r["scores"])
    assert mean >= AUROC_FLOOR, f"mean image AUROC {mean:.3f} < floor {AUROC_FLOOR}: {per_category}"
    low = {c: a for c, a in per_category.items() if a < CATEGORY_AUROC_FLOOR}
    assert not low, f"image AUROC below {CATEGORY_AUROC_FLOOR}: {low}"


def test_scoring_the_extracted_features_is_what_score_does(floor_runs):
    """The floor's variants below score features directly; on the true features that path is ``score``."""
    for category, r in floor_runs.items():
        np.testing.assert_allclose(image_scores(r["site"], r["features"]), r["scores"], rtol=1e-5, err_msg=category)


def test_the_floor_bites_on_negated_scores(floor_runs):
    """A flipped sign in the score ranks normals above defects: far below the floor (measured 0.168)."""
    mean, per_category = mean_auroc(floor_runs, lambda r: -r["scores"])
    assert mean < AUROC_FLOOR - 0.3, f"negated scores still reach mean AUROC {mean:.3f}: {per_category}"


def test_the_floor_bites_on_shuffled_feature_channels(floor_runs):
    """Scoring the wrong features (the query's backbone channels in a fixed random order) falls to chance
    (measured 0.498), below the floor.

    Shuffling the spatial positions of the query features instead does not: the image score is a max over
    patches and the model shrinks toward a position-free posterior, so a defect stays visible wherever
    its patches land (measured mean AUROC 0.84 with positions shuffled, 0.83 without); what the model
    reads is the channels.
    """
    perm = torch.randperm(
        next(iter(floor_runs.values()))["features"].shape[1], generator=torch.Generator().manual_seed(0)
    )
    mean, per_category = mean_auroc(floor_runs, lambda r: image_scores(r["site"], r["features"][:, perm]))
    assert mean < AUROC_FLOOR - 0.15, f"shuffled channels still reach mean AUROC {mean:.3f}: {per_category}"


# --- decisions agree with score and threshold --------------------------------------------------------


def test_decisions_follow_the_score_the_threshold_and_the_uncertainty_band(floor_runs):
    seen = set()
    for category, r in floor_runs.items():
        site = r["site"]
        scores = r["scores"]
        band = np.sqrt(
            relative_sd(scores, site.model.dim, site.nu_n, site.kappa_n) ** 2
            + site.calibration.threshold_sd(site.target_fpr, site.df) ** 2
        )
        expected, uncertainty = decide(scores, site.threshold, band, site.z_review)
        for i, res in enumerate(r["results"]):
            where = f"{category} image {i}: score {res.score:.3f}, threshold {site.threshold:.3f}"
            assert res.threshold == site.threshold, where
            assert res.decision == expected[i] and res.uncertainty == pytest.approx(uncertainty[i]), where
            if res.decision == "anomalous":
                assert res.score > site.threshold and res.p_value < site.target_fpr, where
            elif res.decision == "normal":
                assert res.score < site.threshold and res.p_value > site.target_fpr, where
            else:
                assert res.decision == "review", where
            # the p-value crosses the target exactly where the score crosses the threshold
            assert (res.p_value < site.target_fpr) == (res.score > site.threshold), where
            seen.add(res.decision)
    assert seen == set(DECISIONS), f"the test set should reach every decision, got {sorted(seen)}"


# --- measured false-positive rate against the target ---------------------------------------------------

FPR_CATEGORIES = ("wood", "brushed_metal")
FPR_SHOTS = 8
FPR_TARGET = 0.1
FPR_SUPPORT_DRAWS = 6
HELD_OUT_NORMALS = 100
FPR_BAND = (0.05, 0.15)
FPR_SINGLE_DRAW_MAX = 0.3


@pytest.mark.parametrize("category", FPR_CATEGORIES)
def test_measured_false_positive_rate_is_near_its_target(category, lite2, frozen_checkpoint):
    """Site models adapted with ``target_fpr=0.1`` on K = 8 good images fire on about 10% of held-out normals.

    Each of 6 support draws is adapted through the real calibration path (the checkpoint's normality prior
    updated by the support's leave-one-out statistics) and its threshold applied to the same 100 held-out
    good images. Band: the mean over draws within [0.05, 0.15], the target +- 50%. Why that wide: a
    threshold learned from 8 images moves with the draw (per-draw rates over 12 draws from 0.01 to 0.22 on
    wood, 0.03 to 0.18 on brushed metal, 0.03 to 0.20 on fabric; sd about 0.06), which leaves the mean of 6
    draws a standard deviation of about 0.025, and the binomial noise of 600 image decisions adds 0.012:
    the band is about two standard deviations. Means measured over these 6 draws: wood 0.103, brushed
    metal 0.083 (over 12 draws: 0.109, 0.072, fabric 0.099). A calibration that ignores the support, like
    the analytic Gamma fallback with this checkpoint (no normality prior: 0.75-0.96 of normals flagged),
    or one that never fires, is far outside. No single draw may exceed 0.3 (measured at most 0.22).
    Not every category is this close: bottle averages 0.093 over these 6 draws, but tiles 0.025 and screw
    0.048 (over 12 draws 0.078 and 0.068, single draws up to 0.36), so the band is stated for the two above.
    """
    rates = measured_false_positive_rates(lite2, frozen_checkpoint, category)
    mean = float(np.mean(rates))
    assert FPR_BAND[0] <= mean <= FPR_BAND[1], (
        f"{category}: measured FPR {mean:.3f} (per draw {rates}), target {FPR_TARGET}, band {FPR_BAND}"
    )
    assert max(rates) <= FPR_SINGLE_DRAW_MAX, f"{category}: a support draw fires on {max(rates):.2f}: {rates}"


def measured_false_positive_rates(
    extractor,
    checkpoint: MetaCheckpoint,
    category: str,
    shots: int = FPR_SHOTS,
    target: float = FPR_TARGET,
    draws: int = FPR_SUPPORT_DRAWS,
) -> list[float]:
    """Per support draw: the share of the held-out normals above the adapted model's threshold."""
    held_out = good_images(category, _HELD_OUT, SEED, HELD_OUT_NORMALS)
    features = extractor.extract(np.stack(held_out), size=SIZE)
    rates = []
    for draw in range(draws):
        support = good_images(category, _SUPPORT, draw, shots)
        assert not pixel_hashes(support) & pixel_hashes(held_out)
        site = adapt(checkpoint, support, target_fpr=target, extractor=extractor)
        assert site.target_fpr == target and len(site.info["loo_statistics"]) == shots
        rates.append(float(np.mean(image_scores(site, features) > site.threshold)))
    return rates
