"""From patch Mahalanobis distances to anomaly maps, image p-values and calibrated decisions.

Calibration. The decision threshold comes from ``LogNormalCalibration``: the log of a normal image's
statistic T is modelled as Gaussian, with a prior per support size K learned at meta-training from
normal query images of held-out episodes (``NormalityPrior``: the typical level, its spread across
categories and within one), updated with the support's leave-one-out statistics; its Student-t
predictive gives the threshold for a target false-positive rate and the p-values.

How high a category's normal statistics run depends on how much its normal images vary (a texture
against a part placed at a random pose), which K good images reveal only partly, and one image not at
all through leave-one-out. What one image does reveal is how much it changes under a small translation:
``shift_covariate`` is the mean log T of the support's own embeddings shifted by a few patch cells, under
the support's posterior. Across categories it tracks the level of normal log T closely, so the prior is
a regression on it, learned at meta-training (slope, with the spread of categories around the line in
place of their raw spread); with one shot this conditioned prior alone decides.

The analytic model below (``Calibration``) is what a checkpoint without a learned prior falls back to.
Under the Student-t predictive, a normal patch's squared Mahalanobis distance over d follows an
F(d, df) law. The image statistic is the largest of these over the image's patches, T = max m / d,
taken after a light smoothing of the map (which makes the per-patch law approximate; the effective
count M below absorbs it, and the measured false-positive rate is what is reported).
Patches are strongly correlated, so T behaves like the maximum of M independent F variables, with M
(the effective number of independent patches) far below the number of patches. M is estimated from
normal images, T_i, in closed form: if F_cdf(T_i) = U^(1/M) then -log F_cdf(T_i) is exponential with
rate M. A Gamma(strength, strength / M_prior) prior from meta-training is updated with the support's
leave-one-out statistics, so that a site with one shot still gets a usable M and a site with eight
refines it. The image p-value is 1 - F_cdf(T)^M, and the threshold for a target false-positive rate
alpha is the T at which the p-value equals alpha.

Uncertainty: the posterior over the covariance and the mean makes the Mahalanobis distance of a
fixed patch uncertain, with relative standard deviation about sqrt(2 / nu_n + 4 / (kappa_n m)) (the
Wishart and Gaussian parts of the NIW posterior). The threshold is uncertain too: where the support
says little about how high its normal images run (one shot of a product unlike the meta-training
categories), the calibration's level is known only to the prior's spread across categories (around
the covariate's line where the rule uses it), and ``threshold_sd`` says how far (in log T); for the
analytic model it comes from the Gamma posterior of M. The two add in quadrature (``decision_sd``). The decision is
"anomalous" or "normal" when that band (one standard deviation, by default) lies on one side of the
threshold, and "review" when it straddles it: a site that cannot yet tell where its threshold lies
sends its borderline images to review instead of deciding them. The reported uncertainty is twice the
probability mass of the band beyond the threshold (1 = a coin flip, 0 = certain).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.anomaly_map import gaussian_blur
from bayprano.platform.model.tiling import masked_max

DECISIONS = ("normal", "anomalous", "review")


STATISTIC_SIGMA = 1.0  # in patch cells


def image_statistic(
    mahalanobis: Tensor, dim: int, sigma: float = STATISTIC_SIGMA, *, inside: Tensor | None = None
) -> Tensor:
    """T = max over patches of m / d after a light Gaussian smoothing of the map, per image: (B, h, w) -> (B,).

    The smoothing (sigma in patch cells) averages out isolated noisy patches; a defect spans several.
    ``inside`` ((h, w) or (B, h, w) bool, a region of interest's cells): the same smoothing over the
    inside cells only (a normalised convolution, so that no value outside leaks in), then the maximum
    over those cells.
    """
    if inside is None:
        return gaussian_blur(mahalanobis / dim, sigma).flatten(1).amax(1)
    weight = inside.to(mahalanobis.device).expand_as(mahalanobis).to(mahalanobis.dtype)
    smoothed = gaussian_blur(mahalanobis / dim * weight, sigma) / gaussian_blur(weight, sigma).clamp_min(1e-12)
    return masked_max(smoothed, inside)


def _neg_log_cdf(t: np.ndarray, dim: int, df: np.ndarray | float) -> np.ndarray:
    return -stats.f.logcdf(np.asarray(t, dtype=np.float64), dim, np.asarray(df, dtype=np.float64))


@dataclass
class Calibration:
    """Effective number of independent patches M with its Gamma posterior (shape, rate)."""

    dim: int
    shape: float  # Gamma shape: prior strength + number of normal images seen
    rate: float  # Gamma rate: prior strength / M_prior + sum of -log F_cdf(T_i)

    @classmethod
    def from_prior(cls, dim: int, m_prior: float, strength: float = 4.0) -> "Calibration":
        if not (m_prior > 0 and math.isfinite(m_prior)):
            raise ConfigError(f"calibration: effective patch count must be positive, got {m_prior}")
        return cls(dim, float(strength), float(strength) / float(m_prior))

    @classmethod
    def estimate(cls, dim: int, statistics, dfs) -> "Calibration":
        """Maximum-likelihood M from normal images' T (no prior); needs at least one image."""
        u = _neg_log_cdf(np.asarray(statistics), dim, dfs)
        if u.size == 0:
            raise ConfigError("calibration: no normal images to estimate from")
        return cls(dim, float(u.size), float(np.maximum(u, 1e-300).sum()))

    def update(self, statistics, dfs) -> "Calibration":
        u = _neg_log_cdf(np.asarray(statistics), self.dim, dfs)
        return Calibration(self.dim, self.shape + u.size, self.rate + float(u.sum()))

    @property
    def effective_patches(self) -> float:
        """Posterior mean of M."""
        return self.shape / self.rate

    def describe(self) -> str:
        return f"effective patch count {self.effective_patches:.1f}"

    def p_value(self, statistic, df) -> np.ndarray:
        """P(T >= t) for a normal image: 1 - F_cdf(t)^M."""
        logcdf = stats.f.logcdf(np.asarray(statistic, dtype=np.float64), self.dim, df)
        return -np.expm1(self.effective_patches * logcdf)

    def threshold(self, alpha: float, df: float) -> float:
        """The statistic T at which the image p-value equals alpha."""
        if not 0 < alpha < 1:
            raise ConfigError(f"target false-positive rate must be between 0 and 1, got {alpha}")
        per_patch_cdf = math.exp(math.log1p(-alpha) / self.effective_patches)
        return float(stats.f.ppf(per_patch_cdf, self.dim, df))

    def threshold_sd(self, alpha: float, df: float) -> float:
        """Posterior standard deviation of log(threshold) from the uncertainty of M: half the distance, in
        log T, between the thresholds at M's posterior 15.9% and 84.1% quantiles (one standard deviation
        either side for a Gaussian; the Gamma posterior is skewed when few images stand behind it)."""
        lo_m, hi_m = stats.gamma.ppf([stats.norm.cdf(-1.0), stats.norm.cdf(1.0)], self.shape, scale=1.0 / self.rate)
        logs = [
            math.log(max(Calibration(self.dim, 1.0, 1.0 / max(float(m), 1e-12)).threshold(alpha, df), 1e-300))
            for m in (lo_m, hi_m)
        ]
        return abs(logs[1] - logs[0]) / 2.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LogNormalCalibration:
    """Normal images' log T ~ N(mu, sigma^2), with a posterior over mu and sigma and a Student-t predictive.

    The prior comes from meta-training (``NormalityPrior``); ``update`` adds the support's leave-one-out
    statistics. The threshold for a target false-positive rate alpha is the predictive's 1 - alpha
    quantile, and an image's p-value is the predictive's upper tail at its log T. ``df`` arguments are
    accepted for a common interface with ``Calibration`` and ignored.
    """

    mean: float
    mean_var: float
    scale2: float
    dof: float
    n: int = 0
    kind: str = "lognormal"

    def update(self, statistics) -> "LogNormalCalibration":
        x = np.log(np.maximum(np.asarray(statistics, dtype=np.float64), 1e-300))
        if x.size == 0:
            return self
        precision = 1.0 / self.mean_var + x.size / self.scale2
        mean = (self.mean / self.mean_var + x.sum() / self.scale2) / precision
        ss = float(((x - x.mean()) ** 2).sum())
        dof = self.dof + x.size - 1
        scale2 = (self.dof * self.scale2 + ss) / dof if dof > 0 else self.scale2
        return LogNormalCalibration(
            float(mean), float(1.0 / precision), float(scale2), float(max(dof, self.dof)), self.n + int(x.size)
        )

    def _predictive(self):
        return stats.t(df=self.dof, loc=self.mean, scale=math.sqrt(self.scale2 + self.mean_var))

    def p_value(self, statistic, df=None) -> np.ndarray:
        return self._predictive().sf(np.log(np.maximum(np.asarray(statistic, dtype=np.float64), 1e-300)))

    def threshold(self, alpha: float, df=None) -> float:
        if not 0 < alpha < 1:
            raise ConfigError(f"target false-positive rate must be between 0 and 1, got {alpha}")
        return float(math.exp(self._predictive().ppf(1 - alpha)))

    def threshold_sd(self, alpha: float = 0.05, df=None) -> float:
        """Posterior standard deviation of log(threshold) from the uncertainty of the level ``mean``: with one
        shot, the prior's spread of levels (across categories, or around the covariate's line where the rule
        conditions on it); each leave-one-out statistic narrows it. The spread ``scale2`` is taken as known."""
        return math.sqrt(self.mean_var)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"normal log-statistic {self.mean:.2f} +- {math.sqrt(self.scale2 + self.mean_var):.2f} "
            f"({self.n} leave-one-out image(s) on top of the meta-learned prior)"
        )


