"""Privacy settings that cannot work are refused before anything starts, naming the setting."""

from __future__ import annotations

import pytest

from bayprano.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--secure-agg", "--secagg-threshold", "5"],
     "--secagg-threshold 5: above the 2 other site(s) of a round of 3"),
    (["--secure-agg", "--secagg-threshold", "2", "--secagg-neighbours", "1"],
     "--secagg-neighbours 1: below --secagg-threshold 2"),
    (["--secure-agg", "--secagg-threshold", "0"], "--secagg-threshold 0: must be greater than or equal to 1"),
    (["--secagg-threshold", "2"], "--secagg-threshold is for --secure-agg"),
    (["--secagg-neighbours", "2"], "--secagg-neighbours is for --secure-agg"),
    (["--secure-agg", "--sites-per-round", "0.34"], "--secure-agg needs at least 2 sites per round, got 1"),
    (["--secure-agg", "--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
])
def test_bad_privacy_settings_are_refused_before_any_training(shard_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "c.pt"
    code = main(["train", "--shards", str(shard_dir), "--rounds", "1", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()
