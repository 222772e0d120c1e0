"""Ray Tune sweeps of meta-training settings (shots, inner steps, step sizes, DP noise): ``bayprano tune``.

A sweep is a YAML file validated as ``bayprano.config.SweepConfig``. Before any trial starts, the
runner checks every searched and fixed value against the trainer's own settings model, resolves the
train, validation and test categories of the data root (generating the synthetic set when the sweep
says how and it is missing), and turns the backbone features of the training and validation images
into a cache on disk, once per feature-changing setting (image size, backbone), which the trials share.

Each trial meta-trains with its settings in rounds (``episodes_per_round`` Proto-MAML episodes, or one
federated round over Factory actors) and after each round reports, with a checkpoint, the image
AUROC of adapting to the validation categories (K images of their ``train/good``, scored on their
``test`` split, ``validation_seeds`` support draws each), the adaptation time (inner loop, posterior
and calibration on cached features, without the backbone) and, for federated trials, epsilon. So ASHA
can stop a trial at a round, and ``--resume`` continues an interrupted sweep from its checkpoints.

At the end the best trial (by the sweep's metric at its last report, among the trials that ran every
round) is calibrated and evaluated once on the held-out test categories. The output folder holds
``trials.parquet``/``.csv`` (one row per trial), ``rounds.parquet``/``.csv`` (one row per report),
``best_config.yaml`` (accepted by ``bayprano train --config`` as is), ``best_checkpoint.pt``, the test
evaluation, ``summary.json`` and the plots.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bayprano.config import SweepConfig, load_yaml_config
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text

FEATURE_SETTINGS = ("backbone", "image_size")  # settings that change the backbone features
STATE_FILE = "state.pt"
FEDERATED_FILE = "federated.pt"
EXPERIMENT = "tune"  # the Ray Tune experiment folder inside the output folder


# ------------------------------------------------------------------------------------- settings


def load_sweep(path: str | os.PathLike, data_root: str | None = None) -> SweepConfig:
    """The sweep in the YAML file ``path`` (``data_root`` overrides its data root), fully checked."""
    spec = load_yaml_config(path, SweepConfig, {"data_root": data_root})
    check_trial_values(spec, str(path))
    return spec


def _defaults(spec: SweepConfig) -> dict[str, Any]:
    """Placeholder values for the settings the sweep owns, so that a trial's settings validate alone."""
    if spec.trainer == "central":
        return {"data_root": spec.data_root, "episodes": spec.rounds * spec.episodes_per_round, "out": "x.pt"}
    return {"shards": spec.data_root, "out": "x.pt", "rounds": spec.rounds}


def _trial_settings_model(spec: SweepConfig):
    model = spec.trial_model()
    if spec.trainer == "central":
        return model
    from bayprano.config import FederatedTrainConfig

    class _Unsharded(FederatedTrainConfig):
        """The federated settings before the shards exist: the shard folder is not looked at."""

        def _consistent(self):  # replaces the parent's check, which needs the shard folder
            return self

    return _Unsharded


def check_trial_values(spec: SweepConfig, source: str) -> None:
    """Every grid and choice value and every bound of the search space, with the fixed settings, must be
    a valid training setting; the first bad one is a ConfigError naming the file, field and value."""
    from pydantic import ValidationError

    model = _trial_settings_model(spec)
    dims = spec.search_space
    fixed_blame = {k: (f"fixed.{k}", v) for k, v in spec.fixed.items()}

    def check(name: str | None, i: int) -> None:
        values = {**_defaults(spec), **spec.fixed}
        blame = dict(fixed_blame)
        for other, dim in dims.items():
            j = i if other == name else 0
            values[other] = dim.values[j]
            blame[other] = (f"search_space.{other}.{dim.kind}[{j}]", dim.values[j])
        here = blame[name] if name is not None else next(iter(fixed_blame.values()), ("fixed", None))
        try:
            cfg = model.model_validate(values)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = [str(p) for p in err.get("loc", ())]
            field, value = blame.get(loc[0], here) if loc else here
            msg = err.get("msg", "invalid value").replace("Value error, ", "").replace("Input should be", "must be")
            raise ConfigError(f"{source}: {field} = {value!r}: {msg}") from None
        if spec.trainer == "federated":
            for needs, given, what in (("dp_noise", cfg.dp_noise, "dp_clip (the noise is z * C)"),
                                       ("target_epsilon", cfg.target_epsilon, "dp_noise and dp_clip")):
                missing = cfg.dp_clip is None if needs == "dp_noise" else cfg.dp_noise is None
                if given is not None and missing:
                    field, value = blame.get(needs, here)
                    raise ConfigError(f"{source}: {field} = {value!r}: {needs} needs {what}")
            if cfg.sites_per_round > spec.federated.sites:
                field, value = blame.get("sites_per_round", here)
                raise ConfigError(f"{source}: {field} = {value!r}: more than the {spec.federated.sites} sites of "
                                  "federated.sites")
            if cfg.fedprox_mu > 0 and cfg.server_opt != "fedprox":
                field, value = blame.get("fedprox_mu", here)
                raise ConfigError(f"{source}: {field} = {value!r}: fedprox_mu is for server_opt fedprox")

    check(None, 0)
    for name, dim in dims.items():
        for i in range(len(dim.values)):
            check(name, i)
    for name in FEATURE_SETTINGS:
        dim = spec.search_space.get(name)
        if dim is not None and dim.kind not in ("grid", "choice"):
            raise ConfigError(f"{source}: search_space.{name}: the backbone features are computed once per value, "
                              f"so give a grid or a choice, not {dim.kind}")
    if spec.trainer == "federated" and "epsilon" == spec.metric and "dp_noise" not in {**spec.fixed, **spec.search_space}:
        raise ConfigError(f"{source}: metric 'epsilon' needs dp_noise in fixed or search_space (without DP, "
                          "epsilon is infinite)")


