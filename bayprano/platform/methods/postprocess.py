"""The post-processing menu: one set of image statistics that the harness applies to every method's patch
scores alike, so that methods are compared on their maps and not on who picked the better statistic.

- ``max``: the maximum raw patch score;
- ``blur_max``: the maximum of the map upsampled to the image size and smoothed with a Gaussian of
  sigma = 4 px (``anomaly_map``);
- ``top1_mean``: the mean of the top 1% of patch scores (at least one patch).

Each method's statistic is chosen on meta-validation tasks (``choose_statistic``), never on the evaluated
category. A SiteModel's threshold keeps its own calibrated statistic; the menu is for ranking metrics.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.metrics import image_auroc
from bayprano.platform.model.anomaly_map import anomaly_map

STATISTICS = ("max", "blur_max", "top1_mean")
BLUR_SIGMA = 4.0
TOP_FRACTION = 0.01


def statistic(patches: Tensor, name: str, image_size: tuple[int, int] | int) -> np.ndarray:
    """(B, h, w) patch scores -> (B,) image scores by the menu entry ``name``."""
    patches = patches.float()
    if name == "max":
        out = patches.flatten(1).amax(1)
    elif name == "blur_max":
        size = (image_size, image_size) if isinstance(image_size, int) else (image_size[0], image_size[1])
        out = anomaly_map(patches, size, sigma=BLUR_SIGMA).flatten(1).amax(1)
    elif name == "top1_mean":
        flat = patches.flatten(1)
        k = max(1, int(math.ceil(flat.shape[1] * TOP_FRACTION)))
        out = flat.topk(k, dim=1).values.mean(1)
    else:
        raise ConfigError(f"unknown image statistic {name!r} (valid: {', '.join(STATISTICS)})")
    return out.cpu().numpy()


def all_statistics(patches: Tensor, image_size: tuple[int, int] | int) -> dict[str, np.ndarray]:
    return {name: statistic(patches, name, image_size) for name in STATISTICS}


def choose_statistic(
    tasks: Sequence[tuple[Tensor, Tensor, np.ndarray]],
    fit_score: Callable[[Tensor, Tensor], Tensor],
    image_size: tuple[int, int] | int,
) -> tuple[str, dict[str, float]]:
    """The menu entry with the best image AUROC pooled over meta-validation ``tasks`` (support features,
    query features, query labels), the patch scores coming from ``fit_score(support, query)``; ties go to
    the earlier entry. Returns (name, {name: AUROC}); ``max`` with NaNs when there is nothing to score."""
    scores: dict[str, list] = {name: [] for name in STATISTICS}
    labels: list = []
    for support, query, query_labels in tasks:
        patches = fit_score(support, query).detach()  # fitting may take gradient steps: no no_grad here
        for name, s in all_statistics(patches, image_size).items():
            scores[name].extend(s.tolist())
        labels.extend(np.asarray(query_labels).tolist())
    if len(set(labels)) < 2:
        return "max", {name: math.nan for name in STATISTICS}
    aurocs = {name: float(image_auroc(np.array(labels), np.array(s))) for name, s in scores.items()}
    best = max(STATISTICS, key=lambda n: (aurocs[n], -STATISTICS.index(n)))
    return best, aurocs
