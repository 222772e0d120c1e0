"""Server-side update rules for federated meta-training, on flat parameter vectors.

A round's sites send deltas (new local parameters - global parameters, see ``local``); the server
combines them into one aggregated delta and a ``ServerOptimizer`` turns it into the next global vector:

- FedAvg (McMahan et al. 2017): ``weighted_average`` with weights = episodes run at each site, then
  ``FedAvgServer``: global + server_lr * delta (server_lr = 1 is plain FedAvg).
- FedProx (Li et al. 2020): the same server rule; what differs is the local objective, which adds
  ``fedprox_penalty`` = mu / 2 * ||w - w_global||^2 (``local.local_meta_update(fedprox_mu=...)``).
- FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2): Adam on the server
  with the negative average delta as the pseudo-gradient, ``FedAdamServer``; its moments are state,
  checkpointed with ``state_dict()``.

With secure aggregation the server only sees a sum, so a weighted average is computed from sums:
each site sends ``pack_weighted(delta, weight)`` = [weight * delta, weight], and ``unpack_weighted``
divides the summed vector by its last entry. Under differential privacy use equal weights (see
``privacy``).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError


def _vector(v, what: str, size: int | None = None) -> Tensor:
    if not isinstance(v, Tensor):
        raise DataError(f"{what}: expected a tensor, got {type(v).__name__}")
    if not v.is_floating_point() or v.ndim != 1:
        raise DataError(f"{what}: expected a 1-D floating-point vector, got {v.dtype} of shape {list(v.shape)}")
    if size is not None and v.numel() != size:
        raise DataError(f"{what}: expected {size} values, got {v.numel()}")
    if not bool(torch.isfinite(v).all()):
        raise DataError(f"{what}: contains NaN or infinite values")
    return v.detach().to("cpu", torch.float32)


def _param(name: str, value, what: str, ok) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not ok(float(value))
    ):
        raise ConfigError(f"aggregation: {name} must be {what}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------ averaging


def weighted_average(deltas: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """FedAvg's combination: sum_i w_i * delta_i / sum_i w_i (equal weights if ``weights`` is None)."""
    deltas = list(deltas)
    if not deltas:
        raise DataError("aggregation: no site deltas to average")
    vecs = [
        _vector(d, f"delta {i}", deltas[0].numel() if isinstance(deltas[0], Tensor) else None)
        for i, d in enumerate(deltas)
    ]
    if weights is None:
        w = [1.0] * len(vecs)
    else:
        w = list(weights)
        if len(w) != len(vecs):
            raise ConfigError(f"aggregation: {len(w)} weights for {len(vecs)} deltas")
        w = [_param(f"weight {i}", x, "a positive number", lambda v: v > 0) for i, x in enumerate(w)]
    total = sum(w)
    out = torch.zeros_like(vecs[0], dtype=torch.float64)
    for wi, v in zip(w, vecs):
        out += (wi / total) * v.double()
    return out.float()


def pack_weighted(delta: Tensor, weight: float) -> Tensor:
    """[weight * delta, weight]: summed over sites (e.g. by secure aggregation), ``unpack_weighted``
    gives the weighted average."""
    w = _param("weight", weight, "a positive number", lambda v: v > 0)
    d = _vector(delta, "delta")
    return torch.cat([d * w, torch.tensor([w], dtype=torch.float32)])


def unpack_weighted(summed: Tensor) -> tuple[Tensor, float]:
    """The weighted average and the total weight from a sum of ``pack_weighted`` vectors."""
    s = _vector(summed, "weighted sum")
    if s.numel() < 2:
        raise DataError(f"weighted sum: expected a delta and a weight, got {s.numel()} values")
    total = float(s[-1])
    if not total > 0:
        raise DataError(f"weighted sum: total weight must be positive, got {total}")
    return s[:-1] / total, total


def fedprox_penalty(params_vector: Tensor, global_vector: Tensor, mu: float) -> Tensor:
    """FedProx's proximal term mu / 2 * ||params - global||^2, differentiable in ``params_vector``."""
    mu = _param("mu", mu, "zero or positive", lambda v: v >= 0)
    if not isinstance(params_vector, Tensor) or not isinstance(global_vector, Tensor):
        raise DataError("fedprox_penalty: expected two tensors")
    if params_vector.shape != global_vector.shape:
        raise DataError(
            f"fedprox_penalty: params have shape {list(params_vector.shape)}, global {list(global_vector.shape)}"
        )
    diff = params_vector - global_vector.detach().to(params_vector.device, params_vector.dtype)
    return 0.5 * mu * diff.pow(2).sum()


