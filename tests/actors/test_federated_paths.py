"""The federation's less travelled paths on a real local Ray: the quorum stop, resuming (and each reason to
refuse it), differential privacy without secure aggregation, the clipping bound in what the Coordinator
aggregates, secure aggregation with few sites, and the server step size.

Written against what a user sees: ``FederatedTrainer``'s runs and rounds, the checkpoints it writes, and the
``bayprano train`` command.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray
import torch

from bayprano.actors.coordinator import FederatedTrainer
from bayprano.cli import main
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.federated.state import decode_update
from bayprano.platform.meta.checkpoint import load_checkpoint

from federation_helpers import SMALL_FLAGS, fed_cfg, quiet


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_checkpoint(path).model.named_parameters()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=f"parameter {name}")


@pytest.fixture(scope="module")
def plain_checkpoint(factories, shard_dir, tmp_path_factory) -> Path:
    """One round of plain FedAvg, no DP."""
    out = tmp_path_factory.mktemp("plain") / "plain.pt"
    summary = FederatedTrainer(fed_cfg(shard_dir, out, rounds=1, local_steps=1), factories, log=quiet).run()
    assert summary["rounds"] == 1 and summary["stop_reason"] == ""
    return out


# ----------------------------------------------------------------------------------------- quorum


def test_a_round_with_fewer_sites_than_the_quorum_stops_the_run_with_the_reason_and_keeps_the_last_round(
    own_factories, shard_dir, tmp_path
):
    out = tmp_path / "quorum.pt"
    logged: list[str] = []
    cfg = fed_cfg(shard_dir, out, rounds=3, local_steps=1, min_sites=3)
    trainer = FederatedTrainer(cfg, own_factories, log=logged.append)
    trainer.setup()
    assert [row["round"] for row in trainer.run_rounds(1)] == [1] and trainer.round == 1
    after_one = weights(out)
    ray.kill(own_factories["site-002"], no_restart=True)  # dead for good: round 2 has two of the three sites

    summary = trainer.run()
    assert summary["rounds"] == 1
    assert summary["stop_reason"] == "stopped at round 2: fewer than 3 sites answered", logged
    assert any("round 2: 2 site(s) answered, quorum is 3" in line for line in logged), logged
    ckpt = load_checkpoint(out)
    state = ckpt.meta_config["federated"]
    assert state["round"] == 1 and state["stop_reason"] == summary["stop_reason"]
    assert [h["round"] for h in ckpt.history] == [1]
    assert_same_weights(weights(out), after_one, atol=0)  # the failed round changed nothing


# ----------------------------------------------------------------------------------------- resume


def test_resume_restores_the_weights_and_the_server_state_so_that_one_plus_one_rounds_equal_two(
    factories, shard_dir, tmp_path
):
    """FedAdam, whose step depends on its moments: resuming with the weights or the moments lost would
    land elsewhere than the uninterrupted run."""
    straight = tmp_path / "straight.pt"
    FederatedTrainer(
        fed_cfg(shard_dir, straight, rounds=2, local_steps=1, server_opt="fedadam", server_lr=0.05),
        factories,
        log=quiet,
    ).run()
    split = tmp_path / "split.pt"
    FederatedTrainer(
        fed_cfg(shard_dir, split, rounds=1, local_steps=1, server_opt="fedadam", server_lr=0.05), factories, log=quiet
    ).run()
    after_one = weights(split)

    logged: list[str] = []
    resumed = FederatedTrainer(
        fed_cfg(shard_dir, split, rounds=2, local_steps=1, server_opt="fedadam", server_lr=0.05, resume=True),
        factories,
        log=logged.append,
    )
    resumed.setup()
    assert f"resuming after round 1 from {split}" in logged
    assert resumed.round == 1
    torch.testing.assert_close(
        resumed.global_vector, resumed.layout.flatten(load_checkpoint(split).model), atol=0, rtol=0
    )
    summary = resumed.run()
    assert summary["rounds"] == 2 and [h["round"] for h in summary["history"]] == [1, 2]

    moved = max(float((after_one[k] - v).abs().max()) for k, v in weights(straight).items())
    assert moved > 1e-3, "the second round moved nothing: the comparison below would prove nothing"
    assert_same_weights(weights(split), weights(straight))
    assert load_checkpoint(split).meta_config["federated"]["server"]["steps"] == 2


def test_resume_from_a_centralised_checkpoint_is_refused(factories, shard_dir, tmp_path):
    out = tmp_path / "central.pt"
    assert (
        main(
            [
                "train",
                "--data-root",
                str(shard_dir.parent / "synth"),
                "--episodes",
                "1",
                "--inner-steps",
                "0",
                "--shots",
                "2",
                "--n-query-normal",
                "2",
                "--n-query-anomalous",
                "2",
                "--backbone",
                "efficientnet_lite2",
                "--image-size",
                "64",
                "--calibration-episodes",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    before = out.read_bytes()
    trainer = FederatedTrainer(fed_cfg(shard_dir, out, resume=True), factories, log=quiet)
    with pytest.raises(DataError, match=f"^{out}: not a federated checkpoint, cannot --resume from it$"):
        trainer.setup()
    assert out.read_bytes() == before


def test_resume_with_dp_settings_other_than_the_checkpoint_s_is_refused_both_ways(
    factories, plain_checkpoint, shard_dir, tmp_path
):
    trainer = FederatedTrainer(
        fed_cfg(shard_dir, plain_checkpoint, resume=True, dp_noise=1.0, dp_clip=0.5), factories, log=quiet
    )
    with pytest.raises(ConfigError, match="was trained without DP; cannot resume it with --dp-noise"):
        trainer.setup()

    dp = tmp_path / "dp.pt"
    FederatedTrainer(
        fed_cfg(shard_dir, dp, rounds=1, local_steps=1, dp_noise=1.0, dp_clip=0.5), factories, log=quiet
    ).run()
    before = dp.read_bytes()
    trainer = FederatedTrainer(fed_cfg(shard_dir, dp, resume=True), factories, log=quiet)
    with pytest.raises(ConfigError, match="was trained with DP; resume it with the same --dp-noise"):
        trainer.setup()
    assert dp.read_bytes() == before


def test_resume_on_another_model_layout_is_refused(factories, plain_checkpoint, shard_dir):
    trainer = FederatedTrainer(fed_cfg(shard_dir, plain_checkpoint, resume=True, dim=32), factories, log=quiet)
    with pytest.raises(DataError, match=f"^{plain_checkpoint}: its model does not match this run's"):
        trainer.setup()


def test_resume_with_sites_on_another_backbone_is_refused(ray_session, plain_checkpoint, shard_dir, tmp_path):
    from bayprano.actors.coordinator_actor import kill_factories, spawn_factories
    from bayprano.config import FederatedTrainConfig

    one_site = {"site-000": str(shard_dir / "site-000.parquet")}  # one is enough to tell the backbone
    settings = {
        **fed_cfg(shard_dir, tmp_path / "x.pt").model_dump(),
        "shards": None,
        "sites": one_site,
        "backbone": "random",
    }
    sites = spawn_factories(FederatedTrainConfig(**settings), num_cpus=0.2)
    try:
        trainer = FederatedTrainer(
            fed_cfg(shard_dir, plain_checkpoint, resume=True, backbone="random"), sites, log=quiet
        )
        with pytest.raises(
            DataError, match=f"^{plain_checkpoint}: made with backbone efficientnet_lite2:.*, the sites run random:"
        ):
            trainer.setup()
    finally:
        kill_factories(sites)


def test_the_command_line_refuses_a_bad_resume_in_one_line_and_leaves_the_checkpoint_alone(
    ray_session, plain_checkpoint, shard_dir, tmp_path, capsys
):
    out = tmp_path / "c.pt"
    out.write_bytes(plain_checkpoint.read_bytes())
    code = main(
        [
            "train",
            "--shards",
            str(shard_dir),
            "--rounds",
            "2",
            "--resume",
            "--dim",
            "32",
            "--out",
            str(out),
            *SMALL_FLAGS,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"bayprano: error: {out}: its model does not match this run's"), err
    assert "\n" not in err and out.read_bytes() == plain_checkpoint.read_bytes()


# --------------------------------------------------------------------------------------------- DP


def test_dp_without_secure_aggregation_adds_noise_of_z_times_c_to_the_sum_of_clipped_deltas(
    factories, shard_dir, tmp_path
):
    z, clip = 1.0, 1e-4  # a bound every delta exceeds, so each is clipped to norm C exactly
    cfg = fed_cfg(shard_dir, tmp_path / "dp.pt", rounds=1, local_steps=1, dp_noise=z, dp_clip=clip)
    trainer = FederatedTrainer(cfg, factories, log=quiet)
    trainer.setup()
    result = trainer.run_round(1)
    assert result.sites == trainer.sites and len(trainer.received) == 3

    # what the Coordinator aggregates: every site's update, each within the bound (site-side clipping)
    deltas = [decode_update(r.update, trainer.layout) for r in trainer.received]
    norms = [float(d.norm()) for d in deltas]
    assert all(n == pytest.approx(clip, rel=1e-4) for n in norms), norms
    # the unweighted sum plus Gaussian noise z * C, over the number of sites
    noise = result.delta.double() * len(deltas) - torch.stack(deltas).double().sum(0)
    n = noise.numel()
    assert n > 5000
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.05)
    assert abs(float(noise.mean())) < 5 * z * clip / math.sqrt(n)

    summary = trainer.run()  # the round accounted with Opacus's analysis, sample rate 3 / 3
    assert summary["epsilon"] == pytest.approx(PrivacyAccountant(z, 1.0, cfg.dp_delta).step(), rel=1e-12)
    saved = load_checkpoint(cfg.out).meta_config["federated"]["accountant"]
    assert PrivacyAccountant(z, 1.0, cfg.dp_delta).load_state_dict(saved).epsilon == summary["epsilon"]


def test_with_secure_aggregation_the_aggregate_of_clipped_deltas_is_within_the_clipping_bound(
    factories, shard_dir, tmp_path
):
    clip = 1e-4
    cfg = fed_cfg(shard_dir, tmp_path / "sa.pt", rounds=1, local_steps=1, secure_agg=True, dp_noise=0.0, dp_clip=clip)
    trainer = FederatedTrainer(cfg, factories, log=quiet)
    trainer.setup()
    result = trainer.run_round(1)
    assert result.sites == trainer.sites
    # no noise (z = 0): the mean of three deltas of norm C, which point different ways
    norm = float(result.delta.norm())
    assert 0.1 * clip < norm <= clip * (1 + 1e-4)


# --------------------------------------------------------------------------------- few sites, lr


def test_secure_aggregation_with_one_site_per_round_is_refused_in_one_line(ray_session, shard_dir, tmp_path, capsys):
    out = tmp_path / "one.pt"
    code = main(
        [
            "train",
            "--shards",
            str(shard_dir),
            "--rounds",
            "1",
            "--sites-per-round",
            "0.34",
            "--secure-agg",
            "--out",
            str(out),
            *SMALL_FLAGS,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err == (
        "bayprano: error: --secure-agg needs at least 2 sites per round, got 1 (--sites-per-round 0.34 "
        "of 3 sites gives 1)"
    )
    assert not out.exists()


def test_secure_aggregation_with_two_sites_per_round_gives_the_plain_aggregate(factories, shard_dir, tmp_path):
    deltas = {}
    for secure in (True, False):
        cfg = fed_cfg(shard_dir, tmp_path / f"{secure}.pt", sites_per_round=2, local_steps=1, secure_agg=secure)
        trainer = FederatedTrainer(cfg, factories, log=quiet)
        trainer.setup()
        result = trainer.run_round(1)
        assert len(result.sites) == 2 and result.sites == trainer.sample(1)
        deltas[secure] = result.delta
    assert float(deltas[False].abs().max()) > 0
    torch.testing.assert_close(deltas[True], deltas[False], atol=1e-6, rtol=0)


def test_server_lr_scales_the_fedavg_step_from_the_same_start(factories, shard_dir, tmp_path):
    moves = {}
    for lr in (1.0, 2.0):
        out = tmp_path / f"lr{lr:g}.pt"
        trainer = FederatedTrainer(fed_cfg(shard_dir, out, rounds=1, local_steps=1, server_lr=lr), factories, log=quiet)
        trainer.setup()
        start = trainer.global_vector.clone()
        trainer.run()
        moves[lr] = trainer.layout.flatten(load_checkpoint(out).model) - start
    assert float(moves[1.0].norm()) > 1e-3
    torch.testing.assert_close(moves[2.0], 2 * moves[1.0], atol=1e-6, rtol=1e-5)
