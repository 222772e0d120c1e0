"""The same-backbone baselines against brute force: PatchCore's nearest-patch distance (with and without its
greedy k-center coreset), PaDiM's per-position Gaussian Mahalanobis distance, and the coreset itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayprano.platform.methods.anomaly_map import image_scores
from bayprano.platform.methods.padim.torch_model import PaDiM
from bayprano.platform.methods.patchcore.torch_model import PatchCore, greedy_coreset


def features(n: int, c: int = 12, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    """Feature maps with a per-position mean (so that positions differ), channel correlation and noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(100))
    mix = torch.randn(c, c, generator=torch.Generator().manual_seed(101)) / c**0.5
    noise = torch.einsum("dc,nchw->ndhw", mix, torch.randn(n, c, h, w, generator=gen))
    return base + 0.5 * noise


def as_patches(f: torch.Tensor) -> np.ndarray:
    """(N, C, h, w) -> (N * h * w, C) float64, in the (image, row, column) order."""
    return f.double().permute(0, 2, 3, 1).reshape(-1, f.shape[1]).numpy()


def brute_nearest(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    return np.sqrt(((query[:, None, :] - bank[None, :, :]) ** 2).sum(-1)).min(1)


def coverage_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance from any point to its nearest chosen point."""
    return float(brute_nearest(points, points[chosen]).max())


# --- PatchCore --------------------------------------------------------------------------------------------


def test_patchcore_scores_are_the_brute_force_nearest_patch_distances():
    support, query = features(3), features(2, seed=1)
    model = PatchCore(chunk=7).fit(support)  # a chunk that does not divide the 60 query patches
    np.testing.assert_array_equal(model.bank_.numpy(), as_patches(support).astype(np.float32))
    got = model.patch_scores(query)
    assert got.shape == (2, 5, 6)
    expected = brute_nearest(as_patches(query), as_patches(support)).reshape(2, 5, 6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    # a support image is its own nearest patch everywhere (cdist's |a|^2 + |b|^2 - 2ab form leaves float32
    # cancellation noise of about 1e-6 under the square root at zero distance)
    np.testing.assert_allclose(model.patch_scores(support[1:2]).numpy(), 0.0, atol=5e-3)
    np.testing.assert_allclose(image_scores(got).numpy(), expected.reshape(2, -1).max(1), rtol=1e-4)


def test_patchcore_reaches_its_coreset_when_the_bank_is_too_large():
    support, query = features(4), features(2, seed=1)  # 4 * 30 = 120 patches
    model = PatchCore(max_bank=100, coreset_ratio=0.25, seed=3).fit(support)
    bank = as_patches(support).astype(np.float32)
    assert model.bank_.shape == (30, 12)  # int(0.25 * 120) rows
    rows = [np.flatnonzero((bank == row).all(1)) for row in model.bank_.numpy()]
    assert all(len(r) == 1 for r in rows), "every coreset row is one of the support patches"
    assert len({int(r[0]) for r in rows}) == 30, "and no patch is taken twice"
    expected = brute_nearest(as_patches(query), model.bank_.double().numpy()).reshape(2, 5, 6)
    np.testing.assert_allclose(model.patch_scores(query).numpy(), expected, rtol=1e-4, atol=1e-4)
    # nearest distances to a subset are never below those to the whole bank
    full = PatchCore().fit(support).patch_scores(query)
    assert torch.all(model.patch_scores(query) >= full - 1e-5)
    assert bool((model.patch_scores(query) > full + 1e-3).any())


def test_patchcore_keeps_the_whole_bank_at_the_limit():
    support = features(4)
    assert PatchCore(max_bank=120).fit(support).bank_.shape == (120, 12)


# --- greedy coreset ---------------------------------------------------------------------------------------


def clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Points in a few tight clusters of very different sizes: random subsets miss the small ones."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [n - 12, 6, 3, 2, 1]
    centres = 10 * torch.randn(len(sizes), dim, generator=gen)
    return torch.cat([c + 0.3 * torch.randn(s, dim, generator=gen) for c, s in zip(centres, sizes)])


def test_greedy_coreset_is_the_farthest_point_sequence():
    """Without projection (dim <= projection_dim), each pick is the point farthest from those picked before."""
    bank = clustered(200, 16)
    chosen = greedy_coreset(bank, 20, seed=0).numpy()
    assert chosen.shape == (20,) and len(set(chosen.tolist())) == 20
    assert chosen.min() >= 0 and chosen.max() < 200
    x = bank.double().numpy()
    for i in range(1, len(chosen)):
        dist = brute_nearest(x, x[chosen[:i]])
        assert dist[chosen[i]] == pytest.approx(dist.max(), rel=1e-5), f"pick {i} is not the farthest point"


def test_greedy_coreset_covers_better_than_random_subsets():
    bank = clustered(200, 16, seed=1)
    x = bank.double().numpy()
    chosen = greedy_coreset(bank, 10, seed=0).numpy()
    greedy = coverage_radius(x, chosen)
    rng = np.random.default_rng(0)
    random_radii = [coverage_radius(x, rng.choice(200, 10, replace=False)) for _ in range(50)]
    assert greedy < min(random_radii), (greedy, min(random_radii))
    # it covers every cluster: each of the 5 clusters is within its spread of a chosen point
    assert greedy < 3.0 < np.median(random_radii)


def test_greedy_coreset_on_a_random_projection_of_wide_features():
    bank = clustered(300, 256, seed=2)
    chosen = greedy_coreset(bank, 15, seed=4, projection_dim=32).numpy()
    assert chosen.shape == (15,) and len(set(chosen.tolist())) == 15
    x = bank.double().numpy()
    rng = np.random.default_rng(1)
    random_radii = [coverage_radius(x, rng.choice(300, 15, replace=False)) for _ in range(30)]
    assert coverage_radius(x, chosen) < min(random_radii)
    np.testing.assert_array_equal(greedy_coreset(bank, 15, seed=4, projection_dim=32).numpy(), chosen)


def test_greedy_coreset_of_at_least_the_whole_bank_is_the_whole_bank():
    bank = clustered(30, 4)
    assert greedy_coreset(bank, 30).tolist() == list(range(30))
    assert greedy_coreset(bank, 50).tolist() == list(range(30))


# --- PaDiM ------------------------------------------------------------------------------------------------


def numpy_padim(support: np.ndarray, query: np.ndarray, index: np.ndarray, eps: float) -> np.ndarray:
    """Per position: the Gaussian of the K support vectors (unbiased covariance + eps I), then the
    Mahalanobis distance of each query vector at that position. Arrays (N, C, h, w) -> (B, h, w)."""
    k, _, h, w = support.shape
    out = np.empty((query.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            x = support[:, index, i, j]
            mean = x.mean(0)
            cov = np.cov(x, rowvar=False, ddof=1) if k > 1 else np.zeros((len(index), len(index)))
            cov = cov + eps * np.eye(len(index))
            diff = query[:, index, i, j] - mean
            out[:, i, j] = np.sqrt(np.einsum("bc,bc->b", diff, np.linalg.solve(cov, diff.T).T))
    return out


def test_padim_is_the_per_position_gaussian_mahalanobis_distance():
    support, query = features(8, c=12), features(3, c=12, seed=1)
    model = PaDiM(channels=5, eps=0.01, seed=2).fit(support)
    index = model.index_.numpy()
    assert index.shape == (5,) and np.all(np.diff(index) > 0) and index.max() < 12
    got = model.patch_scores(query)
    assert got.shape == (3, 5, 6)
    expected = numpy_padim(support.double().numpy(), query.double().numpy(), index, 0.01)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(
        model.mean_.numpy().reshape(5, 6, 5),
        support[:, index].double().mean(0).permute(1, 2, 0).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_padim_positions_are_separate():
    """A vector normal at one position is anomalous at another whose mean differs."""
    support = features(8, c=6)
    model = PaDiM(channels=6).fit(support)
    query = support[:1].clone()
    query[0, :, 2, 3] = support[:, :, 0, 0].mean(0)  # position (0, 0)'s mean, placed at (2, 3)
    scores = model.patch_scores(query)[0]
    assert scores.argmax().item() == 2 * 6 + 3
    assert scores[2, 3] > 3 * scores.flatten()[torch.arange(30) != 15].max()


def test_padim_takes_every_channel_when_asked_for_more_and_one_shot_is_euclidean():
    support, query = features(1, c=6), features(2, c=6, seed=1)
    model = PaDiM(channels=100, eps=0.04).fit(support)
    assert model.index_.tolist() == list(range(6))
    # with one image the covariance is eps I: the distance is the Euclidean one over sqrt(eps)
    expected = (query - support).norm(dim=1) / 0.2
    np.testing.assert_allclose(model.patch_scores(query).numpy(), expected.numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        model.patch_scores(query).numpy(),
        numpy_padim(support.double().numpy(), query.double().numpy(), np.arange(6), 0.04),
        rtol=1e-4,
    )


def test_image_score_is_the_largest_patch_score():
    p = torch.tensor([[[0.1, 0.7], [0.3, 0.2]], [[2.0, -1.0], [0.0, 1.5]]])
    assert image_scores(p).tolist() == pytest.approx([0.7, 2.0])
