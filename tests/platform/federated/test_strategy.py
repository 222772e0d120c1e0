"""The federation's strategies without Ray: sampling, FedAvg weighting, and the DP wrapper's noise, sampling,
instruction and budget."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from bayprano.platform.errors import ConfigError
from bayprano.platform.federated.aggregation import FedAdamServer, FedAvgServer, pack_weighted
from bayprano.platform.federated.messages import RoundInstruction, SiteSettings, UpdateMetrics, UpdateReply
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.federated.state import ParameterLayout, encode_update
from bayprano.platform.federated.strategy import (
    DifferentialPrivacy,
    FedAvg,
    PoissonSampling,
    SeededSampling,
    strategy_from_config,
)

SITES = [f"site-{i:03d}" for i in range(10)]
LAYOUT = ParameterLayout((("w", (400,)),))


def fedavg(k: int = 4, **kwargs) -> FedAvg:
    return FedAvg(SITES, k, seed=3, server=FedAvgServer(), local_steps=2, **kwargs)


def reply(site: str, delta: torch.Tensor, weight: float, loss: float | None = None) -> UpdateReply:
    metrics = None if loss is None else UpdateMetrics(loss=loss, delta_norm=0.0, clipped_norm=0.0, seconds=0.0)
    return UpdateReply(site, 1, 0, weight, encode_update(delta, LAYOUT), metrics=metrics)


def test_seeded_sampling_replays_by_round_and_draws_k_distinct_sites():
    a, b = SeededSampling(SITES, 4, seed=7), SeededSampling(SITES, 4, seed=7)
    draws = [a.sample(r) for r in range(50)]
    assert draws == [b.sample(r) for r in range(50)]
    assert all(len(set(d)) == 4 and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 10  # each round its own draw
    with pytest.raises(ConfigError, match="11 site"):
        SeededSampling(SITES, 11, seed=0)


def test_poisson_sampling_takes_each_site_with_its_rate_and_a_binomial_number_of_sites():
    rate, n = 0.3, 4000
    sampling = PoissonSampling(SITES, rate, source=random.Random(0))
    draws = [sampling.sample(r) for r in range(n)]
    counts = np.array([sum(s in d for d in draws) for s in SITES])
    assert np.all(np.abs(counts / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)), counts
    sizes = np.bincount([len(d) for d in draws], minlength=len(SITES) + 1) / n
    binomial = [math.comb(10, j) * rate**j * (1 - rate) ** (10 - j) for j in range(11)]
    np.testing.assert_allclose(sizes, binomial, atol=0.025)
    assert isinstance(PoissonSampling(SITES, rate).source, random.SystemRandom)  # default: the OS's source


def test_fedavg_weights_the_decoded_deltas_by_their_weights_and_averages_the_loss():
    g = torch.Generator().manual_seed(0)
    deltas = {s: torch.randn(400, generator=g) for s in SITES[:3]}
    weights = {SITES[0]: 1.0, SITES[1]: 2.0, SITES[2]: 5.0}
    replies = {s: reply(s, deltas[s], weights[s], loss=float(i)) for i, s in enumerate(SITES[:3])}
    agg = fedavg().aggregate(replies, LAYOUT)
    expected = sum(weights[s] * deltas[s] for s in deltas) / 8.0
    torch.testing.assert_close(agg.delta, expected, atol=1e-6, rtol=0)
    assert agg.loss == pytest.approx(1.0)
    # the same from a secure sum of [weight * delta, weight, loss]
    summed = sum(
        torch.cat([pack_weighted(deltas[s], weights[s]), torch.tensor([float(i)])]).double()
        for i, s in enumerate(SITES[:3])
    )
    from_sum = fedavg().aggregate_sum(summed, 3, 400)
    torch.testing.assert_close(from_sum.delta, expected, atol=1e-5, rtol=0)
    assert from_sum.loss == pytest.approx(1.0)


def test_fedavg_instruction_carries_the_run_settings_and_applies_its_server_optimiser():
    strategy = FedAvg(
        SITES, 4, seed=0, server=FedAdamServer(lr=0.1), local_steps=3, fedprox_mu=0.01, clip=0.5, fp16=True
    )
    instruction = strategy.configure_round([0.0, 1.0], [1.0, 2.0])
    assert instruction == RoundInstruction(
        local_steps=3,
        feature_mean=(0.0, 1.0),
        feature_std=(1.0, 2.0),
        fedprox_mu=0.01,
        clip=0.5,
        weighted=True,
        dp=False,
        fp16=True,
    )
    start, delta = torch.zeros(5), torch.ones(5)
    torch.testing.assert_close(strategy.apply(start, delta), FedAdamServer(lr=0.1).step(start, delta))
    assert strategy.refusal() is None and strategy.account() is None and not strategy.dp


def test_the_dp_wrapper_releases_the_sum_plus_noise_of_std_z_c_over_the_expected_number_of_sites():
    z, clip, k = 1.5, 0.2, 4
    dp = DifferentialPrivacy(fedavg(k), z, clip, 1e-5, generator=torch.Generator().manual_seed(1))
    deltas = {s: torch.full((400,), 0.01 * (i + 1)) for i, s in enumerate(SITES[:3])}
    replies = {s: reply(s, d, 1.0) for s, d in deltas.items()}
    total = sum(deltas.values())
    noises = torch.stack([dp.aggregate(replies, LAYOUT).delta - total / k for _ in range(50)])  # 20000 draws
    assert float(noises.std()) == pytest.approx(z * clip / k, rel=0.03)  # the expected sites, not the 3 that came
    assert abs(float(noises.mean())) < 5 * z * clip / k / math.sqrt(noises.numel())
    agg = dp.aggregate(replies, LAYOUT)
    assert math.isnan(agg.loss)  # no loss is released under DP
    # the same release from a secure sum of [delta, 1]: the weight entry is left out
    summed = torch.cat([total, torch.tensor([3.0])]).double()
    from_sum = torch.stack([dp.aggregate_sum(summed, 3, 400).delta - total / k for _ in range(50)])
    assert float(from_sum.std()) == pytest.approx(z * clip / k, rel=0.03)


def test_the_dp_wrapper_clips_unweighted_samples_by_poisson_and_keeps_the_inner_server():
    inner = fedavg(4)
    dp = DifferentialPrivacy(inner, 1.0, 0.5, 1e-5, source=random.Random(2))
    instruction = dp.configure_round([0.0], [1.0])
    assert (instruction.clip, instruction.weighted, instruction.dp) == (0.5, False, True)
    assert instruction.local_steps == 2 and dp.dp and dp.server is inner.server
    assert isinstance(dp.sampler, PoissonSampling) and dp.sampler.rate == pytest.approx(0.4)
    assert dp.accountant is not None and dp.accountant.sample_rate == pytest.approx(0.4)
    assert len({len(dp.sample(r)) for r in range(200)}) > 2  # the sample size varies
    with pytest.raises(ConfigError, match="--dp-clip"):
        DifferentialPrivacy(inner, 1.0, None, 1e-5)  # type: ignore[arg-type]


def test_the_dp_wrapper_accounts_each_round_and_refuses_the_one_that_would_pass_the_target():
    z, q, delta = 1.1, 0.4, 1e-5
    by_hand = PrivacyAccountant(z, q, delta)
    eps = [by_hand.step() for _ in range(3)]
    target = (eps[1] + eps[2]) / 2
    dp = DifferentialPrivacy(fedavg(4), z, 0.5, delta, target_epsilon=target)
    steps = []
    while dp.refusal() is None:
        steps.append(dp.account())
    assert steps == pytest.approx(eps[:2], rel=1e-12)
    refusal = dp.refusal()
    assert refusal is not None and f"past the target {target:g}" in refusal and f"{eps[2]:.3f}" in refusal


def test_strategy_from_config_composes_fedavg_and_dp_from_the_settings():
    class Cfg:
        server_opt, server_lr, seed, local_steps, fedprox_mu, dp_clip, fp16 = "fedprox", 2.0, 0, 1, 0.1, None, False
        dp_noise, dp_delta, target_epsilon = None, 1e-5, None

    plain = strategy_from_config(Cfg, SITES, 5)
    assert isinstance(plain, FedAvg) and plain.fedprox_mu == 0.1 and plain.server.lr == 2.0
    Cfg.dp_noise, Cfg.dp_clip = 1.0, 0.5
    private = strategy_from_config(Cfg, SITES, 5)
    assert isinstance(private, DifferentialPrivacy) and private.configure_round([0.0], [1.0]).clip == 0.5


def test_site_settings_from_a_config_carry_the_meta_training_settings_and_the_run_seed():
    from bayprano.config import FederatedTrainConfig

    cfg = FederatedTrainConfig(
        sites={"a": "/x/a.parquet"},
        out="c.pt",
        rounds=1,
        shots=3,
        inner_steps=2,
        seed=5,
        second_order=True,
        image_size=70,
        holdout=2,
    )
    settings = SiteSettings.from_config(cfg)
    assert (settings.image_size, settings.seed, settings.holdout) == (70, 5, 2)
    assert (settings.meta.shots, settings.meta.inner_steps, settings.meta.seed) == (3, 2, 5)
    assert settings.meta.first_order is False
    recorded = settings.meta_settings()
    assert recorded["inner_positions"] == settings.meta.inner_positions and recorded["shots"] == 3
