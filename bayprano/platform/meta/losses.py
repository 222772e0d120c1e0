"""The outer loss's terms: balanced binary cross-entropy and the supervised contrastive regulariser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def supervised_contrastive(embeddings: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al.) over (N, d) embeddings with integer labels."""
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.t() / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    counts = positive.sum(1)
    keep = counts > 0
    if not bool(keep.any()):
        return embeddings.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1)
    return -(pos_log_prob[keep] / counts[keep]).mean()


def balanced_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with the positive and the negative targets' means weighted equally."""
    pos = targets > 0.5
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    parts = [loss[pos].mean()] if bool(pos.any()) else []
    if bool((~pos).any()):
        parts.append(loss[~pos].mean())
    return torch.stack(parts).mean()
