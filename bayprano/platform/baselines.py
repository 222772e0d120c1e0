"""Baselines scored on the same backbone features and the same protocol as the Bayesian model.

- ``PatchCore``: distance of each test patch to its nearest support patch (memory bank), with a greedy
  k-center coreset when the bank is large (Roth et al., 2022).
- ``PaDiM``: a Gaussian per patch position over a random subset of feature channels, with the
  covariance regularised by 0.01 I, scored by Mahalanobis distance (Defard et al., 2021).

The deterministic Proto-MAML control (Euclidean prototype on a meta-learned head) lives with the model,
``bayprano.platform.model.bayes.EuclideanPrototype``, since it is meta-trained the same way.

Each has ``fit(support_features)`` returning self and ``patch_scores(features) -> (B, h, w)``; the image
score is the maximum patch score.
"""

from __future__ import annotations

import torch
from torch import Tensor



def greedy_coreset(bank: Tensor, n: int, seed: int = 0, projection_dim: int = 128) -> Tensor:
    """Indices of ``n`` bank rows chosen by greedy k-center selection on a random projection."""
    if n >= bank.shape[0]:
        return torch.arange(bank.shape[0])
    gen = torch.Generator().manual_seed(seed)
    x = bank
    if bank.shape[1] > projection_dim:
        proj = torch.randn(bank.shape[1], projection_dim, generator=gen) / projection_dim**0.5
        x = bank @ proj
    selected = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    dist = torch.cdist(x, x[selected[-1]][None]).flatten()
    for _ in range(n - 1):
        nxt = int(dist.argmax())
        selected.append(nxt)
        dist = torch.minimum(dist, torch.cdist(x, x[nxt][None]).flatten())
    return torch.tensor(selected)


class PatchCore:
    def __init__(self, max_bank: int = 16384, coreset_ratio: float = 0.1, chunk: int = 4096, seed: int = 0):
        self.max_bank, self.coreset_ratio, self.chunk, self.seed = max_bank, coreset_ratio, chunk, seed

    def fit(self, features: Tensor) -> "PatchCore":
        bank = features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        if bank.shape[0] > self.max_bank:
            bank = bank[greedy_coreset(bank, max(1, int(self.coreset_ratio * bank.shape[0])), self.seed)]
        self.bank_ = bank
        return self

    def patch_scores(self, features: Tensor) -> Tensor:
        b, c, h, w = features.shape
        q = features.float().permute(0, 2, 3, 1).reshape(-1, c)
        out = torch.cat([torch.cdist(q[i : i + self.chunk], self.bank_).amin(1) for i in range(0, q.shape[0], self.chunk)])
        return out.reshape(b, h, w)


class PaDiM:
    def __init__(self, channels: int = 100, eps: float = 0.01, seed: int = 0):
        self.channels, self.eps, self.seed = channels, eps, seed

    def fit(self, features: Tensor) -> "PaDiM":
        k, c, h, w = features.shape
        gen = torch.Generator().manual_seed(self.seed)
        self.index_ = torch.randperm(c, generator=gen)[: min(self.channels, c)].sort().values
        x = features.float()[:, self.index_].permute(2, 3, 0, 1).reshape(h * w, k, -1)  # (P, K, c')
        mean = x.mean(1)
        centred = x - mean[:, None]
        cov = centred.transpose(1, 2) @ centred / max(k - 1, 1)
        cov = cov + self.eps * torch.eye(cov.shape[-1])
        self.mean_, self.chol_ = mean, torch.linalg.cholesky(cov)
        return self

    def patch_scores(self, features: Tensor) -> Tensor:
        b, _, h, w = features.shape
        x = features.float()[:, self.index_].permute(2, 3, 0, 1).reshape(h * w, b, -1)
        diff = (x - self.mean_[:, None]).transpose(1, 2)
        sol = torch.linalg.solve_triangular(self.chol_, diff, upper=False)
        return sol.pow(2).sum(1).sqrt().t().reshape(b, h, w)


def image_scores(patch_scores: Tensor) -> Tensor:
    return patch_scores.flatten(1).amax(1)