SHIFT_CELLS = 3  # patch cells: beyond the posterior's 3x3 pooling window


def shift_covariate(
    mahalanobis: Callable[[Tensor], Tensor], z: Tensor, dim: int, shift: int = SHIFT_CELLS, inside: Tensor | None = None
) -> float:
    """Mean log T of the support embeddings ``z`` (K, d, h, w) shifted by ``shift`` cells up, down, left
    and right (reflected at the border), scored by ``mahalanobis`` (the support's own posterior);
    ``inside`` (K, h, w): the views' cells inside a region of interest, over which T is taken."""
    h, w = z.shape[-2:]
    s = max(1, min(shift, h - 1, w - 1))
    padded = F.pad(z, (s, s, s, s), mode="reflect")
    views = [padded[..., s + dy : s + dy + h, s + dx : s + dx + w] for dy, dx in ((0, s), (0, -s), (s, 0), (-s, 0))]
    region = None if inside is None else inside.repeat(4, 1, 1)
    return float(torch.log(image_statistic(mahalanobis(torch.cat(views)), dim, inside=region)).mean())


def summary_moments(group) -> tuple[float, float, float, float, float, float]:
    """A category's summary as (n, sum x, sum y, sum xx, sum xy, sum yy), x the covariate and y log T;
    an older (mean, ss, count) summary has no covariate (x = 0)."""
    if len(group) == 3:
        mean, ss, n = group
        return float(n), 0.0, mean * n, 0.0, 0.0, ss + n * mean * mean
    n, sx, sy, sxx, sxy, syy = (float(v) for v in group)
    return n, sx, sy, sxx, sxy, syy


