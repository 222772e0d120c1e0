"""Calibration priors learned at meta-training from normal query images of fresh episodes.

``calibrate``: the analytic fallback's effective patch count; ``normal_log_statistics`` and
``calibrate_normality``: the log image statistic of normal images per category and support size, with
each episode's shift covariate, summarised as the ``NormalityPrior`` that a site's threshold starts from;
``choose_rules``: how that prior is used per support size (conditioned on the covariate or not, with how
much weight), chosen by leave-one-category-out over the same meta-training episodes, never on a test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.inner import adapt_head, site_positions
from bayprano.platform.meta.outer import MetaConfig
from bayprano.platform.meta.tasks import TaskBank, sample_episode
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.niw import NIWPrototype
from bayprano.platform.model.scoring import Calibration, NormalityPrior, image_statistic, shift_covariate
from bayprano.platform.model.site_support import SupportLayout

RULE_TARGET_FPR = 0.05  # the platform's default target; a rule is chosen at it
RULE_STRENGTHS = (2.0, 4.0, 8.0, 16.0, 32.0)
RULE_EPISODES_PER_CATEGORY = 8


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
    model: BayesianPatchModel,
    banks: Mapping[str, TaskBank],
    cfg: MetaConfig,
    shots: Sequence[int] | None = None,
    target_fpr: float = RULE_TARGET_FPR,
) -> NormalityPrior:
    """Log T of normal query images of fresh episodes, per category and support size, as a prior, with each
    K's calibration rule chosen by leave-one-category-out over those episodes (``choose_rules``)."""
    episodes = normal_episodes(model, banks, cfg, shots, per_category=RULE_EPISODES_PER_CATEGORY, loo=True)
    return episode_prior(episodes).with_rules(choose_rules(episodes, target_fpr))


@dataclass
class NormalEpisode:
    """One fresh episode of normal images: its category, support size K, the support's shift covariate,
    the log T of its normal query images and the T of each support image left out of the others' posterior
    (K >= 2)."""

    category: str
    shots: int
    covariate: float
    query_log_statistics: list[float]
    loo_statistics: list[float] = field(default_factory=list)


@torch.no_grad()
def normal_episodes(
    model: BayesianPatchModel,
    banks: Mapping[str, TaskBank],
    cfg: MetaConfig,
    shots: Sequence[int] | None = None,
    per_category: int = 1,
    loo: bool = False,
) -> list[NormalEpisode]:
    """Fresh episodes of normal images, K in ``shots`` (default 1, 2, K), at least ``per_category`` per
    category and K (and ``cfg.calibration_episodes`` in all per K); ``loo``: with leave-one-out statistics."""
    rng = np.random.default_rng(cfg.seed + 104729)
    names = sorted(banks)
    smallest = min(len(b) for b in banks.values())
    shots = sorted({k for k in (shots or (1, 2, cfg.shots)) if 1 <= k and k + cfg.n_query_normal <= smallest})
    if not shots:
        raise ConfigError(f"calibration: categories need more than {cfg.n_query_normal} normal images")
    out = []
    for k in shots:
        for e in range(max(cfg.calibration_episodes, per_category * len(names))):
            bank = banks[names[e % len(names)]]
            ep = sample_episode(bank, k, cfg.n_query_normal, 0, rng)
            h, w = ep.support.shape[-2:]
            positions = site_positions(h, w, cfg.inner_steps, cfg.inner_positions, ep.support.device)
            adapted = adapt_head(model, ep.support, cfg.inner_steps, positions)  # as a site adapts
            z = adapted.support_embeddings
            covariate = shift_covariate(adapted.prototype.distance, z, model.dim)
            queries = torch.log(image_statistic(adapted.distance(ep.query), model.dim)).tolist()
            held_out = [s for s, _ in SupportLayout.plain(k).leave_one_out(model, z)] if loo and k >= 2 else []
            out.append(NormalEpisode(bank.category, k, covariate, queries, held_out))
    return out


def log_statistics(episodes: Sequence[NormalEpisode]) -> dict:
    """{(category, K): [(log T of a normal query image, the episode's shift covariate)]}."""
    logs: dict = {}
    for ep in episodes:
        logs.setdefault((ep.category, ep.shots), []).extend((t, ep.covariate) for t in ep.query_log_statistics)
    return logs


@torch.no_grad()
def normal_log_statistics(
    model: BayesianPatchModel, banks: Mapping[str, TaskBank], cfg: MetaConfig, shots: Sequence[int] | None = None
) -> dict:
    """{(category, K): [(log T of a normal query image, the episode's ``shift_covariate``)]} over fresh
    episodes, K in ``shots`` (default 1, 2, K)."""
    return log_statistics(normal_episodes(model, banks, cfg, shots))


def pinball_loss(log_threshold: float, log_statistics: np.ndarray, target_fpr: float) -> float:
    """Mean quantile (pinball) loss of a log threshold for the 1 - target quantile of ``log_statistics``:
    a proper score, lowest in expectation at the true quantile."""
    u = np.asarray(log_statistics, dtype=np.float64) - log_threshold
    return float(np.mean(np.maximum((1 - target_fpr) * u, -target_fpr * u)))


