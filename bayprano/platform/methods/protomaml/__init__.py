"""Deterministic Proto-MAML, the control for the Bayesian prototype: the meta-trained head adapted to the
support, a Euclidean prototype (``bayprano.platform.model.bayes.EuclideanPrototype``, its torch model),
the maximum patch distance as the image score and the largest leave-one-out support score (under the
head adapted to the whole support) as the threshold."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.meta.inner import AdaptedHead, adapt_head
from bayprano.platform.methods.anomaly_map import image_scores
from bayprano.platform.methods.base import MethodContext, MethodScores, register_method


class ProtoMAMLMethod:
    def __init__(self, checkpoint: MetaCheckpoint, steps: int):
        self.model, self.steps = checkpoint.model, steps

    def fit(self, support: Tensor) -> "ProtoMAMLMethod":
        self.adapted_: AdaptedHead = adapt_head(self.model, support, self.steps)
        return self

    @torch.no_grad()
    def score(self, features: Tensor) -> MethodScores:
        patches = self.adapted_.distance(features)
        return MethodScores(image_scores(patches).numpy(), patches)

    @torch.no_grad()
    def threshold(self, target_fpr: float) -> float:
        z = self.adapted_.support_embeddings
        if z.shape[0] < 2:
            return math.nan
        return float(
            max(
                image_scores(self.model.prototype(torch.cat([z[:i], z[i + 1 :]])).distance(z[i : i + 1]))[0]
                for i in range(z.shape[0])
            )
        )

    def calibration_info(self) -> dict | None:
        return None


def build(context: MethodContext) -> ProtoMAMLMethod:
    return ProtoMAMLMethod(context.checkpoint("euclidean"), context.inner_steps)


register_method(
    "protomaml", build, checkpoint="euclidean", summary="meta-trained head with a deterministic Euclidean prototype"
)
