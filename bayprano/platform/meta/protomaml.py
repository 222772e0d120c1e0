"""Proto-MAML with Bayesian prototypes: episodes, the inner loop, the outer loss, meta-training.

Tasks are product categories. Backbone features are frozen, so each category's normal training images
and a pool of synthetic anomalies made from them are turned into features once (``TaskBank``); an
episode then draws, from one bank, K normal support maps and a query of held-out normals and
synthetic anomalies whose source image is not in the support.

Inner loop (``clone`` / ``adapt``): S gradient steps on the head's parameters that lower the support's
leave-one-out patch score, i.e. raise the leave-one-out predictive density of each support image under
the posterior of the others (its normalising constant is left out: it rewards shrinking the embedding
rather than predicting it). With one shot there is nothing to leave out, and the support is scored in
sample. The posterior is then recomputed from the adapted support embeddings.

Outer loss on the query: balanced pixel BCE on patch scores (targets: the fraction of each patch
cell covered by the synthetic defect), image BCE on the image score, plus ``supcon_weight`` times a
supervised contrastive loss between normal and anomalous patch embeddings. First-order by default
(the inner gradients are treated as constants), second-order as an option.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.niw import NIWPrototype, fit_posteriors
from bayprano.platform.model.scoring import Calibration, NormalityPrior, image_statistic, shift_covariate


# ------------------------------------------------------------------------------------------- tasks


@dataclass
class TaskBank:
    """One category's cached features: normals and synthetic anomalies made from them."""

    category: str
    normals: Tensor  # (N, C, h, w), float16
    normal_ids: list[str]
    anomalies: Tensor  # (M, C, h, w), float16
    anomaly_masks: Tensor  # (M, h, w), fraction of each patch cell that is defective
    anomaly_sources: Tensor  # (M,), index of the normal each anomaly was made from

    def __len__(self) -> int:
        return self.normals.shape[0]

    def to(self, device: torch.device | str) -> "TaskBank":
        """The same bank with its feature tensors on ``device`` (indices stay on the CPU)."""
        return TaskBank(self.category, self.normals.to(device), self.normal_ids, self.anomalies.to(device),
                        self.anomaly_masks.to(device), self.anomaly_sources)


def build_task_bank(
    category: str,
    images: np.ndarray,
    ids: Sequence[str],
    extract: Callable[[np.ndarray], Tensor],
    injector: Callable,
    anomalies_per_image: int = 1,
    seed: int = 0,
) -> TaskBank:
    """Features of a category's normal images (uint8 (N, H, W, 3)) and of synthetic anomalies of them."""
    rng = np.random.default_rng(seed)
    normals = extract(images).to(torch.float16)
    anomalous, masks, sources = [], [], []
    n = len(images)
    for rep in range(anomalies_per_image):
        for i in range(n):
            other = images[(i + 1 + rng.integers(n - 1)) % n] if n > 1 else None
            image, mask = injector(images[i], rng, source=other)
            anomalous.append(image)
            masks.append(mask)
            sources.append(i)
    feats = extract(np.stack(anomalous)).to(torch.float16)
    h, w = feats.shape[-2:]
    mask_t = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    cell = F.adaptive_avg_pool2d(mask_t, (h, w))[:, 0]
    return TaskBank(category, normals, list(ids), feats, cell, torch.tensor(sources))


@dataclass
class FeatureEpisode:
    category: str
    support: Tensor  # (K, C, h, w)
    query: Tensor  # (Q, C, h, w)
    query_masks: Tensor  # (Q, h, w) defect fraction per cell
    query_labels: Tensor  # (Q,)
    support_index: list[int]
    query_normal_index: list[int]


def sample_episode(
    bank: TaskBank, shots: int, n_query_normal: int, n_query_anomalous: int, rng: np.random.Generator
) -> FeatureEpisode:
    """Disjoint support and normal query from the bank's normals; anomalies not made from the support."""
    need = shots + n_query_normal
    if need > len(bank):
        raise ConfigError(
            f"shots={shots} plus {n_query_normal} normal query images needs {need} normal train images, "
            f"category {bank.category!r} has {len(bank)}"
        )
    order = rng.permutation(len(bank))
    support_idx = order[:shots].tolist()
    query_idx = order[shots:need].tolist()
    allowed = np.flatnonzero(~np.isin(bank.anomaly_sources.numpy(), support_idx))
    if n_query_anomalous and len(allowed) < n_query_anomalous:
        raise ConfigError(
            f"category {bank.category!r}: only {len(allowed)} synthetic anomalies not made from the support, "
            f"{n_query_anomalous} needed"
        )
    anomaly_idx = rng.choice(allowed, size=n_query_anomalous, replace=False).tolist() if n_query_anomalous else []
    h, w = bank.normals.shape[-2:]
    query = torch.cat([bank.normals[query_idx], bank.anomalies[anomaly_idx]]).float()
    dev = bank.normals.device
    masks = torch.cat([torch.zeros(len(query_idx), h, w, device=dev), bank.anomaly_masks[anomaly_idx].float()])
    labels = torch.cat([torch.zeros(len(query_idx), device=dev), torch.ones(len(anomaly_idx), device=dev)])
    return FeatureEpisode(bank.category, bank.normals[support_idx].float(), query, masks, labels,
                          support_idx, query_idx)


# ------------------------------------------------------------------------------------ inner loop


