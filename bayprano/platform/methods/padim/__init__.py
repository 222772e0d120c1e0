"""The padim baseline on the raw backbone features: its torch model (torch_model.py) behind the method protocol."""

from __future__ import annotations

from bayprano.platform.methods.base import MethodContext, PatchScoreMethod, register_method
from bayprano.platform.methods.padim.torch_model import PaDiM


def build(context: MethodContext) -> PatchScoreMethod:
    return PatchScoreMethod(PaDiM)


register_method("padim", build, summary="per-position Gaussian over random channels")