def smoke_sweep(spec: SweepConfig) -> SweepConfig:
    """The same sweep shrunk to run in about a minute on 2 cores: the first two values of each grid or
    choice (the cheap end of shots and inner steps), at most 2 samples, 2 rounds of 2 episodes, 64 px
    images, the first categories of each group."""
    space = {}
    for name, dim in spec.search_space.items():
        if dim.kind in ("grid", "choice"):
            values = list(dict.fromkeys(dim.values[:2]))
            space[name] = dim.model_copy(update={dim.kind: values})
        else:
            space[name] = dim
    fixed = dict(spec.fixed)
    fixed.update(image_size=64, calibration_episodes=2, n_query_normal=2, n_query_anomalous=2)
    if spec.trainer == "federated":
        fixed.update(local_steps=1, holdout=2)
    update: dict[str, Any] = dict(
        search_space=space, fixed=fixed, rounds=2, episodes_per_round=2, validation_seeds=1, test_seeds=1,
        num_samples=min(spec.num_samples, 2),
        scheduler=spec.scheduler.model_copy(update={"grace_period": 1}),
        federated=spec.federated.model_copy(update={"sites": min(spec.federated.sites, 2)}),
        validation_categories=spec.validation_categories[:1], test_categories=spec.test_categories[:1],
    )
    if spec.train_categories:
        update["train_categories"] = spec.train_categories[:2]
    if "image_size" in space:
        del space["image_size"]
    return spec.model_copy(update=update)


def _smoke_synth(spec: SweepConfig, categories: list[str]) -> dict[str, Any]:
    shots = max([int(v) for v in spec.search_space["shots"].values] if "shots" in spec.search_space
                else [int(spec.fixed.get("shots", 5))])
    return dict(categories=categories, size=64, n_train=shots + 6, n_test_good=4, n_test_defective=4,
                seed=spec.synth.seed if spec.synth else 0)


# ----------------------------------------------------------------------------------------- data


def resolve_categories(spec: SweepConfig, root: Path) -> dict[str, list[str]]:
    from bayprano.platform.data.mvtec import list_categories

    available = list_categories(root)
    for group in ("train_categories", "validation_categories", "test_categories"):
        for c in getattr(spec, group) or []:
            if c not in available:
                raise ConfigError(f"{group}: unknown category {c!r} in {root} (available: {', '.join(available)})")
    held = set(spec.validation_categories) | set(spec.test_categories)
    train = list(spec.train_categories or [c for c in available if c not in held])
    if not train:
        raise ConfigError(f"{root}: no category left to meta-train on after the validation and test categories")
    return {"train": train, "validation": list(spec.validation_categories), "test": list(spec.test_categories)}


def prepare_data(spec: SweepConfig, out: Path, smoke: bool, log: Callable[[str], None]) -> tuple[Path, SweepConfig]:
    """The data root the trials read (generated when the sweep says how and it is missing)."""
    from bayprano.platform.data.synth import generate_dataset

    root = Path(spec.data_root)
    if smoke and spec.synth is not None:
        root = out / "smoke-data"
        names = list(dict.fromkeys((spec.train_categories or []) + spec.validation_categories + spec.test_categories))
        if not spec.train_categories:
            cats = spec.synth.categories
            pool = cats if isinstance(cats, list) else None
            if pool is None:
                from bayprano.platform.data.synth import CATEGORIES

                pool = list(CATEGORIES[:cats])
            names += [c for c in pool if c not in names][:2]
        if not (root / "synth.json").is_file():
            log(f"generating the smoke data set ({len(names)} categories at 64 px) in {root}")
            generate_dataset(root, **_smoke_synth(spec, names))
        if not spec.train_categories:
            spec = spec.model_copy(update={"train_categories": [c for c in names if c not in
                                                                 spec.validation_categories + spec.test_categories]})
        return root, spec
    if not root.exists():
        if spec.synth is None:
            raise DataError(f"data_root {root}: does not exist (generate it with `bayprano data synth`, or give "
                            "the sweep a synth: section)")
        s = spec.synth
        log(f"generating the synthetic set in {root} ({s.size} px)")
        generate_dataset(root, categories=s.categories, seed=s.seed, size=s.size, n_train=s.train,
                         n_test_good=s.test_good, n_test_defective=s.test_defective)
    return root, spec


