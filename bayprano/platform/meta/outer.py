"""The outer loop of Proto-MAML: the episode loss on the query after adapting to the support, and
meta-training over episodes of several categories.

Outer loss on the query: balanced pixel BCE on patch scores (targets: the fraction of each patch cell
covered by the synthetic defect), image BCE on the image score, plus ``supcon_weight`` times a
supervised contrastive loss between normal and anomalous patch embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.inner import clone
from bayprano.platform.meta.losses import balanced_bce, supervised_contrastive
from bayprano.platform.meta.tasks import FeatureEpisode, TaskBank, sample_episode
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import image_statistic


@dataclass
class MetaConfig:
    shots: int = 5
    inner_steps: int = 3
    episodes: int = 200
    n_query_normal: int = 4
    n_query_anomalous: int = 4
    lr: float = 2e-3
    supcon_weight: float = 0.1
    supcon_patches: int = 128
    inner_positions: int = 128
    first_order: bool = True
    calibration_episodes: int = 20
    seed: int = 0

    @classmethod
    def from_settings(cls, cfg: Any, **overrides: Any) -> "MetaConfig":
        """The meta-learning settings of a training config (``TrainConfig``, ``FederatedTrainConfig`` or
        any object with their fields); ``overrides`` set the rest. Not validated."""
        return cls(
            shots=cfg.shots,
            inner_steps=cfg.inner_steps,
            n_query_normal=cfg.n_query_normal,
            n_query_anomalous=cfg.n_query_anomalous,
            lr=cfg.lr,
            supcon_weight=cfg.supcon_weight,
            first_order=not cfg.second_order,
            calibration_episodes=cfg.calibration_episodes,
            seed=cfg.seed,
            **overrides,
        )

    def validate(self) -> "MetaConfig":
        checks = [
            ("shots", self.shots >= 1, "at least 1"),
            ("inner_steps", 0 <= self.inner_steps <= 10, "between 0 and 10"),
            ("episodes", self.episodes >= 1, "at least 1"),
            ("n_query_normal", self.n_query_normal >= 1, "at least 1"),
            ("n_query_anomalous", self.n_query_anomalous >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("supcon_weight", self.supcon_weight >= 0, "zero or positive"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"meta-training: {name} must be {what}, got {getattr(self, name)}")
        return self


def episode_loss(
    model: BayesianPatchModel, episode: FeatureEpisode, cfg: MetaConfig, gen: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    """Adapt to the support, then the outer loss on the query."""
    h, w = episode.support.shape[-2:]
    positions = None
    if cfg.inner_positions and cfg.inner_positions < h * w:
        positions = torch.randperm(h * w, generator=gen)[: cfg.inner_positions].to(episode.support.device)
    task = clone(model).adapt(episode.support, cfg.inner_steps, cfg.first_order, positions)
    proto = model.prototype(task.embed(episode.support))
    zq = task.embed(episode.query)
    maha = proto.distance(zq)  # (Q, h, w); the patch score is a monotone function of it
    pixel = balanced_bce(model.pixel_logits(maha), episode.query_masks)
    image_stat = image_statistic(maha, model.dim) * model.dim
    image = F.binary_cross_entropy_with_logits(model.image_logits(image_stat), episode.query_labels)
    loss = pixel + image
    supcon = torch.zeros((), device=loss.device)
    if cfg.supcon_weight > 0:
        emb = zq.permute(0, 2, 3, 1).reshape(-1, zq.shape[1])
        cell = episode.query_masks.reshape(-1)
        anomalous = torch.nonzero(cell > 0.5).flatten()
        normal = torch.nonzero(cell == 0).flatten()
        if len(anomalous) >= 2:
            a = anomalous[torch.randperm(len(anomalous), generator=gen)[: cfg.supcon_patches // 2].to(cell.device)]
            b = normal[torch.randperm(len(normal), generator=gen)[: cfg.supcon_patches - len(a)].to(cell.device)]
            idx = torch.cat([a, b])
            labels = torch.cat([torch.ones(len(a), device=cell.device), torch.zeros(len(b), device=cell.device)])
            supcon = supervised_contrastive(emb[idx], labels)
            loss = loss + cfg.supcon_weight * supcon
    metrics = {"loss": loss.item(), "pixel_bce": pixel.item(), "image_bce": image.item(), "supcon": supcon.item()}
    return loss, metrics


def meta_train(
    model: BayesianPatchModel,
    banks: Mapping[str, TaskBank],
    cfg: MetaConfig,
    progress: Callable[[dict], None] | None = None,
    log_every: int = 10,
    optimizer: torch.optim.Optimizer | None = None,
    extra_losses: Mapping[str, Callable[[BayesianPatchModel], Tensor]] | None = None,
) -> list[dict]:
    """Meta-train ``model`` in place on episodes from ``banks``; returns one row of metrics per log step
    (means over the episodes since the previous row).

    ``extra_losses``: named terms added to every episode's outer loss, each a function of the model (a
    proximal term, for instance); each term's value is reported under its name, ``loss`` stays the
    outer loss without them.
    """
    cfg.validate()
    if not banks:
        raise ConfigError("meta-training needs at least one category")
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    names = sorted(banks)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    rows, window = [], []
    start = time.perf_counter()
    for step in range(1, cfg.episodes + 1):
        bank = banks[names[rng.integers(len(names))]]
        episode = sample_episode(bank, cfg.shots, cfg.n_query_normal, cfg.n_query_anomalous, rng)
        loss, metrics = episode_loss(model, episode, cfg, gen)
        for name, term in (extra_losses or {}).items():
            value = term(model)
            loss = loss + value
            metrics[name] = value.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(metrics)
        if step % log_every == 0 or step == cfg.episodes:
            row = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
            row.update(episode=step, seconds=time.perf_counter() - start)
            rows.append(row)
            window = []
            if progress:
                progress(row)
    model.eval()
    return rows
