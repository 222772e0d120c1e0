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
- the calibration rule of the checkpoint, chosen as ``meta.calibration.choose_rules`` chooses it, in two
  sums. ``calibration_vector``: the normality moments of a site's calibration episodes (with
  leave-one-out statistics) and the additive parts of their ``episode_terms``; its sum is the pooled
  prior (``prior_from_calibration_vector``). ``rule_loss_vector``: given that sum, each of the site's
  categories calibrated on the prior of all the other categories (the sum less its own part) under
  every candidate rule, as sums of pinball losses and FPRs over categories; its sum picks the rule
  (``rules_from_loss_vector``), the same rule as ``choose_rules`` over every site's episodes pooled.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

from bayprano.platform.errors import DataError
from bayprano.platform.meta.calibration import (
    RULE_TARGET_FPR,
    NormalEpisode,
    episode_term_sums,
    log_statistics,
    pick_rule,
    rule_candidates,
    score_rules,
    terms_from_sums,
)
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


TERM_FIELDS = ("within_categories", "within_sum", "offset_categories", "offset_sum")


def calibration_size(shots: Sequence[int]) -> int:
    return len(shots) * (len(NORMALITY_FIELDS) + len(TERM_FIELDS))


def calibration_vector(episodes: Sequence[NormalEpisode], shots: Sequence[int]) -> np.ndarray:
    """A site's calibration episodes as one additive vector: their ``normality_vector`` and, per K in
    ``shots``, the parts of ``episode_term_sums``."""
    sums = episode_term_sums(episodes)
    terms = np.zeros((len(shots), len(TERM_FIELDS)))
    for row, k in enumerate(shots):
        if k in sums:
            terms[row] = [*sums[k]["within"], *sums[k]["offset"]]
    moments = normality_vector(NormalityPrior.summarize(log_statistics(episodes)), shots)
    return np.concatenate([moments, terms.reshape(-1)])


def prior_from_calibration_vector(vector: np.ndarray, shots: Sequence[int]) -> NormalityPrior | None:
    """The prior (with its episode terms) of summed ``calibration_vector``s: ``episode_prior`` of the episodes
    pooled; None when no category reported."""
    vector = np.asarray(vector, dtype=np.float64)
    if vector.shape != (calibration_size(shots),):
        raise DataError(f"calibration sum: expected {calibration_size(shots)} values, got shape {list(vector.shape)}")
    split = len(shots) * len(NORMALITY_FIELDS)
    prior = normality_from_vector(vector[:split], shots)
    if prior is None:
        return None
    terms = vector[split:].reshape(len(shots), len(TERM_FIELDS))
    sums = {int(k): {"within": list(t[:2]), "offset": list(t[2:])} for k, t in zip(shots, terms)}
    return prior.with_terms(terms_from_sums(sums))


def rule_loss_size(shots: Sequence[int]) -> int:
    return sum(2 + 2 * len(rule_candidates(k)) for k in shots)


def rule_loss_vector(
    episodes: Sequence[NormalEpisode], total: np.ndarray, shots: Sequence[int], target_fpr: float = RULE_TARGET_FPR
) -> np.ndarray:
    """Per K in ``shots``: [categories, episodes, then per ``rule_candidates(K)`` the sum over this site's
    categories of the mean pinball loss and the mean FPR of its episodes], each category calibrated on the
    prior of ``total`` (the summed ``calibration_vector``, which includes this site's) less its own part:
    a prior that never saw it."""
    total = np.asarray(total, dtype=np.float64)
    parts = []
    for k in shots:
        candidates = rule_candidates(k)
        row = np.zeros(2 + 2 * len(candidates))
        of_k = [ep for ep in episodes if ep.shots == k]
        for category in sorted({ep.category for ep in of_k}):
            held_out = [ep for ep in of_k if ep.category == category]
            own = calibration_vector([ep for ep in episodes if ep.category == category], shots)
            prior = prior_from_calibration_vector(total - own, shots)
            if prior is None or int(k) not in prior.table:
                continue  # no other category at this K: nothing to calibrate on
            row[0] += 1
            row[1] += len(held_out)
            row[2:] += score_rules(prior, held_out, k, candidates, target_fpr).reshape(-1)
        parts.append(row)
    return np.concatenate(parts)


def rules_from_loss_vector(summed: np.ndarray, shots: Sequence[int], target_fpr: float = RULE_TARGET_FPR) -> dict:
    """The rule per K from summed ``rule_loss_vector``s, as ``choose_rules`` gives it; a K with fewer than
    three categories keeps the default rule (absent from the result)."""
    summed = np.asarray(summed, dtype=np.float64)
    if summed.shape != (rule_loss_size(shots),):
        raise DataError(f"calibration rule sum: expected {rule_loss_size(shots)} values, got {list(summed.shape)}")
    rules, start = {}, 0
    for k in shots:
        candidates = rule_candidates(k)
        row = summed[start : start + 2 + 2 * len(candidates)]
        start += len(row)
        categories = int(round(row[0]))
        if categories < 3:
            continue
        scores = row[2:].reshape(len(candidates), 2) / categories
        rules[int(k)] = pick_rule(candidates, scores, target_fpr, categories, int(round(row[1])))
    return rules