@dataclass
class NormalityPrior:
    """What meta-training learned about normal images' log T, per support size K.

    For each K, from normal query images of fresh episodes: the line ``mean + slope * (c - x_mean)``
    through the categories' mean log T against their mean ``shift_covariate`` c (each category counts
    once: the line predicts a new category's level), the spread of categories around it
    (``between_var``; ``between_var_raw`` around the plain mean), within a category (``within_var``),
    and the spread of one support's covariate around its category's mean (``x_within_var``).
    ``for_shots(K, c)`` turns the entry of the nearest K into a ``LogNormalCalibration`` prior with
    ``strength`` pseudo-observations behind its within-category variance; the variance of its level is
    the new category's own spread around the line, the line's uncertainty at c, and the covariate's noise.
    """

    table: dict
    strength: float = 4.0

    @staticmethod
    def summarize(log_statistics: dict) -> dict:
        """{(category, K): [(log T, covariate) or log T]} -> {K: [(n, Sx, Sy, Sxx, Sxy, Syy) per category]}.

        The summaries of several sites can be concatenated per K and given to ``from_summaries``.
        """
        out: dict = {}
        for (_, k), values in sorted(log_statistics.items()):
            pairs = np.array([v if isinstance(v, (tuple, list)) else (v, 0.0) for v in values], dtype=np.float64)
            if pairs.size:
                y, x = pairs[:, 0], pairs[:, 1]
                out.setdefault(int(k), []).append(
                    (
                        float(len(y)),
                        float(x.sum()),
                        float(y.sum()),
                        float((x * x).sum()),
                        float((x * y).sum()),
                        float((y * y).sum()),
                    )
                )
        return out

    @classmethod
    def from_summaries(cls, summaries: dict, strength: float = 4.0) -> "NormalityPrior":
        table: dict = {}
        for k, groups in sorted(summaries.items(), key=lambda kv: int(kv[0])):
            moments = [summary_moments(g) for g in groups if g]
            m = np.array([x for x in moments if x[0] > 0])
            if not m.size:
                continue
            n, sx, sy, sxx, sxy, syy = m.T
            category_x, category_y = sx / n, sy / n
            x_mean, y_mean = category_x.mean(), category_y.mean()
            x_ss = float(((category_x - x_mean) ** 2).sum())
            slope = 0.0
            if len(m) >= 3 and x_ss > 1e-12:
                slope = float(((category_x - x_mean) * (category_y - y_mean)).sum() / x_ss)
            residuals = category_y - y_mean - slope * (category_x - x_mean)
            ddof = 2 if slope else 1
            within_ss = float(np.maximum(syy - n * category_y**2, 0.0).sum())
            table[int(k)] = {
                "mean": float(y_mean),
                "slope": slope,
                "x_mean": float(x_mean),
                "x_ss": x_ss,
                "x_within_var": float(np.maximum(sxx - n * category_x**2, 0.0).sum() / n.sum()),
                "n_categories": int(len(m)),
                "between_var": float(max((residuals**2).sum() / (len(m) - ddof) if len(m) > ddof else 0.25, 0.01)),
                "between_var_raw": float(max(category_y.var(ddof=1) if len(m) > 1 else 0.25, 0.01)),
                "within_var": float(max(within_ss / max(n.sum() - len(m), 1), 1e-3)),
            }
        if not table:
            raise ConfigError("calibration: no normal images to estimate from")
        return cls(table, strength)

    @classmethod
    def estimate(cls, log_statistics: dict, strength: float = 4.0) -> "NormalityPrior":
        """From {(category, K): [(log T, covariate) of normal images]} (or bare log T, without a covariate)."""
        return cls.from_summaries(cls.summarize(log_statistics), strength)

    @classmethod
    def uninformed(cls) -> "NormalityPrior":
        """A weak prior for a model that was not meta-trained: log T around log 3, wide."""
        return cls({1: {"mean": math.log(3.0), "between_var": 1.0, "within_var": 0.09}}, strength=2.0)

    def entry(self, shots: int) -> dict:
        keys = sorted(int(k) for k in self.table)
        k = min(keys, key=lambda kk: (abs(math.log(kk) - math.log(max(shots, 1))), kk))
        return self.table[k] if k in self.table else self.table[str(k)]

    def for_shots(
        self, shots: int, covariate: float | None = None, strength: float | None = None, within: str = "category"
    ) -> LogNormalCalibration:
        """The prior for K = ``shots``, conditioned on ``covariate`` where it is given (None: the plain level);
        ``within``: the spread of normal log T inside a category (``category``: over all its episodes) or
        inside one episode (``episode``: one support's images, where the entry has it)."""
        e = self.entry(shots)
        strength = self.strength if strength is None else strength
        scale2 = e["episode_within_var"] if within == "episode" and "episode_within_var" in e else e["within_var"]
        slope = float(e.get("slope", 0.0))
        if covariate is None or slope == 0.0 or not math.isfinite(covariate):
            return LogNormalCalibration(e["mean"], e.get("between_var_raw", e["between_var"]), scale2, strength)
        offset = covariate - e["x_mean"]
        line = e["between_var"] * (1.0 + 1.0 / e["n_categories"] + offset**2 / e["x_ss"])
        return LogNormalCalibration(e["mean"] + slope * offset, line + slope**2 * e["x_within_var"], scale2, strength)

    def rule(self, shots: int) -> dict:
        """How a site of K = ``shots`` sets its threshold, as chosen on meta-validation (``with_rules``):
        ``use_covariate``, ``strength``, ``within`` (see ``for_shots``) and ``loo_shift`` (move the support's
        leave-one-out log statistics by the entry's ``loo_offset``, the gap meta-training measured between
        them and the log statistics of new normal images). A prior without a choice conditions on the
        covariate only where the support has no leave-one-out statistic (K = 1), at its own strength."""
        chosen = self.entry(shots).get("rule") or {}
        return {
            "use_covariate": bool(chosen.get("use_covariate", shots < 2)),
            "strength": float(chosen.get("strength", self.strength)),
            "within": str(chosen.get("within", "category")),
            "loo_shift": bool(chosen.get("loo_shift", False)),
        }

    def site_calibration(
        self, shots: int, covariate: float | None, loo_statistics: Sequence[float] = ()
    ) -> LogNormalCalibration:
        """The calibration of a site of K = ``shots``: the prior at its support's ``covariate`` under ``rule``,
        updated with the support's leave-one-out statistics."""
        rule = self.rule(shots)
        cal = self.for_shots(shots, covariate if rule["use_covariate"] else None, rule["strength"], rule["within"])
        if len(loo_statistics):
            shift = float(self.entry(shots).get("loo_offset", 0.0)) if rule["loo_shift"] else 0.0
            cal = cal.update(np.asarray(loo_statistics, dtype=np.float64) * math.exp(shift))
        return cal

    def with_rules(self, rules: dict) -> "NormalityPrior":
        """A copy whose entries carry the rule chosen for each K: {K: {"use_covariate", "strength", ...}}."""
        table = {int(k): dict(v) for k, v in self.table.items()}
        for k, rule in rules.items():
            if int(k) in table:
                table[int(k)]["rule"] = dict(rule)
        return NormalityPrior(table, self.strength)

    def with_terms(self, terms: dict) -> "NormalityPrior":
        """A copy whose entries also carry per-K terms measured on whole episodes ({K: {name: value}})."""
        table = {int(k): dict(v) for k, v in self.table.items()}
        for k, values in terms.items():
            if int(k) in table:
                table[int(k)].update(values)
        return NormalityPrior(table, self.strength)

    def as_dict(self) -> dict:
        return {"table": {str(k): v for k, v in self.table.items()}, "strength": self.strength}

    @classmethod
    def from_dict(cls, d: dict) -> "NormalityPrior":
        return cls({int(k): v for k, v in d["table"].items()}, float(d.get("strength", 4.0)))


