"""The method protocol and the registry that evaluate, the demo, the sites' validation and sweeps loop over.

A method is fitted on the support's backbone features and scores query features:

- ``fit(support)`` on (K, C, h, w) features returns self; ``fit(support, groups=groups)`` on the features of
  augmented views, ``groups[v]`` numbering the original image of view ``v`` (0..K-1, each original's
  first view the image itself), so that a leave-one-out threshold leaves every view of an image out;
- ``score(features)`` on (B, C, h, w) returns ``MethodScores``: one score per image and the patch
  scores (B, h, w) that the harness turns into anomaly maps (``anomaly_map``);
- ``threshold(target_fpr)``: the image-score threshold the support gives (NaN when it cannot tell, e.g.
  leave-one-out with one shot);
- ``calibration_info()``: what the threshold came from, or None;
- ``decisions(image_scores, threshold)``: ``normal``, ``anomalous`` or ``review`` per image at that
  threshold (a method without an uncertainty band never sends an image to review; see
  ``threshold_decisions``), or None when the threshold is not finite.

A ``MethodSpec`` names a method and says how to build one from a ``MethodContext`` (the inner steps, the
target false-positive rate, and the checkpoints a fold provides). ``checkpoint`` is the kind of
meta-checkpoint the method needs: ``"niw"`` (the meta-trained Bayesian model), ``"euclidean"`` (the
meta-trained deterministic Proto-MAML control), ``"frozen"`` (the Bayesian model at its initialisation) or
None (the raw backbone features). Adding a method is one ``register_method`` call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from bayprano.platform.errors import ConfigError
from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.methods.anomaly_map import image_scores

CHECKPOINT_KINDS = ("niw", "euclidean", "frozen")


@dataclass
class MethodScores:
    image: np.ndarray  # (B,) image scores
    patches: Tensor  # (B, h, w) patch scores on the feature grid


class Method(Protocol):
    def fit(self, support: Tensor, groups: Sequence[int] | None = None) -> "Method": ...

    def score(self, features: Tensor) -> MethodScores: ...

    def threshold(self, target_fpr: float) -> float: ...

    def calibration_info(self) -> dict | None: ...

    def decisions(self, image_scores: np.ndarray, threshold: float) -> list[str] | None: ...


def threshold_decisions(image_scores, threshold: float) -> list[str] | None:
    """``anomalous`` above the threshold, ``normal`` at or below it (the convention of the measured FPR),
    ``review`` for a score that is not a number; None when the threshold is not finite."""
    if not math.isfinite(threshold):
        return None
    return [
        "review" if math.isnan(s) else "anomalous" if s > threshold else "normal"
        for s in np.asarray(image_scores, dtype=np.float64).tolist()
    ]


@dataclass
class MethodContext:
    """What a fold (or a site) gives a method to build on."""

    inner_steps: int = 1
    target_fpr: float = 0.05
    checkpoints: Callable[[str], MetaCheckpoint] | None = None  # kind -> checkpoint
    extractor: object | None = None  # the backbone, recorded in site models
    kinds: tuple[str, ...] = CHECKPOINT_KINDS  # the checkpoint kinds ``checkpoints`` can provide

    def can_build(self, spec: "MethodSpec") -> bool:
        return spec.checkpoint is None or (self.checkpoints is not None and spec.checkpoint in self.kinds)

    def checkpoint(self, kind: str) -> MetaCheckpoint:
        if self.checkpoints is None:
            raise ConfigError(f"this method needs a {kind!r} meta-checkpoint and none is available here")
        return self.checkpoints(kind)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[MethodContext], Method]
    checkpoint: str | None = None
    summary: str = ""


class MethodRegistry(Mapping[str, MethodSpec]):
    """Registered methods by name, in registration order."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}

    def __getitem__(self, name: str) -> MethodSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"MethodRegistry({', '.join(self._specs)})"


METHODS = MethodRegistry()


