"""One site's part of a federated round: a local meta-update on its own task banks.

``local_meta_update`` loads the global parameter vector into the site's model, runs ``local_steps``
Proto-MAML episodes on the site's categories (its own images only; they never leave the site) and
returns the delta (new - global) in the same ``ParameterLayout`` with a few scalar metrics. It is
``meta_train`` for ``local_steps`` episodes (a fresh Adam each round); with FedProx (``fedprox_mu > 0``)
mu / 2 * ||w - w_global||^2 is one of ``meta_train``'s extra loss terms.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Mapping

import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.federated.aggregation import fedprox_penalty
from bayprano.platform.federated.state import ParameterLayout
from bayprano.platform.meta.protomaml import MetaConfig, TaskBank, meta_train
from bayprano.platform.model.bayes import BayesianPatchModel

METRIC_KEYS = ("loss", "pixel_bce", "image_bce", "supcon")


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
    if (
        isinstance(fedprox_mu, bool)
        or not isinstance(fedprox_mu, numbers.Real)
        or not math.isfinite(fedprox_mu)
        or fedprox_mu < 0
    ):
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
            raise ConfigError(
                f"shots={local_cfg.shots} plus {local_cfg.n_query_normal} normal query images needs "
                f"{need} normal train images, category {name!r} has {len(banks[name])}"
            )
    start = layout.check_vector(global_vector, "global vector")
    layout.load_into(model, start)
    t0 = time.perf_counter()
    extra = {}
    if fedprox_mu:
        anchor = start.to(next(model.parameters()).device)
        extra["prox"] = lambda m: fedprox_penalty(
            torch.cat([p.reshape(-1) for p in m.parameters()]), anchor, float(fedprox_mu)
        )
    row = meta_train(model, banks, local_cfg, log_every=local_cfg.episodes, extra_losses=extra)[-1]
    metrics = {k: float(row.get(k, 0.0)) for k in (*METRIC_KEYS, "prox")}
    delta = layout.flatten(model) - start
    metrics.update(episodes=float(local_cfg.episodes), delta_norm=float(delta.norm()), seconds=time.perf_counter() - t0)
    return delta, metrics
