"""The sums of the sites' summary vectors give what the per-site summaries gave."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bayprano.platform.federated.summaries import (
    feature_standardisation,
    feature_vector,
    normality_shots,
    read_validation,
    validation_vector,
)
from bayprano.platform.model.scoring import Calibration, NormalityPrior


def _site_summaries(seed: int, categories: int) -> dict:
    rng = np.random.default_rng(seed)
    logs = {}
    for c in range(categories):
        for k in (1, 2, 5):
            logs[(f"c{seed}-{c}", k)] = [
                (float(rng.normal(1 + c * 0.3, 0.2)), float(rng.normal(c, 1))) for _ in range(int(rng.integers(2, 6)))
            ]
    return NormalityPrior.summarize(logs)


def test_summed_validation_vectors_give_the_pooled_normality_prior_calibration_and_mean_auroc():
    shots = normality_shots(5)
    sites = [_site_summaries(s, n) for s, n in ((0, 2), (1, 1), (2, 3))]
    cals = [Calibration(64, 4.0 + i, 2.0 + i) for i in range(3)]
    aurocs = [0.9, math.nan, 0.7]
    total = sum(validation_vector(a, c, s, shots) for a, c, s in zip(aurocs, cals, sites))
    got = read_validation(total, 64, shots)
    assert got["auroc"] == pytest.approx(0.8) and got["validated"] == 2
    assert (got["calibration"].shape, got["calibration"].rate) == pytest.approx((15.0, 9.0))
    pooled: dict = {}
    for s in sites:
        for k, groups in s.items():
            pooled.setdefault(k, []).extend(groups)
    expected = NormalityPrior.from_summaries(pooled).table
    assert set(got["normality"].table) == set(expected)
    for k in expected:
        for field, value in expected[k].items():
            assert got["normality"].table[k][field] == pytest.approx(value, rel=1e-9, abs=1e-12), (k, field)


def test_summed_feature_vectors_give_the_pooled_standardisation():
    rng = np.random.default_rng(0)
    parts = [rng.normal(2.0, 3.0, (n, 4)) for n in (10, 30, 5)]
    total = sum(feature_vector(p.sum(0), (p**2).sum(0), len(p)) for p in parts)
    mean, std = feature_standardisation(total)
    everything = np.concatenate(parts)
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, everything.std(0), rtol=1e-9)