def support_loo_score(
    model: BayesianPatchModel,
    params: Mapping[str, Tensor],
    support: Tensor,
    positions: Tensor | None = None,
) -> Tensor:
    """Mean leave-one-out patch score of the support (the inner loop's loss)."""
    z = model.embed(support, dict(params))
    k = z.shape[0]
    losses = []
    for i in range(k):
        rest = z if k == 1 else torch.cat([z[:i], z[i + 1 :]])
        if model.prototype_kind == "niw":
            _, local = fit_posteriors(rest, model.hyper(), positions)
            pred = local.predictive()
            x = z[i].flatten(1)
            x = (x if positions is None else x[:, positions]).t()[:, None, :]  # (P', 1, d)
            losses.append(-pred.log_kernel(pred.mahalanobis(x)).mean())
        else:
            dist = model.prototype(rest).mahalanobis(z[i : i + 1]).flatten()
            losses.append(torch.log1p(dist if positions is None else dist[positions]).mean())
    return torch.stack(losses).mean()


class TaskHead:
    """A task's copy of the head parameters (learn2learn's ``clone``), changed by ``adapt``.

    The copy starts as the model's own tensors, so the outer loss differentiates through the inner
    steps into the shared initialisation.
    """

    def __init__(self, model: BayesianPatchModel, params: Mapping[str, Tensor] | None = None):
        self.model = model
        self.params = dict(params if params is not None else model.head_params())

    def adapt(
        self,
        support: Tensor,
        steps: int,
        first_order: bool = True,
        positions: Tensor | None = None,
        lr: Tensor | float | None = None,
    ) -> "TaskHead":
        lr = self.model.log_inner_lr.exp() if lr is None else lr
        for _ in range(steps):
            loss = support_loo_score(self.model, self.params, support, positions)
            names = list(self.params)
            grads = torch.autograd.grad(
                loss, [self.params[n] for n in names], create_graph=not first_order, allow_unused=True
            )
            new = {}
            for n, g in zip(names, grads):
                if g is None:
                    new[n] = self.params[n]
                    continue
                if first_order:
                    g = g.detach()
                new[n] = self.params[n] - lr * g
            self.params = new
        return self

    def embed(self, features: Tensor) -> Tensor:
        return self.model.embed(features, self.params)


def clone(model: BayesianPatchModel) -> TaskHead:
    return TaskHead(model)


# ------------------------------------------------------------------------------------- outer loss


def supervised_contrastive(embeddings: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al.) over (N, d) embeddings with integer labels."""
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.t() / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    counts = positive.sum(1)
    keep = counts > 0
    if not bool(keep.any()):
        return embeddings.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1)
    return -(pos_log_prob[keep] / counts[keep]).mean()


def _balanced_bce(logits: Tensor, targets: Tensor) -> Tensor:
    pos = targets > 0.5
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    parts = [loss[pos].mean()] if bool(pos.any()) else []
    if bool((~pos).any()):
        parts.append(loss[~pos].mean())
    return torch.stack(parts).mean()


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
    maha = proto.mahalanobis(zq)  # (Q, h, w); the patch score is a monotone function of it
    pixel = _balanced_bce(model.pixel_logits(maha), episode.query_masks)
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


@dataclass
class MetaHistory:
    rows: list[dict] = field(default_factory=list)


def meta_train(
    model: BayesianPatchModel,
    banks: Mapping[str, TaskBank],
    cfg: MetaConfig,
    progress: Callable[[dict], None] | None = None,
    log_every: int = 10,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[dict]:
    """Meta-train ``model`` in place on episodes from ``banks``; returns one row of metrics per log step."""
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


@torch.no_grad()
def calibrate(
    model: BayesianPatchModel, banks: Mapping[str, TaskBank], cfg: MetaConfig
) -> Calibration:
    """Effective patch count M estimated from normal query images of fresh episodes (no grad)."""
    rng = np.random.default_rng(cfg.seed + 7919)
    names = sorted(banks)
    stats_, dfs = [], []
    for e in range(cfg.calibration_episodes):
        bank = banks[names[e % len(names)]]
        ep = sample_episode(bank, cfg.shots, cfg.n_query_normal, 0, rng)
        with torch.enable_grad():
            task = clone(model).adapt(ep.support, cfg.inner_steps, True)
        params = {k: v.detach() for k, v in task.params.items()}
        proto = NIWPrototype(model.hyper()).fit(model.embed(ep.support, params))  # niw models only
        maha = proto.mahalanobis(model.embed(ep.query, params))
        stats_.extend(image_statistic(maha, model.dim).tolist())
        dfs.extend([float(proto.df_[0])] * maha.shape[0])
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
            with torch.enable_grad():
                task = clone(model).adapt(ep.support, cfg.inner_steps, True)
            params = {n: v.detach() for n, v in task.params.items()}
            z = model.embed(ep.support, params)
            proto = NIWPrototype(model.hyper()).fit(z)
            covariate = shift_covariate(proto.mahalanobis, z, model.dim)
            maha = proto.mahalanobis(model.embed(ep.query, params))
            logs.setdefault((bank.category, k), []).extend(
                (t, covariate) for t in torch.log(image_statistic(maha, model.dim)).tolist())
    return logs


def feature_statistics(banks: Mapping[str, TaskBank]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over all normal features of all banks."""
    total, total_sq, count = 0.0, 0.0, 0
    for bank in banks.values():
        x = bank.normals.float()
        total = total + x.sum((0, 2, 3))
        total_sq = total_sq + (x**2).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean, std
