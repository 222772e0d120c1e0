"""A site's local meta-update on toy task banks, and one whole federated round built from the pieces."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.aggregation import FedAvgServer, fedprox_penalty, weighted_average
from bayprano.platform.federated.local import local_meta_update
from bayprano.platform.federated.privacy import PrivacyAccountant, add_gaussian_noise, clip_update
from bayprano.platform.federated.secagg import secure_sum
from bayprano.platform.federated.state import ParameterLayout, decode_update, encode_update
from bayprano.platform.meta.protomaml import MetaConfig, TaskBank, build_task_bank, feature_statistics, meta_train
from bayprano.platform.model.bayes import BayesianPatchModel

from toy_tasks import toy_extract, toy_injector


def toy_bank(category: str, seed: int, n: int = 10) -> TaskBank:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (1, 32, 32, 3))
    images = np.clip(base + rng.normal(0, 6, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return build_task_bank(
        category, images, [f"{category}/{i}" for i in range(n)], toy_extract, toy_injector, seed=seed
    )


@pytest.fixture(scope="module")
def site_banks():
    """Two sites that own different product lines."""
    return {
        "site-a": {"caps": toy_bank("caps", 1)},
        "site-b": {"tiles": toy_bank("tiles", 2), "wood": toy_bank("wood", 3)},
    }


def make_model(site_banks) -> BayesianPatchModel:
    model = BayesianPatchModel(in_channels=12, dim=6, seed=0)
    everything = {k: v for banks in site_banks.values() for k, v in banks.items()}
    model.set_feature_statistics(*feature_statistics(everything))  # fixed, shared by all sites
    return model


CFG = MetaConfig(shots=3, inner_steps=1, n_query_normal=2, n_query_anomalous=2, inner_positions=16, lr=1e-2)


def test_local_update_returns_a_delta_of_the_layout_and_its_metrics(site_banks):
    model = make_model(site_banks)
    layout = ParameterLayout.from_model(model)
    start = layout.flatten(model)
    delta, metrics = local_meta_update(
        model, site_banks["site-a"], CFG, local_steps=3, global_vector=start, layout=layout, seed=11
    )
    assert delta.shape == (layout.size,) and delta.dtype == torch.float32
    assert bool(torch.isfinite(delta).all()) and float(delta.abs().max()) > 0
    torch.testing.assert_close(layout.flatten(model), start + delta)
    assert metrics["episodes"] == 3 and metrics["prox"] == 0.0 and metrics["loss"] > 0
    assert metrics["delta_norm"] == pytest.approx(float(delta.norm()))
    assert not model.training
    again, _ = local_meta_update(make_model(site_banks), site_banks["site-a"], CFG, 3, start, layout, seed=11)
    torch.testing.assert_close(again, delta)  # same global vector and seed: same delta


def test_the_fedprox_loop_is_meta_train_when_mu_is_zero_and_pulls_back_when_it_is_not(site_banks):
    model = make_model(site_banks)
    layout = ParameterLayout.from_model(model)
    start = layout.flatten(model)
    plain, _ = local_meta_update(model, site_banks["site-b"], CFG, 4, start, layout, seed=5)
    layout.load_into(model, start)
    cfg = MetaConfig(**{**CFG.__dict__, "episodes": 4, "seed": 5})

    def zero_prox(m):
        return fedprox_penalty(torch.cat([p.reshape(-1) for p in m.parameters()]), start, 0.0)

    metrics = meta_train(model, site_banks["site-b"], cfg, log_every=cfg.episodes, extra_losses={"prox": zero_prox})[-1]
    torch.testing.assert_close(layout.flatten(model) - start, plain)
    assert metrics["prox"] == 0.0
    prox, prox_metrics = local_meta_update(model, site_banks["site-b"], CFG, 4, start, layout, fedprox_mu=50.0, seed=5)
    assert prox_metrics["prox"] > 0 and prox.norm() < 0.5 * plain.norm()  # measured: about 1/3


def test_fedavg_of_two_sites_changes_the_shared_model(site_banks):
    model = make_model(site_banks)
    layout = ParameterLayout.from_model(model)
    start = layout.flatten(model)
    deltas, weights = [], []
    for i, site in enumerate(sorted(site_banks)):
        d, m = local_meta_update(make_model(site_banks), site_banks[site], CFG, 2, start, layout, seed=i)
        deltas.append(d)
        weights.append(m["episodes"])
    new = FedAvgServer().step(start, weighted_average(deltas, weights))
    torch.testing.assert_close(new, start + (deltas[0] + deltas[1]) / 2)
    layout.load_into(model, new)
    assert not torch.allclose(layout.flatten(model), start)
    assert float(model.log_inner_lr.detach().exp()) != pytest.approx(0.05, rel=1e-6)  # the inner lr is learned too


def test_a_private_secure_round_from_the_pieces(site_banks):
    """Broadcast (fp16 bytes), local updates, clipping, masking, secure sum, noise, server step, accounting."""
    model = make_model(site_banks)
    layout = ParameterLayout.from_model(model)
    start = layout.flatten(model)
    clip, z = 0.05, 0.5
    accountant = PrivacyAccountant(noise_multiplier=z, sample_rate=1.0, delta=1e-3)
    assert not accountant.would_exceed(10.0)
    wire = encode_update(start, layout, fp16=True)
    clipped = {}
    for i, sid in enumerate(sorted(site_banks)):
        received = decode_update(wire, layout)
        delta, _ = local_meta_update(make_model(site_banks), site_banks[sid], CFG, 2, received, layout, seed=i)
        clipped[sid], _ = clip_update(delta, clip)
    total = secure_sum(clipped, {sid: os.urandom(32) for sid in clipped}, "round-0", threshold=1).float()
    torch.testing.assert_close(total, sum(clipped.values()), atol=1e-6, rtol=0)
    noisy = add_gaussian_noise(total, z, clip, generator=torch.Generator().manual_seed(0))
    new = FedAvgServer().step(decode_update(wire, layout), noisy / len(clipped))
    accountant.step()
    assert 0 < accountant.epsilon < 10.0
    layout.load_into(model, new)
    assert float((layout.flatten(model) - start).norm()) > 0


def test_local_update_validates_its_inputs(site_banks):
    model = make_model(site_banks)
    layout = ParameterLayout.from_model(model)
    start = layout.flatten(model)
    with pytest.raises(ConfigError, match="local_steps must be an integer of at least 1, got 0"):
        local_meta_update(model, site_banks["site-a"], CFG, 0, start, layout)
    with pytest.raises(ConfigError, match="fedprox_mu must be zero or positive, got -0.1"):
        local_meta_update(model, site_banks["site-a"], CFG, 1, start, layout, fedprox_mu=-0.1)
    with pytest.raises(ConfigError, match="needs at least one category"):
        local_meta_update(model, {}, CFG, 1, start, layout)
    with pytest.raises(DataError, match=rf"global vector: expected a 1-D vector of {layout.size} values"):
        local_meta_update(model, site_banks["site-a"], CFG, 1, start[:-1], layout)
    other = start + 1.0
    with pytest.raises(
        ConfigError, match="shots=9 plus 2 normal query images needs 11 normal train images, category 'caps' has 10"
    ):
        local_meta_update(model, site_banks["site-a"], MetaConfig(**{**CFG.__dict__, "shots": 9}), 1, other, layout)
    torch.testing.assert_close(layout.flatten(model), start)  # refused before the model was touched
