"""The inner loop of Proto-MAML in learn2learn's vocabulary: ``clone(model)`` then ``adapt(support)``.

``clone`` gives a task's copy of the head parameters; ``adapt`` takes S gradient steps on them that
lower the support's leave-one-out patch score, i.e. raise the leave-one-out predictive density of each
support image under the prototype of the others (for the Bayesian prototype its normalising constant is
left out: it rewards shrinking the embedding rather than predicting it). With one shot there is nothing
to leave out, and the support is scored in sample. First-order by default (the inner gradients are
treated as constants), second-order as an option.

``adapt_head`` is the one way to adapt a head to a support set outside meta-training (calibration,
validation, evaluation, sweeps, the site model): it adapts, detaches, and returns the fitted prototype
of the adapted support embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from bayprano.platform.model.bayes import BayesianPatchModel, Prototype


def support_loo_score(
    model: BayesianPatchModel, params: Mapping[str, Tensor], support: Tensor, positions: Tensor | None = None
) -> Tensor:
    """Mean leave-one-out patch score of the support (the inner loop's loss), over ``positions`` (flat
    indices into the grid) or every position."""
    z = model.embed(support, dict(params))
    k = z.shape[0]
    losses = []
    for i in range(k):
        rest = z if k == 1 else torch.cat([z[:i], z[i + 1 :]])
        losses.append(model.prototype(rest, positions).score(z[i : i + 1]).mean())
    return torch.stack(losses).mean()


class TaskHead:
    """A task's copy of the head parameters (learn2learn's ``clone``), changed by ``adapt``.

    The copy starts as the model's own tensors, so the outer loss differentiates through the inner
    steps into the shared initialisation.
    """

    def __init__(self, model: BayesianPatchModel, params: Mapping[str, Tensor] | None = None):
        self.model = model
        self.params = dict(params if params is not None else model.head_params())

    def adapt(
        self,
        support: Tensor,
        steps: int,
        first_order: bool = True,
        positions: Tensor | None = None,
        lr: Tensor | float | None = None,
    ) -> "TaskHead":
        lr = self.model.log_inner_lr.exp() if lr is None else lr
        for _ in range(steps):
            loss = support_loo_score(self.model, self.params, support, positions)
            names = list(self.params)
            grads = torch.autograd.grad(
                loss, [self.params[n] for n in names], create_graph=not first_order, allow_unused=True
            )
            new = {}
            for n, g in zip(names, grads):
                if g is None:
                    new[n] = self.params[n]
                    continue
                if first_order:
                    g = g.detach()
                new[n] = self.params[n] - lr * g
            self.params = new
        return self

    def embed(self, features: Tensor) -> Tensor:
        return self.model.embed(features, self.params)


def clone(model: BayesianPatchModel) -> TaskHead:
    return TaskHead(model)


@dataclass
class AdaptedHead:
    """A head adapted to one support set: detached head parameters, the support's embeddings and the
    prototype fitted on them."""

    model: BayesianPatchModel
    params: dict[str, Tensor]
    support_embeddings: Tensor  # (K, d, h, w)
    prototype: Prototype

    @torch.no_grad()
    def embed(self, features: Tensor) -> Tensor:
        return self.model.embed(features, self.params)

    @torch.no_grad()
    def distance(self, features: Tensor) -> Tensor:
        """The prototype's distance maps (B, h, w) of backbone features (B, C, h, w)."""
        return self.prototype.distance(self.embed(features))


INNER_POSITIONS_SEED = 0


def site_positions(h: int, w: int, steps: int, inner_positions: int, device=None) -> Tensor | None:
    """The patch positions a site's inner loop is evaluated on (None: every position): a fixed random subset
    of ``inner_positions`` of the h x w grid, as at meta-training, or all of them."""
    if not (steps and inner_positions and inner_positions < h * w):
        return None
    gen = torch.Generator().manual_seed(INNER_POSITIONS_SEED)
    return torch.randperm(h * w, generator=gen)[:inner_positions].to(device)


def adapt_head(model: BayesianPatchModel, support: Tensor, steps: int, positions: Tensor | None = None) -> AdaptedHead:
    """Adapt ``model``'s head to support features (K, C, h, w) with ``steps`` first-order inner steps (the
    loss over ``positions``, or every position), and fit its prototype on the adapted embeddings."""
    with torch.enable_grad():
        task = clone(model).adapt(support, steps, True, positions)
    params = {name: value.detach() for name, value in task.params.items()}
    with torch.no_grad():
        z = model.embed(support, params)
        return AdaptedHead(model, params, z, model.prototype(z))
