"""PatchCore-style nearest patch (Roth et al., 2022), pure torch: the distance of each test patch to its
nearest support patch (memory bank), with a greedy k-center coreset when the bank is large."""

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
        out = torch.cat(
            [torch.cdist(q[i : i + self.chunk], self.bank_).amin(1) for i in range(0, q.shape[0], self.chunk)]
        )
        return out.reshape(b, h, w)
