"""Deterministic Proto-MAML, the control for the Bayesian prototype: the meta-trained head adapted to the
support, a Euclidean prototype (``bayprano.platform.model.bayes.EuclideanPrototype``, its torch model),
the maximum patch distance as the image score and the largest leave-one-out support score (under the
head adapted to the whole support) as the threshold."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.meta.inner import AdaptedHead, adapt_head
from bayprano.platform.methods.anomaly_map import image_scores
from bayprano.platform.methods.base import (
    MethodContext,
    MethodScores,
    group_index,
    originals,
    register_method,
    threshold_decisions,
)
from bayprano.platform.model.site_support import INNER_VIEWS, inner_views


class ProtoMAMLMethod:
    def __init__(self, checkpoint: MetaCheckpoint, steps: int):
        self.model, self.steps = checkpoint.model, steps

    def fit(self, support: Tensor, groups: Sequence[int] | None = None) -> "ProtoMAMLMethod":
        self.firsts_ = originals(groups, support.shape[0])
        self.groups_ = group_index(groups, support.shape[0])
        inner = None if groups is None else inner_views(groups, max(INNER_VIEWS, len(self.firsts_)))
        adapted = adapt_head(self.model, support if inner is None else support[inner], self.steps)
        if inner is not None:  # the head adapts on a spread of the views, the prototype is fitted on all
            z = adapted.embed(support)
            adapted = AdaptedHead(self.model, adapted.params, z, self.model.prototype(z))
        self.adapted_: AdaptedHead = adapted
        return self

    @torch.no_grad()
    def score(self, features: Tensor) -> MethodScores:
        patches = self.adapted_.distance(features)
        return MethodScores(image_scores(patches).numpy(), patches)

    @torch.no_grad()
    def threshold(self, target_fpr: float) -> float:
        z = self.adapted_.support_embeddings
        if len(self.firsts_) < 2:
            return math.nan
        return float(
            max(
                image_scores(self.model.prototype(z[self.groups_ != i]).distance(z[v : v + 1]))[0]
                for i, v in enumerate(self.firsts_)
            )
        )

    def calibration_info(self) -> dict | None:
        return None

    def decisions(self, image_scores: np.ndarray, threshold: float) -> list[str] | None:
        return threshold_decisions(image_scores, threshold)


def build(context: MethodContext) -> ProtoMAMLMethod:
    return ProtoMAMLMethod(context.checkpoint("euclidean"), context.inner_steps)


register_method(
    "protomaml", build, checkpoint="euclidean", summary="meta-trained head with a deterministic Euclidean prototype"
)
