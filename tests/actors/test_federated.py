"""Federated meta-training on a real local Ray: three Factory actors (one per category) and the Coordinator.

The Factory actors are started once for the module and shared by the tests; the test that kills one runs
last. Every reply a Factory sends is kept by the trainer (``received``) and inspected here.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bayprano.actors.coordinator import FederatedTrainer, spawn_factories
from bayprano.cli import main
from bayprano.config import FederatedTrainConfig
from bayprano.platform.data.imageio import load_image
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.federated.secagg import MaskedUpdate
from bayprano.platform.federated.state import encode_update, encoded_num_bytes
from bayprano.platform.meta.checkpoint import load_checkpoint
from bayprano.platform.model.site import adapt

ray = pytest.importorskip("ray")

SMALL = dict(image_size=64, shots=2, n_query_normal=2, n_query_anomalous=2, calibration_episodes=2, holdout=3,
             backbone="efficientnet_lite2", round_timeout=120.0)
SMALL_FLAGS = ["--image-size", "64", "--shots", "2", "--n-query-normal", "2", "--n-query-anomalous", "2",
               "--calibration-episodes", "2"]


def fed_cfg(shard_dir: Path, out: Path, **overrides) -> FederatedTrainConfig:
    return FederatedTrainConfig(shards=shard_dir, out=out, **{**SMALL, "rounds": 2, "local_steps": 2, **overrides})


@pytest.fixture(scope="module")
def factories(ray_session, shard_dir, tmp_path_factory):
    handles = spawn_factories(fed_cfg(shard_dir, tmp_path_factory.mktemp("unused") / "c.pt"), num_cpus=0.2)
    yield handles
    for handle in handles.values():
        ray.kill(handle)


def _eventually(check, seconds: float = 15.0) -> bool:
    """Whether ``check()`` becomes true within ``seconds`` (Ray's resource view is eventually consistent)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _arrays(value, path="reply"):
    """Every array-like leaf of a reply, with where it is."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _arrays(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _arrays(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _arrays(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (bytes, bytearray, np.ndarray, torch.Tensor)):
        yield path, value


def test_a_secure_federated_run_writes_a_usable_checkpoint_and_sends_the_coordinator_only_masked_sums(
        factories, shard_dir, tmp_path):
    ray.get([f.ping.remote() for f in factories.values()])
    assert _eventually(lambda: ray.available_resources().get("factory:site-000", 1) == pytest.approx(0.999))  # pinned
    cfg = fed_cfg(shard_dir, tmp_path / "fed.pt", secure_agg=True, server_opt="fedprox", fedprox_mu=0.01)
    trainer = FederatedTrainer(cfg, factories, log=lambda m: None)
    summary = trainer.run()
    assert summary["rounds"] == 2 and summary["stop_reason"] == ""
    size = trainer.layout.size

    updates = [t["reply"] for t in trainer.transcript if t["stage"] == "update"]
    assert len(updates) == 6 and {r["site"] for r in updates} == set(trainer.sites)
    for reply in trainer.received:
        for where, leaf in _arrays(reply):
            n = len(leaf) if isinstance(leaf, (bytes, bytearray)) else leaf.size if isinstance(leaf, np.ndarray) \
                else leaf.numel()
            assert n <= size + 2, f"{where}: {n} values, more than the parameter vector"
            if isinstance(leaf, (bytes, bytearray)):
                assert leaf.startswith(b"\x89PNG") is False and b"IHDR" not in leaf, f"{where}: image bytes"
            else:
                assert where.endswith(".masked.values"), f"{where}: an array other than the masked vector"
    for reply in updates:  # [weight * delta, weight, loss], masked
        assert isinstance(reply["masked"], MaskedUpdate) and set(reply) == {"site", "masked", "round", "attempt"}
        assert reply["masked"].values.dtype == np.uint64 and reply["masked"].values.shape == (size + 2,)
    validations = [t["reply"] for t in trainer.transcript if t["stage"] == "validation"]
    assert len(validations) == 6 and all(set(r) == {"site", "masked"} for r in validations)

    shard_bytes = sum(ray.get([f.shard_bytes.remote() for f in factories.values()]))
    assert shard_bytes > 0 and summary["bytes"] == trainer.ledger.total() > 0
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.meta_config["federated"]["round"] == 2 and [h["round"] for h in ckpt.history] == [1, 2]
    assert ckpt.categories == sorted(c for i in trainer.infos.values() for c in i["categories"])
    assert ckpt.image_size == 64 and ckpt.calibration.effective_patches > 0
    assert ckpt.normality is not None and 1 in ckpt.normality.table
    torch.testing.assert_close(trainer.layout.flatten(ckpt.model), trainer.global_vector)
    assert all(0 <= h["val_auroc"] <= 1 for h in ckpt.history)

    good = sorted((shard_dir.parent / "synth" / ckpt.categories[0] / "train" / "good").glob("*.png"))
    site_model = adapt(ckpt, [load_image(p) for p in good[:2]])
    results = site_model.score([load_image(good[-1])], maps=False)
    assert len(results) == 1 and np.isfinite(results[0].score)


def test_secure_aggregation_on_and_off_give_the_same_aggregate(factories, shard_dir, tmp_path):
    deltas = {}
    for secure, fp16 in ((True, False), (False, False), (False, True)):
        trainer = FederatedTrainer(fed_cfg(shard_dir, tmp_path / f"{secure}{fp16}.pt", secure_agg=secure, fp16=fp16),
                                   factories, log=lambda m: None)
        trainer.setup()
        result = trainer.run_round(1)
        assert result["sites"] == trainer.sites and result["attempt"] == 0
        deltas[secure, fp16] = result["delta"]
        if not secure:
            assert all(isinstance(r["update"], bytes) and len(r["update"]) == encoded_num_bytes(trainer.layout, fp16)
                       for r in trainer.received)
    plain = deltas[False, False]
    assert float(plain.abs().max()) > 0
    torch.testing.assert_close(deltas[True, False], plain, atol=1e-6, rtol=0)
    # float16 on the wire both ways: local training starts from a rounded global model, so only close
    assert float((deltas[False, True] - plain).norm()) < 0.25 * float(plain.norm())


def test_dp_stops_at_the_epsilon_target_with_the_reason_and_resume_continues_without_repeating_a_round(
        ray_session, shard_dir, tmp_path, capsys):
    z, clip, delta, q = 1.0, 0.5, 1e-5, 1.0  # under DP the sites are Poisson-sampled: at q = 1, all of them
    direct = PrivacyAccountant(z, q, delta)
    eps = [direct.step() for _ in range(3)]
    target = (eps[1] + eps[2]) / 2  # two rounds fit, the third does not
    out = tmp_path / "dp.pt"
    flags = ["train", "--shards", str(shard_dir), "--sites-per-round", "1.0", "--local-steps", "1",
             "--dp-noise", str(z), "--dp-clip", str(clip), "--dp-delta", str(delta), "--secure-agg",
             "--server-opt", "fedadam",
             "--out", str(out), *SMALL_FLAGS]
    assert main([*flags, "--rounds", "3", "--target-epsilon", str(target)]) == 0
    captured = capsys.readouterr()
    assert "stopped before round 3" in captured.err and f"target {target:g}" in captured.err
    assert "2 federated round(s) of 3" in captured.out and "image bytes" in captured.out
    for site in ("site-000", "site-001", "site-002"):  # one line per site: what it sent against its images
        assert f"  {site}: sent " in captured.out and "% of its " in captured.out
    ckpt = load_checkpoint(out)
    state = ckpt.meta_config["federated"]
    assert state["round"] == 2 and "stopped before round 3" in state["stop_reason"]
    assert [h["round"] for h in ckpt.history] == [1, 2] and all("sites" not in h for h in ckpt.history)  # secret
    assert ckpt.history[-1]["epsilon"] == pytest.approx(eps[1], rel=1e-12)
    assert PrivacyAccountant(z, q, delta).load_state_dict(state["accountant"]).epsilon == pytest.approx(eps[1], rel=1e-12)
    assert state["server"]["name"] == "fedadam" and state["server"]["steps"] == 2

    assert main([*flags, "--rounds", "3", "--resume"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.meta_config["federated"]["round"] == 3
    assert [h["round"] for h in ckpt.history] == [1, 2, 3]
    assert ckpt.history[-1]["epsilon"] == pytest.approx(eps[2], rel=1e-12)
    assert ckpt.meta_config["federated"]["server"]["steps"] == 3  # FedAdam's moments carried over, not restarted


@pytest.mark.parametrize("argv, message", [
    (["--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
    (["--target-epsilon", "3", "--dp-clip", "1"], "--target-epsilon needs --dp-noise"),
    (["--server-opt", "fedsgd"], "--server-opt fedsgd"),
    (["--fedprox-mu", "0.1"], "--fedprox-mu is for --server-opt fedprox"),
    (["--sites-per-round", "1.5"], "--sites-per-round 1.5"),
    (["--resume"], "no checkpoint"),
    (["--pool-size", "0"], "--pool-size 0: must be greater than or equal to 1"),
    (["--min-sites", "4"], "--min-sites 4: more than the 3 site(s) sampled each round"),
    (["--round-timeout", "-1"], "--round-timeout -1: must be greater than 0"),
    (["--server-lr", "0"], "--server-lr 0: must be greater than 0"),
    (["--sites-per-round", "4"], "--sites-per-round 4: more than the 3 site(s) there are"),
])
def test_federated_flags_are_validated_before_anything_starts(shard_dir, tmp_path, capsys, argv, message):
    code = main(["train", "--shards", str(shard_dir), "--rounds", "1", "--out", str(tmp_path / "c.pt"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_federated_flags_need_shards(tmp_path, capsys):
    assert main(["train", "--data-root", str(tmp_path), "--shots", "1", "--inner-steps", "0", "--episodes", "1",
                 "--out", str(tmp_path / "c.pt"), "--secure-agg"]) == 2
    assert "give --shards" in capsys.readouterr().err


def test_a_straggler_past_the_round_timeout_is_dropped_for_that_round_and_rejoins_after_a_restart(
        factories, shard_dir, tmp_path):
    straggler = "site-002"
    logged = []
    cfg = fed_cfg(shard_dir, tmp_path / "late.pt", rounds=3, local_steps=1, round_timeout=30.0)
    trainer = FederatedTrainer(cfg, factories, log=logged.append)
    trainer.setup()
    assert trainer.run_round(1)["sites"] == trainer.sites
    # keep the straggler busy: its round-2 update queues behind a local update that would run for hours
    settings = {**trainer._round_settings(), "local_steps": 10**6}
    busy = factories[straggler].local_update.remote(99, 0, encode_update(trainer.global_vector, trainer.layout),
                                                    None, settings)
    late = trainer.run_round(2)
    assert late["sites"] == ["site-000", "site-001"] and straggler not in late["replies"]
    assert any(f"round 2 attempt 0: dropped {straggler} (late or dead)" in line for line in logged), logged
    assert float(late["delta"].abs().max()) > 0
    ray.kill(factories[straggler], no_restart=False)  # the only way to stop it; it restarts (max_restarts)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(busy)
    assert _eventually(lambda: _answers(factories[straggler], straggler), seconds=60)
    assert trainer.run_round(3)["sites"] == trainer.sites  # back in the next round


def _answers(handle, site: str) -> bool:
    try:
        return ray.get(handle.ping.remote(), timeout=5) == site
    except ray.exceptions.RayError:
        return False


def test_a_killed_factory_is_dropped_for_the_round_which_the_others_complete_without_a_redo_and_it_rejoins(
        factories, shard_dir, tmp_path):
    victim = "site-001"

    def kill_in_round_2(round, attempt, participants):
        if round == 2 and attempt == 0:
            ray.kill(factories[victim], no_restart=False)

    cfg = fed_cfg(shard_dir, tmp_path / "kill.pt", rounds=3, local_steps=1, secure_agg=True)
    logged = []
    trainer = FederatedTrainer(cfg, factories, log=logged.append, on_broadcast=kill_in_round_2)
    summary = trainer.run()
    assert summary["rounds"] == 3 and summary["stop_reason"] == "", logged
    assert any("update 2 attempt 0: site-001 dropped after sharing" in line for line in logged), logged
    rounds = {h["round"]: h for h in trainer.history}
    assert victim in rounds[1]["sites"]
    assert victim not in rounds[2]["sites"] and len(rounds[2]["sites"]) == 2 and rounds[2]["attempt"] == 0
    assert victim in rounds[3]["sites"] and rounds[3]["attempt"] == 0
    assert load_checkpoint(cfg.out).meta_config["federated"]["round"] == 3
