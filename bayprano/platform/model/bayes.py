"""The meta-learned part of BayPrAnoMeta: the patch projection head and the NIW prior hyperparameters.

``BayesianPatchModel`` holds everything that Proto-MAML trains and that the federation averages: a 1x1
projection of standardised backbone features to d channels, the raw (unconstrained) prior
hyperparameters, the affine maps from scores to logits used by the outer loss, and the inner-loop
learning rate. Only the head is adapted in the inner loop; ``head_params()`` and ``embed(..., params)``
give the functional form that the inner loop needs (learn2learn's ``clone()`` / ``adapt()`` vocabulary
lives in ``bayprano.platform.meta``).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayprano.platform.model.niw import NIWHyper, NIWPrototype, window_statistics


class Prototype(Protocol):
    """What the inner loop, the outer loss and scoring need of a prototype of normal patch embeddings.

    ``fit(z, positions)`` on support maps (K, d, h, w) returns self (learned state ends in ``_``);
    ``distance(x)`` is the query patches' distance to it, the quantity the score-to-logit maps take,
    and ``score(x)`` their anomaly score, a monotone function of it: (B, h, w), or (B, P') when fitted
    at the flat indices ``positions`` only.
    """

    def fit(self, z: Tensor, positions: Tensor | None = None) -> "Prototype": ...

    def distance(self, x: Tensor) -> Tensor: ...

    def score(self, x: Tensor) -> Tensor: ...


class EuclideanPrototype:
    """Deterministic prototype: the window-pooled mean embedding per position.

    ``distance`` is the squared Euclidean distance in units of the support's average per-channel
    variance, so that it is on the scale of the Bayesian model's Mahalanobis distance and shares its
    logit maps; ``score`` is log(1 + distance).
    """

    def __init__(self, window: int = 3):
        self.window = window

    def fit(self, z: Tensor, positions: Tensor | None = None) -> "EuclideanPrototype":
        _, self.mean_, _ = window_statistics(z, self.window, positions)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        self.unit_ = flat.var(0, unbiased=False).mean().clamp_min(1e-12)
        self.shape_ = tuple(z.shape[1:])
        self.positions_ = positions
        return self

    def distance(self, z: Tensor) -> Tensor:
        b, d, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if self.positions_ is not None:
            return (x[:, self.positions_] - self.mean_[None]).pow(2).sum(-1) / self.unit_
        return ((x - self.mean_[None]).pow(2).sum(-1) / self.unit_).reshape(b, h, w)

    def score(self, z: Tensor) -> Tensor:
        return torch.log1p(self.distance(z))


PROTOTYPES: dict[str, Callable[["BayesianPatchModel"], Prototype]] = {
    "niw": lambda model: NIWPrototype(model.hyper()),
    "euclidean": lambda model: EuclideanPrototype(model.window),
}


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class BayesianPatchModel(nn.Module):
    """Projection head + NIW prior hyperparameters + score-to-logit maps + inner learning rate."""

    HEAD = ("head.weight", "head.bias")

    in_channels: int
    dim: int
    window: int
    feature_mean: Tensor  # buffers (C,) of the feature standardisation
    feature_std: Tensor

    def __init__(
        self,
        in_channels: int,
        dim: int = 64,
        window: int = 3,
        kappa0: float = 1.0,
        nu0_offset: float = 2.0,
        psi_scale: float = 1.0,
        obs_per_image: float = 1.0,
        global_obs_per_image: float = 16.0,
        inner_lr: float = 0.05,
        seed: int = 0,
        prototype: str = "niw",
    ):
        super().__init__()
        if prototype not in PROTOTYPES:
            raise ValueError(f"prototype must be one of {', '.join(PROTOTYPES)}, got {prototype!r}")
        self.prototype_kind = prototype
        if dim < 2 or dim > in_channels:
            raise ValueError(f"head dim must be between 2 and the backbone's {in_channels} channels, got {dim}")
        self.in_channels, self.dim, self.window = in_channels, dim, window
        self.head = nn.Conv2d(in_channels, dim, 1)
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(in_channels, dim, generator=gen))
        with torch.no_grad():
            self.head.weight.copy_(q.t().reshape(dim, in_channels, 1, 1))
            self.head_bias.zero_()
        self.register_buffer("feature_mean", torch.zeros(in_channels))
        self.register_buffer("feature_std", torch.ones(in_channels))
        self.raw_kappa0 = nn.Parameter(torch.tensor(_inv_softplus(kappa0)))
        self.raw_nu0_offset = nn.Parameter(torch.tensor(_inv_softplus(nu0_offset)))
        self.log_psi_scale = nn.Parameter(torch.tensor(math.log(psi_scale)))
        self.raw_obs_per_image = nn.Parameter(torch.tensor(_inv_softplus(obs_per_image)))
        self.raw_global_obs = nn.Parameter(torch.tensor(_inv_softplus(global_obs_per_image)))
        self.log_inner_lr = nn.Parameter(torch.tensor(math.log(inner_lr)))
        # logit = exp(log_scale) * (log(m / d) - bias), for patches (m) and for images (max m); a normal
        # patch has m / d near 1 under the predictive, so these start near the decision boundary
        self.pixel_log_scale = nn.Parameter(torch.tensor(math.log(2.0)))
        self.pixel_bias = nn.Parameter(torch.tensor(1.0))
        self.image_log_scale = nn.Parameter(torch.tensor(math.log(2.0)))
        self.image_bias = nn.Parameter(torch.tensor(2.0))

    # ------------------------------------------------------------------------------------- features

    def set_feature_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Per-channel standardisation of backbone features, fixed once from meta-training data."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp_min(1e-6))

    def head_params(self) -> dict[str, Tensor]:
        return {"weight": self.head.weight, "bias": self.head_bias}

    @property
    def head_bias(self) -> Tensor:
        """The head's bias (the head is always built with one)."""
        bias = self.head.bias
        if bias is None:
            raise RuntimeError("the projection head has lost its bias")
        return bias

    def embed(self, features: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Backbone features (B, C, h, w) -> patch embeddings (B, d, h, w) with the given head params."""
        params = params or self.head_params()
        x = (features.to(self.feature_mean.dtype) - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]
        return F.conv2d(x, params["weight"], params["bias"])

    # ------------------------------------------------------------------------------ hyperparameters

    def hyper(self) -> NIWHyper:
        return NIWHyper(
            kappa0=F.softplus(self.raw_kappa0) + 1e-3,
            nu0_offset=F.softplus(self.raw_nu0_offset) + 1e-2,
            psi_scale=self.log_psi_scale.exp(),
            obs_per_image=F.softplus(self.raw_obs_per_image) + 1e-2,
            global_obs_per_image=F.softplus(self.raw_global_obs) + 1e-2,
            window=self.window,
        )

    def hyper_values(self) -> dict[str, float]:
        h = self.hyper()
        out = {
            k: float(getattr(h, k).detach())
            for k in ("kappa0", "nu0_offset", "psi_scale", "obs_per_image", "global_obs_per_image")
        }
        out["inner_lr"] = float(self.log_inner_lr.detach().exp())
        return out

    def prototype(self, support_embeddings: Tensor, positions: Tensor | None = None) -> Prototype:
        """The fitted prototype: Bayesian (NIW, Student-t) or, for the deterministic Proto-MAML control,
        the window-pooled mean with a squared Euclidean distance."""
        return PROTOTYPES[self.prototype_kind](self).fit(support_embeddings, positions)

    def pixel_logits(self, mahalanobis: Tensor) -> Tensor:
        return self.pixel_log_scale.exp() * (torch.log(mahalanobis / self.dim + 1e-6) - self.pixel_bias)

    def image_logits(self, max_mahalanobis: Tensor) -> Tensor:
        return self.image_log_scale.exp() * (torch.log(max_mahalanobis / self.dim + 1e-6) - self.image_bias)

    def config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "dim": self.dim,
            "window": self.window,
            "prototype": self.prototype_kind,
        }