def feature_key(settings: Mapping[str, Any]) -> str:
    return f"{settings.get('backbone', 'efficientnet_lite2')}-{int(settings.get('image_size', 256))}px"


def _feature_variants(spec: SweepConfig) -> list[dict[str, Any]]:
    from bayprano.config import TrainConfig

    fields = TrainConfig.model_fields
    options = []
    for name in FEATURE_SETTINGS:
        if name in spec.search_space:
            options.append(list(spec.search_space[name].values))
        else:
            options.append([spec.fixed.get(name, fields[name].default)])
    return [dict(zip(FEATURE_SETTINGS, combo)) for combo in itertools.product(*options)]


def build_feature_cache(spec: SweepConfig, root: Path, categories: dict[str, list[str]], folder: Path,
                        log: Callable[[str], None]) -> dict[str, str]:
    """One file per feature variant: training task banks (central trials) and the validation categories'
    images, features and labels. An existing file is reused (a resumed sweep)."""
    import torch

    from bayprano.platform.data.anomalies import AnomalyInjector
    from bayprano.platform.evaluate import load_category
    from bayprano.platform.meta.protomaml import build_task_bank
    from bayprano.platform.model.backbone import build_backbone

    seed = int(spec.fixed.get("seed", 0))
    device = str(spec.fixed.get("device", "cpu"))
    files = {}
    for variant in _feature_variants(spec):
        key = feature_key(variant)
        path = folder / f"{key}.pt"
        files[key] = str(path)
        if path.is_file():
            continue
        t0 = time.perf_counter()
        size = int(variant["image_size"])
        extractor = build_backbone(variant["backbone"], device=device)

        def extract(images: np.ndarray):
            return extractor.extract(images, size=size).cpu()

        payload: dict[str, Any] = {"backbone": extractor.name, "fingerprint": extractor.fingerprint(),
                                   "image_size": size, "in_channels": extractor.out_channels, "banks": {},
                                   "validation": {}}
        if spec.trainer == "central":
            injector = AnomalyInjector()
            for c in categories["train"]:
                images, ids = _train_good(root, c, size)
                bank = build_task_bank(c, images, ids, extract, injector, seed=seed)
                payload["banks"][c] = {"normals": bank.normals, "normal_ids": bank.normal_ids,
                                       "anomalies": bank.anomalies, "anomaly_masks": bank.anomaly_masks,
                                       "anomaly_sources": bank.anomaly_sources}
        for c in categories["validation"]:
            d = load_category(root, c, size)
            payload["validation"][c] = {
                "train_images": torch.from_numpy(d.train_images), "train_features": extract(d.train_images).half(),
                "test_features": extract(d.test_images).half(), "test_labels": torch.from_numpy(d.test_labels),
            }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())
        log(f"features {key}: {len(payload['banks'])} training and {len(payload['validation'])} validation "
            f"categories in {time.perf_counter() - t0:.1f}s")
    return files


def _train_good(root: Path, category: str, size: int) -> tuple[np.ndarray, list[str]]:
    """A training category's train/good images at ``size`` px (its test split is never opened)."""
    from bayprano.platform.data.imageio import load_image
    from bayprano.platform.evaluate import _resize
    from bayprano.platform.train import train_good_files

    files = train_good_files(root, category)
    return np.stack([_resize(load_image(p), size) for p in files]), [str(p) for p in files]


def _load_cache(path: str):
    import torch

    from bayprano.platform.meta.protomaml import TaskBank

    payload = torch.load(path, map_location="cpu", weights_only=True)
    banks = {c: TaskBank(c, b["normals"], list(b["normal_ids"]), b["anomalies"], b["anomaly_masks"],
                         b["anomaly_sources"]) for c, b in payload["banks"].items()}
    return payload, banks


# ------------------------------------------------------------------------------------- trials


class _CachedFeatures:
    """Stands in for the backbone during adaptation: returns the support's cached features."""

    def __init__(self, features, name: str, fingerprint: str):
        import torch

        self.features = features
        self.name = name
        self.device = torch.device("cpu")
        self.out_channels = features.shape[1]
        self._fingerprint = fingerprint

    def fingerprint(self) -> str:
        return self._fingerprint

    def extract(self, images, size: int | None = None, batch_size: int = 16):
        if len(images) != self.features.shape[0]:
            raise ValueError("cached features are for another support set")
        return self.features


