"""Server update rules on hand-made vectors: FedAvg, FedProx's penalty, FedAdam and its checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.aggregation import (
    FedAdamServer,
    FedAvgServer,
    fedprox_penalty,
    make_server_optimizer,
    pack_weighted,
    unpack_weighted,
    weighted_average,
)


def test_fedavg_weights_sites_by_their_episodes():
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(weighted_average([d1, d2], [1, 3]), torch.tensor([0.25, 1.5]))
    torch.testing.assert_close(weighted_average([d1, d2]), torch.tensor([0.5, 1.0]))
    new = FedAvgServer().step(torch.tensor([10.0, 10.0]), weighted_average([d1, d2], [1, 3]))
    torch.testing.assert_close(new, torch.tensor([10.25, 11.5]))
    torch.testing.assert_close(FedAvgServer(lr=0.5).step(torch.zeros(2), d2), torch.tensor([0.0, 1.0]))


def test_weighted_average_from_a_sum_of_packed_vectors_equals_fedavg():
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mean, total = unpack_weighted(pack_weighted(d1, 1) + pack_weighted(d2, 3))
    assert total == 4.0
    torch.testing.assert_close(mean, weighted_average([d1, d2], [1, 3]))


def test_averaging_refuses_inconsistent_inputs():
    d = torch.zeros(3)
    with pytest.raises(DataError, match="no site deltas to average"):
        weighted_average([])
    with pytest.raises(ConfigError, match="2 weights for 1 deltas"):
        weighted_average([d], [1, 2])
    with pytest.raises(ConfigError, match="weight 1 must be a positive number, got 0"):
        weighted_average([d, d], [1, 0])
    with pytest.raises(DataError, match="delta 1: expected 3 values, got 4"):
        weighted_average([d, torch.zeros(4)])
    with pytest.raises(DataError, match="aggregated delta: expected 3 values, got 2"):
        FedAvgServer().step(d, torch.zeros(2))


def test_fedprox_penalty_is_half_mu_squared_distance_with_gradient_toward_the_global():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    g = torch.tensor([0.0, 2.0, 5.0], requires_grad=True)
    penalty = fedprox_penalty(w, g, mu=0.5)
    assert penalty.item() == pytest.approx(0.25 * (1 + 0 + 4))
    penalty.backward()
    torch.testing.assert_close(w.grad, torch.tensor([0.5, 0.0, -1.0]))
    assert g.grad is None  # the global vector is a constant of the local objective
    assert fedprox_penalty(w, g, 0.0).item() == 0.0
    with pytest.raises(ConfigError, match="mu must be zero or positive, got -1"):
        fedprox_penalty(w, g, -1)


def test_fedadam_follows_reddi_et_al_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = FedAdamServer(lr=lr, beta1=b1, beta2=b2, tau=tau)
    x0 = [1.0, -1.0]
    d1, d2 = [1.0, -2.0], [0.5, 0.0]
    x1 = opt.step(torch.tensor(x0), torch.tensor(d1))
    m = [(1 - b1) * d for d in d1]
    v = [b2 * tau**2 + (1 - b2) * d * d for d in d1]
    want1 = [x + lr * mi / (math.sqrt(vi) + tau) for x, mi, vi in zip(x0, m, v)]
    torch.testing.assert_close(x1, torch.tensor(want1))
    assert want1[0] > x0[0] and want1[1] < x0[1]  # moves along the delta (the pseudo-gradient is -delta)
    x2 = opt.step(x1, torch.tensor(d2))
    m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, d2)]
    v = [b2 * vi + (1 - b2) * d * d for vi, d in zip(v, d2)]
    want2 = [x + lr * mi / (math.sqrt(vi) + tau) for x, mi, vi in zip(want1, m, v)]
    torch.testing.assert_close(x2, torch.tensor(want2))
    assert opt.steps == 2


def test_fedadam_state_round_trips_and_resumes_identically():
    a = FedAdamServer(lr=0.05)
    x = torch.tensor([0.0, 1.0, 2.0])
    x = a.step(x, torch.tensor([0.1, -0.2, 0.3]))
    b = FedAdamServer(lr=0.05).load_state_dict(a.state_dict())
    d = torch.tensor([0.3, 0.1, -0.1])
    torch.testing.assert_close(b.step(x, d), a.step(x, d))
    assert b.steps == a.steps == 2
    with pytest.raises(DataError, match="made by 'fedadam', this optimizer is 'fedavg'"):
        FedAvgServer().load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="FedAdam: state holds 3 values, the global vector has 2"):
        b.step(torch.zeros(2), torch.zeros(2))


def test_server_optimizers_by_name():
    assert isinstance(make_server_optimizer("fedavg"), FedAvgServer)
    assert isinstance(make_server_optimizer("fedprox", lr=1.0), FedAvgServer)
    assert make_server_optimizer("fedadam", lr=0.01, tau=1e-2).tau == 1e-2
    with pytest.raises(ConfigError, match="aggregation must be one of fedavg, fedprox, fedadam, got 'sgd'"):
        make_server_optimizer("sgd")
    with pytest.raises(ConfigError, match="aggregation 'fedavg': .*unexpected keyword argument 'beta1'"):
        make_server_optimizer("fedavg", beta1=0.9)
    with pytest.raises(ConfigError, match=r"beta2 must be in \[0, 1\), got 1.0"):
        FedAdamServer(beta2=1.0)
