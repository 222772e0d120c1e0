"""What a site reports besides its update, as fixed-length vectors whose sum over sites is all the server needs.

Secure aggregation only reveals sums, so every summary a site sends is a vector that adds up across
sites into what the server uses:

- ``feature_vector``: per-channel sums and sums of squares of the site's normal backbone features and
  their count; the sum gives the shared standardisation (``feature_standardisation``).
- ``validation_vector``: [image AUROC, 1] (or [0, 0] without validation images), the calibration's
  Gamma shape and rate, and per support size K the category-level moments of the normal log-statistic
  (``normality_vector``): the number of categories, sums of the categories' mean covariate and mean
  log T, of their squares and cross product, of the within-category sums of squares and of the image
  counts. ``read_validation`` turns the sum into the mean AUROC over the sites that validated, a
  ``Calibration`` and a ``NormalityPrior`` equal to ``NormalityPrior.from_summaries`` over all the
  sites' categories (tested), so nothing per site is needed.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from bayprano.platform.errors import DataError
from bayprano.platform.meta.tasks import statistics_from_sums
from bayprano.platform.model.scoring import Calibration, NormalityPrior, summary_moments

NORMALITY_FIELDS = ("categories", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy", "within_ss", "images", "x_within_ss")


def normality_shots(shots: int) -> list[int]:
    """The support sizes a validation summary carries (those ``normal_log_statistics`` uses by default)."""
    return sorted({1, 2, int(shots)})


def normality_vector(summaries: Mapping, shots: Sequence[int]) -> np.ndarray:
    """``NormalityPrior.summarize``'s {K: [category summaries]} as len(shots) x 9 additive moments."""
    out = np.zeros((len(shots), len(NORMALITY_FIELDS)))
    for row, k in enumerate(shots):
        for group in summaries.get(k, summaries.get(str(k), [])):
            n, sx, sy, sxx, sxy, syy = summary_moments(group)
            if n <= 0:
                continue
            cx, cy = sx / n, sy / n
            out[row] += [
                1.0,
                cx,
                cy,
                cx * cx,
                cy * cy,
                cx * cy,
                max(syy - n * cy * cy, 0.0),
                n,
                max(sxx - n * cx * cx, 0.0),
            ]
    return out.reshape(-1)


def normality_from_vector(vector: np.ndarray, shots: Sequence[int], strength: float = 4.0) -> NormalityPrior | None:
    """The ``NormalityPrior`` of summed ``normality_vector``s (None when no category reported)."""
    rows = np.asarray(vector, dtype=np.float64).reshape(len(shots), len(NORMALITY_FIELDS))
    table = {}
    for k, (m, sx, sy, sxx, syy, sxy, within_ss, n, x_within_ss) in zip(shots, rows):
        m = int(round(m))
        if m <= 0 or n <= 0:
            continue
        x_mean, y_mean = sx / m, sy / m
        x_ss = max(sxx - m * x_mean**2, 0.0)
        y_ss = max(syy - m * y_mean**2, 0.0)
        xy = sxy - m * x_mean * y_mean
        slope = xy / x_ss if m >= 3 and x_ss > 1e-12 else 0.0
        residual_ss = max(y_ss - 2 * slope * xy + slope**2 * x_ss, 0.0)
        ddof = 2 if slope else 1
        table[int(k)] = {
            "mean": float(y_mean),
            "slope": float(slope),
            "x_mean": float(x_mean),
            "x_ss": float(x_ss),
            "x_within_var": float(x_within_ss / n),
            "n_categories": m,
            "between_var": float(max(residual_ss / (m - ddof) if m > ddof else 0.25, 0.01)),
            "between_var_raw": float(max(y_ss / (m - 1) if m > 1 else 0.25, 0.01)),
            "within_var": float(max(within_ss / max(n - m, 1), 1e-3)),
        }
    return NormalityPrior(table, strength) if table else None


def validation_vector(auroc: float, calibration: Calibration, normality: Mapping, shots: Sequence[int]) -> np.ndarray:
    head = [auroc, 1.0] if math.isfinite(auroc) else [0.0, 0.0]
    return np.concatenate([head, [calibration.shape, calibration.rate], normality_vector(normality, shots)])


def validation_size(shots: Sequence[int]) -> int:
    return 4 + len(shots) * len(NORMALITY_FIELDS)


def read_validation(total: np.ndarray, dim: int, shots: Sequence[int]) -> dict:
    """{auroc: mean over the sites that validated (nan if none), calibration, normality} from a summed
    ``validation_vector``."""
    total = np.asarray(total, dtype=np.float64)
    if total.shape != (validation_size(shots),):
        raise DataError(f"validation sum: expected {validation_size(shots)} values, got shape {list(total.shape)}")
    count = int(round(total[1]))
    calibration = Calibration(dim, float(total[2]), float(total[3])) if total[2] > 0 and total[3] > 0 else None
    return {
        "auroc": float(total[0] / count) if count > 0 else math.nan,
        "validated": count,
        "calibration": calibration,
        "normality": normality_from_vector(total[4:], shots),
    }


def feature_vector(total: np.ndarray, total_sq: np.ndarray, count: int) -> np.ndarray:
    return np.concatenate([np.asarray(total, np.float64), np.asarray(total_sq, np.float64), [float(count)]])


def feature_standardisation(summed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per channel from a summed ``feature_vector``."""
    summed = np.asarray(summed, dtype=np.float64)
    channels = (summed.size - 1) // 2
    count = summed[-1]
    if count <= 0:
        raise DataError("feature statistics: no features were counted")
    mean, std = statistics_from_sums(
        torch.from_numpy(summed[:channels]), torch.from_numpy(summed[channels : 2 * channels]), int(round(float(count)))
    )  # a sum of whole counts
    return mean.numpy(), std.numpy()
