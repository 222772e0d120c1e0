"""Image scores of methods without a statistic of their own: the maximum patch score."""

from __future__ import annotations

from torch import Tensor


def image_scores(patch_scores: Tensor) -> Tensor:
    """(B, h, w) patch scores -> (B,) image scores, the maximum over patches."""
    return patch_scores.flatten(1).amax(1)