def validate(model, cache: dict, shots: int, inner_steps: int, seeds: int) -> dict[str, float]:
    """Image AUROC of adapting ``model`` to each validation category, mean over ``seeds`` support draws."""
    import torch

    from bayprano.platform.evaluate import support_indices
    from bayprano.platform.meta.checkpoint import MetaCheckpoint
    from bayprano.platform.metrics import image_auroc
    from bayprano.platform.model.scoring import Calibration
    from bayprano.platform.model.site import adapt

    out: dict[str, float] = {}
    aurocs, seconds = [], []
    for c, v in cache["validation"].items():
        feats = v["train_features"]
        h, w = feats.shape[-2:]
        ckpt = MetaCheckpoint(model, cache["backbone"], cache["fingerprint"], cache["image_size"],
                              Calibration.from_prior(model.dim, h * w / 9, 1.0),
                              meta_config={"inner_steps": inner_steps})
        labels = v["test_labels"].numpy()
        per_cat = []
        for s in range(seeds):
            idx = support_indices(feats.shape[0], shots, s, c)
            images = list(v["train_images"][idx].numpy())
            site = adapt(ckpt, images, steps=inner_steps,
                         extractor=_CachedFeatures(feats[idx].float(), cache["backbone"], cache["fingerprint"]))
            with torch.no_grad():
                results = site.results_from_mahalanobis(site.mahalanobis(v["test_features"].float()))
            per_cat.append(image_auroc(labels, np.array([r.score for r in results])))
            seconds.append(site.info["adapt_seconds"])
        out[f"val_auroc_{c}"] = float(np.mean(per_cat))
        aurocs.append(out[f"val_auroc_{c}"])
    out["val_image_auroc"] = float(np.mean(aurocs))
    out["adapt_seconds"] = float(np.median(seconds))
    return out


def _report(metrics: dict, files: Mapping[str, Callable[[Path], None]]) -> None:
    """``tune.report`` the metrics with a checkpoint folder holding ``files`` (name -> writer)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="bayprano-ckpt-") as tmp:
        for name, write in files.items():
            write(Path(tmp) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def sweep_trial(config: dict, setup: dict) -> None:
    """The Ray Tune trainable: meta-train with ``config`` (the sampled settings) over the sweep's rounds."""
    import torch

    torch.set_num_threads(setup["threads"])
    settings = {**setup["fixed"], **config}
    if setup["trainer"] == "central":
        _central_trial(settings, setup)
    else:
        _federated_trial(settings, setup)


def _meta_config(settings: dict, episodes: int, seed: int):
    from bayprano.config import TrainConfig
    from bayprano.platform.train import meta_config

    cfg = TrainConfig.model_validate({**settings, "data_root": ".", "episodes": episodes, "out": "x.pt",
                                      "seed": seed})
    return meta_config(cfg), cfg


