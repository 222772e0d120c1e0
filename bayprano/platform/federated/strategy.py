"""Federation strategies, Flower-style: which sites take part, what they are told, how their updates combine.

A strategy is pure (no Ray, no transport): the ``FederatedTrainer`` asks it, round by round, to

- ``sample(round)``: the round's sites;
- ``configure_round(mean, std)``: the ``RoundInstruction`` every sampled site receives;
- ``aggregate(replies, layout)`` / ``aggregate_sum(summed, sites, size)``: the round's aggregated delta
  (and mean loss, where released) from the sites' plain replies, or from the sum that secure
  aggregation reveals (each site sent [weight * delta, weight] and, without DP, its loss);
- ``apply(global_vector, delta)``: the server optimiser's step (``aggregation.ServerOptimizer``:
  FedAvg, FedProx, FedAdam);
- ``refusal()`` before a round (a reason not to run it, or None) and ``account()`` after it (the
  epsilon spent so far, or None without DP).

``FedAvg`` is the base strategy: a seeded choice of ``sites_per_round`` sites (``SeededSampling``),
weighted FedAvg of the decoded deltas (weight = episodes run). ``DifferentialPrivacy`` wraps a strategy
as Flower's ``DifferentialPrivacyServerSideFixedClipping`` wraps one, for client-level DP-FedAvg: it
puts the clipping bound C in the instruction and makes the sites weigh 1 and keep their metrics home,
swaps the sampling for Poisson sampling from the OS's random source (``PoissonSampling``, as the
accountant assumes; nothing can replay it), releases the sum of clipped deltas plus N(0, (z C)^2)
over the expected number of sites (a fixed denominator: dividing by the number sampled would reveal
it), steps the Opacus RDP accountant once per round, and refuses a round that would take epsilon past
the target. ``strategy_from_config`` builds the composition a ``FederatedTrainConfig`` asks for.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.aggregation import ServerOptimizer, make_server_optimizer, weighted_average
from bayprano.platform.federated.messages import RoundInstruction, UpdateReply
from bayprano.platform.federated.privacy import PrivacyAccountant, add_gaussian_noise
from bayprano.platform.federated.state import ParameterLayout, decode_update


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregated delta and the sites' mean training loss (nan when it is not released)."""

    delta: Tensor
    loss: float


# -------------------------------------------------------------------------------------- sampling


class Sampling(Protocol):
    def sample(self, round: int) -> list[str]: ...


class SeededSampling:
    """``k`` of ``sites`` without replacement, from a generator seeded by (run seed, round): replayable."""

    def __init__(self, sites: Sequence[str], k: int, seed: int):
        if not 1 <= k <= len(sites):
            raise ConfigError(f"sampling: {k} site(s) per round of {len(sites)}")
        self.sites, self.k, self.seed = list(sites), int(k), int(seed)

    def sample(self, round: int) -> list[str]:
        rng = np.random.default_rng([self.seed, round])
        chosen = rng.choice(len(self.sites), size=self.k, replace=False)
        return sorted(self.sites[i] for i in chosen)


class PoissonSampling:
    """Each site independently with probability ``rate``, from ``source`` (default: the OS's random source,
    which nobody can replay): the sampling DP-FedAvg's analysis assumes. The sample size varies."""

    def __init__(self, sites: Sequence[str], rate: float, source: Any = None):
        if not 0 < rate <= 1:
            raise ConfigError(f"sampling: rate must be in (0, 1], got {rate!r}")
        self.sites, self.rate = list(sites), float(rate)
        self.source = secrets.SystemRandom() if source is None else source

    def sample(self, round: int) -> list[str]:
        return sorted(s for s in self.sites if self.source.random() < self.rate)


# ----------------------------------------------------------------------------------- strategies


class Strategy(Protocol):
    """What the ``FederatedTrainer`` asks of a strategy (see the module docstring)."""

    sites: list[str]
    expected_sites: int  # sites per round (the mean, under Poisson sampling)
    dp: bool  # under DP: who took part is secret, and metrics, validation and feature statistics stay home
    accountant: PrivacyAccountant | None

    @property
    def server(self) -> ServerOptimizer: ...

    def sample(self, round: int) -> list[str]: ...

    def configure_round(self, feature_mean: Sequence[float], feature_std: Sequence[float]) -> RoundInstruction: ...

    def aggregate(self, replies: Mapping[str, UpdateReply], layout: ParameterLayout) -> Aggregate: ...

    def aggregate_sum(self, summed: Tensor, sites: int, size: int) -> Aggregate: ...

    def apply(self, global_vector: Tensor, delta: Tensor) -> Tensor: ...

    def refusal(self) -> str | None: ...

    def account(self) -> float | None: ...


