"""Log-normal calibration of the image statistic: prior from meta-training, leave-one-out update."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.scoring import LogNormalCalibration, NormalityPrior, calibration_from_dict


def test_prior_only_threshold_is_the_student_t_quantile():
    cal = LogNormalCalibration(mean=1.0, mean_var=0.16, scale2=0.09, dof=4.0)
    expected = math.exp(1.0 + stats.t.ppf(0.95, 4.0) * math.sqrt(0.25))
    assert cal.threshold(0.05) == pytest.approx(expected)
    assert cal.p_value(expected) == pytest.approx(0.05)
    assert cal.p_value(1e-9) > 0.999
    with pytest.raises(ConfigError, match="between 0 and 1"):
        cal.threshold(1.5)


def test_update_is_the_conjugate_normal_update():
    cal = LogNormalCalibration(mean=0.0, mean_var=1.0, scale2=0.04, dof=4.0)
    x = np.array([1.0, 1.2, 0.8, 1.1, 0.9])
    post = cal.update(np.exp(x))
    precision = 1 / 1.0 + 5 / 0.04
    assert post.mean == pytest.approx((0 + x.sum() / 0.04) / precision)
    assert post.mean_var == pytest.approx(1 / precision)
    assert post.scale2 == pytest.approx((4 * 0.04 + ((x - x.mean()) ** 2).sum()) / 8)
    assert post.dof == 8 and post.n == 5
    assert calibration_from_dict(post.as_dict()) == post


def test_false_positive_rate_is_on_target_when_the_model_holds():
    """Categories whose normal log-statistics follow the prior's hierarchy: the average FPR is alpha."""
    rng = np.random.default_rng(0)
    prior = NormalityPrior({5: {"mean": 1.2, "between_var": 0.3**2, "within_var": 0.2**2}}, strength=4.0)
    rates = []
    for _ in range(400):
        mu = rng.normal(1.2, 0.3)
        loo = np.exp(rng.normal(mu, 0.2, size=5))
        threshold = prior.for_shots(5).update(loo).threshold(0.05)
        rates.append(np.mean(np.exp(rng.normal(mu, 0.2, size=500)) > threshold))
    assert 0.035 < np.mean(rates) < 0.065


def test_prior_is_estimated_per_support_size_and_the_nearest_is_used():
    logs = {("a", 1): [1.0, 1.2], ("b", 1): [2.0, 2.2], ("a", 5): [0.5, 0.7], ("b", 5): [0.9, 1.1]}
    prior = NormalityPrior.estimate(logs)
    assert prior.table[1]["mean"] == pytest.approx(1.6)
    assert prior.table[1]["between_var"] == pytest.approx(np.var([1.1, 2.1], ddof=1))
    assert prior.table[5]["within_var"] == pytest.approx((4 * 0.1**2) / 2)
    assert prior.for_shots(1).mean == pytest.approx(1.6)
    assert prior.for_shots(4).mean == pytest.approx(0.8)
    assert NormalityPrior.from_dict(prior.as_dict()).table == prior.table
    with pytest.raises(ConfigError, match="no normal images"):
        NormalityPrior.estimate({})
