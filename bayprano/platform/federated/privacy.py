"""Client-level differential privacy for federated meta-training: DP-FedAvg and its privacy accountant.

DP-FedAvg (McMahan et al., "Learning differentially private recurrent language models", ICLR 2018):
each sampled site clips its model delta to L2 norm ``C`` (``clip_update``); the server sums the clipped
deltas, unweighted, adds Gaussian noise of standard deviation ``z * C`` to the sum
(``add_gaussian_noise``; one site changes the sum by at most ``C``), and divides by the number of
sampled sites (the expected number, under Poisson sampling). Weighting sites by their episode counts would raise the sensitivity to
``max weight * C``; under DP use equal weights.

``PrivacyAccountant`` tracks the (epsilon, delta) spent with Opacus's RDP analysis of the subsampled
Gaussian mechanism (the functions behind ``opacus.accountants.RDPAccountant``, whose epsilon it
reproduces exactly; one round's RDP is cached per (z, q) because it takes 0.15 s to compute), one step
per round, sample rate = sites per round / sites. Opacus's analysis assumes Poisson sampling of sites,
which is what the Coordinator does under DP (each site independently with probability q, from the
operating system's random source, recorded nowhere), dividing the noised sum by the expected number
of sites q N.
``would_exceed(target)`` tells the Coordinator, before a round starts, whether running it would take
epsilon past the budget: the hard stop. Its state is a plain dict, so the Coordinator checkpoints it
with the model and resumes without losing a round.

Limits: the noise comes from torch's generator (Mersenne Twister) and floating-point sampling, which
is standard practice but not a hardened DP implementation (Mironov 2012); the server that adds the
noise sees the un-noised sum (with ``secagg`` it sees nothing less than the sum).
"""

from __future__ import annotations

import functools
import math
import numbers
import secrets
import warnings
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError


def _number(name: str, value, what: str, ok) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not ok(float(value))
    ):
        raise ConfigError(f"privacy: {name} must be {what}, got {value!r}")
    return float(value)


def _check_delta_vector(vector: Tensor, what: str) -> Tensor:
    if not isinstance(vector, Tensor):
        raise DataError(f"{what}: expected a tensor, got {type(vector).__name__}")
    if not vector.is_floating_point() or vector.ndim != 1:
        raise DataError(
            f"{what}: expected a 1-D floating-point vector, got {vector.dtype} of shape {list(vector.shape)}"
        )
    if not bool(torch.isfinite(vector).all()):
        raise DataError(f"{what}: contains NaN or infinite values")
    return vector


# ------------------------------------------------------------------------------ the mechanism


def clip_update(delta: Tensor, max_norm: float) -> tuple[Tensor, float]:
    """``delta`` scaled to L2 norm at most ``max_norm`` (a new tensor), and its original norm."""
    max_norm = _number("max_norm", max_norm, "a positive number", lambda v: v > 0)
    delta = _check_delta_vector(delta, "clip_update")
    norm = float(torch.linalg.vector_norm(delta.double()))
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return delta * factor, norm


def add_gaussian_noise(
    sum_vector: Tensor, noise_multiplier: float, max_norm: float, generator: torch.Generator | None = None
) -> Tensor:
    """``sum_vector`` + N(0, (noise_multiplier * max_norm)^2) per coordinate (a new tensor).

    ``sum_vector`` is the sum of the sampled sites' deltas, each clipped to ``max_norm``. Pass a seeded
    ``generator`` for reproducible tests; without one a generator is seeded from the OS's randomness.
    """
    z = _number("noise_multiplier", noise_multiplier, "zero or positive", lambda v: v >= 0)
    c = _number("max_norm", max_norm, "a positive number", lambda v: v > 0)
    sum_vector = _check_delta_vector(sum_vector, "add_gaussian_noise")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.randn(sum_vector.shape, generator=generator, dtype=torch.float64)
    return (sum_vector.double().cpu() + noise * (z * c)).to(sum_vector.dtype).to(sum_vector.device)


# ----------------------------------------------------------------------------- the accountant


