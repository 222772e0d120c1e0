"""Proto-MAML pieces: episodes from cached features, the inner loop's exactness, meta-training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.protomaml import (
    MetaConfig,
    TaskBank,
    adapt_head,
    build_task_bank,
    calibrate,
    clone,
    episode_loss,
    feature_statistics,
    meta_train,
    sample_episode,
    support_loo_score,
    supervised_contrastive,
)
from bayprano.platform.model.bayes import BayesianPatchModel

from toy_tasks import toy_extract, toy_injector


def toy_bank(category="toy", n=12, seed=0) -> TaskBank:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (1, 32, 32, 3))
    images = np.clip(base + rng.normal(0, 6, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return build_task_bank(
        category, images, [f"{category}/{i}" for i in range(n)], toy_extract, toy_injector, seed=seed
    )


def make_model(bank: TaskBank) -> BayesianPatchModel:
    model = BayesianPatchModel(in_channels=12, dim=6, seed=0)
    model.set_feature_statistics(*feature_statistics({bank.category: bank}))
    return model


def test_episode_is_disjoint_and_anomalies_do_not_come_from_the_support():
    bank = toy_bank()
    rng = np.random.default_rng(3)
    for _ in range(20):
        ep = sample_episode(bank, 4, 3, 3, rng)
        assert not set(ep.support_index) & set(ep.query_normal_index)
        assert ep.query.shape == (6, 12, 8, 8) and ep.query_labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert (ep.query_masks[:3] == 0).all() and (ep.query_masks[3:].flatten(1).amax(1) > 0).all()
    with pytest.raises(
        ConfigError, match=r"shots=10 plus 3 normal query images needs 13 normal train images, category 'toy' has 12"
    ):
        sample_episode(bank, 10, 3, 1, rng)


def test_adapt_one_step_is_exactly_one_sgd_step():
    bank = toy_bank()
    model = make_model(bank)
    support = bank.normals[:3].float()
    lr = 0.1
    adapted = clone(model).adapt(support, steps=1, lr=lr)
    params = model.head_params()
    grads = torch.autograd.grad(support_loo_score(model, params, support), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        torch.testing.assert_close(adapted.params[name], p - lr * g)
    assert clone(model).adapt(support, steps=0).params["weight"] is model.head.weight


def test_first_order_gradient_skips_the_inner_hessian_and_second_order_does_not():
    bank = toy_bank()
    model = make_model(bank)
    support, query = bank.normals[:3].float(), bank.anomalies[:2].float()

    def outer_grad(first_order: bool) -> torch.Tensor:
        model.zero_grad()
        task = clone(model).adapt(support, steps=1, first_order=first_order, lr=0.5)
        task.embed(query).pow(2).mean().backward()
        return model.head.weight.grad.clone()

    fo, so = outer_grad(True), outer_grad(False)
    # First order: the gradient at the adapted weights, handed to the initial weights unchanged.
    task = clone(model).adapt(support, steps=1, first_order=True, lr=0.5)
    adapted = {k: v.detach().requires_grad_() for k, v in task.params.items()}
    model.embed(query, adapted).pow(2).mean().backward()
    torch.testing.assert_close(fo, adapted["weight"].grad)
    assert not torch.allclose(fo, so)


def test_supervised_contrastive_prefers_separated_classes():
    labels = torch.tensor([0, 0, 1, 1])
    separated = torch.tensor([[1.0, 0], [1.0, 0.1], [0, 1.0], [0.1, 1.0]])
    mixed = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0.1], [0.1, 1.0]])
    assert supervised_contrastive(separated, labels) < supervised_contrastive(mixed, labels)


def test_meta_training_lowers_the_outer_loss_and_calibrates():
    bank = toy_bank(n=16)
    model = make_model(bank)
    cfg = MetaConfig(
        shots=3,
        inner_steps=1,
        episodes=60,
        n_query_normal=2,
        n_query_anomalous=2,
        inner_positions=32,
        lr=1e-2,
        calibration_episodes=4,
    )
    gen = torch.Generator().manual_seed(0)
    probe = [sample_episode(bank, 3, 2, 2, np.random.default_rng(100 + i)) for i in range(6)]
    before = np.mean([episode_loss(model, ep, cfg, gen)[1]["loss"] for ep in probe])
    rows = meta_train(model, {"toy": bank}, cfg, log_every=20)
    after = np.mean([episode_loss(model, ep, cfg, gen)[1]["loss"] for ep in probe])
    assert len(rows) == 3 and rows[-1]["episode"] == 60
    assert after < 0.8 * before
    cal = calibrate(model, {"toy": bank}, cfg)
    assert cal.shape == 4 * 2 and 0 < cal.effective_patches < 64


def test_adapt_head_is_clone_adapt_detached_with_the_prototype_of_the_adapted_support():
    bank = toy_bank()
    model = make_model(bank)
    support, query = bank.normals[:3].float(), bank.anomalies[:2].float()
    adapted = adapt_head(model, support, steps=2)
    task = clone(model).adapt(support, steps=2)
    for name, value in task.params.items():
        torch.testing.assert_close(adapted.params[name], value.detach())
        assert not adapted.params[name].requires_grad
    z = task.embed(support).detach()
    torch.testing.assert_close(adapted.support_embeddings, z)
    torch.testing.assert_close(adapted.distance(query), model.prototype(z).distance(task.embed(query).detach()))
    assert adapt_head(model, support, steps=0).params["weight"].data_ptr() == model.head.weight.data_ptr()


@pytest.mark.parametrize("kind", ["niw", "euclidean"])
def test_a_prototype_fitted_at_some_positions_scores_exactly_those_positions(kind):
    model = BayesianPatchModel(in_channels=12, dim=6, seed=0, prototype=kind)
    z = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([0, 7, 12, 24])
    full = model.prototype(z[:3])
    part = model.prototype(z[:3], positions)
    torch.testing.assert_close(part.distance(z[3:]), full.distance(z[3:]).flatten(1)[:, positions])
    torch.testing.assert_close(part.score(z[3:]), full.score(z[3:]).flatten(1)[:, positions])
    assert full.distance(z[3:]).shape == (1, 5, 5)
    assert torch.all(full.score(z[3:])[0].flatten().argsort() == full.distance(z[3:])[0].flatten().argsort())


def test_meta_train_adds_each_extra_loss_term_and_reports_it_under_its_name():
    bank = toy_bank(n=16)
    cfg = MetaConfig(shots=3, inner_steps=1, episodes=3, n_query_normal=2, n_query_anomalous=2, inner_positions=32)
    plain, pulled = make_model(bank), make_model(bank)
    anchor = torch.cat([p.detach().reshape(-1) for p in pulled.parameters()])
    rows = meta_train(plain, {"toy": bank}, cfg, log_every=3)
    pulled_rows = meta_train(
        pulled,
        {"toy": bank},
        cfg,
        log_every=3,
        extra_losses={
            "pull": lambda m: 1e3 * (torch.cat([p.reshape(-1) for p in m.parameters()]) - anchor).pow(2).sum()
        },
    )
    assert "pull" not in rows[-1] and pulled_rows[-1]["pull"] > 0
    assert rows[0]["loss"] == pytest.approx(pulled_rows[0]["loss"], rel=0.2)  # the outer loss without the term

    def moved(m: BayesianPatchModel) -> float:
        return float((torch.cat([p.detach().reshape(-1) for p in m.parameters()]) - anchor).norm())

    assert moved(pulled) < 0.5 * moved(plain)


def test_calibrate_normality_records_a_rule_per_support_size_chosen_leaving_each_category_out():
    from bayprano.platform.meta.calibration import (
        RULE_EPISODES_PER_CATEGORY,
        calibrate_normality,
        choose_rules,
        normal_episodes,
    )

    banks = {c: toy_bank(c, n=12, seed=i) for i, c in enumerate(("a", "b", "c", "d"))}
    model = make_model(banks["a"])
    with torch.no_grad():
        model.log_inner_lr.fill_(0.0)  # a step large enough that where the inner loss is taken shows
    cfg = MetaConfig(shots=3, inner_steps=1, n_query_normal=3, calibration_episodes=4, inner_positions=32)
    episodes = normal_episodes(model, banks, cfg, per_category=RULE_EPISODES_PER_CATEGORY, loo=True)
    assert {(ep.shots, len(ep.loo_statistics)) for ep in episodes} == {(1, 0), (2, 2), (3, 3)}
    assert len(episodes) == 3 * 4 * RULE_EPISODES_PER_CATEGORY
    assert all(len(ep.query_log_statistics) == 3 and np.isfinite(ep.covariate) for ep in episodes)
    prior = calibrate_normality(model, banks, cfg)
    rules = choose_rules(episodes)
    for k in (1, 2, 3):
        assert prior.table[k]["rule"] == rules[k] and rules[k]["categories"] == 4
        assert prior.rule(k) == {key: rules[k][key] for key in ("use_covariate", "strength", "within", "loo_shift")}
        assert prior.table[k]["episode_within_var"] > 0 and ("loo_offset" in prior.table[k]) == (k >= 2)
    # what a site adapting on an episode's support computes: the same leave-one-out statistics and covariate
    from bayprano.platform.meta.checkpoint import MetaCheckpoint
    from bayprano.platform.model.scoring import Calibration
    from bayprano.platform.model.site_adapt import adapt_features

    ckpt = MetaCheckpoint(
        model, "toy", "toy:0", 32, Calibration.from_prior(6, 8.0), meta_config=dict(cfg.__dict__), normality=prior
    )
    rng = np.random.default_rng(cfg.seed + 104729)
    per_k = 4 * RULE_EPISODES_PER_CATEGORY
    for k in (1, 2, 3):
        for e in range(per_k):  # the same episodes again; a site adapts on the last one's support
            ep = sample_episode(banks["abcd"[e % 4]], k, cfg.n_query_normal, 0, rng)
        site = adapt_features(ckpt, ep.support)  # its inner loop on 32 of the 64 positions, as meta-training's
        assert site.info["inner_positions"] == 32
        recorded = [x for x in episodes if x.shots == k][per_k - 1]
        assert site.info["loo_statistics"] == pytest.approx(recorded.loo_statistics, rel=1e-5)
        assert site.info["shift_covariate"] == pytest.approx(recorded.covariate, rel=1e-5)
        assert site.info["calibration_rule"] == prior.rule(k)
    # leave-one-out statistics are drawn without touching the random stream: the queries are the same
    plain = normal_episodes(model, banks, cfg, per_category=RULE_EPISODES_PER_CATEGORY)
    assert [ep.query_log_statistics for ep in plain] == [ep.query_log_statistics for ep in episodes]