def episode_term_sums(episodes: Sequence[NormalEpisode]) -> dict:
    """Per K, the additive parts of ``episode_terms``: {"within": [categories, sum of their mean within-episode
    variance], "offset": [categories, sum of their mean leave-one-out offset]}, so that sums over sites (or
    a sum less one category's part) give the same terms as the episodes pooled."""
    sums: dict = {}
    for k in sorted({ep.shots for ep in episodes}):
        within: dict[str, list[float]] = {}
        offsets: dict[str, list[float]] = {}
        for ep in (ep for ep in episodes if ep.shots == k):
            q = np.asarray(ep.query_log_statistics, dtype=np.float64)
            if q.size >= 2:
                within.setdefault(ep.category, []).append(float(q.var(ddof=1)))
            if ep.loo_statistics:
                loo = np.log(np.maximum(np.asarray(ep.loo_statistics, dtype=np.float64), 1e-300))
                offsets.setdefault(ep.category, []).append(float(q.mean() - loo.mean()))
        sums[k] = {
            "within": [float(len(within)), float(sum(np.mean(v) for v in within.values()))],
            "offset": [float(len(offsets)), float(sum(np.mean(v) for v in offsets.values()))],
        }
    return sums


def terms_from_sums(sums: Mapping) -> dict:
    """``episode_terms`` from (summed) ``episode_term_sums``."""
    terms: dict = {}
    for k, parts in sums.items():
        entry = {}
        categories, total = parts["within"]
        if round(categories) > 0:
            entry["episode_within_var"] = max(float(total / categories), 1e-3)
        categories, total = parts["offset"]
        if round(categories) > 0:
            entry["loo_offset"] = float(total / categories)
        terms[int(k)] = entry
    return terms


def episode_terms(episodes: Sequence[NormalEpisode]) -> dict:
    """Per K, what only whole episodes show (each category weighs the same): ``episode_within_var``, the
    spread of normal log T around its episode's mean (one support's images), and ``loo_offset``, how far
    new normal images' mean log T lies from the support's own leave-one-out log statistics (K >= 2)."""
    return terms_from_sums(episode_term_sums(episodes))


def episode_prior(episodes: Sequence[NormalEpisode], strength: float = 4.0) -> NormalityPrior:
    """The ``NormalityPrior`` of these episodes, with their ``episode_terms``."""
    return NormalityPrior.estimate(log_statistics(episodes), strength).with_terms(episode_terms(episodes))


def rule_candidates(shots: int, strengths: Sequence[float] = RULE_STRENGTHS) -> list[dict]:
    """Every rule ``choose_rules`` scores for K = ``shots`` (``NormalityPrior.rule`` says what each field does)."""
    default = NormalityPrior({shots: {}}).rule(shots)
    candidates = [
        {"use_covariate": cov, "strength": float(s), "within": within, "loo_shift": shift}
        for cov in (False, True)
        for within in ("category", "episode")
        for shift in ((False, True) if shots >= 2 else (False,))
        for s in strengths
    ]
    # the default first: where candidates tie (a fold too small to fit the covariate's line), it stays
    return sorted(candidates, key=lambda c: c != default)


def score_rules(
    prior: NormalityPrior, held_out: Sequence[NormalEpisode], shots: int, candidates: Sequence[dict], target_fpr: float
) -> np.ndarray:
    """(len(candidates), 2): each rule's mean pinball loss and mean FPR at ``target_fpr`` over the ``held_out``
    episodes of K = ``shots``, each calibrated on ``prior`` (which must not have seen their category) through
    ``NormalityPrior.site_calibration``, the path a site takes, and scored on its own normal query images."""
    out = np.zeros((len(candidates), 2))
    for i, rule in enumerate(candidates):
        ruled = prior.with_rules({shots: rule})
        losses, rates = [], []
        for ep in held_out:
            cal = ruled.site_calibration(shots, ep.covariate, ep.loo_statistics)
            log_threshold = math.log(cal.threshold(target_fpr))
            queries = np.asarray(ep.query_log_statistics, dtype=np.float64)
            losses.append(pinball_loss(log_threshold, queries, target_fpr))
            rates.append(float(np.mean(queries > log_threshold)))
        out[i] = (np.mean(losses), np.mean(rates))
    return out


def pick_rule(
    candidates: Sequence[dict], scores: np.ndarray, target_fpr: float, categories: int, episodes: int
) -> dict:
    """The candidate of lowest mean pinball loss (``scores``: mean loss and FPR over the held-out categories),
    with every candidate's scores."""
    scored = [{**rule, "pinball": float(loss), "fpr": float(fpr)} for rule, (loss, fpr) in zip(candidates, scores)]
    best = min(scored, key=lambda c: c["pinball"])
    return {
        **best,
        "target_fpr": float(target_fpr),
        "categories": int(categories),
        "episodes": int(episodes),
        "candidates": scored,
    }


def choose_rules(
    episodes: Sequence[NormalEpisode], target_fpr: float = RULE_TARGET_FPR, strengths: Sequence[float] = RULE_STRENGTHS
) -> dict:
    """Per K, the calibration rule (``rule_candidates``) with the lowest pinball loss at ``target_fpr`` when
    each category is left out: its episodes are calibrated on the prior of the other categories' episodes
    (``episode_prior``) and scored on their own normal query images (``score_rules``; each category weighs
    the same). {K: {rule fields, "pinball", "fpr", "categories", "episodes", "candidates"}}; a K with fewer
    than three categories keeps the default rule (absent from the result)."""
    rules: dict = {}
    for k in sorted({ep.shots for ep in episodes}):
        of_k = [ep for ep in episodes if ep.shots == k]
        categories = sorted({ep.category for ep in of_k})
        if len(categories) < 3:
            continue
        candidates = rule_candidates(k, strengths)
        scores = [
            score_rules(
                episode_prior([ep for ep in of_k if ep.category != held]),
                [ep for ep in of_k if ep.category == held],
                k,
                candidates,
                target_fpr,
            )
            for held in categories
        ]
        rules[k] = pick_rule(candidates, np.mean(scores, axis=0), target_fpr, len(categories), len(of_k))
    return rules
