"""`bayprano tune`: sweep files are checked before any trial starts, the smoke sweep runs end to end, and
an interrupted sweep resumes from its trials' checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bayprano.cli import main
from bayprano.config import TrainConfig, load_yaml_config
from bayprano.sweep_config import SweepConfig
from bayprano.platform.errors import ConfigError
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.meta.checkpoint import load_checkpoint
from bayprano.tune import load_sweep, smoke_sweep, trial_count
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
BAYPRANO = str(Path(sys.executable).with_name("bayprano"))
SHIPPED = sorted((REPO / "tune_configs").glob("*.yaml"))

TINY = {
    "name": "tiny",
    "data_root": "data",
    "synth": {"categories": ["fabric", "bottle", "tiles"], "size": 64, "train": 8, "test_good": 4, "test_defective": 4},
    "train_categories": ["fabric", "bottle"],
    "validation_categories": ["tiles"],
    "rounds": 3,
    "episodes_per_round": 1,
    "validation_seeds": 1,
    "max_concurrent_trials": 1,
    "resources_per_trial": {"cpu": 0.5},
    "fixed": {
        "backbone": "efficientnet_lite2",
        "image_size": 64,
        "inner_steps": 0,
        "calibration_episodes": 1,
        "n_query_normal": 2,
        "n_query_anomalous": 2,
    },
    "search_space": {"shots": {"grid": [1, 2]}},
}


def write_sweep(path: Path, **changes) -> Path:
    spec = {**TINY, "data_root": str(path.parent / "data"), **changes}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweeps_are_valid_and_their_smoke_versions_are_small(config):
    spec = load_sweep(config)
    smoke = smoke_sweep(spec)
    assert spec.rounds > smoke.rounds == 2 and smoke.fixed["image_size"] == 70
    assert trial_count(smoke) <= 4 and len(smoke.validation_categories) == 1
    if config.stem == "shots_inner_steps":
        assert spec.search_space["shots"].grid == [1, 2, 4, 5, 8]
        assert spec.search_space["inner_steps"].grid == [0, 1, 3, 5, 10] and trial_count(spec) == 25
    if config.stem == "dp_noise":
        assert spec.trainer == "federated" and "dp_noise" in spec.search_space


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"search_space": {"colour": {"grid": [1, 2]}}},
            "search_space.colour: unknown parameter 'colour' for central trials, it is not a training setting (tunable: ",
        ),
        (
            {"search_space": {"episodes": {"grid": [1, 2]}}},
            "search_space.episodes: unknown parameter 'episodes' for central trials, it is set by the sweep itself",
        ),
        ({"search_space": {"shots": {"grid": []}}}, "search_space.shots = {'grid': []}: empty grid: give at least one"),
        ({"search_space": {}}, "search_space = {}: empty search space: give at least one setting"),
        ({"metric": "epsilon"}, "metric 'epsilon': central trials do not report it (they report val_image_auroc, "),
        ({"metric": "accuracy", "trainer": "federated"}, "metric 'accuracy': federated trials do not report it"),
        (
            {"search_space": {"shots": {"grid": [0, 1]}}},
            "search_space.shots.grid[0] = 0: must be greater than or equal to 1",
        ),
        (
            {"search_space": {"lr": {"loguniform": [0.0, 0.1]}}},
            "search_space.lr = {'loguniform': [0.0, 0.1]}: loguniform [0, 0.1]: bounds must be positive",
        ),
        (
            {"search_space": {"shots": {"grid": [1], "choice": [2]}}},
            "search_space.shots = {'grid': [1], 'choice': [2]}: give exactly one of grid, choice, uniform, loguniform",
        ),
        ({"scheduler": "hyperband"}, "scheduler.kind = 'hyperband': must be asha or none"),
        ({"resources_per_trial": {"cpu": 0}}, "resources_per_trial.cpu = 0: must be greater than 0"),
        ({"test_categories": ["tiles"]}, "category 'tiles' is in both validation_categories and test_categories"),
        ({"fixed": {"shots": 2}}, "'shots' is both in fixed and in search_space"),
        (
            {"trainer": "federated", "fixed": {"dp_noise": 1.0}, "search_space": {"shots": [1, 2]}},
            "fixed.dp_noise = 1.0: dp_noise needs dp_clip",
        ),
        (
            {"trainer": "federated", "fixed": {"fedprox_mu": 0.1}, "search_space": {"server_opt": ["fedavg"]}},
            "fixed.fedprox_mu = 0.1: fedprox_mu is for server_opt fedprox",
        ),
        (
            {"trainer": "federated", "federated": {"sites": 3}, "search_space": {"sites_per_round": [2, 5]}},
            "search_space.sites_per_round.grid[1] = 5: sites_per_round 5: more than the 3 site(s) there are",
        ),
        (
            {"trainer": "federated", "search_space": {"secagg_threshold": [2]}},
            "search_space.secagg_threshold.grid[0] = 2: secagg_threshold is for secure_agg",
        ),
    ],
)
def test_a_bad_sweep_is_one_line_naming_the_problem_before_any_trial(tmp_path, capsys, changes, message):
    sweep = write_sweep(tmp_path / "bad.yaml", **changes)
    out = tmp_path / "out"
    assert main(["tune", str(sweep), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bayprano: error: {sweep}: {message}"), err
    assert "\n" not in err and not out.exists()


def test_an_unknown_category_or_missing_data_is_refused_before_any_trial(tmp_path, capsys):
    sweep = write_sweep(
        tmp_path / "cats.yaml", train_categories=["fabric"], validation_categories=["marble"], synth=None
    )
    (tmp_path / "data" / "fabric" / "train" / "good").mkdir(parents=True)
    out = tmp_path / "out"
    assert main(["tune", str(sweep), "--out", str(out)]) == 2
    assert "validation_categories: unknown category 'marble'" in capsys.readouterr().err
    assert not (out / "tune").exists()
    assert main(["tune", str(sweep), "--out", str(out), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no interrupted sweep"):
        from bayprano.tune import run_sweep

        run_sweep(load_sweep(sweep), tmp_path / "empty", resume=True)


def test_smoke_sweep_runs_every_trial_and_writes_results_plots_and_a_trainable_best_config(
    ray_session, tmp_path, capsys
):
    out = tmp_path / "smoke"
    start = time.perf_counter()
    assert main(["tune", str(REPO / "tune_configs" / "shots_inner_steps.yaml"), "--smoke", "--out", str(out)]) == 0
    seconds = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert sum(line.startswith("[tune] trial ") for line in printed.splitlines()) == 4, printed

    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 4 and set(trials["status"]) == {"completed"} and set(trials["rounds"]) == {2}
    assert sorted(zip(trials["shots"], trials["inner_steps"])) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert trials["val_image_auroc"].between(0, 1).all() and (trials["adapt_seconds"] > 0).all()
    # the trials ran their own settings: the support size changes what they measure (0.625 at K=1, 0.44 at
    # K=2 on the smoke set's few validation images)
    by_shots = trials.groupby("shots")["val_image_auroc"].mean()
    assert by_shots[1] != by_shots[2], trials
    assert len(pd.read_csv(out / "trials.csv")) == 4
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert len(rounds) == 8 and (rounds["round"] == rounds["training_iteration"]).all()
    for png in ("heatmap_auroc_shots_inner_steps.png", "auroc_adapt_time_vs_inner_steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = yaml.safe_load((out / "summary.json").read_text())
    best = summary["best"]["params"]
    assert summary["best"]["metrics"]["val_image_auroc"] == trials["val_image_auroc"].max()
    assert summary["test"]["categories"] == ["wood"] and 0 <= summary["test"]["image_auroc"] <= 1
    # the smoke set has too few test images for a meaningful image AUROC (measured 0.69), but its pixels are
    # many: measured 0.88 (a reversed score would give 0.12)
    assert summary["test"]["pixel_auroc"] >= 0.75, summary["test"]
    cfg = load_yaml_config(out / "best_config.yaml", TrainConfig)
    assert (cfg.shots, cfg.inner_steps, cfg.image_size) == (best["shots"], best["inner_steps"], 70)
    assert "wood" not in cfg.categories and "tiles" not in cfg.categories
    assert main(["train", "--config", str(out / "best_config.yaml")]) == 0
    assert cfg.out.is_file()
    print(f"smoke sweep: {seconds:.0f}s")


def _wait_for(check, seconds: float, what: str, proc: subprocess.Popen | None = None) -> None:
    def reached() -> bool:
        if check():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before {what}")
        return False

    wait_until(reached, what, timeout=seconds, every=0.2)


def test_a_sweep_is_unfinished_while_a_saved_trial_runs_or_a_trial_was_never_created():
    """Ctrl-C can land mid-trial or between two trials, before Tune created the next one: both are an
    interrupted sweep; only every trial saved and done is a finished one."""
    from bayprano.tune.run import unfinished_trials

    assert unfinished_trials(["TERMINATED", "RUNNING"], 2) == 1
    assert unfinished_trials(["TERMINATED"], 2) == 1  # the second trial never existed
    assert unfinished_trials([], 3) == 3
    assert unfinished_trials(["TERMINATED", "ERROR"], 2) == 0
    assert unfinished_trials(["PAUSED", "PENDING", "TERMINATED"], 3) == 2


def test_an_interrupted_sweep_resumes_from_its_checkpoints(ray_session, tmp_path, capsys):
    """Ctrl-C reaches the sweep, a `bayprano tune` process of its own, once a trial has checkpointed a
    round (Tune then stops mid-trial, or between two trials when the first finishes first); the same
    command with --resume (here, in this process's Ray) then finishes it."""
    sweep = write_sweep(tmp_path / "tiny.yaml")
    out = tmp_path / "out"
    experiment = out / "tune"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    log = tmp_path / "sweep.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [BAYPRANO, "tune", str(sweep), "--out", str(out)], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
        try:
            _wait_for(lambda: any(experiment.glob("*/checkpoint_*")), 300, "a trial saved its first checkpoint", proc)
            proc.send_signal(signal.SIGINT)  # as Ctrl+C: Tune saves its state and stops
            code = proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    printed = log.read_text()
    assert code == 130, printed
    assert "the same command with --resume continues the sweep" in printed and "bayprano: interrupted" in printed
    assert not (out / "trials.parquet").exists()

    with pytest.raises(ConfigError, match="holds a sweep already"):
        from bayprano.tune import run_sweep

        run_sweep(load_sweep(sweep), out)
    capsys.readouterr()
    assert main(["tune", str(sweep), "--out", str(out), "--resume"]) == 0
    resumed = capsys.readouterr().out
    # the restored run's progress lines reach this run's output, counted over the whole sweep
    assert "[tune] trial 2/2 done" in resumed and "[tune] trial 3/2" not in resumed, resumed
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"} and set(trials["rounds"]) == {3}
    rounds = pd.read_parquet(out / "rounds.parquet")
    # A trial restarted from scratch would report round 1 again at a later training iteration.
    assert (rounds["round"] == rounds["training_iteration"]).all()
    assert sorted(rounds.groupby("trial_id")["round"].max()) == [3, 3]
    assert load_yaml_config(out / "best_config.yaml", TrainConfig).episodes == 3

    changed = write_sweep(tmp_path / "tiny.yaml", rounds=4)
    with pytest.raises(ConfigError, match="was started with other settings"):
        from bayprano.tune import run_sweep

        run_sweep(load_sweep(changed), out, resume=True)


def test_asha_stops_the_federated_trials_that_spend_more_epsilon_after_their_first_round(ray_session, tmp_path, capsys):
    """Federated trials (two sites, a Factory actor each, in the trial's placement group) under ASHA, by a
    metric that is known before they run: epsilon, lower with more noise. The first trial sets the rung at
    round 1; the second, with less noise, spends more epsilon, falls below it and is stopped there; the
    first runs both rounds."""
    sweep = write_sweep(
        tmp_path / "dp.yaml",
        trainer="federated",
        federated={"sites": 2},
        metric="epsilon",
        rounds=2,
        mode="min",
        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        resources_per_trial={"cpu": 0.5, "factory_cpu": 0.1},
        fixed={
            "backbone": "efficientnet_lite2",
            "image_size": 64,
            "shots": 1,
            "inner_steps": 0,
            "local_steps": 1,
            "holdout": 2,
            "dp_clip": 0.5,
            "calibration_episodes": 1,
            "n_query_normal": 2,
            "n_query_anomalous": 2,
        },
        search_space={"dp_noise": {"grid": [2.0, 0.5]}},
    )
    out = tmp_path / "out"
    assert main(["tune", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    trials = pd.read_parquet(out / "trials.parquet").set_index("dp_noise")
    assert trials.loc[2.0, "status"] == "completed" and trials.loc[2.0, "rounds"] == 2, trials
    assert trials.loc[0.5, "status"] == "stopped early" and trials.loc[0.5, "rounds"] == 1, trials
    assert sum("(stopped early by ASHA)" in line for line in printed.splitlines()) == 1, printed
    # what each trial reported is the Opacus epsilon of its rounds, 2 sites of 2 a round
    rounds = pd.read_parquet(out / "rounds.parquet")
    for z, group in rounds.groupby("dp_noise"):
        accountant = PrivacyAccountant(float(z), 1.0, 1e-5)
        expected = [accountant.step() for _ in range(len(group))]
        assert group.sort_values("round")["epsilon"].tolist() == pytest.approx(expected, rel=1e-9)
    assert trials["site_val_auroc"].isna().all()  # under DP the sites' validation results stay home
    summary = yaml.safe_load((out / "summary.json").read_text())
    assert summary["best"]["params"] == {"dp_noise": 2.0}
    ckpt = load_checkpoint(out / "best_checkpoint.pt")
    assert ckpt.meta_config["federated"]["round"] == 2 and ckpt.meta_config["dp_noise"] == 2.0


def test_sweep_config_shorthands():
    spec = SweepConfig.model_validate({**TINY, "scheduler": "asha", "search_space": {"shots": [1, 2]}})
    assert spec.scheduler.kind == "asha" and spec.search_space["shots"].grid == [1, 2]
