"""Privacy settings that cannot work are refused before anything starts, naming the setting."""

from __future__ import annotations

import pytest

from bayprano.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--secure-agg", "--secagg-threshold", "5"],
            "--secagg-threshold 5: above the 2 other site(s) of a round of 3",
        ),
        (
            ["--secure-agg", "--secagg-threshold", "2", "--secagg-neighbours", "1"],
            "--secagg-neighbours 1: below --secagg-threshold 2",
        ),
        (["--secure-agg", "--secagg-threshold", "0"], "--secagg-threshold 0: must be greater than or equal to 1"),
        (["--secagg-threshold", "2"], "--secagg-threshold is for --secure-agg"),
        (["--secagg-neighbours", "2"], "--secagg-neighbours is for --secure-agg"),
        (["--secure-agg", "--sites-per-round", "0.34"], "--secure-agg needs at least 2 sites per round, got 1"),
        (["--secure-agg", "--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
    ],
)
def test_bad_privacy_settings_are_refused_before_any_training(shard_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "c.pt"
    code = main(["train", "--shards", str(shard_dir), "--rounds", "1", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()


def test_under_dp_sites_are_poisson_sampled_from_the_os_and_no_seed_replays_the_sample(shard_dir, tmp_path):
    import secrets

    import numpy as np

    from bayprano.actors.coordinator import FederatedTrainer
    from bayprano.config import FederatedTrainConfig

    def trainer(**dp):
        cfg = FederatedTrainConfig(shards=shard_dir, out=tmp_path / "c.pt", rounds=1, sites_per_round=2, **dp)
        return FederatedTrainer(cfg, {s: None for s in cfg.site_paths()}, log=lambda m: None)  # no call is made

    plain = trainer()
    assert plain.sample(5) == trainer().sample(5) and len(plain.sample(5)) == 2  # seeded, fixed size
    private = trainer(dp_noise=1.0, dp_clip=0.5)
    assert isinstance(private.strategy.sampler.source, secrets.SystemRandom)
    draws = [private.sample(r) for r in range(3000)]
    q = 2 / 3
    counts = {s: sum(s in d for d in draws) for s in private.sites}
    assert all(abs(c / 3000 - q) < 4 * np.sqrt(q * (1 - q) / 3000) for c in counts.values()), counts
    sizes = np.bincount([len(d) for d in draws], minlength=4) / 3000  # Binomial(3, q), not always 2
    np.testing.assert_allclose(sizes, [(1 - q) ** 3, 3 * q * (1 - q) ** 2, 3 * q * q * (1 - q), q**3], atol=0.04)
    assert draws[:100] != [trainer(dp_noise=1.0, dp_clip=0.5).sample(r) for r in range(100)]
    assert private.accountant.sample_rate == pytest.approx(q)
