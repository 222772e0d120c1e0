"""The patchcore baseline on the raw backbone features: its torch model (torch_model.py) behind the method protocol."""

from __future__ import annotations

from bayprano.platform.methods.base import MethodContext, PatchScoreMethod, register_method
from bayprano.platform.methods.patchcore.torch_model import PatchCore


def build(context: MethodContext) -> PatchScoreMethod:
    return PatchScoreMethod(PatchCore)


register_method("patchcore", build, summary="nearest support patch (memory bank, coreset)")