# ---------------------------------------------------------------------------- server optimizers


class ServerOptimizer(ABC):
    """Turns the round's aggregated delta into the next global vector; its state is checkpointable."""

    name = "server"

    @abstractmethod
    def step(self, global_vector: Tensor, aggregated_delta: Tensor) -> Tensor:
        """The new global vector (a new float32 tensor); the inputs are left unchanged."""

    def state_dict(self) -> dict:
        return {"name": self.name}

    def load_state_dict(self, state: Mapping) -> "ServerOptimizer":
        if not isinstance(state, Mapping) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, Mapping) else type(state).__name__
            raise DataError(f"server optimizer state: made by {got!r}, this optimizer is {self.name!r}")
        return self

    @staticmethod
    def _inputs(global_vector: Tensor, aggregated_delta: Tensor) -> tuple[Tensor, Tensor]:
        g = _vector(global_vector, "global vector")
        return g, _vector(aggregated_delta, "aggregated delta", g.numel())


class FedAvgServer(ServerOptimizer):
    """global + lr * delta; lr = 1 is FedAvg (and FedProx, whose difference is local)."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0):
        self.lr = _param("server lr", lr, "a positive number", lambda v: v > 0)

    def step(self, global_vector: Tensor, aggregated_delta: Tensor) -> Tensor:
        g, d = self._inputs(global_vector, aggregated_delta)
        return g + self.lr * d


class FedAdamServer(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2), written on the delta d (pseudo-gradient = -d):

    m <- beta1 m + (1 - beta1) d;  v <- beta2 v + (1 - beta2) d^2;  x <- x + lr * m / (sqrt(v) + tau),

    with m = 0 and v = tau^2 at the start and no bias correction, as in the paper. The moments and the
    step count are state (``state_dict``); the hyperparameters come from the constructor.
    """

    name = "fedadam"

    def __init__(self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.lr = _param("server lr", lr, "a positive number", lambda v: v > 0)
        self.beta1 = _param("beta1", beta1, "in [0, 1)", lambda v: 0 <= v < 1)
        self.beta2 = _param("beta2", beta2, "in [0, 1)", lambda v: 0 <= v < 1)
        self.tau = _param("tau", tau, "a positive number", lambda v: v > 0)
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.steps = 0

    def step(self, global_vector: Tensor, aggregated_delta: Tensor) -> Tensor:
        g, d = self._inputs(global_vector, aggregated_delta)
        m, v = self.m, self.v
        if m is None or v is None:
            m, v = torch.zeros_like(g), torch.full_like(g, self.tau**2)
        elif m.numel() != g.numel():
            raise DataError(f"FedAdam: state holds {m.numel()} values, the global vector has {g.numel()}")
        self.m = self.beta1 * m + (1 - self.beta1) * d
        self.v = self.beta2 * v + (1 - self.beta2) * d * d
        self.steps += 1
        return g + self.lr * self.m / (self.v.sqrt() + self.tau)

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "steps": self.steps,
            "m": None if self.m is None else self.m.clone(),
            "v": None if self.v is None else self.v.clone(),
        }

    def load_state_dict(self, state: Mapping) -> "FedAdamServer":
        super().load_state_dict(state)
        m, v = state.get("m"), state.get("v")
        if (m is None) != (v is None):
            raise DataError("FedAdam state: has one moment without the other")
        if m is not None:
            m, v = _vector(m, "FedAdam state m"), _vector(v, "FedAdam state v", m.numel())
            if bool((v < 0).any()):
                raise DataError("FedAdam state: second moment has negative values")
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise DataError(f"FedAdam state: steps must be a non-negative integer, got {steps!r}")
        self.m, self.v, self.steps = m, v, int(steps)
        return self


SERVER_OPTIMIZERS = {"fedavg": FedAvgServer, "fedprox": FedAvgServer, "fedadam": FedAdamServer}


def make_server_optimizer(name: str, **kwargs) -> ServerOptimizer:
    """``fedavg`` / ``fedprox`` (FedAvgServer: lr) or ``fedadam`` (FedAdamServer: lr, beta1, beta2, tau)."""
    if name not in SERVER_OPTIMIZERS:
        raise ConfigError(f"aggregation must be one of {', '.join(SERVER_OPTIMIZERS)}, got {name!r}")
    try:
        return SERVER_OPTIMIZERS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"aggregation {name!r}: {exc}") from None
