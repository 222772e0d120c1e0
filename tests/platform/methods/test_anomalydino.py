"""The anomalydino baseline against brute force: the cosine distance of each query patch to its nearest
support patch, whole-vector normalised, in chunks that need not divide the query."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bayprano.platform.methods import MethodContext, get_method
from bayprano.platform.methods.anomalydino.torch_model import CosineNearestPatch


def features(n: int, c: int = 10, h: int = 4, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)) + 0.3


def brute_cosine_nearest(query: torch.Tensor, support: torch.Tensor) -> np.ndarray:
    q = query.double().permute(0, 2, 3, 1).reshape(-1, query.shape[1]).numpy()
    s = support.double().permute(0, 2, 3, 1).reshape(-1, support.shape[1]).numpy()
    cos = np.array([[a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for b in s] for a in q])
    return (1.0 - cos.max(1)).reshape(query.shape[0], query.shape[2], query.shape[3])


def test_scores_are_the_brute_force_cosine_nearest_patch_distances():
    support, query = features(3), features(2, seed=1)
    model = CosineNearestPatch(chunk=7).fit(support)  # 7 does not divide the 40 query patches
    got = model.patch_scores(query)
    assert got.shape == (2, 4, 5)
    np.testing.assert_allclose(got.numpy(), brute_cosine_nearest(query, support), atol=1e-5)
    # scale-free per patch, and a support image is its own nearest patch everywhere
    np.testing.assert_allclose(model.patch_scores(query * 3.0).numpy(), got.numpy(), atol=1e-5)
    np.testing.assert_allclose(model.patch_scores(support[2:3]).numpy(), 0.0, atol=1e-5)


def test_per_tap_normalised_features_give_the_mean_of_the_taps_cosines():
    """DINOv2's taps come L2-normalised one by one: the whole-vector cosine is then the mean of the taps'."""
    a, b = features(1, c=6, seed=2), features(1, c=6, seed=3)

    def taps(f):
        return torch.cat([F.normalize(f[:, :3], dim=1), F.normalize(f[:, 3:], dim=1)], 1)

    got = CosineNearestPatch().fit(taps(b)).patch_scores(taps(a))
    query_taps = [F.normalize(a[:, i : i + 3], dim=1).flatten(2)[0].t() for i in (0, 3)]  # (20, 3) each
    support_taps = [F.normalize(b[:, i : i + 3], dim=1).flatten(2)[0] for i in (0, 3)]  # (3, 20) each
    mean_cos = (query_taps[0] @ support_taps[0] + query_taps[1] @ support_taps[1]) / 2  # (20 query, 20 support)
    np.testing.assert_allclose(got.flatten().numpy(), (1.0 - mean_cos.amax(1)).numpy(), atol=1e-5)


def test_the_registered_method_scores_a_local_anomaly_highest():
    base = features(1, seed=9)
    support = base + 0.1 * features(4)
    query = base + 0.1 * features(2, seed=5)
    query[1, :, 1:3, 1:3] = -base[0, :, 1:3, 1:3]
    method = get_method("anomalydino").build(MethodContext()).fit(support)
    out = method.score(query)
    assert out.patches.shape == (2, 4, 5) and out.image[1] > out.image[0]
    assert np.isfinite(method.threshold(0.05))  # a leave-one-out threshold from four shots