class FedAvg:
    """Weighted FedAvg over a seeded choice of sites, with the given server optimiser (FedAvg, FedProx, FedAdam)."""

    dp = False
    accountant: PrivacyAccountant | None = None

    def __init__(
        self,
        sites: Sequence[str],
        sites_per_round: int,
        seed: int,
        server: ServerOptimizer,
        local_steps: int,
        fedprox_mu: float = 0.0,
        clip: float | None = None,
        fp16: bool = False,
    ):
        self.sites = list(sites)
        self.expected_sites = int(sites_per_round)
        self.sampler: Sampling = SeededSampling(self.sites, self.expected_sites, seed)
        self.server = server
        self.local_steps, self.fedprox_mu, self.clip, self.fp16 = int(local_steps), float(fedprox_mu), clip, bool(fp16)

    def sample(self, round: int) -> list[str]:
        return self.sampler.sample(round)

    def configure_round(self, feature_mean: Sequence[float], feature_std: Sequence[float]) -> RoundInstruction:
        return RoundInstruction(
            local_steps=self.local_steps,
            fedprox_mu=self.fedprox_mu,
            clip=self.clip,
            weighted=True,
            dp=False,
            fp16=self.fp16,
            feature_mean=tuple(float(v) for v in feature_mean),
            feature_std=tuple(float(v) for v in feature_std),
        )

    def aggregate(self, replies: Mapping[str, UpdateReply], layout: ParameterLayout) -> Aggregate:
        """sum_i w_i delta_i / sum_i w_i over the replies (in site order) and their mean loss."""
        sites = sorted(replies)
        if not sites:
            raise DataError("aggregation: no site replied")
        deltas = [decode_update(replies[s].update, layout) for s in sites]
        losses = [m.loss for m in (replies[s].metrics for s in sites) if m is not None]
        loss = float(np.mean(losses)) if len(losses) == len(sites) else math.nan
        return Aggregate(weighted_average(deltas, [replies[s].weight for s in sites]), loss)

    def aggregate_sum(self, summed: Tensor, sites: int, size: int) -> Aggregate:
        """From the revealed sum of [weight * delta, weight, loss] over ``sites`` sites."""
        total = summed.double()
        return Aggregate((total[:size] / total[size]).float(), float(total[size + 1] / sites))

    def apply(self, global_vector: Tensor, delta: Tensor) -> Tensor:
        return self.server.step(global_vector, delta)

    def refusal(self) -> str | None:
        return None

    def account(self) -> float | None:
        return None


class DifferentialPrivacy:
    """Client-level DP-FedAvg around ``strategy`` (fixed clipping C, noise z * C on the server's sum).

    ``target_epsilon``: ``refusal()`` names the round that would pass it. ``source`` is the sampling's
    random source and ``generator`` the noise's (defaults: the OS's; tests may pass seeded ones).
    """

    dp = True

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clip: float,
        delta: float,
        target_epsilon: float | None = None,
        source: Any = None,
        generator: torch.Generator | None = None,
    ):
        if clip is None or not clip > 0:
            raise ConfigError("--dp-noise needs --dp-clip (the noise is z * C)")
        self.inner = strategy
        self.noise_multiplier, self.clip, self.delta = float(noise_multiplier), float(clip), float(delta)
        self.target_epsilon = target_epsilon
        self.generator = generator
        self.sites = strategy.sites
        self.expected_sites = strategy.expected_sites
        self.sampler: Sampling = PoissonSampling(self.sites, self.expected_sites / len(self.sites), source)
        self.accountant: PrivacyAccountant | None = PrivacyAccountant(
            noise_multiplier, self.expected_sites / len(self.sites), delta
        )

    @property
    def server(self) -> ServerOptimizer:
        return self.inner.server

    def sample(self, round: int) -> list[str]:
        return self.sampler.sample(round)

    def configure_round(self, feature_mean: Sequence[float], feature_std: Sequence[float]) -> RoundInstruction:
        return dataclasses.replace(
            self.inner.configure_round(feature_mean, feature_std), clip=self.clip, weighted=False, dp=True
        )

    def release(self, total: Tensor) -> Tensor:
        """DP-FedAvg's release: ``total`` (a sum of clipped deltas) plus N(0, (z C)^2), over the expected
        number of sites."""
        noised = add_gaussian_noise(total.double(), self.noise_multiplier, self.clip, generator=self.generator)
        return (noised / self.expected_sites).float()

    def aggregate(self, replies: Mapping[str, UpdateReply], layout: ParameterLayout) -> Aggregate:
        deltas = [decode_update(replies[s].update, layout) for s in sorted(replies)]
        if not deltas:
            raise DataError("aggregation: no site replied")
        return Aggregate(self.release(torch.stack(deltas).double().sum(0)), math.nan)

    def aggregate_sum(self, summed: Tensor, sites: int, size: int) -> Aggregate:
        return Aggregate(self.release(summed.double()[:size]), math.nan)

    def apply(self, global_vector: Tensor, delta: Tensor) -> Tensor:
        return self.inner.apply(global_vector, delta)

    def refusal(self) -> str | None:
        accountant = self.accountant
        if self.target_epsilon is None or accountant is None or not accountant.would_exceed(self.target_epsilon):
            return self.inner.refusal()
        return (
            f"it would take epsilon from {accountant.epsilon:.3f} to {accountant.epsilon_after(1):.3f}, past the "
            f"target {self.target_epsilon:g} (delta {self.delta:g})"
        )

    def account(self) -> float | None:
        """One more round (every sampled round counts, a skipped one too: its sampling happened)."""
        assert self.accountant is not None
        return self.accountant.step()


def strategy_from_config(cfg: Any, sites: Sequence[str], sites_per_round: int) -> Strategy:
    """The strategy a ``FederatedTrainConfig`` asks for: FedAvg with its server optimiser, wrapped in
    ``DifferentialPrivacy`` when ``dp_noise`` is set."""
    server = make_server_optimizer(cfg.server_opt, **({"lr": cfg.server_lr} if cfg.server_lr else {}))
    base = FedAvg(
        sites,
        sites_per_round,
        cfg.seed,
        server,
        cfg.local_steps,
        fedprox_mu=cfg.fedprox_mu if cfg.server_opt == "fedprox" else 0.0,
        clip=cfg.dp_clip,
        fp16=cfg.fp16,
    )
    if cfg.dp_noise is None:
        return base
    return DifferentialPrivacy(base, cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, cfg.target_epsilon)
