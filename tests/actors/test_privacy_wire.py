"""What the Coordinator receives, byte for byte, under each privacy mode, and the epsilon it prints.

Every reply of every site goes through the trainer's one gather, which keeps it in ``transcript``
with its stage; these tests walk every leaf of every reply and check it against the README's table
"what leaves a site". Under secure aggregation with DP no per-site number reaches the Coordinator
except inside masked vectors; without secure aggregation, the same run shows each site's clipped delta.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bayprano.actors.coordinator_actor import spawn_factories
from bayprano.actors.coordinator import FederatedTrainer
from bayprano.config import FederatedTrainConfig
from bayprano.platform.federated.messages import sent_fields
from bayprano.platform.federated.summaries import calibration_size, normality_shots, rule_loss_size
from bayprano.platform.federated.secagg import Advertisement, MaskedUpdate
from bayprano.platform.federated.state import decode_update
from bayprano.platform.meta.checkpoint import load_checkpoint
from federation_helpers import SMALL

ray = pytest.importorskip("ray")

ONE_STEP = {**SMALL, "local_steps": 1}
Z, CLIP, DELTA = 1.2, 0.5, 1e-5

# the README table, as field sets per stage; metadata that is the same at every site or names the site
DESCRIBE = {"site", "categories", "in_channels", "backbone", "fingerprint", "image_size", "layout", "node", "host"}
EXPECTED = {
    "plain": {"check", "describe", "features", "update", "validation", "calibration", "rules"},
    "dp": {"check", "describe", "update"},
    "secure-dp": {"check", "describe", "advertise", "share", "update", "unmask"},
}


def cfg_for(shard_dir, out, mode: str, **overrides) -> FederatedTrainConfig:
    privacy = {
        "plain": {},
        "dp": dict(dp_noise=Z, dp_clip=CLIP, dp_delta=DELTA),
        "secure-dp": dict(dp_noise=Z, dp_clip=CLIP, dp_delta=DELTA, secure_agg=True),
    }[mode]
    return FederatedTrainConfig(shards=shard_dir, out=out, **{**ONE_STEP, "rounds": 1, **privacy, **overrides})


@pytest.fixture(scope="module")
def factories(ray_session, shard_dir, tmp_path_factory):
    handles = spawn_factories(cfg_for(shard_dir, tmp_path_factory.mktemp("w") / "c.pt", "plain"), num_cpus=0.2)
    yield handles
    for handle in handles.values():
        ray.kill(handle)


def leaves(value, path=""):
    """(path, leaf) for every number, string, bytes or array inside a reply."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[]")
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name), f"{path}.{f.name}")
    else:
        yield path, value


