"""Tasks of Proto-MAML: one product category's cached backbone features, and episodes drawn from them.

Backbone features are frozen, so each category's normal training images and a pool of synthetic
anomalies made from them are turned into features once (``TaskBank``); an episode then draws, from one
bank, K normal support maps and a query of held-out normals and synthetic anomalies whose source image
is not in the support. ``feature_statistics`` is the per-channel standardisation of the features that
the head applies, computed from banks or from per-site sums (federation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.errors import ConfigError


@dataclass
class TaskBank:
    """One category's cached features: normals and synthetic anomalies made from them."""

    category: str
    normals: Tensor  # (N, C, h, w), float16
    normal_ids: list[str]
    anomalies: Tensor  # (M, C, h, w), float16
    anomaly_masks: Tensor  # (M, h, w), fraction of each patch cell that is defective
    anomaly_sources: Tensor  # (M,), index of the normal each anomaly was made from

    def __len__(self) -> int:
        return self.normals.shape[0]

    def to(self, device: torch.device | str) -> "TaskBank":
        """The same bank with its feature tensors on ``device`` (indices stay on the CPU)."""
        return TaskBank(
            self.category,
            self.normals.to(device),
            self.normal_ids,
            self.anomalies.to(device),
            self.anomaly_masks.to(device),
            self.anomaly_sources,
        )


def build_task_bank(
    category: str,
    images: np.ndarray,
    ids: Sequence[str],
    extract: Callable[[np.ndarray], Tensor],
    injector: Callable,
    anomalies_per_image: int = 1,
    seed: int = 0,
) -> TaskBank:
    """Features of a category's normal images (uint8 (N, H, W, 3)) and of synthetic anomalies of them."""
    rng = np.random.default_rng(seed)
    normals = extract(images).to(torch.float16)
    anomalous, masks, sources = [], [], []
    n = len(images)
    for rep in range(anomalies_per_image):
        for i in range(n):
            other = images[(i + 1 + rng.integers(n - 1)) % n] if n > 1 else None
            image, mask = injector(images[i], rng, source=other)
            anomalous.append(image)
            masks.append(mask)
            sources.append(i)
    feats = extract(np.stack(anomalous)).to(torch.float16)
    h, w = feats.shape[-2:]
    mask_t = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    cell = F.adaptive_avg_pool2d(mask_t, (h, w))[:, 0]
    return TaskBank(category, normals, list(ids), feats, cell, torch.tensor(sources))


@dataclass
class FeatureEpisode:
    category: str
    support: Tensor  # (K, C, h, w)
    query: Tensor  # (Q, C, h, w)
    query_masks: Tensor  # (Q, h, w) defect fraction per cell
    query_labels: Tensor  # (Q,)
    support_index: list[int]
    query_normal_index: list[int]


def sample_episode(
    bank: TaskBank, shots: int, n_query_normal: int, n_query_anomalous: int, rng: np.random.Generator
) -> FeatureEpisode:
    """Disjoint support and normal query from the bank's normals; anomalies not made from the support."""
    need = shots + n_query_normal
    if need > len(bank):
        raise ConfigError(
            f"shots={shots} plus {n_query_normal} normal query images needs {need} normal train images, "
            f"category {bank.category!r} has {len(bank)}"
        )
    order = rng.permutation(len(bank))
    support_idx = order[:shots].tolist()
    query_idx = order[shots:need].tolist()
    allowed = np.flatnonzero(~np.isin(bank.anomaly_sources.numpy(), support_idx))
    if n_query_anomalous and len(allowed) < n_query_anomalous:
        raise ConfigError(
            f"category {bank.category!r}: only {len(allowed)} synthetic anomalies not made from the support, "
            f"{n_query_anomalous} needed"
        )
    anomaly_idx = rng.choice(allowed, size=n_query_anomalous, replace=False).tolist() if n_query_anomalous else []
    h, w = bank.normals.shape[-2:]
    query = torch.cat([bank.normals[query_idx], bank.anomalies[anomaly_idx]]).float()
    dev = bank.normals.device
    masks = torch.cat([torch.zeros(len(query_idx), h, w, device=dev), bank.anomaly_masks[anomaly_idx].float()])
    labels = torch.cat([torch.zeros(len(query_idx), device=dev), torch.ones(len(anomaly_idx), device=dev)])
    return FeatureEpisode(
        bank.category, bank.normals[support_idx].float(), query, masks, labels, support_idx, query_idx
    )


def feature_sums(banks: Mapping[str, TaskBank], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, int]:
    """Per-channel sum and sum of squares over all normal features of all banks, and the count of
    patches summed: what sites share so that the standardisation is set without sharing features."""
    total, total_sq, count = torch.zeros((), dtype=dtype), torch.zeros((), dtype=dtype), 0
    for bank in banks.values():
        x = bank.normals.to(dtype)
        total = total + x.sum((0, 2, 3))
        total_sq = total_sq + (x**2).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    return total, total_sq, count


def statistics_from_sums(total: Tensor, total_sq: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std from feature sums (``feature_sums``, possibly added over sites)."""
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean, std


def feature_statistics(banks: Mapping[str, TaskBank]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over all normal features of all banks."""
    return statistics_from_sums(*feature_sums(banks))
