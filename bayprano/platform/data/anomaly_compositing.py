"""The machinery every synthetic anomaly kind (``anomalies``) shares: checked inputs, float composites
of the box an attempt changes, and the contract that the returned mask is exactly the changed pixels.

An anomaly kind is an *attempt* ``(image, rng, strength, gray) -> (box, composite, region)``;
:func:`inject` calls it with rising strengths until at least ``min_pixels`` pixels change by
``min_delta`` grey levels or more, and falls back to shifting the region's brightness.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from bayprano.platform.errors import ConfigError, DataError

MIN_SIDE = 16

_STRENGTHS = (1.0, 1.5, 2.0, 3.0)
_FORCED_DELTA = 32.0

# One attempt, from (image, rng, strength, gray): the box it changes (y0, y1, x0, x1), the float
# composite of that box, and the intended region within it.
Attempt = Callable[
    [np.ndarray, np.random.Generator, float, bool], tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]
]


def check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray):
        raise DataError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{name}: expected a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise DataError(
            f"{name}: {image.shape[1]}x{image.shape[0]} is too small, both sides must be at least {MIN_SIDE}"
        )


def check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")


def check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a pair (low, high)") from None
    if not (low <= a <= b <= high):
        raise ConfigError(f"{name}={value!r}: expected {low} <= low <= high <= {high}")
    return a, b


def _is_int(value: object, low: int, high: float) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(low <= value <= high)


def check_limits(min_pixels: int, min_delta: int, image: np.ndarray | None = None) -> None:
    if not _is_int(min_delta, 1, 64):
        raise ConfigError(f"min_delta={min_delta!r}: expected an integer from 1 to 64")
    if image is None:
        if not _is_int(min_pixels, 1, math.inf):
            raise ConfigError(f"min_pixels={min_pixels!r}: expected an integer of at least 1")
        return
    limit = image.shape[0] * image.shape[1] // 4
    if not _is_int(min_pixels, 1, limit):
        raise ConfigError(f"min_pixels={min_pixels!r}: expected an integer from 1 to {limit} (image area / 4)")


def _is_gray(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


# ------------------------------------------------------------------------------------ compositing
#
# Composites are float32, channel-first (3, h, w) and cover only the box an attempt changes: numpy is
# several times slower on a trailing axis of 3 than on whole planes, and the box is often small.

Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def bbox(region: np.ndarray) -> Box:
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    return array[box[0] : box[1], box[2] : box[3]]


def planes(image: np.ndarray, box: Box) -> np.ndarray:
    """The box of a uint8 (H, W, 3) image as float32 (3, h, w)."""
    return crop(image, box).transpose(2, 0, 1).astype(np.float32)


def _finish(
    image: np.ndarray, box: Box, composite: np.ndarray, gray: bool, min_delta: int
) -> tuple[np.ndarray, np.ndarray]:
    """Round the composite of ``box`` (overwritten) to uint8; keep changes of ``min_delta`` levels or more."""
    original = planes(image, box)
    if gray:
        original = original[:1]
        level = composite[0] + composite[1]
        level += composite[2]
        level /= np.float32(3.0)
        composite = level[None]
    np.clip(composite, 0, 255, out=composite)
    np.rint(composite, out=composite)
    composite -= original
    size = np.abs(composite[0])
    for plane in composite[1:]:
        np.maximum(size, np.abs(plane), out=size)
    changed = size >= min_delta
    composite *= changed
    composite += original
    result = composite.astype(np.uint8).transpose(1, 2, 0)
    out = image.copy()
    out[box[0] : box[1], box[2] : box[3]] = result
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[box[0] : box[1], box[2] : box[3]] = changed
    return out, mask


def _forced(
    image: np.ndarray, box: Box, region: np.ndarray, rng: np.random.Generator, min_pixels: int, min_delta: int
) -> tuple[Box, np.ndarray]:
    """Shift every pixel of ``region`` (grown to ``min_pixels``) by a fixed amount away from saturation.

    A pixel brighter than mid-grey on average has a channel above 127, any other pixel has one at most
    127, so a shift of at most 127 levels changes that channel by the full shift.
    """
    h, w = image.shape[:2]
    full = np.zeros((h, w), dtype=bool)
    full[box[0] : box[1], box[2] : box[3]] = region
    if full.sum() < min_pixels:
        # A rectangle of at least min_pixels that fits: min_pixels <= h * w / 4 makes both sides fit.
        rw = min(w, max(math.ceil(math.sqrt(min_pixels)), math.ceil(min_pixels / h)))
        rh = math.ceil(min_pixels / rw)
        y, x = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        full[y : y + rh, x : x + rw] = True
    box = (0, h, 0, w)
    out = planes(image, box)
    shift = np.where(out.mean(axis=0) > 127.5, -1.0, 1.0).astype(np.float32)
    shift *= np.float32(max(_FORCED_DELTA, float(min_delta))) * full
    out += shift
    return box, out


def inject(
    image: np.ndarray, rng: np.random.Generator, attempt: Attempt, min_pixels: int, min_delta: int
) -> tuple[np.ndarray, np.ndarray]:
    check_image(image)
    check_rng(rng)
    check_limits(min_pixels, min_delta, image)
    gray = _is_gray(image)
    for strength in _STRENGTHS:
        box, composite, region = attempt(image, rng, strength, gray)
        out, mask = _finish(image, box, composite, gray, min_delta)
        if mask.sum() >= min_pixels:
            return out, mask
    box, composite = _forced(image, box, region, rng, min_pixels, min_delta)
    return _finish(image, box, composite, gray, min_delta)


def blend(base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base * (1 - alpha) + target * alpha``, computed in ``target``: (3, h, w) arrays, alpha (h, w)."""
    target -= base
    target *= alpha
    target += base
    return target


def colour(rng: np.random.Generator, low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """A random (3, 1, 1) float32 colour (or gain, or offset), broadcastable against (3, h, w)."""
    return rng.uniform(low, high, (3, 1, 1)).astype(np.float32)


def resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 image or a float32 (H, W) array."""
    if array.shape[:2] == (height, width):
        return array
    return np.array(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR), dtype=array.dtype)