def register_method(
    name: str,
    build: Callable[[MethodContext], Method],
    checkpoint: str | None = None,
    summary: str = "",
    replace: bool = False,
) -> MethodSpec:
    """Register a method under ``name``; every loop over ``METHODS`` picks it up."""
    if not name or not isinstance(name, str) or "," in name:
        raise ConfigError(f"method name must be a non-empty string without commas, got {name!r}")
    if checkpoint is not None and checkpoint not in CHECKPOINT_KINDS:
        raise ConfigError(
            f"method {name!r}: checkpoint must be one of {', '.join(CHECKPOINT_KINDS)} or None, got {checkpoint!r}"
        )
    if name in METHODS and not replace:
        raise ConfigError(f"method {name!r} is already registered")
    spec = MethodSpec(name, build, checkpoint, summary)
    METHODS._specs[name] = spec
    return spec


def unregister_method(name: str) -> None:
    METHODS._specs.pop(name, None)


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (valid: {', '.join(METHODS)})") from None


def originals(groups: Sequence[int] | None, views: int) -> list[int]:
    """The view index of each original support image (its first view); every view with ``groups`` None."""
    if groups is None:
        return list(range(views))
    if len(groups) != views:
        raise ConfigError(f"support groups: {len(groups)} given for {views} views")
    first: dict[int, int] = {}
    for v, g in enumerate(groups):
        first.setdefault(int(g), v)
    if sorted(first) != list(range(len(first))):
        raise ConfigError(f"support groups must number the originals 0..K-1, got {sorted(first)}")
    return [first[i] for i in range(len(first))]


def group_index(groups: Sequence[int] | None, views: int) -> Tensor:
    """Each view's original as a tensor, to select the views of the others (``index != i``)."""
    return torch.as_tensor(list(groups) if groups is not None else range(views))


def loo_threshold(make: Callable[[], Method], support: Tensor, groups: Sequence[int] | None = None) -> float:
    """The largest leave-one-out image score of the support: each original image scored by a method fitted
    on the others' views (NaN with one image)."""
    firsts = originals(groups, support.shape[0])
    if len(firsts) < 2:
        return math.nan
    group_of = group_index(groups, support.shape[0])
    scores = []
    for i, v in enumerate(firsts):
        rest = support[group_of != i]
        rest_groups = None if groups is None else _renumbered(group_of[group_of != i])
        scores.append(fit_on(make(), rest, rest_groups).score(support[v : v + 1]).image[0])
    return float(max(scores))


def _renumbered(groups: Tensor) -> list[int]:
    numbers = {g: i for i, g in enumerate(dict.fromkeys(groups.tolist()))}
    return [numbers[g] for g in groups.tolist()]


def fit_on(method: Method, support: Tensor, groups: Sequence[int] | None = None) -> Method:
    """``method.fit(support)``, passing ``groups`` only when there are views (methods that never see
    augmented supports need not take them)."""
    return method.fit(support) if groups is None else method.fit(support, groups=groups)


def fitted_scores(method: Method, support: Tensor, query: Tensor) -> tuple[np.ndarray, float]:
    """Fit ``method`` on ``support``, score ``query``: image scores and the seconds the fit took."""
    t0 = time.perf_counter()
    method.fit(support)
    seconds = time.perf_counter() - t0
    return method.score(query).image, seconds


class PatchModel(Protocol):
    def fit(self, features: Tensor) -> "PatchModel": ...

    def patch_scores(self, features: Tensor) -> Tensor: ...


class PatchScoreMethod:
    """A method from a torch model of patch scores on the raw backbone features (``fit`` and
    ``patch_scores``): the image score is the maximum patch score, the threshold the largest
    leave-one-out support score (no calibration)."""

    def __init__(self, make_model: Callable[[], PatchModel]):
        self.make_model = make_model

    def fit(self, support: Tensor, groups: Sequence[int] | None = None) -> "PatchScoreMethod":
        originals(groups, support.shape[0])
        self.model_ = self.make_model().fit(support)
        self.support_, self.groups_ = support, None if groups is None else list(groups)
        return self

    def score(self, features: Tensor) -> MethodScores:
        patches = self.model_.patch_scores(features)
        return MethodScores(image_scores(patches).numpy(), patches)

    def threshold(self, target_fpr: float) -> float:
        return loo_threshold(lambda: PatchScoreMethod(self.make_model), self.support_, self.groups_)

    def calibration_info(self) -> dict | None:
        return None

    def decisions(self, image_scores: np.ndarray, threshold: float) -> list[str] | None:
        return threshold_decisions(image_scores, threshold)