def calibration_from_dict(d: dict) -> "Calibration | LogNormalCalibration":
    d = dict(d)
    if d.pop("kind", None) == "lognormal":
        return LogNormalCalibration(**d)
    return Calibration(**d)


def relative_sd(statistic: Tensor | np.ndarray, dim: int, nu_n: float, kappa_n: float) -> np.ndarray:
    """Posterior relative standard deviation of a patch's Mahalanobis distance at statistic T = m / d."""
    m = np.maximum(np.asarray(statistic, dtype=np.float64) * dim, 1e-12)
    return np.sqrt(2.0 / nu_n + 4.0 / (kappa_n * m))


def decision_sd(
    statistic,
    dim: int,
    nu_n: float,
    kappa_n: float,
    calibration: "Calibration | LogNormalCalibration",
    alpha: float,
    df,
) -> np.ndarray:
    """The standard deviation of log T - log(threshold) that the review band uses: the image's own
    (``relative_sd``, the posterior over mean and covariance) and the threshold's (``threshold_sd``, the
    posterior over the calibration), independent, so added in quadrature."""
    own = relative_sd(statistic, dim, nu_n, kappa_n)
    return np.sqrt(own**2 + calibration.threshold_sd(alpha, df) ** 2)


def decide(statistic, threshold: float, rel_sd, z_review: float = 1.0) -> tuple[list[str], np.ndarray]:
    """Decisions and uncertainties for image statistics against a threshold on T.

    The band is log T +- z_review * rel_sd; an image whose band straddles log(threshold) is sent to review.
    """
    t = np.maximum(np.asarray(statistic, dtype=np.float64), 1e-300)
    sd = np.maximum(np.asarray(rel_sd, dtype=np.float64), 1e-12)
    z = (np.log(t) - math.log(threshold)) / sd
    uncertainty = 2 * stats.norm.sf(np.abs(z))
    decisions = np.where(z >= z_review, "anomalous", np.where(z <= -z_review, "normal", "review"))
    return decisions.tolist(), uncertainty
