"""Anomaly maps, and how they are shown: the one place for map maths that CLI, Serve and reports share.

- ``anomaly_map``: patch scores (B, h, w) upsampled to the image size and smoothed, as one precomputed
  linear operator per axis; ``gaussian_blur``: the same smoothing on maps at their own size.
- ``heat_level``: a map of Student-t patch scores as a heat level, linear in each patch's Mahalanobis
  distance and scaled so that the hottest point is the image's statistic over its threshold;
  ``overlay``: a heat level drawn over the image.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.model.niw import distance_from_patch_score


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device | None = None) -> tuple[int, Tensor]:
    """The radius (3 sigma, at least 1) and the normalised 1-D Gaussian kernel of that radius."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return radius, kernel / kernel.sum()


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps, reflect-padded."""
    if sigma <= 0:
        return maps
    radius, kernel = gaussian_kernel(sigma, maps.dtype, maps.device)
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def anomaly_map(patch_scores: Tensor, size: tuple[int, int], sigma: float = 4.0) -> Tensor:
    """Patch scores (B, h, w) upsampled (bilinear) to the image size (B, H, W) and smoothed (Gaussian).

    Both steps are linear and separable, so the map is A_H P A_W^T with one precomputed (H, h) and
    (W, w) matrix per axis: a few small matrix products instead of a 25-tap convolution over every
    pixel, which cost as much as a tenth of the backbone at 256 px.
    """
    b, h, w = patch_scores.shape
    rows = map_operator(h, int(size[0]), float(sigma), patch_scores.dtype, patch_scores.device)
    cols = map_operator(w, int(size[1]), float(sigma), patch_scores.dtype, patch_scores.device)
    return rows @ patch_scores @ cols.t()


@functools.lru_cache(maxsize=16)
def map_operator(n_in: int, n_out: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n_out, n_in) matrix of 1-D bilinear upsampling (align_corners=False) then the reflect-padded
    Gaussian blur of ``gaussian_blur``, built by passing unit impulses through both (in float64)."""
    impulses = torch.eye(n_in, dtype=torch.float64)[:, None, None, :]  # (n_in, 1, 1, n_in)
    up = F.interpolate(impulses, size=(1, n_out), mode="bilinear", align_corners=False)[:, :, 0]
    if sigma > 0:
        radius, kernel = gaussian_kernel(sigma, torch.float64)
        up = F.conv1d(F.pad(up, (radius, radius), mode="reflect"), kernel.view(1, 1, -1))
    return up[:, 0].t().contiguous().to(device=device, dtype=dtype)


def heat_level(amap: np.ndarray, score: float, threshold: float | None, dim: int, df: float) -> np.ndarray:
    """A map of Student-t patch scores (``anomaly_map`` of ``patch_score``) as a heat level: linear in each
    patch's Mahalanobis distance, scaled so that the hottest point is the image's statistic over the
    threshold (1 and above only for an image over it; the statistic itself without a threshold)."""
    maha = distance_from_patch_score(amap, df, dim)
    return maha / max(float(maha.max()), 1e-12) * (score / threshold if threshold else 1.0)


def overlay(image: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The uint8 RGB image with a heatmap over it, at the image's size; ``level`` (h, w) runs from 0 (blue,
    perfectly normal) to 1 (red, as far out as the decision threshold)."""
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[:2]
    level = np.asarray(Image.fromarray(level.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)).clip(0, 1)
    colour = colormaps["jet"](level)[..., :3] * 255
    alpha = (0.2 + 0.5 * level)[..., None]
    return ((1 - alpha) * image + alpha * colour).round().clip(0, 255).astype(np.uint8)
