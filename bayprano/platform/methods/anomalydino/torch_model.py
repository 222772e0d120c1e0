"""AnomalyDINO-style nearest neighbour (Damm et al., 2025), pure torch: the cosine distance of each query
patch to its nearest patch among all support patches, no coreset.

Each patch vector is L2-normalised as a whole. For DINOv2 the taps are already normalised one by one, so
the whole-vector cosine is the mean of the taps' cosines; for CNN features it is the plain cosine.
The query is scored in chunks of ``chunk`` patches, so memory stays (chunk x support patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def patch_rows(features: Tensor) -> Tensor:
    """(B, C, h, w) -> (B * h * w, C), each row L2-normalised."""
    return F.normalize(features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1]), dim=1)


class CosineNearestPatch:
    def __init__(self, chunk: int = 4096):
        self.chunk = chunk

    def fit(self, features: Tensor) -> "CosineNearestPatch":
        self.bank_ = patch_rows(features)
        return self

    def patch_scores(self, features: Tensor) -> Tensor:
        b, _, h, w = features.shape
        q = patch_rows(features)
        bank_t = self.bank_.t()
        best = torch.cat([(q[i : i + self.chunk] @ bank_t).amax(1) for i in range(0, q.shape[0], self.chunk)])
        return (1.0 - best).clamp_min(0.0).reshape(b, h, w)
