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


def _calibration_episodes(seed: int, categories: int, per_category: int = 4) -> list:
    """Normal episodes at K = 1, 2, 5 of categories with their own level, spread and leave-one-out bias,
    the level following the covariate (so the rules differ in what they are worth)."""
    from bayprano.platform.meta.calibration import NormalEpisode

    rng = np.random.default_rng(seed)
    out = []
    for c in range(categories):
        x = float(rng.normal(0.3, 0.3))
        level, sd, bias = 1.0 + 1.5 * x + rng.normal(0, 0.1), float(rng.uniform(0.08, 0.4)), float(rng.normal(0.2, 0.1))
        for k in (1, 2, 5):
            for _ in range(per_category):
                loo = np.exp(rng.normal(level + bias, sd, size=k)).tolist() if k >= 2 else []
                queries = rng.normal(level, sd, size=6).tolist()
                out.append(NormalEpisode(f"site{seed}-c{c}", k, x + float(rng.normal(0, 0.05)), queries, loo))
    return out


def test_two_secure_sums_choose_the_calibration_rule_that_pooling_every_sites_episodes_chooses():
    from bayprano.platform.federated.summaries import (
        calibration_vector,
        prior_from_calibration_vector,
        rule_loss_vector,
        rules_from_loss_vector,
    )
    from bayprano.platform.meta.calibration import choose_rules, episode_prior

    shots = normality_shots(5)
    sites = [_calibration_episodes(s, n) for s, n in ((0, 2), (1, 1), (2, 3))]
    pooled = [ep for site in sites for ep in site]
    total = sum(calibration_vector(site, shots) for site in sites)

    prior = prior_from_calibration_vector(total, shots)
    expected_prior = episode_prior(pooled).table
    assert set(prior.table) == set(expected_prior) == {1, 2, 5}
    for k, entry in expected_prior.items():
        assert set(prior.table[k]) == set(entry), k  # the episode terms too: loo_offset at K >= 2 only
        for field, value in entry.items():
            assert prior.table[k][field] == pytest.approx(value, rel=1e-9, abs=1e-12), (k, field)

    losses = sum(rule_loss_vector(site, total, shots) for site in sites)
    rules = rules_from_loss_vector(losses, shots)
    expected = choose_rules(pooled)
    assert set(rules) == set(expected) == {1, 2, 5}
    for k, rule in expected.items():
        got = rules[k]
        assert (got["categories"], got["episodes"]) == (rule["categories"], rule["episodes"]) == (6, 24)
        assert [c["pinball"] for c in got["candidates"]] == pytest.approx([c["pinball"] for c in rule["candidates"]])
        assert [c["fpr"] for c in got["candidates"]] == pytest.approx([c["fpr"] for c in rule["candidates"]])
        fields = ("use_covariate", "strength", "within", "loo_shift")
        assert {f: got[f] for f in fields} == {f: rule[f] for f in fields}, k
    # the choice is not the default everywhere: the sums decide something (the level follows the covariate)
    assert rules[1]["use_covariate"] is True and any(
        not rules[k]["loo_shift"] or rules[k]["strength"] != 4.0 for k in (2, 5)
    )


def test_a_site_never_calibrates_its_categories_on_a_prior_that_saw_them(monkeypatch):
    """Every prior a site scores its held-out category on is the pooled prior of all the other categories,
    at every site: none of the held-out category's images is in it."""
    from bayprano.platform.federated import summaries
    from bayprano.platform.meta.calibration import episode_prior

    seen = []
    real = summaries.score_rules

    def spy(prior, held_out, *args):
        seen.append((prior, {ep.category for ep in held_out}, held_out[0].shots))
        return real(prior, held_out, *args)

    monkeypatch.setattr(summaries, "score_rules", spy)
    shots = normality_shots(5)
    sites = [_calibration_episodes(0, 3), _calibration_episodes(1, 2)]
    pooled = [ep for site in sites for ep in site]
    total = sum(summaries.calibration_vector(site, shots) for site in sites)
    for site in sites:
        summaries.rule_loss_vector(site, total, shots)
    assert len(seen) == 5 * len(shots)  # each category once per K
    for prior, held, k in seen:
        (category,) = held
        others = episode_prior([ep for ep in pooled if ep.category != category]).table[k]
        assert prior.table[k]["n_categories"] == 4
        for field, value in others.items():
            assert prior.table[k][field] == pytest.approx(value, rel=1e-9, abs=1e-12), (category, k, field)


def test_rule_sums_of_the_wrong_length_are_refused_with_the_lengths():
    from bayprano.platform.errors import DataError
    from bayprano.platform.federated.summaries import (
        calibration_size,
        prior_from_calibration_vector,
        rule_loss_size,
        rules_from_loss_vector,
    )

    shots = normality_shots(5)
    with pytest.raises(DataError, match=f"expected {calibration_size(shots)} values"):
        prior_from_calibration_vector(np.zeros(3), shots)
    with pytest.raises(DataError, match=f"expected {rule_loss_size(shots)} values"):
        rules_from_loss_vector(np.zeros(5), shots)
    assert rules_from_loss_vector(np.zeros(rule_loss_size(shots)), shots) == {}  # no category: default rules