@functools.lru_cache(maxsize=128)
def _rdp_one_round(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one round at Opacus's default orders (0.15 s for q < 1, so cached: k rounds cost k times it)."""
    from opacus.accountants import RDPAccountant  # Opacus is slow to import; only the accountant needs it
    from opacus.accountants.analysis import rdp as analysis

    return tuple(
        analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
        )
    )


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` after ``history``: what ``opacus.accountants.RDPAccountant.get_epsilon``
    returns for the same history (the same functions, summed in the same order)."""
    if not history:
        return 0.0
    if any(z == 0 for z, _, n in history if n > 0):
        return math.inf  # no noise: no privacy
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    rdp = sum(np.array(_rdp_one_round(z, q)) * n for z, q, n in history)
    with warnings.catch_warnings():
        # "optimal order is the smallest/largest alpha": the bound is still valid, only perhaps loose
        warnings.filterwarnings("ignore", message=r"Optimal order is the (smallest|largest) alpha")
        eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    eps = float(eps)
    return eps if not math.isnan(eps) else math.inf


class PrivacyAccountant:
    """(epsilon, delta) of client-level DP-FedAvg so far, one ``step()`` per aggregated round.

    ``noise_multiplier`` (z >= 0) and ``sample_rate`` (q, in (0, 1]) apply to each round unless
    ``step`` is given others; ``delta`` (in (0, 1)) is the target delta, usually below 1 / number of
    sites. With z = 0 there is no privacy: epsilon is infinite after the first round and
    ``would_exceed`` is True for any budget.
    """

    MECHANISM = "rdp"

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float):
        self.noise_multiplier = _number("noise_multiplier", noise_multiplier, "zero or positive", lambda v: v >= 0)
        self.sample_rate = _number("sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)
        self.delta = _number("delta", delta, "in (0, 1)", lambda v: 0 < v < 1)
        self._history: list[tuple[float, float, int]] = []  # Opacus's (noise, sample rate, steps) runs

    @property
    def rounds(self) -> int:
        return sum(n for _, _, n in self._history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)

    @staticmethod
    def _extend(history: list[tuple[float, float, int]], z: float, q: float, k: int) -> list[tuple[float, float, int]]:
        """``history`` after ``k`` more steps with (z, q), merged as Opacus's ``RDPAccountant.step`` does."""
        out = list(history)
        if k == 0:
            return out
        if out and out[-1][0] == z and out[-1][1] == q:
            out[-1] = (z, q, out[-1][2] + k)
        else:
            out.append((z, q, k))
        return out

    def step(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> float:
        """Record one round (with the configured z and q unless given) and return the new epsilon."""
        z = (
            self.noise_multiplier
            if noise_multiplier is None
            else _number("noise_multiplier", noise_multiplier, "zero or positive", lambda v: v >= 0)
        )
        q = (
            self.sample_rate
            if sample_rate is None
            else _number("sample_rate", sample_rate, "in (0, 1]", lambda v: 0 < v <= 1)
        )
        self._history = self._extend(self._history, z, q, 1)
        return self.epsilon

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0.0 before the first round, ``math.inf`` without noise)."""
        return _rdp_epsilon(self._history, self.delta)

    def epsilon_after(self, extra_rounds: int) -> float:
        """Epsilon if ``extra_rounds`` more rounds ran with the configured z and q; records nothing."""
        if isinstance(extra_rounds, bool) or not isinstance(extra_rounds, numbers.Integral) or extra_rounds < 0:
            raise ConfigError(f"privacy: extra_rounds must be a non-negative integer, got {extra_rounds!r}")
        return _rdp_epsilon(
            self._extend(self._history, self.noise_multiplier, self.sample_rate, int(extra_rounds)), self.delta
        )

    def would_exceed(self, target_epsilon: float) -> bool:
        """True if running the next round would take epsilon above ``target_epsilon``: stop before it."""
        target = _number("target_epsilon", target_epsilon, "a positive number", lambda v: v > 0)
        return self.epsilon_after(1) > target

    def rounds_within(self, target_epsilon: float, limit: int = 100_000) -> int:
        """How many more rounds fit in ``target_epsilon`` (at most ``limit``)."""
        target = _number("target_epsilon", target_epsilon, "a positive number", lambda v: v > 0)
        if self.epsilon_after(0) > target:
            return 0
        lo, hi = 0, limit  # epsilon_after(lo) <= target; find the largest such lo
        if self.epsilon_after(hi) <= target:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    # ---------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict:
        return {
            "mechanism": self.MECHANISM,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "history": [[z, q, n] for z, q, n in self._history],
        }

    def load_state_dict(self, state: Mapping) -> "PrivacyAccountant":
        """Restore the rounds spent. The saved delta must equal this accountant's (an epsilon is only
        comparable at one delta); this accountant's z and q apply to the rounds still to come."""
        if not isinstance(state, Mapping) or "history" not in state:
            raise DataError("privacy accountant state: expected a mapping with a 'history'")
        if state.get("mechanism") != self.MECHANISM:
            raise DataError(
                f"privacy accountant state: mechanism {state.get('mechanism')!r}, expected {self.MECHANISM!r}"
            )
        if "delta" in state and float(state["delta"]) != self.delta:
            raise ConfigError(
                f"privacy: delta={self.delta} but the checkpointed accountant used delta={state['delta']}"
            )
        history = []
        for row in state["history"]:
            try:
                z, q, n = row
                z, q = float(z), float(q)
            except (TypeError, ValueError):
                raise DataError(
                    f"privacy accountant state: a history row must be [noise, sample_rate, steps], got {row!r}"
                ) from None
            if not (
                z >= 0 and 0 < q <= 1 and isinstance(n, numbers.Integral) and not isinstance(n, bool) and int(n) >= 1
            ):
                raise DataError(f"privacy accountant state: invalid history row {row!r}")
            history.append((z, q, int(n)))
        self._history = history
        return self

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self.noise_multiplier}, sample_rate={self.sample_rate}, "
            f"delta={self.delta}, rounds={self.rounds}, epsilon={self.epsilon:.4g})"
        )
