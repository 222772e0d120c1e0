"""Synthetic anomalies made from normal images, for the positive query images of meta-training episodes.

No real defect is ever used in training: each episode's anomalous queries are normal images with one
of these injected, and the returned mask is the pixel-level target. Four kinds, after CutPaste and
DRAEM, chosen to cover what real defects look like (thin cracks, tiny holes, foreign material, large
faint discolourations, often touching the image border):

- ``cut_paste``: a patch of the same image pasted elsewhere, optionally rotated and colour-jittered;
  the ``scar`` variant is a thin, long, rotated patch.
- ``texture_blend``: a foreign texture blended in through a thresholded fractal Perlin noise mask;
  the texture is procedural (coloured noise, stripes, checker, gradient, tint) or a region of another
  image passed as ``source``.
- ``scratch``: thin straight, curved or jagged lines, lighter or darker than the surface.
- ``blob``: an irregular hole or stain, darker or lighter, with a hard or soft edge.

Every function has the signature ``(image, rng, **params) -> (image, mask)``: ``image`` is ``uint8``
(H, W, 3) and is never modified, ``rng`` is a ``numpy.random.Generator`` (same state, same output).
The mask is exactly the set of changed pixels, ``mask == (out != image).any(-1)``, and holds at least
``min_pixels`` pixels: changes smaller than ``min_delta`` grey levels (in every channel) are reverted to
the original, an attempt that changes too little is repeated stronger, and if the last one still falls
short (a cut-paste on a flat surface) its region is shifted in brightness. On a grayscale-looking image
(all channels equal) the result stays grayscale-looking, so that colour is never a shortcut.

This module holds the registry of kinds and :class:`AnomalyInjector`; the kinds live in
``anomaly_training`` (cut_paste, texture_blend) and ``anomaly_validation`` (scratch, blob), and the
compositing they share in ``anomaly_compositing``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from bayprano.platform.data.anomaly_compositing import MIN_SIDE, check_limits, check_rng
from bayprano.platform.data.anomaly_training import TEXTURES, cut_paste, perlin_noise, texture_blend
from bayprano.platform.data.anomaly_validation import blob, scratch
from bayprano.platform.errors import ConfigError

__all__ = [
    "ANOMALIES",
    "KINDS",
    "MIN_SIDE",
    "TEXTURES",
    "TRAINING_KINDS",
    "VALIDATION_KINDS",
    "AnomalyInjector",
    "blob",
    "cut_paste",
    "perlin_noise",
    "scratch",
    "texture_blend",
]

KINDS = ("cut_paste", "texture_blend", "scratch", "blob")
# The families are split so that meta-learning is measured on defects it never saw: meta-training (train,
# evaluate's meta-training, tune, the Factory's local updates) injects only the families that ``data synth``'s
# test defects do not resemble; the families of those defects (lines, holes, stains) are kept for validation
# (the sites' validation during federated training, the meta-validation of the post-processing menu).
TRAINING_KINDS = ("cut_paste", "texture_blend")
VALIDATION_KINDS = ("scratch", "blob")

ANOMALIES: Mapping[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "cut_paste": cut_paste,
    "texture_blend": texture_blend,
    "scratch": scratch,
    "blob": blob,
}


class AnomalyInjector:
    """Picks one anomaly kind per call (by ``weights``, default uniform) and injects it; the default kinds
    are the meta-training families (``TRAINING_KINDS``).

    ``injector(image, rng, source=None) -> (image, mask)``; ``source`` (another normal image, any
    size) is passed to ``texture_blend`` only. ``min_pixels`` and ``min_delta`` are passed to every kind.
    """

    def __init__(
        self,
        kinds: Sequence[str] = TRAINING_KINDS,
        weights: Sequence[float] | None = None,
        *,
        min_pixels: int = 16,
        min_delta: int = 4,
    ) -> None:
        if isinstance(kinds, str):
            kinds = (kinds,)
        kinds = tuple(kinds)
        if not kinds:
            raise ConfigError(f"kinds: none given (valid: {', '.join(KINDS)})")
        for kind in kinds:
            if kind not in ANOMALIES:
                raise ConfigError(f"kinds: unknown anomaly kind {kind!r} (valid: {', '.join(KINDS)})")
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"kinds={list(kinds)}: each kind may appear only once")
        if weights is None:
            probs = np.full(len(kinds), 1.0 / len(kinds))
        else:
            try:
                probs = np.asarray([float(x) for x in weights], dtype=np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"weights={weights!r}: expected one number per kind") from None
            if probs.shape != (len(kinds),):
                raise ConfigError(f"weights={list(weights)}: expected {len(kinds)} numbers, one per kind")
            if not np.isfinite(probs).all() or (probs < 0).any() or probs.sum() <= 0:
                raise ConfigError(f"weights={list(weights)}: expected numbers >= 0 with a positive sum")
            probs = probs / probs.sum()
        check_limits(min_pixels, min_delta)
        self.kinds = kinds
        self.weights = tuple(float(p) for p in probs)
        self.min_pixels = int(min_pixels)
        self.min_delta = int(min_delta)
        self._cdf = np.cumsum(probs)

    def choose(self, rng: np.random.Generator) -> str:
        """The kind the next call with this generator state will inject (consumes one draw)."""
        index = int(np.searchsorted(self._cdf, rng.random() * self._cdf[-1], side="right"))
        return self.kinds[min(index, len(self.kinds) - 1)]

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        check_rng(rng)
        kind = self.choose(rng)
        params: dict[str, int | np.ndarray | None] = {"min_pixels": self.min_pixels, "min_delta": self.min_delta}
        if kind == "texture_blend":
            params["source"] = source
        return ANOMALIES[kind](image, rng, **params)

    def __repr__(self) -> str:
        return f"AnomalyInjector(kinds={self.kinds}, weights={tuple(round(w, 4) for w in self.weights)})"
