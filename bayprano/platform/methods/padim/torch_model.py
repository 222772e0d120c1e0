"""PaDiM-style per-position Gaussian (Defard et al., 2021), pure torch: a Gaussian per patch position over
a random subset of feature channels, the covariance regularised by 0.01 I, scored by Mahalanobis distance."""

from __future__ import annotations

import torch
from torch import Tensor


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
