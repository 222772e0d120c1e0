"""The anomalydino baseline: training-free cosine nearest neighbour of each query patch among all support
patches, on the raw backbone features (torch_model.py), behind the method protocol."""

from __future__ import annotations

from bayprano.platform.methods.anomalydino.torch_model import CosineNearestPatch
from bayprano.platform.methods.base import MethodContext, PatchScoreMethod, register_method


def build(context: MethodContext) -> PatchScoreMethod:
    return PatchScoreMethod(CosineNearestPatch)


register_method("anomalydino", build, summary="cosine nearest neighbour over all support patches (training-free)")