def _central_trial(settings: dict, setup: dict) -> None:
    import torch
    from ray import tune

    from bayprano.platform.meta.protomaml import feature_statistics, meta_train
    from bayprano.platform.model.bayes import BayesianPatchModel

    cache, banks = _load_cache(setup["features"][feature_key(settings)])
    _, cfg = _meta_config(settings, setup["episodes_per_round"], int(settings.get("seed", 0)))
    model = BayesianPatchModel(cache["in_channels"], cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
    model.set_feature_statistics(*feature_statistics(banks))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    done, history = 0, []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        done, history = int(state["round"]), list(state["history"])
    for r in range(done + 1, setup["rounds"] + 1):
        mcfg, _ = _meta_config(settings, setup["episodes_per_round"], cfg.seed * 100003 + r)
        rows = meta_train(model, banks, mcfg, log_every=setup["episodes_per_round"], optimizer=opt)
        metrics = {"round": r, "episodes": r * setup["episodes_per_round"], "loss": rows[-1]["loss"]}
        metrics.update(validate(model, cache, cfg.shots, cfg.inner_steps, setup["validation_seeds"]))
        history.append(metrics)
        state = {"round": r, "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history}
        _report(metrics, {STATE_FILE: lambda p: torch.save(state, p)})


def _federated_trial(settings: dict, setup: dict) -> None:
    import ray
    from ray import tune

    from bayprano.actors.coordinator import FederatedTrainer, _site_settings
    from bayprano.actors.factory import Factory
    from bayprano.config import FederatedTrainConfig
    from bayprano.platform.meta.checkpoint import load_checkpoint

    cache, _ = _load_cache(setup["features"][feature_key(settings)])
    work = Path(tempfile.mkdtemp(prefix="bayprano-federated-"))
    out = work / FEDERATED_FILE
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            shutil.copyfile(Path(folder) / FEDERATED_FILE, out)
    cfg = FederatedTrainConfig.model_validate({**settings, "shards": setup["shards"], "out": out,
                                               "rounds": setup["rounds"], "resume": checkpoint is not None})
    site_settings = _site_settings(cfg)
    # Scheduled inside the trial's placement group, in the bundles reserved for them.
    factories = {site: Factory.options(num_cpus=setup["factory_cpu"], max_restarts=1, max_task_retries=0)
                 .remote(site, path, site_settings) for site, path in cfg.site_paths().items()}
    try:
        trainer = FederatedTrainer(cfg, factories, log=lambda m: print(f"[federated] {m}", flush=True))
        trainer.setup()
        while trainer.round < setup["rounds"]:
            before = trainer.round
            trainer.cfg = cfg.model_copy(update={"rounds": before + 1})
            trainer.run()
            if trainer.round == before:  # stopped: the privacy budget is spent or too few sites answered
                break
            row = trainer.history[-1]
            ckpt = load_checkpoint(out)
            metrics = {"round": trainer.round, "loss": row["loss"], "site_val_auroc": row["val_auroc"],
                       "epsilon": math.inf if row["epsilon"] is None else float(row["epsilon"]),
                       "episodes": sum(int(h["episodes"]) for h in trainer.history)}
            metrics.update(validate(ckpt.model, cache, cfg.shots, cfg.inner_steps, setup["validation_seeds"]))
            _report(metrics, {FEDERATED_FILE: lambda p: shutil.copyfile(out, p)})
    finally:
        for f in factories.values():
            ray.kill(f)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------- runner


def _param_space(spec: SweepConfig) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda b: tune.uniform(*b), "loguniform": lambda b: tune.loguniform(*b)}
    return {name: make[dim.kind](dim.values) for name, dim in spec.search_space.items()}


def trial_count(spec: SweepConfig) -> int:
    grid = math.prod(len(d.values) for d in spec.search_space.values() if d.kind == "grid")
    return grid * spec.num_samples


def _progress_callback(total: int, rounds: int, metric: str, log: Callable[[str], None], already: int = 0):
    from ray.tune import Callback

    class TrialLines(Callback):
        """One line per finished trial: its settings, its last metrics, how many rounds it ran."""

        def __init__(self):
            self.finished = already  # trials a resumed sweep had finished before
            self.started: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.perf_counter())

        def _line(self, trial, what: str) -> None:
            self.finished += 1
            params = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.config.items()))
            r = trial.last_result or {}
            ran = int(r.get("training_iteration", 0))
            early = " (stopped early by ASHA)" if what == "done" and ran < rounds else ""
            values = ", ".join(f"{k} {_fmt(r[k])}" for k in dict.fromkeys([metric, "val_image_auroc", "adapt_seconds",
                                                                             "epsilon"]) if k in r)
            secs = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
            log(f"trial {self.finished}/{total} {what}: {params}: {values or 'no report'} after {ran}/{rounds} "
                f"round(s){early} ({secs:.0f}s)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return TrialLines()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


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
            raise ConfigError(f"--resume: the sweep in {out} was started with other settings; resume it with the "
                              "same sweep file and --smoke, or start a new one with another --out")
    elif experiment.exists():
        raise ConfigError(f"--out {out}: holds a sweep already; --resume continues it, or choose another --out")
    if not (smoke and spec.synth is not None):
        if Path(spec.data_root).exists():
            resolve_categories(spec, Path(spec.data_root))
        elif spec.synth is None:
            raise DataError(f"data_root {spec.data_root}: does not exist (generate it with `bayprano data synth`, "
                            "or give the sweep a synth: section)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, _spec_record(spec, smoke))

    root, spec = prepare_data(spec, out, smoke, log)
    categories = resolve_categories(spec, root)
    shards = None
    if spec.trainer == "federated":
        from bayprano.platform.data.shards import shard_dataset

        shards = out / "shards"
        if not (shards / "manifest.json").is_file():
            shard_dataset(root, shards, sites=spec.federated.sites, mode="iid" if spec.federated.iid else "by-category",
                          seed=int(spec.fixed.get("seed", 0)), categories=categories["train"])
    total = trial_count(spec)
    log(f"sweep {spec.name}{' (smoke)' if smoke else ''}: {total} trial(s) x {spec.rounds} round(s), {spec.trainer} "
        f"meta-training on {', '.join(categories['train'])}; validation on {', '.join(categories['validation'])}; "
        f"test on {', '.join(categories['test']) or 'none'}")
    features = build_feature_cache(spec, root, categories, out / "features", log)

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    try:
        res = spec.resources_per_trial
        setup = {"trainer": spec.trainer, "fixed": dict(spec.fixed), "rounds": spec.rounds,
                 "episodes_per_round": spec.episodes_per_round, "validation_seeds": spec.validation_seeds,
                 "features": features, "shards": str(shards) if shards else None, "factory_cpu": res.factory_cpu,
                 "threads": max(1, int(res.cpu))}
        trainable = tune.with_parameters(sweep_trial, setup=setup)
        first = {"CPU": res.cpu, **({"GPU": res.gpu} if res.gpu else {})}
        if spec.trainer == "federated":
            bundles = [first] + [{"CPU": res.factory_cpu}] * spec.federated.sites
            trainable = tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))
        else:
            trainable = tune.with_resources(trainable, {k.lower(): v for k, v in first.items()})
        already = 0
        if resume:
            already = sum(t.status in ("TERMINATED", "ERROR") for t in tune.ExperimentAnalysis(str(experiment)).trials)
        callback = _progress_callback(total, spec.rounds, spec.metric, log, already)
        if resume:
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
            log(f"resuming the sweep in {out}: {already} of {total} trial(s) had finished")
            run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
            if run_config is not None:  # the restored run keeps the callbacks of the interrupted one
                run_config.callbacks = [callback]
        else:
            from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
            from ray.tune.search.basic_variant import BasicVariantGenerator

            scheduler = FIFOScheduler()
            if spec.scheduler.kind == "asha":
                scheduler = ASHAScheduler(max_t=spec.rounds, grace_period=spec.scheduler.grace_period,
                                          reduction_factor=spec.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(spec),
                # The generator itself limits concurrency: Tune ignores max_concurrent_trials beside a given one.
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                            search_alg=BasicVariantGenerator(random_state=int(spec.fixed.get("seed", 0)),
                                                                             max_concurrent=spec.max_concurrent_trials or 0),
                                            num_samples=spec.num_samples, reuse_actors=True),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), verbose=0, callbacks=[callback],
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
        # The state Tune saved last (before it stops the trials of an interrupted run) tells what is unfinished.
        saved = tune.ExperimentAnalysis(str(experiment)).trials
        unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
        if unfinished:
            log(f"interrupted with {len(unfinished)} of {len(saved)} trial(s) unfinished; their last "
                f"checkpoints are saved in {experiment}: the same command with --resume continues the sweep")
            raise KeyboardInterrupt
        summary = finish_sweep(spec, grid, out, root, categories, features, smoke, log)
    finally:
        if started:
            ray.shutdown()
    summary["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "summary.json", _jsonable(summary))
    return summary


def _jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python numbers and infinite or NaN floats (epsilon without DP) as None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------------------- results


def _write_table(frame, stem: Path) -> list[str]:
    atomic_write(stem.with_suffix(".parquet"), lambda tmp: frame.to_parquet(tmp, index=False))
    atomic_write_text(stem.with_suffix(".csv"), frame.to_csv(index=False))
    return [str(stem.with_suffix(".parquet")), str(stem.with_suffix(".csv"))]


def trial_tables(spec: SweepConfig, grid) -> tuple[Any, Any]:
    """(one row per trial, one row per report) as pandas DataFrames, with the settings as columns."""
    import pandas as pd

    trials, rounds = [], []
    names = list(spec.search_space)
    for result in grid:
        m = dict(result.metrics or {})
        trial_id = m.get("trial_id") or Path(result.path).name
        params = {k: (result.config or {}).get(k) for k in names}
        ran = int(m.get("training_iteration", 0) or 0)
        status = "error" if result.error else ("completed" if ran >= spec.rounds else "stopped early")
        row = {"trial_id": trial_id, **params, "status": status, "rounds": ran}
        for key in ("val_image_auroc", "adapt_seconds", "loss", "epsilon", "site_val_auroc", "episodes"):
            if key in m:
                row[key] = m[key]
        row.update({k: v for k, v in m.items() if k.startswith("val_auroc_")})
        df = result.metrics_dataframe
        if df is not None and spec.metric in df:
            best = df[spec.metric].max() if spec.mode == "max" else df[spec.metric].min()
            row[f"best_{spec.metric}"] = float(best)
        row["error"] = None if not result.error else str(result.error).strip().splitlines()[-1][:300]
        row["path"] = str(result.path)
        trials.append(row)
        if df is not None and len(df):
            keep = [c for c in df.columns if c in ("training_iteration", "round", "episodes", "loss", "epsilon",
                                                  "site_val_auroc", "val_image_auroc", "adapt_seconds",
                                                  "time_total_s") or c.startswith("val_auroc_")]
            part = df[keep].copy()
            for k, v in params.items():
                part.insert(0, k, v)
            part.insert(0, "trial_id", trial_id)
            rounds.append(part)
    trial_frame = pd.DataFrame(trials)
    if len(trial_frame) and names:
        trial_frame = trial_frame.sort_values(names, kind="stable").reset_index(drop=True)
    round_frame = pd.concat(rounds, ignore_index=True) if rounds else pd.DataFrame()
    return trial_frame, round_frame


def pick_best(spec: SweepConfig, grid):
    """The best result by the metric at its last report, among the trials that ran every round (those
    that ASHA let run); among all that reported when none did."""
    ok = [r for r in grid if not r.error and r.metrics and spec.metric in r.metrics
          and math.isfinite(float(r.metrics[spec.metric]))]
    if not ok:
        errors = [r for r in grid if r.error]
        why = f": {str(errors[0].error).strip().splitlines()[-1][:300]}" if errors else ""
        raise DataError(f"sweep {spec.name}: no trial reported {spec.metric}{why}")
    full = [r for r in ok if int(r.metrics.get("training_iteration", 0)) >= spec.rounds] or ok
    sign = 1 if spec.mode == "max" else -1
    return max(full, key=lambda r: sign * float(r.metrics[spec.metric]))


def _best_train_settings(spec: SweepConfig, best, categories: dict, root: Path, out: Path,
                         shards: Path | None) -> dict:
    settings = {**spec.fixed, **{k: best.config[k] for k in spec.search_space}}
    settings = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()}
    if spec.trainer == "central":
        return {"data_root": str(root), "categories": categories["train"], **settings,
                "episodes": spec.rounds * spec.episodes_per_round, "out": str(out / "best_model.pt")}
    return {"shards": str(shards), **settings, "rounds": spec.rounds, "out": str(out / "best_model.pt")}


