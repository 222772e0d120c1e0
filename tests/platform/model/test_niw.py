"""The NIW posterior and its Student-t predictive, against closed forms and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.niw import (
    NIWHyper,
    NIWPrototype,
    StudentT,
    fit_posteriors,
    global_statistics,
    niw_update,
    window_statistics,
)


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_niw_update_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    mu0, kappa0, nu0, psi0 = torch.tensor([0.0, 1.0]), 2.0, 5.0, torch.eye(2) * 3
    n, mean = 3, x.mean(0)
    scatter = (x - mean).t() @ (x - mean)
    post = niw_update(mu0, kappa0, nu0, psi0, n, mean, scatter)
    assert post.kappa.item() == 5 and post.nu.item() == 8
    np.testing.assert_allclose(post.mu.numpy(), (2 * np.array([0, 1]) + 3 * np.array([2, 2])) / 5)
    d = np.array([2.0, 1.0])
    expected = 3 * np.eye(2) + scatter.numpy() + (2 * 3 / 5) * np.outer(d, d)
    np.testing.assert_allclose(post.psi.numpy(), expected)
    # Sequential updates equal one batch update (conjugacy).
    m1, s1 = x[:1].mean(0), torch.zeros(2, 2)
    step = niw_update(mu0, kappa0, nu0, psi0, 1, m1, s1)
    rest = x[1:]
    m2 = rest.mean(0)
    step2 = niw_update(step.mu, step.kappa, step.nu, step.psi, 2, m2, (rest - m2).t() @ (rest - m2))
    np.testing.assert_allclose(step2.psi.numpy(), post.psi.numpy(), rtol=1e-10)
    np.testing.assert_allclose(step2.mu.numpy(), post.mu.numpy(), rtol=1e-10)


def test_student_t_matches_scipy_multivariate_t():
    rng = np.random.default_rng(0)
    d = 5
    a = rng.normal(size=(d, d))
    shape = a @ a.T + d * np.eye(d)
    loc, df = rng.normal(size=d), 4.5
    t = StudentT(torch.tensor(loc), torch.linalg.cholesky(torch.tensor(shape)), torch.tensor(df))
    x = rng.normal(size=(7, d)) * 3
    ours = t.log_prob(torch.tensor(x)).numpy()
    ref = stats.multivariate_t(loc=loc, shape=shape, df=df).logpdf(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_predictive_is_the_textbook_student_t():
    rng = np.random.default_rng(1)
    d = 3
    x = torch.tensor(rng.normal(size=(10, d)))
    mean = x.mean(0)
    post = niw_update(torch.zeros(d), 1.0, d + 2.0, torch.eye(d), 10, mean, (x - mean).t() @ (x - mean))
    pred = post.predictive()
    df = post.nu.item() - d + 1
    shape = post.psi.numpy() * (post.kappa.item() + 1) / (post.kappa.item() * df)
    q = rng.normal(size=(4, d))
    ref = stats.multivariate_t(loc=post.mu.numpy(), shape=shape, df=df).logpdf(q)
    np.testing.assert_allclose(pred.log_prob(torch.tensor(q)).numpy(), ref, rtol=1e-10)


def test_mahalanobis_over_d_follows_the_f_law():
    rng = np.random.default_rng(2)
    d, df = 4, 6.0
    shape = np.diag([1.0, 2.0, 0.5, 3.0])
    samples = stats.multivariate_t(loc=np.zeros(d), shape=shape, df=df).rvs(size=20000, random_state=rng)
    t = StudentT(torch.zeros(d), torch.linalg.cholesky(torch.tensor(shape)), torch.tensor(df))
    f = t.mahalanobis(torch.tensor(samples)).numpy() / d
    assert stats.kstest(f, stats.f(d, df).cdf).pvalue > 0.01


def test_window_statistics_pool_a_clipped_window_over_images():
    z = torch.arange(2 * 2 * 3 * 3, dtype=torch.float64).reshape(2, 2, 3, 3)
    count, mean, scatter = window_statistics(z, 3)
    assert count.tolist() == [8, 12, 8, 12, 18, 12, 8, 12, 8]  # corner 2x2, edge 2x3, centre 3x3, times K=2
    corner = torch.cat([z[k, :, 0:2, 0:2].reshape(2, -1).t() for k in range(2)])
    np.testing.assert_allclose(mean[0].numpy(), corner.mean(0).numpy())
    c = corner - corner.mean(0)
    np.testing.assert_allclose(scatter[0].numpy(), (c.t() @ c).numpy())
    g_count, g_mean, g_scatter = global_statistics(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert g_count.item() == 18
    np.testing.assert_allclose(g_scatter.numpy(), ((flat - flat.mean(0)).t() @ (flat - flat.mean(0))).numpy())


def test_local_posterior_shrinks_towards_global_with_few_shots():
    torch.manual_seed(0)
    d, h, w = 4, 6, 6
    offsets = torch.randn(1, d, h, w) * 3  # each position has its own mean
    few = offsets + 0.3 * torch.randn(2, d, h, w)
    many = offsets + 0.3 * torch.randn(64, d, h, w)
    hyper = NIWHyper(kappa0=4.0)
    g_few, l_few = fit_posteriors(few, hyper)
    _, l_many = fit_posteriors(many, hyper)
    target = offsets[0].permute(1, 2, 0).reshape(-1, d)
    err_few = (l_few.mu - target).norm(dim=1).mean()
    err_many = (l_many.mu - target).norm(dim=1).mean()
    assert err_many < err_few
    _, window_mean, _ = window_statistics(few, 3)
    pull = (l_few.mu - g_few.mu).norm(dim=1) / (window_mean - g_few.mu).norm(dim=1)
    np.testing.assert_allclose(pull.numpy(), 2 / (4 + 2))  # kappa0 = 4 against 2 effective observations
    assert torch.all(l_many.predictive().df > l_few.predictive().df)


def test_prototype_scores_a_shifted_patch_as_anomalous_and_is_differentiable():
    torch.manual_seed(1)
    d, h, w = 6, 8, 8
    base = torch.randn(1, d, h, w)
    support = base + 0.2 * torch.randn(5, d, h, w)
    query = base + 0.2 * torch.randn(2, d, h, w)
    query[1, :, 3, 4] += 3.0
    kappa = torch.tensor(1.0, requires_grad=True)
    proto = NIWPrototype(NIWHyper(kappa0=kappa)).fit(support)
    scores = proto.score(query)
    assert scores.shape == (2, h, w)
    maha = proto.mahalanobis(query).detach()
    assert maha[1, 3, 4] > 5 * maha[0].max()
    assert scores[1, 3, 4] > 2 * scores[0].max()
    assert torch.unravel_index(scores[1].argmax(), (h, w)) == (3, 4)
    scores.sum().backward()

    def total(k: float) -> float:
        return float(NIWPrototype(NIWHyper(kappa0=torch.tensor(k))).fit(support).score(query).sum())

    eps = 1e-5
    assert float(kappa.grad) == pytest.approx((total(1 + eps) - total(1 - eps)) / (2 * eps), rel=1e-5)
    lp = proto.log_prob(query).detach()
    np.testing.assert_allclose(
        lp.numpy(), (proto.predictive_.log_normaliser().detach().reshape(h, w) - scores.detach()).numpy(), rtol=1e-8
    )


def test_bad_hyperparameters_and_shapes_are_named():
    with pytest.raises(ConfigError, match="kappa0 must be a positive number, got -1"):
        NIWPrototype(NIWHyper(kappa0=-1.0))
    with pytest.raises(ConfigError, match="window must be an odd"):
        NIWPrototype(NIWHyper(window=2))
    proto = NIWPrototype().fit(torch.randn(3, 4, 5, 5))
    with pytest.raises(ConfigError, match=r"query maps have shape \(4, 6, 6\)"):
        proto.score(torch.randn(1, 4, 6, 6))
