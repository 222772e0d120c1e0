"""Calibration priors learned at meta-training from normal query images of fresh episodes.

``calibrate``: the analytic fallback's effective patch count; ``normal_log_statistics`` and
``calibrate_normality``: the log image statistic of normal images per category and support size, with
each episode's shift covariate, summarised as the ``NormalityPrior`` that a site's threshold starts from.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.inner import adapt_head
from bayprano.platform.meta.outer import MetaConfig
from bayprano.platform.meta.tasks import TaskBank, sample_episode
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.niw import NIWPrototype
from bayprano.platform.model.scoring import Calibration, NormalityPrior, image_statistic, shift_covariate


@torch.no_grad()
def calibrate(model: BayesianPatchModel, banks: Mapping[str, TaskBank], cfg: MetaConfig) -> Calibration:
    """Effective patch count M estimated from normal query images of fresh episodes (no grad)."""
    rng = np.random.default_rng(cfg.seed + 7919)
    names = sorted(banks)
    stats_, dfs = [], []
    for e in range(cfg.calibration_episodes):
        bank = banks[names[e % len(names)]]
        ep = sample_episode(bank, cfg.shots, cfg.n_query_normal, 0, rng)
        adapted = adapt_head(model, ep.support, cfg.inner_steps)
        maha = adapted.distance(ep.query)
        stats_.extend(image_statistic(maha, model.dim).tolist())
        prototype = adapted.prototype
        if not isinstance(prototype, NIWPrototype):
            raise ConfigError(
                f"calibrate: the effective patch count needs the Bayesian (NIW) prototype, not "
                f"{type(prototype).__name__}"
            )
        dfs.extend([prototype.df] * maha.shape[0])
    return Calibration.estimate(model.dim, np.array(stats_), np.array(dfs))


@torch.no_grad()
def calibrate_normality(
    model: BayesianPatchModel, banks: Mapping[str, TaskBank], cfg: MetaConfig, shots: Sequence[int] | None = None
) -> NormalityPrior:
    """Log T of normal query images of fresh episodes, per category and support size, as a prior."""
    return NormalityPrior.estimate(normal_log_statistics(model, banks, cfg, shots))


@torch.no_grad()
def normal_log_statistics(
    model: BayesianPatchModel, banks: Mapping[str, TaskBank], cfg: MetaConfig, shots: Sequence[int] | None = None
) -> dict:
    """{(category, K): [(log T of a normal query image, the episode's ``shift_covariate``)]} over fresh
    episodes, K in ``shots`` (default 1, 2, K)."""
    rng = np.random.default_rng(cfg.seed + 104729)
    names = sorted(banks)
    smallest = min(len(b) for b in banks.values())
    shots = sorted({k for k in (shots or (1, 2, cfg.shots)) if 1 <= k and k + cfg.n_query_normal <= smallest})
    if not shots:
        raise ConfigError(f"calibration: categories need more than {cfg.n_query_normal} normal images")
    logs: dict = {}
    for k in shots:
        for e in range(max(cfg.calibration_episodes, len(names))):
            bank = banks[names[e % len(names)]]
            ep = sample_episode(bank, k, cfg.n_query_normal, 0, rng)
            adapted = adapt_head(model, ep.support, cfg.inner_steps)
            covariate = shift_covariate(adapted.prototype.distance, adapted.support_embeddings, model.dim)
            maha = adapted.distance(ep.query)
            logs.setdefault((bank.category, k), []).extend(
                (t, covariate) for t in torch.log(image_statistic(maha, model.dim)).tolist()
            )
    return logs
