"""Normal-Inverse-Wishart normality model of patch embeddings, with its Student-t posterior predictive.

The support images' patch embeddings (K images, d channels, an H x W grid of positions) update a
hierarchical NIW model:

- a position-free (global) posterior over all patches of all support images, under a weak prior;
- one posterior per patch position, from the embeddings in a w x w window around it in every support
  image (small misalignments are absorbed), whose prior is centred on the global posterior (empirical
  Bayes): mean mu0 = global mean, scale Psi0 = (nu0 - d - 1) * psi_scale * global covariance.

Neighbouring pooled patches are strongly correlated, so the w x w window of one image counts as
``obs_per_image`` observations (about one), not w^2: the window's sample covariance is kept but its
weight is the effective count. The same holds for the global posterior with ``global_obs_per_image``.

The posterior predictive at each position is a multivariate Student-t
``t_{nu_n - d + 1}(mu_n, (kappa_n + 1) / (kappa_n (nu_n - d + 1)) Psi_n)``. Under it a normal patch's
squared Mahalanobis distance over d follows an F(d, nu_n - d + 1) law, which is what calibration uses.

Everything is batched over positions, differentiable (the prior hyperparameters are meta-learned),
and works in the Cholesky / log domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.errors import ConfigError


@dataclass
class NIWHyper:
    """Prior hyperparameters. Plain floats or 0-dim tensors (which may require grad)."""

    kappa0: float | Tensor = 1.0
    nu0_offset: float | Tensor = 2.0  # nu0 = d + 1 + nu0_offset, so the prior covariance has a mean
    psi_scale: float | Tensor = 1.0
    obs_per_image: float | Tensor = 1.0
    global_obs_per_image: float | Tensor = 16.0
    window: int = 3

    def validate(self) -> "NIWHyper":
        for name in ("kappa0", "nu0_offset", "psi_scale", "obs_per_image", "global_obs_per_image"):
            value = getattr(self, name)
            value = float(value.detach()) if isinstance(value, Tensor) else float(value)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"NIW prior: {name} must be a positive number, got {value}")
        if self.window < 1 or self.window % 2 == 0:
            raise ConfigError(f"NIW prior: window must be an odd positive integer, got {self.window}")
        return self


@dataclass
class NIWPosterior:
    """Batched NIW parameters: mu (..., d), kappa (...), nu (...), psi (..., d, d)."""

    mu: Tensor
    kappa: Tensor
    nu: Tensor
    psi: Tensor

    @property
    def dim(self) -> int:
        return self.mu.shape[-1]

    def predictive(self) -> "StudentT":
        d = self.dim
        df = self.nu - d + 1
        factor = (self.kappa + 1) / (self.kappa * df)
        return StudentT(self.mu, _cholesky(self.psi, factor), df)

    def mean_covariance(self) -> Tensor:
        """E[Sigma] = Psi / (nu - d - 1)."""
        return self.psi / (self.nu - self.dim - 1)[..., None, None]


def niw_update(mu0: Tensor, kappa0, nu0, psi0: Tensor, n, mean: Tensor, scatter: Tensor) -> NIWPosterior:
    """Conjugate update from sufficient statistics: count n, sample mean, centred scatter matrix.

    ``n`` may be fractional (an effective count); ``scatter`` must already be on that count's scale.
    """
    n = torch.as_tensor(n, dtype=mean.dtype, device=mean.device)
    kappa0 = torch.as_tensor(kappa0, dtype=mean.dtype, device=mean.device)
    nu0 = torch.as_tensor(nu0, dtype=mean.dtype, device=mean.device)
    kappa_n = kappa0 + n
    nu_n = nu0 + n
    mu_n = (kappa0[..., None] * mu0 + n[..., None] * mean) / kappa_n[..., None]
    diff = mean - mu0
    # psi0 + scatter + coef * diff diff^T, the outer product fused into the sum (one pass over (..., d, d))
    psi_n = torch.addcmul(
        psi0 + scatter, (kappa0 * n / kappa_n)[..., None, None] * diff[..., :, None], diff[..., None, :]
    )
    return NIWPosterior(mu_n, kappa_n.expand(mu_n.shape[:-1]), nu_n.expand(mu_n.shape[:-1]), psi_n)


def _cholesky(matrix: Tensor, scale: Tensor | None = None) -> Tensor:
    """Lower Cholesky factor of ``scale * matrix`` (scale per matrix, 1 if None), symmetrised first."""
    half = 0.5 if scale is None else 0.5 * scale[..., None, None]
    matrix = (matrix + matrix.transpose(-1, -2)) * half
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool((info > 0).any()):
        d = matrix.shape[-1]
        jitter = 1e-6 * matrix.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        eye = torch.eye(d, dtype=matrix.dtype, device=matrix.device)
        chol = torch.linalg.cholesky(matrix + jitter[..., None, None] * eye)
    return chol


@dataclass
class StudentT:
    """Multivariate Student-t with location (..., d), lower Cholesky scale (..., d, d), dof (...)."""

    loc: Tensor
    scale_tril: Tensor
    df: Tensor

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    def mahalanobis(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distance; x is (..., B, d) against a batch of shape (...)."""
        diff = (x - self.loc[..., None, :]).transpose(-1, -2)  # (..., d, B)
        sol = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)
        return sol.pow(2).sum(-2)

    def log_normaliser(self) -> Tensor:
        d = self.dim
        half_logdet = torch.log(torch.diagonal(self.scale_tril, dim1=-2, dim2=-1)).sum(-1)
        return (
            torch.lgamma((self.df + d) / 2)
            - torch.lgamma(self.df / 2)
            - d / 2 * torch.log(self.df * math.pi)
            - half_logdet
        )

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of x (..., B, d) -> (..., B)."""
        return self.log_normaliser()[..., None] + self.log_kernel(self.mahalanobis(x))

    def log_kernel(self, maha: Tensor) -> Tensor:
        """-(df + d)/2 log(1 + m/df): the log density relative to its value at the mode."""
        df = self.df[..., None] if maha.dim() > self.df.dim() else self.df
        return -patch_score(maha, df, self.dim)


def patch_score(maha: Tensor, df: Tensor | float, dim: int) -> Tensor:
    """A patch's anomaly score from its squared Mahalanobis distance under a Student-t with ``df``
    degrees of freedom in ``dim`` dimensions: (df + d)/2 log(1 + m/df), minus the log kernel."""
    return (df + dim) / 2 * torch.log1p(maha / df)


def distance_from_patch_score(score, df: float, dim: int):
    """The inverse of ``patch_score`` on numpy arrays (clipped so that it stays finite)."""
    return df * np.expm1(np.minimum(2 * np.asarray(score, dtype=np.float64) / (df + dim), 50.0))


# --------------------------------------------------------------------------------------- statistics


def window_statistics(z: Tensor, window: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position statistics of K embedding maps pooled over a window clipped at the border.

    z: (K, d, H, W). Returns raw count (P,), mean (P, d) and centred scatter (P, d, d), P = H * W, or
    only at the flat indices ``positions`` (P' of them) when given.
    """
    k, d, h, w = z.shape
    pad = window // 2
    # Gather each window from the zero-padded, channels-last maps, only at the positions asked for: the
    # same values as F.unfold (padding cells get weight 0), without unfolding and transposing the
    # whole map, which dominated the inner loop's cost when it evaluates a subset of positions.
    flat = torch.arange(h * w, device=z.device) if positions is None else positions.to(z.device)
    ys, xs = (flat // w)[:, None], (flat % w)[:, None]
    dy, dx = (
        o.reshape(1, -1)
        for o in torch.meshgrid(
            torch.arange(window, device=z.device), torch.arange(window, device=z.device), indexing="ij"
        )
    )
    index = (ys + dy) * (w + 2 * pad) + xs + dx  # (P, w^2) into the padded grid
    valid = (ys + dy - pad >= 0) & (ys + dy - pad < h) & (xs + dx - pad >= 0) & (xs + dx - pad < w)
    padded = F.pad(z, (pad, pad, pad, pad)).permute(0, 2, 3, 1).reshape(k, -1, d)
    cols = padded[:, index].transpose(0, 1).reshape(len(flat), k * window * window, d)  # (P, N, d)
    weights = valid.to(z.dtype).repeat(1, k)  # (P, N)
    count = weights.sum(1)
    mean = (cols * weights[..., None]).sum(1) / count[:, None]
    centred = (cols - mean[:, None, :]) * weights[..., None]
    scatter = centred.transpose(1, 2) @ centred
    return count, mean, scatter


def global_statistics(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics of all patches of all maps: raw count (), mean (d,), scatter (d, d)."""
    k, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    mean = flat.mean(0)
    centred = flat - mean
    return torch.tensor(float(flat.shape[0]), dtype=z.dtype, device=z.device), mean, centred.t() @ centred


# ------------------------------------------------------------------------------------------- model


def _f(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def fit_posteriors(z: Tensor, hyper: NIWHyper, positions: Tensor | None = None) -> tuple[NIWPosterior, NIWPosterior]:
    """The global posterior and the per-position posteriors (batched over P = H * W, or over the flat
    indices ``positions``) of support maps z (K, d, H, W)."""
    k, d, h, w = z.shape
    # Global: a weak prior (unit-scale, one pseudo-observation) updated with an effective count.
    g_count, g_mean, g_scatter = global_statistics(z)
    g_n = k * _f(hyper.global_obs_per_image, z)
    g_nu0 = _f(d + 2.0, z)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    g_post = niw_update(
        torch.zeros(d, dtype=z.dtype, device=z.device),
        _f(1e-2, z),
        g_nu0,
        eye * (g_nu0 - d - 1),
        g_n,
        g_mean,
        g_scatter * (g_n / g_count),
    )
    g_cov = g_post.mean_covariance()

    count, mean, scatter = window_statistics(z, hyper.window, positions)
    n_eff = k * _f(hyper.obs_per_image, z)
    nu0 = d + 1 + _f(hyper.nu0_offset, z)
    psi0 = (nu0 - d - 1) * _f(hyper.psi_scale, z) * g_cov
    local = niw_update(
        g_post.mu,
        _f(hyper.kappa0, z),
        nu0,
        psi0,
        n_eff.expand(count.shape),
        mean,
        scatter * (n_eff / count)[:, None, None],
    )
    return g_post, local


class NIWPrototype:
    """Bayesian prototype of normal patch embeddings, in the scikit-learn estimator style.

    ``NIWPrototype(hyper).fit(z).score(x)``: ``fit`` takes support maps (K, d, H, W) and sets the learned
    state (``predictive_``, ``global_``, ``local_``, ``shape_``, ``n_support_``, ``positions_``);
    ``distance`` returns squared Mahalanobis maps and ``score`` patch scores (B, H, W) for query maps
    (B, d, H, W) of the same grid.
    """

    hyper: NIWHyper | None  # None for a prototype rebuilt from its predictive alone
    global_: NIWPosterior | None
    local_: NIWPosterior | None
    predictive_: StudentT
    shape_: tuple[int, ...]
    n_support_: int | None
    positions_: Tensor | None
    nu_n_: float
    kappa_n_: float

    def __init__(self, hyper: NIWHyper | None = None):
        self.hyper = (hyper or NIWHyper()).validate()

    def fit(self, z: Tensor, positions: Tensor | None = None) -> "NIWPrototype":
        """Fit on support maps (K, d, H, W), at every position or only at the flat indices ``positions``
        (then distances and scores are (B, P') instead of maps)."""
        if z.dim() != 4:
            raise ConfigError(f"NIWPrototype.fit: expected support maps (K, d, H, W), got shape {tuple(z.shape)}")
        if self.hyper is None:
            raise ConfigError("NIWPrototype.fit: this prototype was rebuilt from a predictive and has no prior")
        self.global_, self.local_ = fit_posteriors(z, self.hyper, positions)
        self.predictive_ = self.local_.predictive()
        self.shape_ = tuple(z.shape[1:])
        self.n_support_ = z.shape[0]
        self.positions_ = positions
        return self

    @classmethod
    def from_predictive(
        cls,
        predictive: "StudentT",
        nu_n: float,
        kappa_n: float,
        shape: tuple[int, int, int],
        n_support: int | None = None,
    ) -> "NIWPrototype":
        """A fitted prototype from its saved predictive (a site model's artifact), without the posteriors."""
        proto = cls.__new__(cls)
        proto.hyper, proto.global_, proto.local_ = None, None, None
        proto.predictive_, proto.shape_, proto.n_support_, proto.positions_ = predictive, tuple(shape), n_support, None
        proto.nu_n_, proto.kappa_n_ = float(nu_n), float(kappa_n)
        return proto

    @property
    def nu_n(self) -> float:
        """The posterior's degrees of freedom (the same at every position)."""
        return float(self.local_.nu.flatten()[0]) if self.local_ is not None else self.nu_n_

    @property
    def kappa_n(self) -> float:
        return float(self.local_.kappa.flatten()[0]) if self.local_ is not None else self.kappa_n_

    def _positions(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape_:
            raise ConfigError(
                f"NIWPrototype: query maps have shape {tuple(x.shape[1:])}, the model was fitted on {self.shape_}"
            )
        b, d, h, w = x.shape
        flat = x.permute(2, 3, 0, 1).reshape(h * w, b, d)
        return flat if self.positions_ is None else flat[self.positions_]

    def _to_maps(self, per_position: Tensor, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return per_position.t() if self.positions_ is not None else per_position.t().reshape(b, h, w)

    def distance(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distance of each query patch under its position's predictive: (B, H, W)."""
        return self._to_maps(self.predictive_.mahalanobis(self._positions(x)), x)

    mahalanobis = distance

    def log_prob(self, x: Tensor) -> Tensor:
        """Predictive log density of each query patch: (B, H, W)."""
        return self._to_maps(self.predictive_.log_prob(self._positions(x)), x)

    def score(self, x: Tensor) -> Tensor:
        """Patch anomaly score: the negative log predictive density relative to the density at the mode.

        Position-dependent normalising constants are left out, so that scores of different positions
        are comparable: a monotone function of the F-distributed Mahalanobis term.
        """
        maha = self.predictive_.mahalanobis(self._positions(x))
        return self._to_maps(-self.predictive_.log_kernel(maha), x)

    def score_from_distance(self, distance: Tensor) -> Tensor:
        """``score`` from ``distance`` maps (every position has the same degrees of freedom)."""
        return patch_score(distance, self.df, self.dim)

    @property
    def dim(self) -> int:
        return self.predictive_.dim

    @property
    def df(self) -> float:
        """The predictive's degrees of freedom (the same at every position)."""
        return float(self.predictive_.df.flatten()[0])

    @property
    def df_(self) -> Tensor:
        return self.predictive_.df

    def with_hyper(self, **changes) -> "NIWPrototype":
        if self.hyper is None:
            raise ConfigError("NIWPrototype.with_hyper: this prototype was rebuilt from a predictive and has no prior")
        return NIWPrototype(replace(self.hyper, **changes))
