"""One site's part of a federated round: a local meta-update on its own task banks.

``local_meta_update`` loads the global parameter vector into the site's model, runs ``local_steps``
Proto-MAML episodes on the site's categories (its own images only; they never leave the site) and
returns the delta (new - global) in the same ``ParameterLayout`` with a few scalar metrics. Without a
proximal term it is exactly ``protomaml.meta_train`` for ``local_steps`` episodes (a fresh Adam each
round); with FedProx (``fedprox_mu > 0``) the same loop is run here with mu / 2 * ||w - w_global||^2
added to each episode's outer loss, because ``meta_train`` has no hook for it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.federated.aggregation import fedprox_penalty
from bayprano.platform.federated.state import ParameterLayout
from bayprano.platform.meta.protomaml import MetaConfig, TaskBank, episode_loss, meta_train, sample_episode
from bayprano.platform.model.bayes import BayesianPatchModel

METRIC_KEYS = ("loss", "pixel_bce", "image_bce", "supcon")


def _proximal_meta_train(
    model: BayesianPatchModel, banks: Mapping[str, TaskBank], cfg: MetaConfig, global_vector: Tensor, mu: float
) -> dict[str, float]:
    """``meta_train``'s loop (same draws, optimiser and gradient clipping) plus the FedProx term."""
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    names = sorted(banks)
    params = [p for _, p in model.named_parameters()]  # the layout's order (checked by load_into)
    anchor = global_vector.to(params[0].device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    rows = []
    for _ in range(cfg.episodes):
        bank = banks[names[rng.integers(len(names))]]
        episode = sample_episode(bank, cfg.shots, cfg.n_query_normal, cfg.n_query_anomalous, rng)
        loss, metrics = episode_loss(model, episode, cfg, gen)
        prox = fedprox_penalty(torch.cat([p.reshape(-1) for p in params]), anchor, mu)
        opt.zero_grad(set_to_none=True)
        (loss + prox).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        metrics["prox"] = prox.item()
        rows.append(metrics)
    model.eval()
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def local_meta_update(
    model: BayesianPatchModel,
    banks: Mapping[str, TaskBank],
    cfg: MetaConfig,
    local_steps: int,
    global_vector: Tensor,
    layout: ParameterLayout,
    fedprox_mu: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """Meta-train ``model`` from ``global_vector`` for ``local_steps`` episodes on ``banks``.

    Returns the float32 CPU delta (new parameters - ``global_vector``) and the metrics: ``episodes``,
    the means over the episodes of ``loss`` (outer loss, without the proximal term), ``pixel_bce``,
    ``image_bce``, ``supcon`` and ``prox``, the delta's L2 norm ``delta_norm`` and ``seconds``.
    ``cfg``'s ``episodes`` and ``seed`` are replaced by ``local_steps`` and ``seed`` (give each round
    and site its own seed, or every round draws the same episodes); the model is left holding the new
    parameters, in eval mode. Its buffers (feature statistics) are not touched: every site must hold
    the same ones, set once before the first round.
    """
    if isinstance(local_steps, bool) or not isinstance(local_steps, numbers.Integral) or local_steps < 1:
        raise ConfigError(f"federated: local_steps must be an integer of at least 1, got {local_steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"federated: seed must be a non-negative integer, got {seed!r}")
    if isinstance(fedprox_mu, bool) or not isinstance(fedprox_mu, numbers.Real) or not math.isfinite(fedprox_mu) \
            or fedprox_mu < 0:
        raise ConfigError(f"federated: fedprox_mu must be zero or positive, got {fedprox_mu!r}")
    if not isinstance(cfg, MetaConfig):
        raise ConfigError(f"federated: cfg must be a MetaConfig, got {type(cfg).__name__}")
    if not banks:
        raise ConfigError("federated: a site needs at least one category (task bank) to train on")
    if not isinstance(layout, ParameterLayout):
        raise ConfigError(f"federated: layout must be a ParameterLayout, got {type(layout).__name__}")
    local_cfg = dataclasses.replace(cfg, episodes=int(local_steps), seed=int(seed)).validate()
    need = local_cfg.shots + local_cfg.n_query_normal
    for name in sorted(banks):  # before the model is touched, not at the first episode
        if need > len(banks[name]):
            raise ConfigError(f"shots={local_cfg.shots} plus {local_cfg.n_query_normal} normal query images needs "
                              f"{need} normal train images, category {name!r} has {len(banks[name])}")
    start = layout.check_vector(global_vector, "global vector")
    layout.load_into(model, start)
    t0 = time.perf_counter()
    if fedprox_mu == 0:
        row = meta_train(model, banks, local_cfg, log_every=local_cfg.episodes)[-1]
        metrics = {k: float(row[k]) for k in METRIC_KEYS}
        metrics["prox"] = 0.0
    else:
        metrics = _proximal_meta_train(model, banks, local_cfg, start, float(fedprox_mu))
    delta = layout.flatten(model) - start
    metrics.update(episodes=float(local_cfg.episodes), delta_norm=float(delta.norm()),
                   seconds=time.perf_counter() - t0)
    return delta, metrics
