"""Decisions from an image statistic, its threshold and its uncertainty band; the analytic Gamma calibration of
the effective patch count (``Calibration``), checked against scipy and against simulated maxima of F variables."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.scoring import (
    DECISIONS,
    Calibration,
    LogNormalCalibration,
    NormalityPrior,
    calibration_from_dict,
    decide,
    decision_sd,
    relative_sd,
)

# --- decide ---------------------------------------------------------------------------------------------


def test_decisions_are_the_three_documented_ones():
    assert DECISIONS == ("normal", "anomalous", "review")


def test_far_above_far_below_and_inside_the_band():
    threshold, sd = 4.0, 0.1
    stats_ = np.array([4.0 * math.exp(0.5), 4.0 * math.exp(-0.5), 4.0 * math.exp(0.05), 4.0 * math.exp(-0.05), 4.0])
    decisions, uncertainty = decide(stats_, threshold, np.full(5, sd), z_review=1.0)
    assert decisions == ["anomalous", "normal", "review", "review", "review"]
    z = np.log(stats_ / threshold) / sd
    np.testing.assert_allclose(uncertainty, 2 * stats.norm.sf(np.abs(z)), rtol=1e-12)
    assert uncertainty[4] == pytest.approx(1.0)  # on the threshold: a coin flip
    assert uncertainty[0] == pytest.approx(uncertainty[1]) and uncertainty[0] < 1e-6


def test_the_band_edges_belong_to_the_confident_decisions():
    """z = +z_review is anomalous, z = -z_review normal; just inside either edge is review."""
    threshold, sd = 2.0, 0.25
    up, down = threshold * math.exp(sd), threshold * math.exp(-sd)
    z_up, z_down = (np.log(up) - math.log(threshold)) / sd, (np.log(down) - math.log(threshold)) / sd
    # the edges exactly as decide computes them
    assert decide([up], threshold, [sd], z_review=z_up)[0] == ["anomalous"]
    assert decide([down], threshold, [sd], z_review=-z_down)[0] == ["normal"]
    inside = np.nextafter(z_up, np.inf)
    assert decide([up], threshold, [sd], z_review=inside)[0] == ["review"]
    assert decide([down], threshold, [sd], z_review=np.nextafter(-z_down, np.inf))[0] == ["review"]
    # the same images with the default band of one standard deviation
    assert decide([up * 1.001, down / 1.001, up / 1.001, down * 1.001], threshold, [sd] * 4)[0] == [
        "anomalous",
        "normal",
        "review",
        "review",
    ]


def test_a_zero_width_band_is_the_plain_threshold():
    threshold = 3.0
    t = np.array([2.999, 3.0, 3.001])
    decisions, _ = decide(t, threshold, np.full(3, 0.2), z_review=0.0)
    assert decisions == ["normal", "anomalous", "anomalous"]  # a statistic on the threshold is anomalous


def test_a_wider_band_only_turns_confident_decisions_into_review():
    rng = np.random.default_rng(0)
    t = np.exp(rng.normal(0.0, 0.5, 500))
    sd = rng.uniform(0.05, 0.3, 500)
    narrow, _ = decide(t, 1.0, sd, z_review=0.5)
    wide, _ = decide(t, 1.0, sd, z_review=2.0)
    assert sum(d == "review" for d in wide) > sum(d == "review" for d in narrow) > 0
    for a, b in zip(narrow, wide):
        assert b == a or b == "review", (a, b)
    expected = np.where(np.log(t) / sd >= 2.0, "anomalous", np.where(np.log(t) / sd <= -2.0, "normal", "review"))
    assert wide == expected.tolist()


def test_a_larger_posterior_uncertainty_sends_the_same_image_to_review():
    t, threshold = np.array([1.5, 1.5]), 1.0
    decisions, uncertainty = decide(t, threshold, np.array([0.1, 1.0]))
    assert decisions == ["anomalous", "review"]
    assert uncertainty[0] < 0.05 < uncertainty[1]


def test_degenerate_inputs_stay_finite():
    """A zero statistic is clamped (certainly normal); a zero band is clamped (no review away from threshold)."""
    decisions, uncertainty = decide(np.array([0.0, 1.2, 0.8]), 1.0, np.array([0.1, 0.0, 0.0]))
    assert decisions == ["normal", "anomalous", "normal"]
    assert np.all(np.isfinite(uncertainty)) and np.all(uncertainty < 1e-12)


def test_relative_sd_is_the_wishart_and_gaussian_parts_of_the_posterior():
    t, dim, nu, kappa = np.array([0.5, 2.0, 8.0]), 16, 40.0, 6.0
    m = t * dim
    np.testing.assert_allclose(relative_sd(t, dim, nu, kappa), np.sqrt(2 / nu + 4 / (kappa * m)), rtol=1e-12)
    # more support (larger nu and kappa) narrows the band
    assert np.all(relative_sd(t, dim, 4 * nu, 4 * kappa) < relative_sd(t, dim, nu, kappa))


# --- the threshold's own uncertainty in the band ----------------------------------------------------------

# The one-shot prior a fold measured on DINOv2 (level 0.79, spread of levels across categories 0.61): a new
# product whose good images run at log T 2.25 (as the synthetic screw's did) lies far above that level.
ONE_SHOT_PRIOR = LogNormalCalibration(mean=0.79, mean_var=0.37, scale2=0.036, dof=32.0)
# That fold's K = 1 entry and the rule meta-validation chose for it (the plain prior, one episode's spread)
SCREW_FOLD_K1 = {
    "mean": 0.7924,
    "slope": -1.8627,
    "x_mean": 0.2257,
    "x_ss": 0.1542,
    "x_within_var": 0.0015,
    "n_categories": 5,
    "between_var": 0.3101,
    "between_var_raw": 0.3664,
    "within_var": 0.0390,
    "episode_within_var": 0.0356,
    "rule": {"use_covariate": False, "strength": 32.0, "within": "episode", "loo_shift": False},
}


def test_a_site_of_one_shot_gets_the_folds_spread_of_levels_as_its_thresholds_uncertainty():
    site = NormalityPrior({1: SCREW_FOLD_K1}, 4.0).site_calibration(1, 1.12, [])
    assert site.mean == pytest.approx(0.7924) and site.mean_var == pytest.approx(0.3664)
    assert site.threshold_sd() == pytest.approx(math.sqrt(0.3664))
    assert site.threshold(0.05) == pytest.approx(ONE_SHOT_PRIOR.threshold(0.05), rel=0.01)


def test_the_band_adds_the_thresholds_uncertainty_to_the_images_in_quadrature():
    t, dim, nu, kappa = np.array([0.5, 2.0, 8.0]), 16, 40.0, 6.0
    own = relative_sd(t, dim, nu, kappa)
    band = decision_sd(t, dim, nu, kappa, ONE_SHOT_PRIOR, 0.05, None)
    np.testing.assert_allclose(band, np.sqrt(own**2 + 0.37), rtol=1e-12)
    assert ONE_SHOT_PRIOR.threshold_sd() == pytest.approx(math.sqrt(0.37))
    # each leave-one-out statistic narrows the level, and with it the threshold's uncertainty
    five = ONE_SHOT_PRIOR.update(np.exp([2.1, 2.2, 2.3, 2.25, 2.4]))
    assert five.threshold_sd() == pytest.approx(math.sqrt(1 / (1 / 0.37 + 5 / 0.036)))  # 0.084 against 0.61


def test_the_analytic_calibrations_threshold_uncertainty_comes_from_the_quantiles_of_m():
    prior = Calibration.from_prior(DIM, 30.0, strength=4.0)
    lo_m, hi_m = stats.gamma.ppf([0.15865525393145707, 0.8413447460685429], 4.0, scale=30.0 / 4.0)
    expected = (
        math.log(Calibration(DIM, 1.0, 1.0 / hi_m).threshold(0.05, DF))
        - math.log(Calibration(DIM, 1.0, 1.0 / lo_m).threshold(0.05, DF))
    ) / 2
    assert prior.threshold_sd(0.05, DF) == pytest.approx(expected, rel=1e-9) and expected > 0
    more = prior.update(np.full(60, prior.threshold(0.05, DF)), np.full(60, DF))
    assert more.threshold_sd(0.05, DF) < 0.5 * prior.threshold_sd(0.05, DF)
    # no jump where the Gamma posterior's shape passes 1, and finite for a tiny effective patch count
    around_one = [Calibration(DIM, shape, shape / 36.0).threshold_sd(0.05, DF) for shape in (0.99, 1.0, 1.01)]
    assert max(around_one) - min(around_one) < 0.03 * around_one[1]  # measured 1.4%; a clamp at shape 1 jumped 57%
    assert math.isfinite(Calibration(DIM, 0.5, 0.5 / 0.01).threshold_sd(0.05, DF))


def test_one_shot_of_an_unusual_product_sends_its_good_images_to_review_instead_of_deciding_them():
    """One good image of a product whose good images score far above anything meta-training saw. Its threshold (at the prior's level) is exceeded by
    nearly every good image; with the image's own uncertainty alone they are decided anomalous, silently
    missing the target FPR. With the threshold's uncertainty in the band they go to review; defects far
    above stay anomalous; five shots reveal the level and the good images are decided normal again."""
    rng = np.random.default_rng(0)
    good, defects = np.exp(rng.normal(2.25, 0.19, 2000)), np.exp(rng.normal(3.6, 0.3, 2000))
    own = np.full(2000, 0.05)  # the image's own relative sd, as a posterior of this size gives

    def shares(cal, images, band):
        decisions = np.array(decide(images, cal.threshold(0.05), band, z_review=1.0)[0])
        return {d: float(np.mean(decisions == d)) for d in DECISIONS}

    with_threshold = np.sqrt(own**2 + ONE_SHOT_PRIOR.threshold_sd() ** 2)
    assert np.mean(good > ONE_SHOT_PRIOR.threshold(0.05)) > 0.95  # the target is missed whatever the band
    assert shares(ONE_SHOT_PRIOR, good, own)["anomalous"] > 0.9  # ... silently, with the image's band alone
    one_shot = shares(ONE_SHOT_PRIOR, good, with_threshold)
    assert one_shot["review"] > 0.8 and one_shot["anomalous"] < 0.15, one_shot
    assert shares(ONE_SHOT_PRIOR, defects, with_threshold)["anomalous"] > 0.99
    # five shots at the product's quantiles (no lucky draw): their leave-one-out statistics show the level
    five = ONE_SHOT_PRIOR.update(np.exp(2.25 + 0.19 * stats.norm.ppf((np.arange(5) + 0.5) / 5)))
    band = np.sqrt(own**2 + five.threshold_sd() ** 2)
    five_shots = shares(five, good, band)
    assert five_shots["normal"] > 0.8 and five_shots["anomalous"] < 0.03, five_shots  # measured 0.88, 0.012
    assert shares(five, defects, band)["anomalous"] > 0.99


# --- Calibration (Gamma posterior over the effective patch count M) -------------------------------------

DIM, DF = 8, 12.0


def max_of_f(rng: np.random.Generator, m: int, n: int, dim: int = DIM, df: float = DF) -> np.ndarray:
    """``n`` image statistics, each the largest of ``m`` independent F(dim, df) patch values."""
    return stats.f.rvs(dim, df, size=(n, m), random_state=rng).max(1)


def test_from_prior_sets_the_gamma_prior_with_mean_m_prior():
    cal = Calibration.from_prior(DIM, 50.0, strength=4.0)
    assert (cal.dim, cal.shape, cal.rate) == (DIM, 4.0, 4.0 / 50.0)
    assert cal.effective_patches == pytest.approx(50.0)
    assert cal.describe() == "effective patch count 50.0"
    assert Calibration.from_prior(DIM, 50.0).shape == 4.0  # default strength


@pytest.mark.parametrize("bad", [0.0, -3.0, math.inf, math.nan])
def test_from_prior_refuses_a_count_that_is_not_positive_and_finite(bad):
    with pytest.raises(ConfigError, match=rf"effective patch count must be positive, got {bad}"):
        Calibration.from_prior(DIM, bad)


def test_update_adds_each_image_as_an_exponential_observation():
    """-log F_cdf(T_i) is Exponential(M) for a normal image: each image adds 1 to the shape and that value to
    the rate of the Gamma posterior."""
    prior = Calibration.from_prior(DIM, 30.0, strength=2.0)
    t, dfs = np.array([3.1, 4.5, 2.2]), np.array([10.0, 12.0, 20.0])
    post = prior.update(t, dfs)
    u = -np.log(stats.f.cdf(t, DIM, dfs))
    assert post.shape == pytest.approx(2.0 + 3)
    assert post.rate == pytest.approx(2.0 / 30.0 + u.sum(), rel=1e-12)
    assert post.effective_patches == pytest.approx(5.0 / (2.0 / 30.0 + u.sum()))
    assert (prior.shape, prior.rate) == (2.0, 2.0 / 30.0)  # update returns a new posterior
    assert prior.update([], []) == prior


def test_estimate_is_the_maximum_likelihood_count_and_recovers_the_simulated_one():
    rng = np.random.default_rng(0)
    t = max_of_f(rng, 40, 400)
    est = Calibration.estimate(DIM, t, DF)
    u = -stats.f.logcdf(t, DIM, DF)
    assert est.effective_patches == pytest.approx(len(t) / u.sum(), rel=1e-12)
    assert est.effective_patches == pytest.approx(40, rel=0.12)  # sd of the MLE: 40 / sqrt(400) = 5%
    with pytest.raises(ConfigError, match="no normal images to estimate from"):
        Calibration.estimate(DIM, [], DF)


def test_a_wrong_prior_is_pulled_to_the_data():
    rng = np.random.default_rng(1)
    t = max_of_f(rng, 40, 300)
    post = Calibration.from_prior(DIM, 400.0, strength=4.0).update(t, np.full(len(t), DF))
    assert post.effective_patches == pytest.approx(40, rel=0.15)
    weak_data = Calibration.from_prior(DIM, 400.0, strength=4.0).update(t[:2], [DF, DF])
    assert 40 < weak_data.effective_patches < 400


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_threshold_is_where_the_image_p_value_equals_alpha(alpha):
    cal = Calibration(DIM, shape=10.0, rate=10.0 / 25.0)  # M = 25
    thr = cal.threshold(alpha, DF)
    assert stats.f.cdf(thr, DIM, DF) ** 25 == pytest.approx(1 - alpha, rel=1e-9)
    assert thr == pytest.approx(stats.f.ppf((1 - alpha) ** (1 / 25), DIM, DF), rel=1e-9)
    assert float(cal.p_value(thr, DF)) == pytest.approx(alpha, rel=1e-6)
    assert cal.threshold(alpha / 2, DF) > thr  # a stricter target needs a higher statistic


def test_p_value_is_one_minus_the_cdf_of_the_maximum():
    cal = Calibration(DIM, shape=3.0, rate=3.0)  # M = 1: the plain F upper tail
    t = np.array([0.5, 1.0, 3.0, 10.0])
    np.testing.assert_allclose(cal.p_value(t, DF), stats.f.sf(t, DIM, DF), rtol=1e-9)
    m30 = Calibration(DIM, shape=30.0, rate=1.0)
    np.testing.assert_allclose(m30.p_value(t, DF), 1 - stats.f.cdf(t, DIM, DF) ** 30, rtol=1e-9)
    assert np.all(np.diff(m30.p_value(t, DF)) < 0)


def test_the_threshold_holds_its_false_positive_rate_on_simulated_normal_images():
    """Calibrated on 200 simulated normal images, the threshold flags about alpha of 4000 fresh ones."""
    rng = np.random.default_rng(2)
    cal = Calibration.from_prior(DIM, 100.0, strength=2.0).update(max_of_f(rng, 60, 200), np.full(200, DF))
    fresh = max_of_f(rng, 60, 4000)
    for alpha in (0.05, 0.1):
        rate = float(np.mean(fresh > cal.threshold(alpha, DF)))
        # binomial sd on 4000 images <= 0.005, and the estimated M is within about 7% of 60
        assert abs(rate - alpha) < 0.3 * alpha, (alpha, rate, cal.effective_patches)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_threshold_refuses_a_target_outside_zero_one(alpha):
    with pytest.raises(ConfigError, match=rf"target false-positive rate must be between 0 and 1, got {alpha}"):
        Calibration.from_prior(DIM, 10.0).threshold(alpha, DF)


def test_round_trips_through_its_dict():
    cal = Calibration.from_prior(DIM, 25.0).update([3.0, 4.0], [DF, DF])
    back = calibration_from_dict(cal.as_dict())
    assert isinstance(back, Calibration) and back == cal
    assert back.threshold(0.05, DF) == cal.threshold(0.05, DF)
