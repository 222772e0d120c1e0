"""A finished sweep's results: trial and round tables, the best trial, its checkpoint and test evaluation."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bayprano.config import load_yaml_config
from bayprano.sweep_config import SweepConfig
from bayprano.platform.errors import DataError
from bayprano.platform.fileio import atomic_write, atomic_write_text
from bayprano.platform.model.names import DEFAULT_BACKBONE
from bayprano.tune.features import feature_key, load_cache, train_good
from bayprano.tune.plots import plot_sweep
from bayprano.tune.spec import FEDERATED_FILE, STATE_FILE
from bayprano.tune.trainables import meta_config


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


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
            keep = [
                c
                for c in df.columns
                if c
                in (
                    "training_iteration",
                    "round",
                    "episodes",
                    "loss",
                    "epsilon",
                    "site_val_auroc",
                    "val_image_auroc",
                    "adapt_seconds",
                    "time_total_s",
                )
                or c.startswith("val_auroc_")
            ]
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
    ok = [
        r
        for r in grid
        if not r.error and r.metrics and spec.metric in r.metrics and math.isfinite(float(r.metrics[spec.metric]))
    ]
    if not ok:
        errors = [r for r in grid if r.error]
        why = f": {str(errors[0].error).strip().splitlines()[-1][:300]}" if errors else ""
        raise DataError(f"sweep {spec.name}: no trial reported {spec.metric}{why}")
    full = [r for r in ok if int(r.metrics.get("training_iteration", 0)) >= spec.rounds] or ok
    sign = 1 if spec.mode == "max" else -1
    return max(full, key=lambda r: sign * float(r.metrics[spec.metric]))


def _best_train_settings(spec: SweepConfig, best, categories: dict, root: Path, out: Path, shards: Path | None) -> dict:
    settings = {**spec.fixed, **{k: best.config[k] for k in spec.search_space}}
    settings = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()}
    if spec.trainer == "central":
        return {
            "data_root": str(root),
            "categories": categories["train"],
            **settings,
            "episodes": spec.rounds * spec.episodes_per_round,
            "out": str(out / "best_model.pt"),
        }
    return {"shards": str(shards), **settings, "rounds": spec.rounds, "out": str(out / "best_model.pt")}


def best_checkpoint(spec: SweepConfig, best, settings: dict, features: dict, path: Path) -> Path:
    """The best trial's model as a complete meta-checkpoint: calibrated on the training categories
    (central trials; a federated checkpoint carries its own calibration)."""
    import torch

    from bayprano.platform.evaluation_data import pixel_hashes
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
    cache, banks = load_cache(features[feature_key(settings)])
    mcfg, cfg = meta_config(
        {k: v for k, v in settings.items() if k in spec.trial_model().model_fields},
        settings["episodes"],
        int(settings.get("seed", 0)),
    )
    model = BayesianPatchModel(cache["in_channels"], cfg.dim, inner_lr=cfg.inner_lr, seed=cfg.seed)
    model.set_feature_statistics(*feature_statistics(banks))
    model.load_state_dict(state["model"])
    model.eval()
    calibration = calibrate(model, banks, mcfg)
    normality = calibrate_normality(model, banks, mcfg)
    pool = set()
    for c in banks:
        pool |= pixel_hashes(train_good(Path(settings["data_root"]), c, cache["image_size"])[0])
    meta = dict(mcfg.__dict__)
    meta.update(
        data_root=settings["data_root"],
        pool_size=sum(len(b) for b in banks.values()),
        pool_sha256=sorted(pool),
        sweep=spec.name,
    )
    ckpt = MetaCheckpoint(
        model,
        cache["backbone"],
        cache["fingerprint"],
        cache["image_size"],
        calibration,
        meta_config=meta,
        categories=sorted(banks),
        history=state["history"],
        normality=normality,
    )
    ckpt.save(path)
    return path


def finish_sweep(
    spec: SweepConfig,
    grid,
    out: Path,
    root: Path,
    categories: dict,
    features: dict,
    smoke: bool,
    log: Callable[[str], None],
) -> dict:
    import yaml

    trials, rounds = trial_tables(spec, grid)
    files = _write_table(trials, out / "trials") + (_write_table(rounds, out / "rounds") if len(rounds) else [])
    best = pick_best(spec, grid)
    shards = out / "shards" if spec.trainer == "federated" else None
    train_settings = _best_train_settings(spec, best, categories, root, out, shards)
    text = (
        f"# best configuration of sweep {spec.name} ({spec.metric} {fmt(float(best.metrics[spec.metric]))}, "
        f"{spec.mode}imised on {', '.join(categories['validation'])})\n"
        f"# bayprano train --config {out / 'best_config.yaml'}\n" + yaml.safe_dump(train_settings, sort_keys=False)
    )
    atomic_write_text(out / "best_config.yaml", text)
    load_yaml_config(out / "best_config.yaml", spec.training_model())  # as `bayprano train --config` reads it
    files.append(str(out / "best_config.yaml"))
    files += plot_sweep(spec, trials, rounds, out)
    best_params = {k: best.config[k] for k in spec.search_space}
    log(
        f"best: {' '.join(f'{k}={fmt(v)}' for k, v in best_params.items())}: {spec.metric} "
        f"{fmt(float(best.metrics[spec.metric]))} (validation: {', '.join(categories['validation'])})"
    )
    test = None
    ckpt_path = best_checkpoint(spec, best, train_settings, features, out / "best_checkpoint.pt")
    files.append(str(ckpt_path))
    if categories["test"]:
        from bayprano.platform.evaluate import run_evaluation

        settings = {**spec.fixed, **best_params}
        shots, steps = int(settings.get("shots", 5)), int(settings.get("inner_steps", 1))
        result = run_evaluation(
            root,
            out / "test" / "evaluation.json",
            categories=categories["test"],
            shots=[shots],
            seeds=spec.test_seeds,
            methods=["bayes"],
            checkpoint=ckpt_path,
            inner_steps=steps,
            backbone=settings.get("backbone", DEFAULT_BACKBONE),
            device=str(settings.get("device", "cpu")),
            progress=lambda m: None,
        )
        s = result["summary"]["bayes"][str(shots)]
        per_category: dict[str, list[float]] = {}
        for r in result["records"]:
            per_category.setdefault(r["category"], []).append(r["image_auroc"])
        test = {
            "categories": categories["test"],
            "shots": shots,
            "inner_steps": steps,
            "seeds": spec.test_seeds,
            "image_auroc": s["image_auroc"],
            "pixel_auroc": s["pixel_auroc"],
            "aupro": s["aupro"],
            "measured_fpr": s["measured_fpr"],
            "image_auroc_per_category": {c: float(np.mean(v)) for c, v in per_category.items()},
            "file": str(out / "test" / "evaluation.json"),
        }
        log(
            f"held-out test ({', '.join(categories['test'])}), best config, {spec.test_seeds} support seed(s): "
            f"image AUROC {fmt(s['image_auroc'])}, pixel AUROC {fmt(s['pixel_auroc'])}, AUPRO {fmt(s['aupro'])}"
        )
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    return {
        "name": spec.name,
        "smoke": smoke,
        "trainer": spec.trainer,
        "metric": spec.metric,
        "mode": spec.mode,
        "data_root": str(root),
        "categories": categories,
        "trials": len(trials),
        "status": counts,
        "best": {
            "params": best_params,
            "metrics": {
                k: v for k, v in best.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            "path": str(best.path),
        },
        "test": test,
        "files": files,
    }
