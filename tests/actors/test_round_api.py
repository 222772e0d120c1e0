"""The public way to run a federation round by round: ``setup()``, ``step()``, ``run_rounds(n)``, as a Tune
trial does, without touching the trainer's settings."""

from __future__ import annotations

import pytest

from bayprano.actors.coordinator import FederatedTrainer
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.meta.checkpoint import load_checkpoint
from federation_helpers import fed_cfg

ray = pytest.importorskip("ray")


def test_step_runs_one_round_at_a_time_and_run_rounds_stops_at_the_last_round(factories, shard_dir, tmp_path):
    cfg = fed_cfg(shard_dir, tmp_path / "steps.pt", rounds=3, local_steps=1)
    logged: list[str] = []
    trainer = FederatedTrainer(cfg, factories, log=logged.append)
    trainer.setup()
    start = trainer.global_vector.clone()
    row = trainer.step()
    assert row is not None and row["round"] == 1 and trainer.round == 1 and trainer.history == [row]
    assert row["sites"] == trainer.sites and row["bytes_up"] > 0
    assert load_checkpoint(cfg.out).meta_config["federated"]["round"] == 1  # saved after each round
    assert float((trainer.global_vector - start).abs().max()) > 0
    assert any(line.startswith("round 1/3 ") for line in logged), logged

    rows = trainer.run_rounds(5)  # only two rounds are left
    assert [r["round"] for r in rows] == [2, 3] and trainer.finished and trainer.stop_reason == ""
    assert trainer.step() is None and trainer.run_rounds(1) == [] and trainer.round == 3
    assert trainer.cfg is cfg and cfg.rounds == 3
    ckpt = load_checkpoint(cfg.out)
    assert ckpt.meta_config["federated"]["round"] == 3 and [h["round"] for h in ckpt.history] == [1, 2, 3]


def test_step_returns_none_with_the_reason_before_a_round_past_the_privacy_budget(factories, shard_dir, tmp_path):
    z, clip, delta = 1.0, 0.5, 1e-5
    accountant = PrivacyAccountant(z, 1.0, delta)
    one, two = accountant.step(), accountant.step()
    cfg = fed_cfg(
        shard_dir,
        tmp_path / "budget.pt",
        rounds=3,
        local_steps=1,
        dp_noise=z,
        dp_clip=clip,
        dp_delta=delta,
        target_epsilon=(one + two) / 2,
    )
    logged: list[str] = []
    trainer = FederatedTrainer(cfg, factories, log=logged.append)
    row = trainer.step()  # runs setup() first
    assert row is not None and row["epsilon"] == pytest.approx(one, rel=1e-12) and "sites" not in row
    assert trainer.step() is None and trainer.finished
    assert trainer.stop_reason.startswith("stopped before round 2: it would take epsilon from ")
    assert trainer.round == 1 and trainer.accountant is not None and trainer.accountant.rounds == 1
    stops = sum("stopped before round 2" in line for line in logged)
    assert trainer.step() is None and sum("stopped before round 2" in line for line in logged) == stops == 1
    assert load_checkpoint(cfg.out).meta_config["federated"]["stop_reason"] == trainer.stop_reason
