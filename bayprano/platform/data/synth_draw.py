"""Drawing primitives of the synthetic image generator (``synth``): smooth noise, anti-aliased strokes
and discs, blending, the scene a renderer returns and the camera that turns it into a uint8 image.

Shared by the category renderers (``synth_textures``, ``synth_objects``) and the surface defects
(``synth_defects``); nothing here knows about categories.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import special

_F = np.float32


@functools.lru_cache(maxsize=16)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (Y, X), float32, shape (size, size)."""
    y, x = np.mgrid[0:size, 0:size].astype(_F)
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


@functools.lru_cache(maxsize=64)
def _spline_weights(n_out: int, cells: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Cubic B-spline interpolation from ``cells + 3`` control values to ``n_out`` samples: the four
    control indices and weights of each sample, and the mean sum of squared weights (the variance of
    the result for unit white control values)."""
    t = 1.0 + (np.arange(n_out) + 0.5) * cells / n_out
    i0 = np.floor(t).astype(np.int64)
    f = t - i0
    w = np.stack([(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6])
    idx = np.stack([i0 - 1 + k for k in range(4)])
    w32 = w.astype(_F)
    idx.setflags(write=False)
    w32.setflags(write=False)
    return idx, w32, float((w**2).sum(0).mean())


def smooth_noise(rng: np.random.Generator, size: int, cells_y: float, cells_x: float | None = None) -> np.ndarray:
    """Smooth Gaussian noise with unit variance; ``cells`` is the number of features across the image
    (few cells: slow variation; anisotropic when the two counts differ)."""
    cy = max(1, int(round(cells_y)))
    cx = cy if cells_x is None else max(1, int(round(cells_x)))
    iy, wy, vy = _spline_weights(size, cy)
    ix, wx, vx = _spline_weights(size, cx)
    g = rng.standard_normal((cy + 3, cx + 3), dtype=_F)
    # separable and sparse (four taps): gathers instead of a matrix product, which stays fast when
    # a multithreaded BLAS competes with other processes for the cores
    rows = sum(wy[k][:, None] * g[iy[k]] for k in range(4))
    out = sum(rows[:, ix[k]] * wx[k] for k in range(4))
    out *= _F(1.0 / np.sqrt(vy * vx))
    return out


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def rgb(*c: float) -> np.ndarray:
    return np.array(c, _F)


def blend(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    """In place: img = img * (1 - alpha) + color * alpha, ``color`` an RGB triple or an image."""
    a = alpha[..., None]
    img += a * (color - img)


def resample_polyline(points: np.ndarray, max_step: float) -> np.ndarray:
    """The polyline resampled so that no segment is longer than ``max_step`` pixels."""
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:]):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / max_step)))
        t = (np.arange(1, n + 1) / n)[:, None]
        out.append(a + (b - a) * t)
    return np.concatenate(out).astype(np.float64)


def stroke_distance(points: np.ndarray, size: int, pad: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each pixel to a polyline (x, y points), and the position along it (0..1) of the
    nearest point. Pixels farther than ``pad`` from every segment get a large distance."""
    d2 = np.full((size, size), 1e12, _F)
    along = np.zeros((size, size), _F)
    n = len(points) - 1
    for k in range(n):
        (ax, ay), (bx, by) = points[k], points[k + 1]
        x0, x1 = max(0, int(np.floor(min(ax, bx) - pad))), min(size, int(np.ceil(max(ax, bx) + pad)) + 1)
        y0, y1 = max(0, int(np.floor(min(ay, by) - pad))), min(size, int(np.ceil(max(ay, by) + pad)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1, dtype=_F)[None, :]
        ys = np.arange(y0, y1, dtype=_F)[:, None]
        abx, aby = bx - ax, by - ay
        t = np.clip(((xs - ax) * abx + (ys - ay) * aby) / (abx * abx + aby * aby + 1e-9), 0, 1)
        dd = (xs - ax - t * abx) ** 2 + (ys - ay - t * aby) ** 2
        win = d2[y0:y1, x0:x1]
        closer = dd < win
        win[closer] = dd[closer]
        along[y0:y1, x0:x1][closer] = ((k + t) / n)[closer]
    return np.sqrt(d2), along


def radial_shape(rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, wobble: float) -> np.ndarray:
    """exp of a few random angular harmonics: a factor that makes a disc irregular."""
    phi = np.arctan2(dy, dx)
    out = np.zeros_like(dx)
    for k in (2, 3, 5):
        out += rng.normal(0, wobble / k**0.5) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.exp(out)


def coverage(signed_inside: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(signed_inside + 0.5, 0, 1)


# --------------------------------------------------------------------------------------------------
# scenes: a rendered reflectance image before lighting and sensor noise


@dataclass
class Scene:
    image: np.ndarray  # float32 (H, W, 3), about 0..1
    support: np.ndarray  # bool (H, W): where surface defects may be placed
    mask: np.ndarray | None = None  # set by renderers that draw a structural defect themselves


# Standard normal quantiles at 256 levels: sensor noise from random bytes, several times faster than
# drawing Gaussians and indistinguishable at the noise levels used.
_GAUSS_256 = special.ndtri((np.arange(256) + 0.5) / 256).astype(_F)


def camera(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera: global gain, a lighting gradient, vignetting, a slight colour cast, sensor noise."""
    size = img.shape[0]
    y, x = pixel_grid(size)
    x = x * _F(2.0 / size) - 1
    y = y * _F(2.0 / size) - 1
    gain = 1.0 + 0.03 * rng.standard_normal()
    ang = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.0, 0.06)
    cx, cy = (float(v) for v in rng.normal(0, 0.2, 2))
    vig = rng.uniform(0.03, 0.10)
    field = (1 + slope * (np.cos(ang) * x + np.sin(ang) * y)) * (1 - vig * 0.5 * ((x - cx) ** 2 + (y - cy) ** 2))
    cast = (gain * (1 + rng.normal(0, 0.006, 3))).astype(_F)
    out = img * field[..., None] * cast
    sigma = rng.uniform(0.006, 0.016)
    noise = _GAUSS_256[np.frombuffer(rng.bytes(out.size), np.uint8).reshape(out.shape)]
    out += _F(sigma) * (0.5 + 0.5 * np.sqrt(np.clip(out, 0, 1))) * noise
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def everywhere(size: int) -> np.ndarray:
    return np.ones((size, size), bool)


def mask_or_anchor(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    """``mask``, with the pixel at (x, y) set when it is empty, so that every defect has a mask."""
    if not mask.any():
        size = mask.shape[0]
        mask[int(np.clip(round(y), 0, size - 1)), int(np.clip(round(x), 0, size - 1))] = True
    return mask
