"""The Ray Tune trainable: central or federated meta-training in rounds, each reported with the
validation AUROC of adapting to the validation categories (on cached features) and a checkpoint."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bayprano.tune.features import feature_key, load_cache
from bayprano.tune.spec import FEDERATED_FILE, STATE_FILE


def validate(model, cache: dict, shots: int, inner_steps: int, seeds: int) -> dict[str, float]:
    """Image AUROC of adapting ``model`` to each validation category, mean over ``seeds`` support draws."""
    from bayprano.platform.evaluation_data import support_indices
    from bayprano.platform.methods import get_method
    from bayprano.platform.methods.base import fitted_scores
    from bayprano.platform.methods.validation import model_checkpoint, model_context
    from bayprano.platform.metrics import image_auroc

    out: dict[str, float] = {}
    aurocs, seconds = [], []
    bayes = get_method("bayes")
    for c, v in cache["validation"].items():
        feats = v["train_features"]
        ckpt = model_checkpoint(
            model, cache["backbone"], cache["fingerprint"], cache["image_size"], tuple(feats.shape[-2:]), inner_steps
        )
        context = model_context(ckpt, inner_steps)
        labels = v["test_labels"].numpy()
        per_cat = []
        for s in range(seeds):
            idx = support_indices(feats.shape[0], shots, s, c)
            scores, fit_seconds = fitted_scores(bayes.build(context), feats[idx].float(), v["test_features"].float())
            per_cat.append(image_auroc(labels, scores))
            seconds.append(fit_seconds)
        out[f"val_auroc_{c}"] = float(np.mean(per_cat))
        aurocs.append(out[f"val_auroc_{c}"])
    out["val_image_auroc"] = float(np.mean(aurocs))
    out["adapt_seconds"] = float(np.median(seconds))
    return out


def _report(metrics: dict, files: Mapping[str, Callable[[Path], object]]) -> None:
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


def meta_config(settings: dict, episodes: int, seed: int):
    """The meta-learning settings of a central trial's ``settings`` for ``episodes`` episodes, and the
    validated settings themselves."""
    from bayprano.config import CentralTrainingSettings
    from bayprano.platform.meta.outer import MetaConfig

    cfg = CentralTrainingSettings.model_validate({**settings, "seed": seed})
    return MetaConfig.from_settings(cfg, episodes=episodes).validate(), cfg


def _central_trial(settings: dict, setup: dict) -> None:
    import torch
    from ray import tune

    from bayprano.platform.meta.protomaml import feature_statistics, meta_train
    from bayprano.platform.model.bayes import BayesianPatchModel

    cache, banks = load_cache(setup["features"][feature_key(settings)])
    _, cfg = meta_config(settings, setup["episodes_per_round"], int(settings.get("seed", 0)))
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
        mcfg, _ = meta_config(settings, setup["episodes_per_round"], cfg.seed * 100003 + r)
        rows = meta_train(model, banks, mcfg, log_every=setup["episodes_per_round"], optimizer=opt)
        metrics = {"round": r, "episodes": r * setup["episodes_per_round"], "loss": rows[-1]["loss"]}
        metrics.update(validate(model, cache, cfg.shots, cfg.inner_steps, setup["validation_seeds"]))
        history.append(metrics)
        state = {"round": r, "model": model.state_dict(), "optimizer": opt.state_dict(), "history": history}
        _report(metrics, {STATE_FILE: lambda p: torch.save(state, p)})


def _federated_trial(settings: dict, setup: dict) -> None:
    """One federated round per report: the trainer steps the federation a round at a time."""
    import ray
    from ray import tune

    from bayprano.actors.coordinator import FederatedTrainer
    from bayprano.actors.factory import Factory
    from bayprano.config import FederatedTrainConfig
    from bayprano.platform.federated.messages import SiteSettings
    from bayprano.platform.meta.checkpoint import load_checkpoint

    cache, _ = load_cache(setup["features"][feature_key(settings)])
    work = Path(tempfile.mkdtemp(prefix="bayprano-federated-"))
    out = work / FEDERATED_FILE
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            shutil.copyfile(Path(folder) / FEDERATED_FILE, out)
    cfg = FederatedTrainConfig.model_validate(
        {**settings, "shards": setup["shards"], "out": out, "rounds": setup["rounds"], "resume": checkpoint is not None}
    )
    site_settings = SiteSettings.from_config(cfg)
    # Scheduled inside the trial's placement group, in the bundles reserved for them.
    factories: dict[str, Any] = {
        site: Factory.options(num_cpus=setup["factory_cpu"], max_restarts=1, max_task_retries=0).remote(
            site, path, site_settings
        )
        for site, path in cfg.site_paths().items()
    }
    try:
        trainer = FederatedTrainer(cfg, factories, log=lambda m: print(f"[federated] {m}", flush=True))
        trainer.setup()
        while True:
            row = trainer.step()
            if row is None:  # every round ran, or stopped: the privacy budget is spent or too few sites answered
                break
            ckpt = load_checkpoint(out)
            metrics = {
                "round": trainer.round,
                "loss": row["loss"],
                "site_val_auroc": row["val_auroc"],
                "epsilon": math.inf if row["epsilon"] is None else float(row["epsilon"]),
                "episodes": sum(int(h["episodes"]) for h in trainer.history),
            }
            metrics.update(validate(ckpt.model, cache, cfg.shots, cfg.inner_steps, setup["validation_seeds"]))
            _report(metrics, {FEDERATED_FILE: lambda p: shutil.copyfile(out, p)})
    finally:
        for f in factories.values():
            ray.kill(f)
        shutil.rmtree(work, ignore_errors=True)
