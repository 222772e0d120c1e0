"""Federated settings: the shipped YAML example, bad input refused before any training, and what each
site sends compared with the bytes of its images at a realistic size."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bayprano.cli import main
from bayprano.config import FederatedTrainConfig, load_yaml_config
import federation_helpers

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "federated.yaml"
SMALL = {
    "image_size": 70,
    "shots": 2,
    "n_query_normal": 2,
    "n_query_anomalous": 2,
    "calibration_episodes": 2,
    "holdout": 3,
    "rounds": 1,
}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _sites(shard_dir: Path) -> dict[str, str]:
    return {f"site-{i:03d}": str(shard_dir / f"site-{i:03d}.parquet") for i in range(3)}


def test_the_example_config_is_accepted_with_per_site_paths_and_flags_override_it():
    assert "sites" in yaml.safe_load(EXAMPLE.read_text())  # what makes `bayprano train --config` federated
    cfg = load_yaml_config(EXAMPLE, FederatedTrainConfig, {"rounds": 3, "pool_size": 2, "server_lr": 2.0})
    assert cfg.shards is None and cfg.site_paths() == {
        f"site-{i:03d}": f"data/shards/site-{i:03d}.parquet" for i in range(3)
    }
    assert cfg.rounds == 3 and cfg.pool_size == 2 and cfg.server_lr == 2.0
    assert cfg.round_size == 2 and cfg.min_sites == 2 and cfg.secure_agg and cfg.fp16
    assert cfg.dp_noise == 1.0 and cfg.dp_clip == 0.5 and cfg.target_epsilon == 25


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sites_per_roud": 0.5}, "unknown key 'sites_per_roud' (value 0.5)"),
        ({"dp_noise": -0.5, "dp_clip": 1.0}, "dp_noise = -0.5: must be greater than or equal to 0"),
        ({"sites_per_round": 4}, "--sites-per-round 4: more than the 3 site(s) there are"),
        ({"sites_per_round": 2.5}, "--sites-per-round 2.5: give a fraction of the sites"),
        ({"sites_per_round": 2, "min_sites": 3}, "--min-sites 3: more than the 2 site(s) sampled each round"),
        ({"pool_size": 0}, "pool_size = 0: must be greater than or equal to 1"),
        ({"round_timeout": -1}, "round_timeout = -1"),
        ({"sites": {"site 0": "a.parquet"}}, "site name 'site 0'"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_file_the_key_and_the_value(
    shard_dir, tmp_path, capsys, change, message
):
    out = tmp_path / "fed.pt"
    config = _write(tmp_path / "fed.yaml", {"sites": _sites(shard_dir), "out": str(out), **SMALL, **change})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err, err
    assert not out.exists()


def test_fewer_sites_than_sites_per_round_is_refused_on_the_command_line(shard_dir, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--shards",
                str(shard_dir),
                "--rounds",
                "1",
                "--sites-per-round",
                "5",
                "--out",
                str(tmp_path / "c.pt"),
            ]
        )
        == 2
    )
    assert "--sites-per-round 5: more than the 3 site(s) there are" in capsys.readouterr().err


def test_a_shard_path_missing_on_its_site_is_reported_by_that_site_before_any_round(
    ray_session, shard_dir, tmp_path, capsys
):
    sites = _sites(shard_dir)
    missing = tmp_path / "plant-c" / "shard.parquet"
    sites["site-002"] = str(missing)
    out = tmp_path / "fed.pt"
    config = _write(tmp_path / "fed.yaml", {"sites": sites, "out": str(out), **SMALL, "round_timeout": 120})
    assert main(["train", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert f"site 'site-002': shard {missing} does not exist on its node" in captured.err, captured.err
    assert "round 1" not in captured.out + captured.err and not out.exists()


def test_each_site_sends_at_most_two_percent_of_its_image_bytes_over_twenty_rounds_at_a_realistic_size(
    ray_session, tmp_path
):
    """One plant with two products at 256 px, 60 good training images and 40 + 40 test images each (the
    synthetic set's defaults, as in the README); the model sees 64 px so that the test is quick, which
    changes neither the update's size nor the shard's."""
    from bayprano.actors.coordinator import FederatedTrainer
    from bayprano.actors.coordinator_actor import kill_factories, spawn_factories, with_shard_bytes
    from bayprano.platform.data.shards import shard_dataset
    from bayprano.platform.data.synth import generate_dataset
    from bayprano.platform.federated.state import encoded_num_bytes

    generate_dataset(tmp_path / "synth", categories=["fabric", "bottle"], seed=0, size=256, workers=1)
    shard_dataset(tmp_path / "synth", tmp_path / "shards", sites=1, seed=0)
    pngs = sum(p.stat().st_size for p in (tmp_path / "synth").rglob("*.png") if "ground_truth" not in p.parts)
    cfg = FederatedTrainConfig(
        sites={"plant-a": str(tmp_path / "shards" / "site-000.parquet")},
        out=tmp_path / "c.pt",
        rounds=20,
        local_steps=1,
        fp16=True,
        **{**federation_helpers.SMALL, "holdout": 0, "round_timeout": 300.0},
    )
    factories = spawn_factories(cfg, num_cpus=0.2)
    try:
        trainer = FederatedTrainer(cfg, factories, log=lambda m: None)
        summary = with_shard_bytes(trainer.run(), trainer.site_shard_bytes())
    finally:
        kill_factories(factories)
    assert summary["rounds"] == 20
    site = summary["site_bytes"]["plant-a"]
    assert site["shard_bytes"] == pngs == summary["shard_bytes"]  # the encoded images, as stored
    assert site["sent"] == trainer.ledger.total(site="plant-a", direction="up")
    update = encoded_num_bytes(trainer.layout, fp16=True)
    assert update < encoded_num_bytes(trainer.layout, fp16=False) <= 2 * update
    assert site["sent"] > 20 * update  # every update, and the scalars and statistics besides
    assert site["sent_fraction"] == site["sent"] / pngs <= 0.02, site
