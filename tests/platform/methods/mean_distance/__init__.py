"""A tiny method, to show that one folder and one registry line add a method: the distance of each patch
to the support's mean feature at its position."""

from __future__ import annotations

import torch
from torch import Tensor

from bayprano.platform.methods import PatchScoreMethod, register_method

NAME = "mean-distance"


class MeanDistance:
    def fit(self, features: Tensor) -> "MeanDistance":
        self.mean_ = features.float().mean(0)
        return self

    def patch_scores(self, features: Tensor) -> Tensor:
        return torch.linalg.vector_norm(features.float() - self.mean_, dim=1)


def register() -> None:
    register_method(NAME, lambda context: PatchScoreMethod(MeanDistance), summary="distance to the mean per position")