def best_checkpoint(spec: SweepConfig, best, settings: dict, features: dict, path: Path) -> Path:
    """The best trial's model as a complete meta-checkpoint: calibrated on the training categories
    (central trials; a federated checkpoint carries its own calibration)."""
    import torch

    from bayprano.platform.evaluate import pixel_hashes
    from bayprano.platform.meta.checkpoint import MetaCheckpoint
    from bayprano.platform.meta.protomaml import calibrate, calibrate_normality, feature_statistics
    from bayprano.platform.model.bayes import BayesianPatchModel

    if best.checkpoint is None:
        raise DataError(f"sweep {spec.name}: the best trial {Path(best.path).name} left no checkpoint")
    with best.checkpoint.as_directory() as folder:
        if spec.trainer == "federated":
            shutil.copyfile(Path(folder) / FEDERATED_FILE, path)
            return path
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    cache, banks = _load_cache(features[feature_key(settings)])
    mcfg, cfg = _meta_config({k: v for k, v in settings.items() if k not in ("data_root", "categories", "episodes",
                                                                              "out")},
                             settings["episodes"], int(settings.get("seed", 0)))
    model = BayesianPatchModel(cache["in_channels"], cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
    model.set_feature_statistics(*feature_statistics(banks))
    model.load_state_dict(state["model"])
    model.eval()
    calibration = calibrate(model, banks, mcfg)
    normality = calibrate_normality(model, banks, mcfg)
    pool = set()
    for c in banks:
        pool |= pixel_hashes(_train_good(Path(settings["data_root"]), c, cache["image_size"])[0])
    meta = dict(mcfg.__dict__)
    meta.update(data_root=settings["data_root"], pool_size=sum(len(b) for b in banks.values()),
                pool_sha256=sorted(pool), sweep=spec.name)
    ckpt = MetaCheckpoint(model, cache["backbone"], cache["fingerprint"], cache["image_size"], calibration,
                          meta_config=meta, categories=sorted(banks), history=state["history"], normality=normality)
    ckpt.save(path)
    return path


def finish_sweep(spec: SweepConfig, grid, out: Path, root: Path, categories: dict, features: dict, smoke: bool,
                 log: Callable[[str], None]) -> dict:
    import yaml

    trials, rounds = trial_tables(spec, grid)
    files = _write_table(trials, out / "trials") + (_write_table(rounds, out / "rounds") if len(rounds) else [])
    best = pick_best(spec, grid)
    shards = out / "shards" if spec.trainer == "federated" else None
    train_settings = _best_train_settings(spec, best, categories, root, out, shards)
    text = (f"# best configuration of sweep {spec.name} ({spec.metric} {_fmt(float(best.metrics[spec.metric]))}, "
            f"{spec.mode}imised on {', '.join(categories['validation'])})\n"
            f"# bayprano train --config {out / 'best_config.yaml'}\n"
            + yaml.safe_dump(train_settings, sort_keys=False))
    atomic_write_text(out / "best_config.yaml", text)
    load_yaml_config(out / "best_config.yaml", spec.trial_model())  # as `bayprano train --config` reads it
    files.append(str(out / "best_config.yaml"))
    files += plot_sweep(spec, trials, rounds, out)
    best_params = {k: best.config[k] for k in spec.search_space}
    log(f"best: {' '.join(f'{k}={_fmt(v)}' for k, v in best_params.items())}: {spec.metric} "
        f"{_fmt(float(best.metrics[spec.metric]))} (validation: {', '.join(categories['validation'])})")
    test = None
    ckpt_path = best_checkpoint(spec, best, train_settings, features, out / "best_checkpoint.pt")
    files.append(str(ckpt_path))
    if categories["test"]:
        from bayprano.platform.evaluate import run_evaluation

        settings = {**spec.fixed, **best_params}
        shots, steps = int(settings.get("shots", 5)), int(settings.get("inner_steps", 1))
        result = run_evaluation(root, out / "test" / "evaluation.json", categories=categories["test"], shots=[shots],
                                seeds=spec.test_seeds, methods=["bayes"], checkpoint=ckpt_path, inner_steps=steps,
                                backbone=settings.get("backbone", "efficientnet_lite2"),
                                device=str(settings.get("device", "cpu")), progress=lambda m: None)
        s = result["summary"]["bayes"][str(shots)]
        per_category = {}
        for r in result["records"]:
            per_category.setdefault(r["category"], []).append(r["image_auroc"])
        test = {"categories": categories["test"], "shots": shots, "inner_steps": steps, "seeds": spec.test_seeds,
                "image_auroc": s["image_auroc"], "pixel_auroc": s["pixel_auroc"], "aupro": s["aupro"],
                "measured_fpr": s["measured_fpr"],
                "image_auroc_per_category": {c: float(np.mean(v)) for c, v in per_category.items()},
                "file": str(out / "test" / "evaluation.json")}
        log(f"held-out test ({', '.join(categories['test'])}), best config, {spec.test_seeds} support seed(s): "
            f"image AUROC {_fmt(s['image_auroc'])}, pixel AUROC {_fmt(s['pixel_auroc'])}, AUPRO {_fmt(s['aupro'])}")
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    return {"name": spec.name, "smoke": smoke, "trainer": spec.trainer, "metric": spec.metric, "mode": spec.mode,
            "data_root": str(root), "categories": categories, "trials": len(trials), "status": counts,
            "best": {"params": best_params, "metrics": {k: v for k, v in best.metrics.items()
                                                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
                     "path": str(best.path)},
            "test": test, "files": files}


# ------------------------------------------------------------------------------------------ plots


def _save_figure(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)




def plot_sweep(spec: SweepConfig, trials, rounds, out: Path) -> list[str]:
    """Heatmap of validation AUROC over shots x inner steps, AUROC and adaptation time against inner steps,
    and the metric (with epsilon for DP sweeps) against each other numeric swept setting."""
    from matplotlib.figure import Figure

    files: list[str] = []
    ok = trials[trials["status"] != "error"] if "status" in trials else trials
    if not len(ok) or "val_image_auroc" not in ok:
        return files
    swept = list(spec.search_space)
    if "shots" in swept and "inner_steps" in swept:
        table = ok.groupby(["shots", "inner_steps"])["val_image_auroc"].mean().unstack("inner_steps")
        early = ok[ok["status"] != "completed"].groupby(["shots", "inner_steps"]).size()
        fig = Figure(figsize=(1.2 * len(table.columns) + 2.4, 0.8 * len(table.index) + 1.8))
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(table.values, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
        ax.set_yticks(range(len(table.index)), [str(i) for i in table.index])
        ax.set_xlabel("inner steps S")
        ax.set_ylabel("shots K")
        lo, hi = np.nanmin(table.values), np.nanmax(table.values)
        for i, k in enumerate(table.index):
            for j, s in enumerate(table.columns):
                v = table.values[i, j]
                if np.isfinite(v):
                    mark = "*" if (k, s) in early.index else ""
                    ax.text(j, i, f"{v:.3f}{mark}", ha="center", va="center", fontsize=8,
                            color="black" if v > (lo + hi) / 2 else "white")
        fig.colorbar(im, ax=ax, label="validation image AUROC")
        note = " (* stopped early)" if len(early) else ""
        ax.set_title(f"{spec.name}: validation image AUROC ({', '.join(spec.validation_categories)}){note}",
                     fontsize=9)
        fig.tight_layout()
        files.append(_save_figure(fig, out / "heatmap_auroc_shots_inner_steps.png"))
    if "inner_steps" in swept:
        fig = Figure(figsize=(10, 4))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        groups = ok.groupby("shots") if "shots" in swept else [(spec.fixed.get("shots", 5), ok)]
        for k, g in groups:
            g = g.groupby("inner_steps")[["val_image_auroc", "adapt_seconds"]].mean()
            ax1.plot(g.index, g["val_image_auroc"], marker="o", label=f"K={k}")
            ax2.plot(g.index, g["adapt_seconds"], marker="o", label=f"K={k}")
        ax1.set_xlabel("inner steps S")
        ax1.set_ylabel("validation image AUROC")
        ax2.set_xlabel("inner steps S")
        ax2.set_ylabel("adaptation s (median, no backbone)")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        fig.suptitle(f"{spec.name}: AUROC and adaptation time against inner steps", fontsize=9)
        fig.tight_layout()
        files.append(_save_figure(fig, out / "auroc_adapt_time_vs_inner_steps.png"))
    for name in swept:
        if name in ("shots", "inner_steps") or not np.issubdtype(ok[name].dtype, np.number):
            continue
        g = ok.groupby(name)[[c for c in ("val_image_auroc", "epsilon") if c in ok]].mean()
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(g.index, g["val_image_auroc"], marker="o", color="tab:blue")
        ax.set_xlabel(name)
        ax.set_ylabel("validation image AUROC", color="tab:blue")
        if spec.search_space[name].kind == "loguniform" or (g.index > 0).all() and g.index.max() / g.index.min() > 20:
            ax.set_xscale("log")
        if "epsilon" in g and np.isfinite(g["epsilon"]).any():
            ax2 = ax.twinx()
            ax2.plot(g.index, g["epsilon"].where(np.isfinite(g["epsilon"])), marker="s", color="tab:red")
            ax2.set_ylabel("epsilon", color="tab:red")
        both = "and epsilon " if "epsilon" in g and np.isfinite(g["epsilon"]).any() else ""
        ax.set_title(f"{spec.name}: validation AUROC {both}against {name}", fontsize=9)
        fig.tight_layout()
        files.append(_save_figure(fig, out / f"auroc_vs_{name}.png"))
    return files


# -------------------------------------------------------------------------------------- command


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
    print(f"wrote {out}: {summary['trials']} trials ({status}), trials.parquet/.csv, best_config.yaml, "
          f"best_checkpoint.pt, plots, in {summary['seconds']:.1f}s")
    return 0