def test_under_secure_aggregation_and_dp_the_coordinator_gets_only_masked_vectors_and_the_tables_metadata(
    factories, shard_dir, tmp_path
):
    from opacus.accountants import RDPAccountant

    q = 1.0  # every site sampled: Poisson sampling at rate 1 is deterministic, as a test needs
    by_hand = RDPAccountant()
    eps = []
    for _ in range(3):
        by_hand.step(noise_multiplier=Z, sample_rate=q)
        eps.append(by_hand.get_epsilon(DELTA))
    target = (eps[1] + eps[2]) / 2  # two releases fit, the third would cross it
    logged = []
    cfg = cfg_for(shard_dir, tmp_path / "sdp.pt", "secure-dp", rounds=3, target_epsilon=target)
    trainer = FederatedTrainer(cfg, factories, log=logged.append)
    summary = trainer.run()
    assert summary["rounds"] == 2 and "stopped before round 3" in summary["stop_reason"]

    stages = {t["stage"] for t in trainer.transcript}
    assert stages == EXPECTED["secure-dp"], stages
    for t in trainer.transcript:
        reply, stage, where = t["reply"], t["stage"], f"{t['stage']} from {t['site']}"
        if stage == "check":
            assert reply == t["site"]
        elif stage == "describe":
            assert sent_fields(reply) == DESCRIBE, where  # no image count, no feature statistic
        elif stage == "advertise":
            assert isinstance(reply, Advertisement) and len(reply.c_public) == len(reply.s_public) == 32
        elif stage == "share":
            assert sent_fields(reply) == {"site", "instance", "shares"}
            assert all(isinstance(ct, bytes) and len(ct) < 400 for ct in reply.shares.values())  # sealed to peers
        elif stage == "update":
            assert sent_fields(reply) == {"site", "masked", "round", "attempt"} and isinstance(
                reply.masked, MaskedUpdate
            )
            assert reply.masked.values.shape == (trainer.layout.size + 1,)  # [clipped delta, 1]: no loss
        elif stage == "unmask":
            assert sent_fields(reply) == {"site", "instance", "shares"}
            assert all(kind == "self" and len(share) == 71 for kind, share in reply.shares.values())  # none dropped
        for path, leaf in leaves(reply):
            if isinstance(leaf, np.ndarray):
                assert path == ".masked.values" and leaf.dtype == np.uint64, f"{where}{path}: an array in the clear"
            assert not isinstance(leaf, (float, np.floating, torch.Tensor)), f"{where}{path}: a number in the clear"
            if isinstance(leaf, int) and not isinstance(leaf, bool):
                assert path in (
                    ".in_channels",
                    ".image_size",
                    ".round",
                    ".attempt",
                    ".masked.round",
                    ".masked.attempt",
                    ".masked.fractional_bits",
                ), f"{where}{path}: {leaf}"

    # one accountant, every noised release counted: the two rounds' updates (nothing else is released)
    ckpt = load_checkpoint(cfg.out)
    state = ckpt.meta_config["federated"]
    assert state["epsilon"] == pytest.approx(eps[1], rel=1e-12) and state["delta"] == DELTA
    assert [h["epsilon"] for h in ckpt.history] == pytest.approx(eps[:2], rel=1e-12)
    assert eps[1] <= target < eps[2]
    assert all("sites" not in h and "site_auroc" not in h and "bytes_up" not in h for h in ckpt.history)
    assert state["ledger"]["rows"][0][1] == "all sites"  # no per-round, per-site traffic in the checkpoint
    assert not any(s in line for line in logged for s in trainer.sites), logged  # no site named in the log
    assert any(f"epsilon {eps[1]:.3f} at delta {DELTA:g}" in line for line in logged), logged
    assert math.isnan(ckpt.history[0]["loss"]) and math.isnan(ckpt.history[0]["val_auroc"])


@pytest.mark.parametrize("mode", ["dp", "plain"])
def test_without_secure_aggregation_each_sites_values_are_visible(factories, shard_dir, tmp_path, mode):
    cfg = cfg_for(shard_dir, tmp_path / f"{mode}.pt", mode)
    trainer = FederatedTrainer(cfg, factories, log=lambda m: None)
    trainer.run()
    stages = {t["stage"] for t in trainer.transcript}
    assert stages == EXPECTED[mode], stages
    updates = {t["site"]: t["reply"] for t in trainer.transcript if t["stage"] == "update"}
    assert set(updates) == set(trainer.sites)
    for site, reply in updates.items():  # the site's own delta, in the clear
        delta = decode_update(reply.update, trainer.layout)
        assert float(delta.abs().max()) > 0
        if mode == "dp":
            assert sent_fields(reply) == {"site", "round", "attempt", "weight", "update"} and reply.weight == 1.0
            assert float(delta.norm()) <= CLIP * (1 + 1e-5)  # clipped, not noised: the noise is added at the server
        else:
            assert reply.metrics is not None and sent_fields(reply.metrics) == {
                "loss",
                "delta_norm",
                "clipped_norm",
                "seconds",
            }
    if mode == "plain":
        validations = [t["reply"].validation for t in trainer.transcript if t["stage"] == "validation"]
        features = [t["reply"].features for t in trainer.transcript if t["stage"] == "features"]
        assert len(validations) == len(features) == 3
        assert all(0 <= v[0] <= 1 and v[1] == 1 for v in validations)  # each site's AUROC
        assert all(f[-1] > 0 for f in features)  # each site's feature sums and count
        shots = normality_shots(cfg.shots)
        for stage, size in (("calibration", calibration_size(shots)), ("rules", rule_loss_size(shots))):
            replies = [t["reply"] for t in trainer.transcript if t["stage"] == stage]
            assert len(replies) == 3 and all(sent_fields(r) == {"site", "values"} for r in replies), stage
            assert all(r.values.shape == (size,) for r in replies), stage  # its moments and losses, nothing per image
        describe = [t["reply"] for t in trainer.transcript if t["stage"] == "describe"]
        assert all(sent_fields(d) == DESCRIBE | {"normals"} for d in describe)
