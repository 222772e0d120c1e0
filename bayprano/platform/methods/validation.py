"""Validation over the method registry: fit each named method on support features, score query features,
and report image AUROC, pooled over the given tasks (a site's held-out categories)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.methods.base import METHODS, MethodContext, fitted_scores, get_method
from bayprano.platform.metrics import image_auroc
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration


def model_checkpoint(
    model: BayesianPatchModel,
    backbone: str,
    fingerprint: str,
    image_size: int,
    grid: tuple[int, int],
    inner_steps: int,
    inner_positions: int | None = None,
) -> MetaCheckpoint:
    """A meta-checkpoint around a model in training (no learned calibration prior: the analytic one), so
    that it adapts the way a saved checkpoint does; ``inner_positions`` None keeps the default subset."""
    meta_config = {"inner_steps": inner_steps}
    if inner_positions is not None:
        meta_config["inner_positions"] = inner_positions
    return MetaCheckpoint(
        model,
        backbone,
        fingerprint,
        image_size,
        Calibration.from_prior(model.dim, grid[0] * grid[1] / 9, 1.0),
        meta_config=meta_config,
    )


def validation_aurocs(
    context: MethodContext, tasks: Sequence[tuple[Tensor, Tensor, np.ndarray]], methods: Sequence[str] | None = None
) -> dict[str, float]:
    """{method: image AUROC} of each method (default: every registered one the context can build) over ``tasks``, each a
    (support features, query features, query labels) triple; the query scores of all tasks are pooled.
    NaN where there is nothing to score."""
    out = {}
    if methods is None:
        methods = [name for name, spec in METHODS.items() if context.can_build(spec)]
    for name in methods:
        spec = get_method(name)
        labels, scores = [], []
        for support, query, query_labels in tasks:
            image, _ = fitted_scores(spec.build(context), support, query)
            scores.extend(np.asarray(image).tolist())
            labels.extend(np.asarray(query_labels).tolist())
        out[name] = float(image_auroc(np.array(labels), np.array(scores))) if labels else math.nan
    return out


def model_context(checkpoint: MetaCheckpoint, inner_steps: int) -> MethodContext:
    """A context whose only checkpoint is ``checkpoint`` (as the meta-trained Bayesian model): for methods
    on the meta-trained model or on the raw features."""

    def provide(kind: str) -> MetaCheckpoint:
        if kind != "niw":
            raise ConfigError(f"validation has only the model being trained, not a {kind!r} checkpoint")
        return checkpoint

    return MethodContext(inner_steps, checkpoints=provide, kinds=("niw",))
