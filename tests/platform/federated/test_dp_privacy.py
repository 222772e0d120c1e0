"""Client-level DP-FedAvg: clipping, noise on the sum, and the RDP privacy accountant."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus.accountants import RDPAccountant

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.privacy import PrivacyAccountant, add_gaussian_noise, clip_update


def test_clip_scales_long_updates_to_the_bound_and_leaves_short_ones_alone():
    delta = torch.tensor([3.0, 4.0])
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped, torch.tensor([0.6, 0.8]))
    short, norm = clip_update(delta, 10.0)
    assert norm == pytest.approx(5.0) and torch.equal(short, delta) and short is not delta
    zero, norm = clip_update(torch.zeros(4), 1.0)
    assert norm == 0.0 and torch.equal(zero, torch.zeros(4))
    with pytest.raises(ConfigError, match="privacy: max_norm must be a positive number, got 0"):
        clip_update(delta, 0)
    with pytest.raises(DataError, match="contains NaN or infinite values"):
        clip_update(torch.tensor([1.0, float("inf")]), 1.0)


def test_noise_on_the_sum_has_std_z_times_c_and_is_reproducible_with_a_generator():
    total = torch.zeros(200_000)
    noisy = add_gaussian_noise(total, noise_multiplier=1.5, max_norm=0.4, generator=torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(0.6, rel=0.01) and abs(float(noisy.mean())) < 0.01
    again = add_gaussian_noise(total, 1.5, 0.4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again) and torch.equal(total, torch.zeros(200_000))
    assert torch.equal(add_gaussian_noise(torch.ones(5), 0.0, 1.0), torch.ones(5))
    with pytest.raises(ConfigError, match="noise_multiplier must be zero or positive, got -1"):
        add_gaussian_noise(total, -1, 1.0)


def direct_opacus_epsilon(z, q, steps, delta):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.get_epsilon(delta)


def test_epsilon_grows_with_rounds_shrinks_with_noise_and_matches_opacus():
    acc = PrivacyAccountant(noise_multiplier=1.1, sample_rate=0.3, delta=1e-5)
    assert acc.epsilon == 0.0 and acc.rounds == 0
    eps = [acc.step() for _ in range(20)]
    assert acc.rounds == 20 and all(a < b for a, b in zip(eps, eps[1:]))
    assert acc.epsilon == pytest.approx(direct_opacus_epsilon(1.1, 0.3, 20, 1e-5), rel=1e-12)
    noisier = PrivacyAccountant(2.0, 0.3, 1e-5)
    for _ in range(20):
        noisier.step()
    assert noisier.epsilon < acc.epsilon
    mixed = PrivacyAccountant(1.1, 0.3, 1e-5)
    mixed.step()
    mixed.step(sample_rate=0.2)  # a round run with another sample rate is accounted as such
    direct = RDPAccountant()
    direct.step(noise_multiplier=1.1, sample_rate=0.3)
    direct.step(noise_multiplier=1.1, sample_rate=0.2)
    assert mixed.epsilon == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)


def test_epsilon_after_and_the_hard_stop_do_not_spend_anything():
    acc = PrivacyAccountant(1.0, 0.5, 1e-5)
    acc.step()
    acc.step()
    before = acc.state_dict()
    ahead = acc.epsilon_after(3)
    assert ahead == pytest.approx(direct_opacus_epsilon(1.0, 0.5, 5, 1e-5), rel=1e-12)
    assert acc.state_dict() == before and acc.epsilon_after(0) == acc.epsilon
    budget = acc.epsilon_after(1)
    assert not acc.would_exceed(budget) and acc.would_exceed(budget * 0.999)
    assert acc.rounds_within(acc.epsilon_after(7)) == 7
    acc.step()
    assert acc.would_exceed(budget)  # the next round would go past it: stop now
    with pytest.raises(ConfigError, match="target_epsilon must be a positive number, got 0"):
        acc.would_exceed(0)


def test_zero_noise_means_infinite_epsilon_and_an_immediate_stop():
    acc = PrivacyAccountant(0.0, 1.0, 1e-5)
    assert acc.epsilon == 0.0 and acc.epsilon_after(1) == math.inf
    assert acc.would_exceed(1e9) and acc.rounds_within(1e9) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Opacus warning leaks out
        assert acc.step() == math.inf and acc.epsilon == math.inf


def test_state_round_trips_and_resumes_the_same_accounting():
    acc = PrivacyAccountant(1.3, 0.25, 1e-6)
    for _ in range(6):
        acc.step()
    resumed = PrivacyAccountant(1.3, 0.25, 1e-6).load_state_dict(acc.state_dict())
    assert resumed.rounds == 6 and resumed.epsilon == acc.epsilon
    acc.step()
    resumed.step()
    assert resumed.epsilon == acc.epsilon and resumed.history == acc.history == [(1.3, 0.25, 7)]
    with pytest.raises(ConfigError, match=r"delta=1e-05 but the checkpointed accountant used delta=1e-06"):
        PrivacyAccountant(1.3, 0.25, 1e-5).load_state_dict(acc.state_dict())
    with pytest.raises(DataError, match="invalid history row"):
        PrivacyAccountant(1.3, 0.25, 1e-6).load_state_dict({"mechanism": "rdp", "history": [[1.0, 2.0, 3]]})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier must be zero or positive, got -0.1"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\], got 1.5"),
        ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
        ({"delta": float("nan")}, r"delta must be in \(0, 1\), got nan"),
        ({"noise_multiplier": True}, "noise_multiplier must be zero or positive, got True"),
    ],
)
def test_accountant_settings_are_validated_eagerly(kwargs, message):
    settings = {"noise_multiplier": 1.0, "sample_rate": 0.5, "delta": 1e-5, **kwargs}
    with pytest.raises(ConfigError, match=message):
        PrivacyAccountant(**settings)
