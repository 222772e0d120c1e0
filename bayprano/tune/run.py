"""Running a sweep with Ray Tune (search space, resume; progress lines in ``progress``), and the ``bayprano tune``
command."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from bayprano.sweep_config import SweepConfig
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write_json, jsonable
from bayprano.tune.features import build_feature_cache
from bayprano.tune.results import finish_sweep
from bayprano.tune.spec import EXPERIMENT, load_sweep, prepare_data, resolve_categories, smoke_sweep
from bayprano.tune.trainables import sweep_trial


def _param_space(spec: SweepConfig) -> dict:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda b: tune.uniform(*b),
        "loguniform": lambda b: tune.loguniform(*b),
    }
    return {name: make[dim.kind](dim.values) for name, dim in spec.search_space.items()}


def trial_count(spec: SweepConfig) -> int:
    grid = math.prod(len(d.values) for d in spec.search_space.values() if d.kind == "grid")
    return grid * spec.num_samples


def unfinished_trials(saved_statuses: list[str], total: int) -> int:
    """How many of the sweep's ``total`` trials are not done, from the statuses Tune saved: those saved
    unfinished, and those never created (a stop between two trials leaves none of the saved unfinished)."""
    return sum(status not in ("TERMINATED", "ERROR") for status in saved_statuses) + max(0, total - len(saved_statuses))


def _spec_record(spec: SweepConfig, smoke: bool) -> dict:
    return {"smoke": smoke, "sweep": json.loads(spec.model_dump_json())}


def run_sweep(
    spec: SweepConfig,
    out: str | os.PathLike,
    smoke: bool = False,
    resume: bool = False,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or with ``resume`` continue) the sweep into ``out``; returns the summary written there."""
    import ray
    from ray import tune

    from bayprano.tune.progress import FINISHED, TrialLines, forward_progress

    start = time.perf_counter()
    # Progress is one line per finished trial (the callback below), not Tune's tables and warnings.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "30")
    out = Path(out).resolve()
    if smoke:
        spec = smoke_sweep(spec)
    experiment = out / EXPERIMENT
    record_path = out / "sweep.json"
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"--resume: there is no interrupted sweep in {out} to continue")
        saved = json.loads(record_path.read_text()) if record_path.is_file() else None
        if saved != _spec_record(spec, smoke):
            raise ConfigError(
                f"--resume: the sweep in {out} was started with other settings; resume it with the "
                "same sweep file and --smoke, or start a new one with another --out"
            )
    elif experiment.exists():
        raise ConfigError(f"--out {out}: holds a sweep already; --resume continues it, or choose another --out")
    if not (smoke and spec.synth is not None):
        if Path(spec.data_root).exists():
            resolve_categories(spec, Path(spec.data_root))
        elif spec.synth is None:
            raise DataError(
                f"data_root {spec.data_root}: does not exist (generate it with `bayprano data synth`, "
                "or give the sweep a synth: section)"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, _spec_record(spec, smoke))

    root, spec = prepare_data(spec, out, smoke, log)
    categories = resolve_categories(spec, root)
    shards = None
    if spec.trainer == "federated":
        from bayprano.platform.data.shards import shard_dataset

        shards = out / "shards"
        if not (shards / "manifest.json").is_file():
            shard_dataset(
                root,
                shards,
                sites=spec.federated.sites,
                mode="iid" if spec.federated.iid else "by-category",
                seed=int(spec.fixed.get("seed", 0)),
                categories=categories["train"],
            )
    total = trial_count(spec)
    log(
        f"sweep {spec.name}{' (smoke)' if smoke else ''}: {total} trial(s) x {spec.rounds} round(s), {spec.trainer} "
        f"meta-training on {', '.join(categories['train'])}; validation on {', '.join(categories['validation'])}; "
        f"test on {', '.join(categories['test']) or 'none'}"
    )
    features = build_feature_cache(spec, root, categories, out / "features", log)

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
        )
    try:
        res = spec.resources_per_trial
        setup = {
            "trainer": spec.trainer,
            "fixed": dict(spec.fixed),
            "rounds": spec.rounds,
            "episodes_per_round": spec.episodes_per_round,
            "validation_seeds": spec.validation_seeds,
            "features": features,
            "shards": str(shards) if shards else None,
            "factory_cpu": res.factory_cpu,
            "threads": max(1, int(res.cpu)),
        }
        trainable = tune.with_parameters(sweep_trial, setup=setup)
        first = {"CPU": res.cpu, **({"GPU": res.gpu} if res.gpu else {})}
        if spec.trainer == "federated":
            bundles = [first] + [{"CPU": res.factory_cpu}] * spec.federated.sites
            trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))
        else:
            trainable = tune.with_resources(trainable, {k.lower(): v for k, v in first.items()})
        if resume:
            # the restored run uses the interrupted one's TrialLines (see bayprano.tune.progress)
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
            already = sum(t.status in FINISHED for t in tune.ExperimentAnalysis(str(experiment)).trials)
            log(f"resuming the sweep in {out}: {already} of {total} trial(s) had finished")
        else:
            from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
            from ray.tune.search.basic_variant import BasicVariantGenerator

            scheduler = FIFOScheduler()
            if spec.scheduler.kind == "asha":
                scheduler = ASHAScheduler(
                    max_t=spec.rounds,
                    grace_period=spec.scheduler.grace_period,
                    reduction_factor=spec.scheduler.reduction_factor,
                )
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(spec),
                # The generator itself limits concurrency: Tune ignores max_concurrent_trials beside a given one.
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode=spec.mode,
                    scheduler=scheduler,
                    search_alg=BasicVariantGenerator(
                        random_state=int(spec.fixed.get("seed", 0)), max_concurrent=spec.max_concurrent_trials or 0
                    ),
                    num_samples=spec.num_samples,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=str(out),
                    verbose=0,
                    callbacks=[TrialLines(total, spec.rounds, spec.metric)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        with forward_progress(log):
            grid = tuner.fit()
        # The state Tune saved last (before it stops the trials of an interrupted run) tells what is unfinished.
        saved = tune.ExperimentAnalysis(str(experiment)).trials
        unfinished = unfinished_trials([t.status for t in saved], total)
        if unfinished:
            log(
                f"interrupted with {unfinished} of {total} trial(s) unfinished; their last "
                f"checkpoints are saved in {experiment}: the same command with --resume continues the sweep"
            )
            raise KeyboardInterrupt
        summary = finish_sweep(spec, grid, out, root, categories, features, smoke, log)
    finally:
        if started:
            ray.shutdown()
    summary["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "summary.json", jsonable(summary))
    return summary


def add_tune_parser(sub) -> None:
    """The ``bayprano tune`` sub-command."""
    p = sub.add_parser("tune", help="run a Ray Tune sweep of meta-training settings (tune_configs/*.yaml)")
    p.add_argument("config", metavar="SWEEP.yaml", help="sweep definition (see tune_configs/)")
    p.add_argument("--smoke", action="store_true", help="a shrunken sweep that runs in about a minute")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    p.add_argument("--out", metavar="DIR", help="output folder (default: sweeps/<name>, sweeps/<name>-smoke)")
    p.add_argument("--data-root", metavar="DIR", help="MVTec-layout root instead of the sweep's data_root")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: a local Ray)")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    spec = load_sweep(args.config, args.data_root)
    out = Path(args.out) if args.out else Path("sweeps") / (spec.name + ("-smoke" if args.smoke else ""))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; name a folder")

    def log(message: str) -> None:
        print(f"[tune] {message}", flush=True)

    summary = run_sweep(spec, out, smoke=args.smoke, resume=args.resume, address=args.address, log=log)
    status = ", ".join(f"{n} {k}" for k, n in summary["status"].items())
    print(
        f"wrote {out}: {summary['trials']} trials ({status}), trials.parquet/.csv, best_config.yaml, "
        f"best_checkpoint.pt, plots, in {summary['seconds']:.1f}s"
    )
    return 0
