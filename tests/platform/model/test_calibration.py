"""Log-normal calibration of the image statistic: prior from meta-training, leave-one-out update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
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


def _categories(rng, n, slope=2.0, between=0.1, within=0.15):
    """(covariate, mean log T) per category on the line 1 + slope * x, with a between-category spread."""
    x = rng.normal(0.3, 0.2, size=n)
    return x, 1.0 + slope * x + rng.normal(0, between, size=n)


def test_the_prior_is_a_regression_on_the_shift_covariate():
    rng = np.random.default_rng(1)
    x, mu = _categories(rng, 12, between=0.0)
    logs = {
        (f"c{i}", 1): [(float(v), float(x[i] + rng.normal(0, 0.05))) for v in rng.normal(mu[i], 0.15, 40)]
        for i in range(12)
    }
    prior = NormalityPrior.estimate(logs)
    e = prior.table[1]
    assert e["slope"] == pytest.approx(2.0, abs=0.25)
    assert e["between_var"] < 0.05 < e["between_var_raw"]
    assert e["within_var"] == pytest.approx(0.15**2, rel=0.3)
    assert prior.for_shots(1, 0.8).mean == pytest.approx(1 + 2 * 0.8, abs=0.15)
    assert prior.for_shots(1).mean == pytest.approx(e["mean"])  # no covariate: the plain level and spread
    assert prior.for_shots(1).mean_var == e["between_var_raw"]
    far, near = prior.for_shots(1, 2.0), prior.for_shots(1, e["x_mean"])
    assert far.mean_var > near.mean_var  # extrapolating the line costs certainty
    old = NormalityPrior({1: {"mean": 1.0, "between_var": 0.2, "within_var": 0.1}})
    assert old.for_shots(1, 5.0).mean == 1.0  # a checkpoint from before the covariate ignores it


def test_summaries_of_sites_pool_to_the_estimate_of_all_their_images():
    rng = np.random.default_rng(2)
    x, mu = _categories(rng, 6)
    logs = {(f"c{i}", 1): [(float(v), float(x[i])) for v in rng.normal(mu[i], 0.15, 20)] for i in range(6)}
    site_a = NormalityPrior.summarize({k: v for k, v in logs.items() if k[0] in ("c0", "c1", "c2")})
    site_b = NormalityPrior.summarize({k: v for k, v in logs.items() if k[0] not in ("c0", "c1", "c2")})
    pooled = NormalityPrior.from_summaries({1: site_a[1] + site_b[1]})
    direct = NormalityPrior.estimate(logs)
    assert pooled.table[1] == pytest.approx(direct.table[1])


def test_one_shot_false_positive_rate_is_on_target_with_the_covariate_and_not_without():
    """Categories whose level follows the covariate, all with the same within-category spread (so the prior
    is given many pseudo-observations behind it): K = 1 thresholds at the covariate hold alpha on average;
    the covariate-blind prior's wide threshold is far off category by category: nearly always 0 (a threshold
    that misses defects), sometimes far above alpha."""
    rng = np.random.default_rng(3)
    x, mu = _categories(rng, 30, slope=2.0, between=0.1)
    prior = NormalityPrior.estimate(
        {(f"c{i}", 1): [(float(v), float(x[i])) for v in rng.normal(mu[i], 0.15, 30)] for i in range(30)},
        strength=200.0,
    )
    x_new, mu_new = _categories(rng, 400, slope=2.0, between=0.1)
    with_cov, blind = [], []
    for xi, mi in zip(x_new, mu_new):
        normals = np.exp(rng.normal(mi, 0.15, size=500))
        with_cov.append(np.mean(normals > prior.for_shots(1, xi).threshold(0.05)))
        blind.append(np.mean(normals > prior.for_shots(1).threshold(0.05)))
    with_cov, blind = np.array(with_cov), np.array(blind)
    assert 0.03 < with_cov.mean() < 0.07
    assert np.mean(with_cov < 0.01) < 0.5 * np.mean(blind < 0.01)
    assert np.sqrt(np.mean((with_cov - 0.05) ** 2)) < 0.75 * np.sqrt(np.mean((blind - 0.05) ** 2))


def test_shift_covariate_is_low_for_a_texture_and_high_for_a_placed_part():
    from bayprano.platform.model.niw import NIWHyper, NIWPrototype
    from bayprano.platform.model.scoring import shift_covariate

    g = torch.Generator().manual_seed(0)
    d, h = 4, 12
    texture = torch.randn(d, 1, 1, generator=g).expand(d, h, h) + 0.05 * torch.randn(d, h, h, generator=g)
    part = 0.05 * torch.randn(d, h, h, generator=g)
    part[:, 4:8, 4:8] += 3.0 * torch.randn(d, 1, 1, generator=g)
    scores = {}
    for name, z in (("texture", texture), ("part", part)):
        z = z[None].contiguous()
        proto = NIWPrototype(NIWHyper()).fit(z)
        scores[name] = shift_covariate(proto.mahalanobis, z, d, shift=3)
    assert scores["texture"] < scores["part"] - 1.0


def _episodes(
    rng,
    categories,
    shots,
    per_category=10,
    queries=20,
    slope=2.0,
    within=None,
    covariate_noise=0.03,
    loo_bias=0.0,
    episode_sd=0.0,
):
    """Meta-training episodes of categories whose mean log T is 1 + slope * x (x their covariate) plus a
    between-category spread; ``within``: each category's own spread of log T (default 0.15 for all);
    ``loo_bias``: how much higher the support's leave-one-out log statistics run than new normal images;
    ``episode_sd``: how much one support's level moves around its category's (shared by its images)."""
    from bayprano.platform.meta.calibration import NormalEpisode

    x = rng.normal(0.3, 0.3, size=categories)
    mu = 1.0 + slope * x + rng.normal(0, 0.3 if slope == 0 else 0.05, size=categories)
    sd = np.full(categories, 0.15) if within is None else np.asarray(within)
    out = []
    for c in range(categories):
        for _ in range(per_category):
            level = mu[c] + rng.normal(0, episode_sd)
            loo = np.exp(rng.normal(level + loo_bias, sd[c], size=shots)).tolist() if shots >= 2 else []
            out.append(
                NormalEpisode(
                    f"c{c}",
                    shots,
                    float(x[c] + rng.normal(0, covariate_noise)),
                    rng.normal(level, sd[c], size=queries).tolist(),
                    loo,
                )
            )
    return out


def test_the_rule_conditions_on_the_covariate_where_it_predicts_the_level_and_costs_nothing_where_it_is_noise():
    from bayprano.platform.meta.calibration import choose_rules

    def best(rule, use_covariate):
        return min(c["pinball"] for c in rule["candidates"] if c["use_covariate"] == use_covariate)

    rng = np.random.default_rng(4)
    informative = choose_rules(_episodes(rng, 10, 1, slope=2.0))[1]
    assert informative["use_covariate"] is True, informative
    assert informative["categories"] == 10 and informative["episodes"] == 100
    assert len(informative["candidates"]) == 20  # covariate or not x two spreads x five strengths
    assert informative["pinball"] == min(c["pinball"] for c in informative["candidates"])
    assert best(informative, False) > 2 * informative["pinball"]  # blind to the covariate: far worse
    assert 0.01 < informative["fpr"] < 0.1  # the chosen rule's held-out FPR: on the safe side of 0.05
    # a covariate unrelated to the level: either rule may win, by little; the choice costs almost nothing
    noise = choose_rules(_episodes(rng, 30, 1, slope=0.0, covariate_noise=0.3, per_category=4))[1]
    assert noise["pinball"] > 0.9 * best(noise, False)


def test_the_rule_trusts_the_prior_spread_where_categories_share_it_and_the_support_where_they_do_not():
    from bayprano.platform.meta.calibration import choose_rules

    rng = np.random.default_rng(5)
    shared = choose_rules(_episodes(rng, 10, 5, slope=0.0))[5]
    varied = choose_rules(_episodes(rng, 10, 5, slope=0.0, within=np.geomspace(0.03, 0.8, 10)))[5]
    assert len(shared["candidates"]) == 40  # and with or without the leave-one-out shift
    assert shared["strength"] >= 8.0, shared
    assert varied["strength"] <= 4.0, varied


def test_leave_one_out_statistics_that_run_high_are_shifted_by_the_gap_measured_at_meta_training():
    from bayprano.platform.meta.calibration import choose_rules, episode_prior

    rng = np.random.default_rng(7)
    episodes = _episodes(rng, 10, 5, slope=0.0, loo_bias=0.4)
    rule = choose_rules(episodes)[5]
    assert rule["loo_shift"] is True, rule
    unshifted = min((c for c in rule["candidates"] if not c["loo_shift"]), key=lambda c: c["pinball"])
    assert unshifted["fpr"] < 0.5 * rule["fpr"]  # without the shift the threshold sits too high
    prior = episode_prior(episodes)
    assert prior.table[5]["loo_offset"] == pytest.approx(-0.4, abs=0.05)
    assert prior.table[5]["episode_within_var"] == pytest.approx(0.15**2, rel=0.15)
    loo = [2.0, 2.5, 3.0, 2.2, 2.8]
    ruled = prior.with_rules({5: {"loo_shift": True, "strength": 4.0}})
    expected = prior.for_shots(5).update(np.array(loo) * np.exp(prior.table[5]["loo_offset"]))
    assert ruled.site_calibration(5, None, loo) == expected


def test_a_site_starts_from_the_chosen_rule_and_an_older_prior_keeps_the_one_shot_covariate():
    from bayprano.platform.meta.calibration import choose_rules, episode_prior

    rng = np.random.default_rng(6)
    episodes = _episodes(rng, 8, 1, slope=0.0, covariate_noise=0.3) + _episodes(rng, 8, 5, slope=2.0)
    rules = choose_rules(episodes)
    assert choose_rules(episodes[:20]) == {}  # two categories: nothing to leave out, the default rule stays
    prior = episode_prior(episodes)
    restored = NormalityPrior.from_dict(prior.with_rules(rules).as_dict())
    loo = [3.0, 3.5, 4.0, 3.2, 3.8]
    for k in (1, 5):
        r = rules[k]
        assert restored.rule(k) == {key: r[key] for key in ("use_covariate", "strength", "within", "loo_shift")}
        cal = prior.for_shots(k, 0.9 if r["use_covariate"] else None, r["strength"], r["within"])
        if k == 5:
            cal = cal.update(np.array(loo) * (np.exp(prior.table[5]["loo_offset"]) if r["loo_shift"] else 1.0))
        assert restored.site_calibration(k, 0.9, loo if k == 5 else []) == cal
    # without a choice (a prior from before the choice, or one from too few categories): covariate at K = 1 only
    assert prior.rule(1) == {
        "use_covariate": True,
        "strength": prior.strength,
        "within": "category",
        "loo_shift": False,
    }
    assert prior.site_calibration(5, 0.9, loo) == prior.for_shots(5).update(loo)
    assert prior.site_calibration(1, 0.9) == prior.for_shots(1, 0.9)


def test_where_supports_move_the_level_the_rule_takes_one_episodes_spread():
    """Each support's images share a level of their own around the category's: after the leave-one-out
    update the level is the support's, and what is left is the spread inside one episode."""
    from bayprano.platform.meta.calibration import choose_rules, episode_prior

    rng = np.random.default_rng(8)
    episodes = _episodes(rng, 10, 5, slope=0.0, within=np.full(10, 0.1), episode_sd=0.3)
    rule = choose_rules(episodes)[5]
    assert rule["within"] == "episode", rule
    e = episode_prior(episodes).table[5]
    assert e["episode_within_var"] == pytest.approx(0.1**2, rel=0.2)
    assert e["within_var"] > 5 * e["episode_within_var"]


def test_a_category_never_calibrates_on_a_prior_that_saw_it(monkeypatch):
    from bayprano.platform.meta import calibration

    seen = []
    real = calibration.episode_prior

    def spy(episodes, *args, **kwargs):
        seen.append({ep.category for ep in episodes})
        return real(episodes, *args, **kwargs)

    monkeypatch.setattr(calibration, "episode_prior", spy)
    episodes = _episodes(np.random.default_rng(9), 5, 5, slope=0.0, per_category=3)
    calibration.choose_rules(episodes)
    assert sorted(map(sorted, seen)) == sorted(sorted({f"c{i}" for i in range(5)} - {f"c{j}"}) for j in range(5))
