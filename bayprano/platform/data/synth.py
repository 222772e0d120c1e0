"""Synthetic industrial inspection images, written in the MVTec AD folder layout.

A stand-in for real inspection data when none can be shipped: tests, demos, benchmarks and the
federated simulations run on it. Eight product categories, half textures (woven fabric, brushed
metal, wood grain, ceramic tiles) and half objects (a bottle mouth seen from above, a screw in any
pose, a printed circuit board, a hex nut). Good images of one category are the same product under
varying lighting, pose, texture phase and sensor noise. Defective images carry one defect with a
pixel mask; a severity drawn per image runs from faint and small (hairline cracks, pin holes, large
low-contrast discolourations, some cut by the image border) to obvious.

    <out>/<category>/train/good/000.png
    <out>/<category>/test/good/000.png
    <out>/<category>/test/<defect>/000.png
    <out>/<category>/ground_truth/<defect>/000_mask.png
    <out>/synth.json

Every image comes from its own random stream, seeded by (seed, category, split, index), so the files
are byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import functools
import io
import numbers
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage, special

from bayprano.platform.data.imageio import encode_png
from bayprano.platform.data.mvtec import GOOD
from bayprano.platform.errors import ConfigError
from bayprano.platform.fileio import atomic_write_json

GENERATOR_VERSION = 1
MIN_SIZE = 64
MAX_SIZE = 1024

_F = np.float32
_TRAIN, _TEST_GOOD, _DEFECT_BASE = 0, 1, 2  # split codes of the per-image seed


# --------------------------------------------------------------------------------------------------
# numeric helpers


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _noise(rng: np.random.Generator, size: int, cells_y: float, cells_x: float | None = None) -> np.ndarray:
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


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0, 1)
    return t * t * (3 - 2 * t)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, _F)


def _blend(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> None:
    """In place: img = img * (1 - alpha) + color * alpha, ``color`` an RGB triple or an image."""
    a = alpha[..., None]
    img += a * (color - img)


def _polyline(points: np.ndarray, max_step: float) -> np.ndarray:
    """The polyline resampled so that no segment is longer than ``max_step`` pixels."""
    out = [points[:1]]
    for a, b in zip(points[:-1], points[1:]):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / max_step)))
        t = (np.arange(1, n + 1) / n)[:, None]
        out.append(a + (b - a) * t)
    return np.concatenate(out).astype(np.float64)


def _stroke(points: np.ndarray, size: int, pad: float) -> tuple[np.ndarray, np.ndarray]:
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


def _radial_shape(rng: np.random.Generator, dx: np.ndarray, dy: np.ndarray, wobble: float) -> np.ndarray:
    """exp of a few random angular harmonics: a factor that makes a disc irregular."""
    phi = np.arctan2(dy, dx)
    out = np.zeros_like(dx)
    for k in (2, 3, 5):
        out += rng.normal(0, wobble / k**0.5) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.exp(out)


def _aa(signed_inside: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive inside)."""
    return np.clip(signed_inside + 0.5, 0, 1)


# --------------------------------------------------------------------------------------------------
# scenes: a rendered reflectance image before lighting and sensor noise


@dataclass
class _Scene:
    image: np.ndarray  # float32 (H, W, 3), about 0..1
    support: np.ndarray  # bool (H, W): where surface defects may be placed
    mask: np.ndarray | None = None  # set by renderers that draw a structural defect themselves


# Standard normal quantiles at 256 levels: sensor noise from random bytes, several times faster than
# drawing Gaussians and indistinguishable at the noise levels used.
_GAUSS_256 = special.ndtri((np.arange(256) + 0.5) / 256).astype(_F)


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera: global gain, a lighting gradient, vignetting, a slight colour cast, sensor noise."""
    size = img.shape[0]
    y, x = _grid(size)
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


def _everywhere(size: int) -> np.ndarray:
    return np.ones((size, size), bool)


def _render_fabric(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    period = 10.0 * size / 256 * (1 + 0.01 * rng.standard_normal())
    th = 0.012 * rng.standard_normal()
    c, s = np.cos(th), np.sin(th)
    u = (c * x + s * y) / _F(period) + _F(rng.uniform(0, 2))
    v = (-s * x + c * y) / _F(period) + _F(rng.uniform(0, 2))
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    warp_on_top = np.mod(iu + iv, 2) < 0.5  # plain weave: warp and weft alternate over and under
    warp_tab = (1 + 0.06 * rng.standard_normal(64)).astype(_F)
    weft_tab = (1 + 0.06 * rng.standard_normal(64)).astype(_F)
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    h_warp = np.sqrt(su) * (0.72 + 0.28 * sv) * warp_tab[np.mod(iu, 64).astype(np.int64)]
    h_weft = np.sqrt(sv) * (0.72 + 0.28 * su) * weft_tab[np.mod(iv, 64).astype(np.int64)]
    fib_warp = _noise(rng, size, size / 8, size / 1.2)
    fib_weft = _noise(rng, size, size / 1.2, size / 8)
    h = np.where(warp_on_top, h_warp * (1 + 0.10 * fib_warp), h_weft * (1 + 0.10 * fib_weft))
    shade = (0.30 + 0.80 * h) * (1 + 0.03 * _noise(rng, size, 4))
    jitter = (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    warp_col = _rgb(0.60, 0.53, 0.42) * jitter
    weft_col = _rgb(0.68, 0.62, 0.50) * jitter
    img = np.where(warp_on_top[..., None], warp_col, weft_col) * shade[..., None]
    return _Scene(img.astype(_F), _everywhere(size))


def _render_metal(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    _, x = _grid(size)
    fine = _noise(rng, size, size / 1.1, 3)
    medium = _noise(rng, size, size / 6, 2)
    coarse = _noise(rng, size, 3)
    centre, width = rng.uniform(0.25, 0.75) * size, 0.22 * size
    sheen = rng.uniform(0.05, 0.12) * np.exp(-(((x - centre) / width) ** 2))
    v = 0.55 + 0.045 * fine + 0.025 * medium + 0.03 * coarse + sheen
    tint = _rgb(0.93, 0.95, 1.0) * (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    return _Scene((v[..., None] * tint).astype(_F), _everywhere(size))


def _render_wood(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    # A plank sawn along the trunk: growth rings are arcs of a far-away, stretched centre.
    cx = rng.uniform(-0.5, 1.5) * size
    cy = -rng.uniform(1.2, 2.5) * size
    r = np.sqrt(((x - cx) * 0.10) ** 2 + (y - cy) ** 2)
    ring = r / _F(0.05 * size) + 0.9 * _noise(rng, size, 2.5, 2) + 0.12 * _noise(rng, size, 24, 3)
    f = ring - np.floor(ring)
    late = _smoothstep(0.45, 0.85, f) * (1 - _smoothstep(0.9, 1.0, f))
    pores = _noise(rng, size, size / 1.5, 6)
    t = np.clip(0.2 + 0.55 * late + 0.08 * pores + 0.05 * _noise(rng, size, 5), 0, 1)
    jitter = (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    light, dark = _rgb(0.80, 0.60, 0.40) * jitter, _rgb(0.50, 0.31, 0.17) * jitter
    img = light + (dark - light) * t[..., None]
    return _Scene(img.astype(_F), _everywhere(size))


def _render_tiles(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    period = size / 3.6 * (1 + 0.005 * rng.standard_normal())
    th = 0.008 * rng.standard_normal()
    c, s = np.cos(th), np.sin(th)
    u = (c * x + s * y) / _F(period) + _F(rng.uniform(0, 1))
    v = (-s * x + c * y) / _F(period) + _F(rng.uniform(0, 1))
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    px = 1.0 / period  # one pixel in tile units
    edge = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv))
    grout_half = 0.04
    cover = _smoothstep(grout_half, grout_half + 1.5 * px, edge)
    # glazed bevel: lit from the top left
    bevel = 0.06 * (_smoothstep(0.12, grout_half, fu) + _smoothstep(0.12, grout_half, fv))
    bevel -= 0.06 * (_smoothstep(0.88, 1 - grout_half, fu) + _smoothstep(0.88, 1 - grout_half, fv))
    tab = (0.03 * rng.standard_normal(97)).astype(_F)
    tile_shift = tab[np.mod(iu * 7 + iv * 13, 97).astype(np.int64)]
    glaze = 0.015 * _noise(rng, size, 6) + 0.012 * _noise(rng, size, size / 2)
    glaze_col = _rgb(0.84, 0.81, 0.74) * (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    tile = (1 + tile_shift + glaze + bevel)[..., None] * glaze_col
    grout = (0.45 + 0.05 * _noise(rng, size, size / 3))[..., None] * _rgb(1.0, 0.97, 0.92)
    img = grout + (tile - grout) * cover[..., None]
    return _Scene(img.astype(_F), _everywhere(size))


def _render_bottle(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    cx, cy = size / 2 + rng.normal(0, 0.006 * size, 2)
    radius = 0.43 * size * (1 + 0.005 * rng.standard_normal())
    dx, dy = x - _F(cx), y - _F(cy)
    rho = np.sqrt(dx * dx + dy * dy) / _F(radius)
    phi = np.arctan2(dy, dx)
    knots = [0.0, 0.40, 0.50, 0.55, 0.60, 0.68, 0.77, 0.85, 0.92, 0.97, 1.0, 1.02]
    level = [0.05, 0.09, 0.22, 0.62, 0.42, 0.30, 0.40, 0.55, 0.30, 0.22, 0.34, 0.0]
    profile = np.interp(rho, knots, level).astype(_F)
    light = rng.normal(0.8, 0.15)
    glass = profile * (1 + 0.12 * np.cos(phi - _F(light))) * (1 + 0.05 * _noise(rng, size, 8))
    glass_col = _rgb(0.62, 0.50, 0.30) * (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    background = (0.10 + 0.012 * _noise(rng, size, size / 3))[..., None] * _rgb(1.0, 1.0, 1.05)
    cover = _aa((1.0 - rho) * _F(radius))
    img = background + (glass[..., None] * glass_col / 0.62 - background) * cover[..., None]
    support = rho < 0.98
    mask = None
    if part == "broken_rim":
        # a piece of glass broken off the outer lip: background shows through a jagged edge
        a0 = rng.uniform(-np.pi, np.pi)
        half = _lerp(0.04, 0.35, sev) * rng.uniform(0.6, 1.0)
        depth = _lerp(0.06, 0.40, sev) * rng.uniform(0.7, 1.0)
        dphi = np.angle(np.exp(1j * (phi - a0))).astype(_F)
        jag = 0.02 * _noise(rng, size, 40)
        inside_wedge = (np.abs(dphi) / _F(half)) ** 2 + ((1 - rho) / _F(depth)) ** 2 + jag < 1
        broken = inside_wedge & (rho < 1.0 + 2.0 / radius)
        soft = ndimage.gaussian_filter(broken.astype(_F), 0.7)
        edge_glint = np.clip(soft * (1 - soft) * 4, 0, 1) * 0.35
        _blend(img, soft, background)
        img += edge_glint[..., None] * glass_col
        mask = ndimage.binary_dilation(broken & (rho < 1.0 + 1.0 / radius))
        _mask_or_anchor(mask, cx + np.cos(a0) * radius * (1 - depth / 2), cy + np.sin(a0) * radius * (1 - depth / 2))
    return _Scene(img.astype(_F), support, mask)


def _screw_geometry(size: int, s: np.ndarray, t: np.ndarray, tip_cut: float, flat: tuple[float, float] | None):
    """Coverage and shading of a side-view screw in its own coordinates (s along the axis, t across)."""
    k = size / 256
    head0, head_len, head_hw = -0.31 * size, 0.08 * size, 0.085 * size
    core_hw, pitch = 0.034 * size, 0.034 * size
    tip_end, tip_len = 0.31 * size - tip_cut, 0.07 * size
    sh = (s - (head0 + head_len / 2)) / (head_len / 2)
    th = t / head_hw
    sh2, th2 = sh * sh, th * th
    head_f = np.sqrt(np.sqrt(sh2 * sh2 + th2 * th2))  # a rounded rectangle
    head_cov = _aa((1 - head_f) * head_len / 2)
    saw = np.abs(np.mod((s - head0) / pitch, 1.0) - 0.5) * 2  # 0..1 triangle wave along the shaft
    thread = 1 + 0.28 * saw
    if flat is not None:
        thread = np.where((s > flat[0]) & (s < flat[1]), _F(1.02), thread)
    taper = np.clip((0.31 * size - s) / tip_len, 0.12, 1)
    half_w = core_hw * thread * taper
    shaft_cov = _aa(half_w - np.abs(t)) * _aa(tip_end - s) * _aa(s - (head0 + head_len - 2 * k))
    cover = np.maximum(head_cov, shaft_cov)
    n = np.clip(t / np.where(head_cov > shaft_cov, head_hw, half_w), -1, 1)
    n35 = (n + 0.35) * 5.0
    cyl = 0.22 + 0.45 * np.sqrt(1 - n * n) + 0.35 * np.exp(-n35 * n35)
    flank = 0.12 * np.sin(2 * np.pi * (s + 0.35 * t) / pitch)
    if flat is not None:
        flank = np.where((s > flat[0]) & (s < flat[1]), _F(0), flank)
    shade = np.where(head_cov > shaft_cov, cyl * (1 + 0.06 * np.cos(sh * 3)), cyl + flank)
    return cover.astype(_F), shade.astype(_F)


def _render_screw(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    cx, cy = size / 2 + np.clip(rng.normal(0, 0.04 * size, 2), -0.08 * size, 0.08 * size)
    c, s_ = np.cos(theta), np.sin(theta)
    dx, dy = x - _F(cx), y - _F(cy)
    s = dx * _F(c) + dy * _F(s_)
    t = -dx * _F(s_) + dy * _F(c)
    tip_cut, flat = 0.0, None
    if part == "manipulated_tip":
        tip_cut = max(2.5, _lerp(0.015, 0.12, sev) * size * rng.uniform(0.8, 1.0))
    elif part == "thread_damage":
        length = max(2.5, _lerp(0.6, 4.0, sev) * 0.034 * size)
        start = rng.uniform(-0.20 * size, 0.22 * size - length)
        flat = (start, start + length)
    cover, shade = _screw_geometry(size, s, t, tip_cut, flat)
    background = (0.74 + 0.02 * _noise(rng, size, 3) + 0.012 * _noise(rng, size, size / 2))[..., None] * _rgb(
        1.0, 0.99, 0.96
    )
    k = size / 256
    shadow = ndimage.shift(ndimage.gaussian_filter(cover, 3.0 * k), (2.5 * k, 2.0 * k), order=1)
    img = background * (1 - 0.35 * shadow)[..., None]
    metal = (shade * (1 + 0.04 * _noise(rng, size, size / 6)))[..., None] * _rgb(0.80, 0.81, 0.83)
    img = img + (metal - img) * cover[..., None]
    mask = None
    if part == "manipulated_tip":
        full, _ = _screw_geometry(size, s, t, 0.0, None)
        mask = (full - cover) > 0.25
    elif part == "thread_damage":
        mask = (s > flat[0] - 1) & (s < flat[1] + 1) & (np.abs(t) < 0.034 * size * 1.35)
    return _Scene(img.astype(_F), cover > 0.5, mask)


@dataclass(frozen=True)
class _Rect:
    cx: float
    cy: float
    hw: float
    hh: float
    color: tuple[float, float, float]
    angle: float = 0.0


@dataclass(frozen=True)
class _Component:
    parts: tuple[_Rect, ...]  # body and terminals
    pads: tuple[_Rect, ...]  # bare pads left when the part is missing


@functools.lru_cache(maxsize=1)
def _pcb_design() -> tuple[tuple[_Rect, ...], tuple[_Component, ...], tuple[tuple[float, float, float], ...]]:
    """The fixed board layout in board units (0..1): copper and silkscreen, components, drill holes."""
    rng = np.random.default_rng(20240611)
    copper_col, pad_col, silk_col = (0.20, 0.50, 0.27), (0.78, 0.72, 0.50), (0.90, 0.90, 0.86)
    base: list[_Rect] = []
    for _ in range(16):
        x0, y0 = rng.uniform(0.12, 0.88, 2)
        x1, y1 = rng.uniform(0.12, 0.88, 2)
        w = rng.choice([0.006, 0.009, 0.012])
        base.append(_Rect((x0 + x1) / 2, y0, abs(x1 - x0) / 2 + w, w, copper_col))
        base.append(_Rect(x1, (y0 + y1) / 2, w, abs(y1 - y0) / 2 + w, copper_col))
        base.append(_Rect(x0, y0, 0.016, 0.016, pad_col))
        base.append(_Rect(x1, y1, 0.016, 0.016, pad_col))
    # silkscreen: a frame around the chip and short "text" strokes
    for cx, cy, hw, hh in [(0.5, 0.46, 0.16, 0.0025), (0.5, 0.74, 0.16, 0.0025), (0.34, 0.60, 0.0025, 0.14),
                           (0.66, 0.60, 0.0025, 0.14)]:
        base.append(_Rect(cx, cy, hw, hh, silk_col))
    for i in range(7):
        base.append(_Rect(0.16 + 0.03 * i, 0.12, 0.009, 0.002 + 0.004 * (i % 3 == 1), silk_col))
        base.append(_Rect(0.64 + 0.025 * i, 0.88, 0.008, 0.006 if i % 2 else 0.002, silk_col))
    components: list[_Component] = []
    # the chip: body and pins
    body = _Rect(0.5, 0.60, 0.11, 0.09, (0.09, 0.09, 0.10))
    pins = tuple(
        _Rect(0.5 + sx * 0.125, 0.60 + (i - 3.5) * 0.022, 0.015, 0.006, (0.80, 0.80, 0.80))
        for sx in (-1, 1)
        for i in range(8)
    )
    components.append(_Component((body,) + pins, tuple(_Rect(p.cx, p.cy, p.hw, p.hh, pad_col) for p in pins)))
    spots = [(0.20, 0.28), (0.35, 0.25), (0.78, 0.25), (0.80, 0.45), (0.22, 0.72), (0.82, 0.70), (0.55, 0.25),
             (0.20, 0.50)]
    for i, (cx, cy) in enumerate(spots):
        length = (0.028, 0.04, 0.055)[i % 3]
        width = length * 0.5
        vertical = i % 2 == 1
        body_col = (0.12, 0.12, 0.12) if i % 3 else (0.70, 0.58, 0.40)
        hw, hh = (width, length) if vertical else (length, width)
        end = 0.22 * length
        ex, ey = (0.0, length - end) if vertical else (length - end, 0.0)
        ehw, ehh = (width, end) if vertical else (end, width)
        ends = tuple(_Rect(cx + sign * ex, cy + sign * ey, ehw, ehh, (0.85, 0.85, 0.84)) for sign in (-1, 1))
        pads = tuple(_Rect(e.cx, e.cy, e.hw * 1.25, e.hh * 1.25, pad_col) for e in ends)
        components.append(_Component((_Rect(cx, cy, hw, hh, body_col),) + ends, pads))
    holes = ((0.10, 0.10, 0.025), (0.90, 0.10, 0.025), (0.10, 0.90, 0.025), (0.90, 0.90, 0.025))
    return tuple(base), tuple(components), holes


def _paint_rect(img: np.ndarray, cov_out: np.ndarray | None, rect: _Rect, pose: tuple[float, ...], size: int) -> None:
    """Paint a board-space rectangle onto the image (anti-aliased), or its coverage into ``cov_out``."""
    cx0, cy0, c, s = pose
    corners = []
    ca, sa = np.cos(rect.angle), np.sin(rect.angle)
    for ex, ey in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
        bx = rect.cx + ex * rect.hw * ca - ey * rect.hh * sa - 0.5
        by = rect.cy + ex * rect.hw * sa + ey * rect.hh * ca - 0.5
        corners.append((cx0 + (bx * c - by * s) * size, cy0 + (bx * s + by * c) * size))
    xs, ys = zip(*corners)
    x0, x1 = max(0, int(min(xs)) - 2), min(size, int(max(xs)) + 3)
    y0, y1 = max(0, int(min(ys)) - 2), min(size, int(max(ys)) + 3)
    if x0 >= x1 or y0 >= y1:
        return
    px = np.arange(x0, x1, dtype=_F)[None, :] - _F(cx0)
    py = np.arange(y0, y1, dtype=_F)[:, None] - _F(cy0)
    bu = (px * c + py * s) / size + 0.5 - rect.cx
    bv = (-px * s + py * c) / size + 0.5 - rect.cy
    lu = bu * ca + bv * sa
    lv = -bu * sa + bv * ca
    cov = _aa((rect.hw - np.abs(lu)) * size) * _aa((rect.hh - np.abs(lv)) * size)
    if cov_out is not None:
        np.maximum(cov_out[y0:y1, x0:x1], cov, out=cov_out[y0:y1, x0:x1])
    else:
        win = img[y0:y1, x0:x1]
        win += cov[..., None] * (np.array(rect.color, _F) - win)


@functools.lru_cache(maxsize=4)
def _pcb_layers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The board drawn once in board space (one board unit = ``size`` pixels): fully assembled, and
    bare (copper, silkscreen and pads, no components)."""
    base, components, holes = _pcb_design()
    y, x = _grid(size)
    pose = (size / 2, size / 2, 1.0, 0.0)
    layer = np.empty((size, size, 3), _F)
    layer[:] = _rgb(0.11, 0.36, 0.19)
    for r in base:
        _paint_rect(layer, None, r, pose, size)
    for hx, hy, hr in holes:
        d = np.sqrt((x / size - hx) ** 2 + (y / size - hy) ** 2) * size
        _blend(layer, _aa(hr * size - d), _rgb(0.80, 0.75, 0.55))
        _blend(layer, _aa(hr * 0.55 * size - d), _rgb(0.05, 0.05, 0.05))
    for comp in components:
        for p in comp.pads:
            _paint_rect(layer, None, p, pose, size)
    bare = layer.copy()
    for comp in components:
        for p in comp.parts:
            _paint_rect(layer, None, p, pose, size)
    layer.setflags(write=False)
    bare.setflags(write=False)
    return layer, bare


def _render_pcb(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    _, components, _ = _pcb_design()
    assembled, bare = _pcb_layers(size)
    th = rng.normal(0, 0.008)
    cx0, cy0 = size / 2 + rng.normal(0, 0.008 * size, 2)
    pose = (cx0, cy0, np.cos(th), np.sin(th))
    board_half = 0.46
    dx, dy = x - _F(cx0), y - _F(cy0)
    bu = (dx * _F(pose[2]) + dy * _F(pose[3])) / size
    bv = (-dx * _F(pose[3]) + dy * _F(pose[2])) / size
    board_cov = _aa((board_half - np.abs(bu)) * size) * _aa((board_half - np.abs(bv)) * size)
    coords = np.stack([(bv + 0.5) * size, (bu + 0.5) * size])

    def place(layer: np.ndarray) -> np.ndarray:
        channels = [ndimage.map_coordinates(layer[..., k], coords, order=1, mode="nearest") for k in range(3)]
        return np.stack(channels, -1)

    board = place(assembled)
    background = (0.22 + 0.015 * _noise(rng, size, size / 4))[..., None] * _rgb(0.95, 0.95, 1.0)
    texture = 1 + 0.04 * _noise(rng, size, 12) + 0.03 * _noise(rng, size, size / 2)
    jitter = (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    mask = None
    if part in ("missing_component", "misplaced_component"):
        # a smaller part when the severity is low
        order = sorted(range(len(components)), key=lambda i: components[i].parts[0].hw * components[i].parts[0].hh)
        pick = int(np.clip(round(sev * (len(order) - 1) + rng.normal(0, 1.0)), 0, len(order) - 1))
        comp = components[order[pick]]
        cov = np.zeros((size, size), _F)
        for p in comp.parts:
            _paint_rect(board, cov, p, pose, size)
        board += (place(bare) - board) * cov[..., None]
        mask = cov > 0.5
        body = comp.parts[0]
        if part == "misplaced_component":
            scale = max(body.hw, body.hh)
            shift = max(_lerp(0.10, 0.8, sev) * scale * rng.uniform(0.7, 1.0), 1.5 / size)
            ang = rng.uniform(0, 2 * np.pi)
            ddx, ddy = shift * np.cos(ang), shift * np.sin(ang)
            rot = np.deg2rad(_lerp(2.0, 25.0, sev)) * rng.choice([-1.0, 1.0]) * (rng.uniform() < 0.6)
            ca, sa = np.cos(rot), np.sin(rot)
            new_cov = np.zeros((size, size), _F)
            for p in comp.parts:
                moved = _Rect(
                    body.cx + ddx + (p.cx - body.cx) * ca - (p.cy - body.cy) * sa,
                    body.cy + ddy + (p.cx - body.cx) * sa + (p.cy - body.cy) * ca,
                    p.hw, p.hh, p.color, p.angle + rot,
                )
                _paint_rect(board, None, moved, pose, size)
                _paint_rect(board, new_cov, moved, pose, size)
            # where the old and the new footprint agree the image is unchanged, unless turned
            mask = (mask ^ (new_cov > 0.5)) | ((new_cov > 0.5) & (rot != 0))
        bx, by = body.cx - 0.5, body.cy - 0.5
        _mask_or_anchor(mask, cx0 + (bx * pose[2] - by * pose[3]) * size, cy0 + (bx * pose[3] + by * pose[2]) * size)
    board *= texture[..., None] * jitter
    img = background + (board - background) * board_cov[..., None]
    return _Scene(img.astype(_F), board_cov > 0.5, mask)


def _render_nut(rng: np.random.Generator, size: int, part: str | None, sev: float) -> _Scene:
    y, x = _grid(size)
    cx, cy = size / 2 + rng.normal(0, 0.015 * size, 2)
    rot = rng.uniform(0, np.pi / 3)
    dx, dy = x - _F(cx), y - _F(cy)
    r = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dy, dx)
    apothem = 0.34 * size
    normals = [(np.cos(rot + k * np.pi / 3), np.sin(rot + k * np.pi / 3)) for k in range(3)]
    hex_d = np.max(np.stack([np.abs(dx * _F(nx) + dy * _F(ny)) for nx, ny in normals]), 0)
    cover = _aa(apothem - hex_d)
    face_r, hole_r, bore_r = 0.95 * apothem, 0.15 * size, 0.20 * size
    light = rng.normal(-2.2, 0.2)
    turned = 0.035 * np.sin(r * _F(2 * np.pi / (2.2 * size / 256)) + 0.8 * _noise(rng, size, 6))
    face = 0.55 + 0.10 * np.cos(2 * (phi - _F(light))) + turned
    chamfer = 0.42 + 0.16 * np.cos(phi - _F(light)) + 0.04 * np.cos(3 * (phi - _F(rot)))
    bore = 0.22 + 0.04 * np.sin(r * _F(2 * np.pi / (3.0 * size / 256))) + 0.12 * np.cos(phi - _F(light) + np.pi)
    level = np.where(r < face_r, face, chamfer)
    level = np.where(r < bore_r, bore, level)
    level = level * (1 + 0.03 * _noise(rng, size, size / 4))
    metal = level[..., None] * (_rgb(0.74, 0.75, 0.78) * (1 + 0.006 * rng.standard_normal(3)).astype(_F))
    hole = _aa(hole_r - r)
    background = (0.16 + 0.02 * _noise(rng, size, size / 2) + 0.015 * _noise(rng, size, 4))[..., None] * _rgb(
        0.95, 1.0, 1.12
    )
    solid = cover * (1 - hole)
    mask = None
    if part == "chipped_corner":
        corner = int(rng.integers(6))
        ca = rot + np.pi / 6 + corner * np.pi / 3
        circum = apothem / np.cos(np.pi / 6)
        depth = max(2.5, _lerp(0.025, 0.16, sev) * size * rng.uniform(0.8, 1.0))
        tilt = rng.normal(0, 0.25)
        along = dx * _F(np.cos(ca + tilt)) + dy * _F(np.sin(ca + tilt))
        cut_line = circum * np.cos(tilt) - depth + 0.04 * size * _noise(rng, size, 30) * (depth / size)
        removed = _aa(along - cut_line)
        fracture = np.clip(_aa(along - cut_line + 2.5 * size / 256) - removed, 0, 1) * cover
        metal = metal * (1 - 0.45 * fracture)[..., None]
        mask = (cover > 0.25) & ((removed > 0.25) | (fracture > 0.25))
        _mask_or_anchor(mask, cx + np.cos(ca) * (circum - 2), cy + np.sin(ca) * (circum - 2))
        solid = solid * (1 - removed)
    img = background + (metal - background) * solid[..., None]
    return _Scene(img.astype(_F), (cover > 0.5) & (r > hole_r + 1), mask)


# --------------------------------------------------------------------------------------------------
# surface defects: each draws into the scene image in place and returns its bool mask


def _anchor(rng: np.random.Generator, support: np.ndarray, border: float) -> tuple[float, float]:
    """A random (x, y) inside ``support``; with probability ``border`` on the image border."""
    size = support.shape[0]
    if border > 0 and rng.uniform() < border:
        side, t = int(rng.integers(4)), rng.uniform(0, size - 1)
        return [(t, 0.0), (t, size - 1.0), (0.0, t), (size - 1.0, t)][side]
    idx = np.flatnonzero(support)
    j = int(idx[rng.integers(len(idx))])
    return float(j % size), float(j // size)


def _mask_or_anchor(mask: np.ndarray, x: float, y: float) -> np.ndarray:
    if not mask.any():
        size = mask.shape[0]
        mask[int(np.clip(round(y), 0, size - 1)), int(np.clip(round(x), 0, size - 1))] = True
    return mask


def _tone(img: np.ndarray, tone: Any, sign: float) -> np.ndarray:
    """The colour a defect pulls toward: a fixed RGB, or 'light'/'dark' relative to the surface."""
    if tone == "light" or (tone == "either" and sign > 0):
        return np.minimum(img * 1.6 + 0.15, 1.0)
    if tone == "dark" or tone == "either":
        return img * 0.25
    return np.asarray(tone, _F)


def _line_defect(img, rng, sev, support, *, kind="scratch", tone="either", width=(0.7, 2.2),
                 contrast=(0.10, 0.75), length=(0.06, 0.45), border=0.2):
    """Scratches (smooth arcs), cracks (jagged, branching walks), loose threads, cuts."""
    size = img.shape[0]
    k = size / 256
    x0, y0 = _anchor(rng, support, border)
    total = _lerp(*length, 0.5 * sev + 0.5 * rng.uniform()) * size
    ang = rng.uniform(0, 2 * np.pi)
    if kind == "scratch":
        bend = rng.normal(0, 0.15) * total
        t = np.linspace(-0.5, 0.5, 24)[:, None]
        d = np.array([np.cos(ang), np.sin(ang)])
        n = np.array([-d[1], d[0]])
        pts = np.array([x0, y0]) + t * total * d + (1 - 4 * t**2) * bend * n
        branches = [pts]
    else:
        step = 2.5 * k
        wiggle = 0.35 if kind == "crack" else 0.15
        main_dir = rng.choice([0.0, np.pi]) + rng.normal(0, 0.15) if kind == "grain_crack" else ang
        n_steps = max(2, int(total / step))
        kicks = rng.normal(0, wiggle, n_steps)
        drift = np.empty(n_steps)
        acc = 0.0
        for i in range(n_steps):  # a mean-reverting heading: wanders, but keeps its course
            acc = 0.85 * acc + kicks[i]
            drift[i] = acc
        heading = main_dir + drift * (0.5 if kind == "grain_crack" else 1.0)
        steps = np.stack([np.cos(heading), np.sin(heading)], 1) * step
        pts = np.array([x0, y0]) + np.concatenate([[[0.0, 0.0]], np.cumsum(steps, 0)])
        pts -= steps.sum(0) * 0.5
        branches = [pts]
        if kind == "crack" and sev > 0.4 and n_steps > 8:
            at = pts[int(rng.integers(n_steps // 3, n_steps))]
            nb = n_steps // 3
            bh = heading[0] + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2) + np.cumsum(rng.normal(0, wiggle, nb)) * 0.3
            bsteps = np.stack([np.cos(bh), np.sin(bh)], 1) * step
            branches.append(at + np.concatenate([[[0.0, 0.0]], np.cumsum(bsteps, 0)]))
    w = _lerp(*width, 0.6 * sev + 0.4 * rng.uniform()) * max(k, 0.5)
    c = _lerp(*contrast, sev)
    alpha = np.zeros((size, size), _F)
    for i, b in enumerate(branches):
        dist, along = _stroke(_polyline(b, 4.0), size, w + 2)
        bw = w * (0.6 if i else 1.0)
        taper = np.sqrt(np.clip(np.sin(np.pi * along), 0, 1)) if kind == "scratch" else 1.0
        np.maximum(alpha, _aa(bw / 2 * taper - dist + 0.3) * np.minimum(1.0, bw), out=alpha)
    alpha *= support
    target = _tone(img, tone, rng.choice([-1.0, 1.0]))
    if kind == "thread":
        # a loose thread is a shaded cylinder lying on the surface
        target = target * (0.7 + 0.3 * alpha[..., None])
    _blend(img, alpha * _F(c), target)
    return _mask_or_anchor(alpha > 0.25, x0, y0)


def _hole_defect(img, rng, sev, support, *, tone=(0.05, 0.05, 0.05), radius=(1.3, 0.08), contrast=(0.35, 0.95),
                 rim=0.25, border=0.15):
    """Holes, chips, pin holes: an irregular dark disc with a lighter (or darker) rim."""
    size = img.shape[0]
    y, x = _grid(size)
    x0, y0 = _anchor(rng, support, border)
    r = max(radius[0], _lerp(radius[0] / size, radius[1], sev * rng.uniform(0.5, 1.0)) * size)
    dx, dy = x - _F(x0), y - _F(y0)
    d = np.sqrt(dx * dx + dy * dy)
    re = r * _radial_shape(rng, dx, dy, 0.15)
    inside = _aa(re - d)
    ring = _aa(re + 1.2 + 0.15 * r - d) - inside
    c = _lerp(*contrast, sev)
    img *= (1 + rim * c * ring * support)[..., None]
    _blend(img, inside * support * _F(c), _tone(img, tone, -1))
    return _mask_or_anchor((inside * support) > 0.25, x0, y0)


def _stain_defect(img, rng, sev, support, *, tint=(0.40, 0.28, 0.14), radius=(0.05, 0.28), contrast=(0.06, 0.45),
                  border=0.25, speckle=0.0):
    """Discolouration: a soft blob of tint. Its mask is where the blend weight exceeds a quarter of its peak."""
    size = img.shape[0]
    y, x = _grid(size)
    x0, y0 = _anchor(rng, support, border)
    r = rng.uniform(*radius) * size
    dx, dy = x - _F(x0), y - _F(y0)
    q = 1 - np.sqrt(dx * dx + dy * dy) / _F(r) + 0.25 * np.clip(_noise(rng, size, max(3, 0.6 * size / r)), -2, 2)
    w = _smoothstep(0, 0.6, q) * support
    if speckle:
        w *= 1 + speckle * np.clip(_noise(rng, size, size / 3), -2, 2)
        w = np.clip(w, 0, 1)
    peak = float(w.max())
    _blend(img, w * _F(_lerp(*contrast, sev)), _tone(img, tint, -1))
    return _mask_or_anchor((w > 0.25 * peak) & (w > 0), x0, y0)


def _particles_defect(img, rng, sev, support, *, tone=(0.12, 0.10, 0.08), count=(1, 4), radius=(1.0, 0.025),
                      spread=0.05, contrast=(0.45, 0.95), border=0.0):
    """Contamination or pitting: a cluster of small irregular specks."""
    size = img.shape[0]
    y, x = _grid(size)
    x0, y0 = _anchor(rng, support, border)
    n = int(round(_lerp(count[0], count[1], sev * rng.uniform(0.5, 1.0))))
    alpha = np.zeros((size, size), _F)
    for i in range(max(1, n)):
        px, py = (x0, y0) if i == 0 else (x0 + rng.normal(0, spread * size), y0 + rng.normal(0, spread * size))
        r = max(radius[0], _lerp(radius[0] / size, radius[1], sev * rng.uniform(0.3, 1.0)) * size)
        lo_x, hi_x = max(0, int(px - 2 * r - 3)), min(size, int(px + 2 * r + 4))
        lo_y, hi_y = max(0, int(py - 2 * r - 3)), min(size, int(py + 2 * r + 4))
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        dx, dy = x[lo_y:hi_y, lo_x:hi_x] - _F(px), y[lo_y:hi_y, lo_x:hi_x] - _F(py)
        d = np.sqrt(dx * dx + dy * dy)
        a = _aa(r * _radial_shape(rng, dx, dy, 0.25) - d)
        np.maximum(alpha[lo_y:hi_y, lo_x:hi_x], a, out=alpha[lo_y:hi_y, lo_x:hi_x])
    alpha *= support
    _blend(img, alpha * _F(_lerp(*contrast, sev)), _tone(img, tone, -1))
    return _mask_or_anchor(alpha > 0.25, x0, y0)


def _dent_defect(img, rng, sev, support, *, radius=(0.02, 0.10), contrast=(0.08, 0.7), border=0.15):
    """A dent in a shiny surface: lit on one side, shaded on the other."""
    size = img.shape[0]
    y, x = _grid(size)
    x0, y0 = _anchor(rng, support, border)
    r = max(2.0, rng.uniform(*radius) * size * (0.6 + 0.4 * sev))
    dx, dy = (x - _F(x0)) / _F(r), (y - _F(y0)) / _F(r)
    la = rng.uniform(0, 2 * np.pi)
    bump = np.exp(-(dx * dx + dy * dy))
    shade = -(dx * _F(np.cos(la)) + dy * _F(np.sin(la))) * bump * 2.3
    img *= (1 + _lerp(*contrast, sev) * shade * support)[..., None]
    return _mask_or_anchor((bump > 0.25) & support, x0, y0)


# --------------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class _Category:
    kind: str
    render: Callable[..., _Scene]
    defects: dict[str, Callable[..., np.ndarray] | None]  # None: drawn by the renderer itself


P = functools.partial
_CATALOGUE: dict[str, _Category] = {
    "fabric": _Category("texture", _render_fabric, {
        "cut": P(_line_defect, kind="crack", tone=(0.10, 0.08, 0.06), width=(1.0, 3.0), contrast=(0.3, 0.9),
                 length=(0.05, 0.35)),
        "hole": P(_hole_defect, tone=(0.07, 0.06, 0.05), radius=(1.3, 0.07), rim=0.3),
        "stain": P(_stain_defect, tint=(0.36, 0.25, 0.12), contrast=(0.08, 0.7)),
        "thread": P(_line_defect, kind="thread", tone=(0.22, 0.24, 0.48), width=(1.2, 3.0), contrast=(0.25, 0.9),
                    length=(0.15, 0.6)),
    }),
    "bottle": _Category("object", _render_bottle, {
        "broken_rim": None,
        "contamination": P(_particles_defect, tone=(0.28, 0.22, 0.14), count=(1, 5), radius=(1.2, 0.035),
                           spread=0.03, contrast=(0.35, 0.9)),
        "crack": P(_line_defect, kind="crack", tone="light", width=(0.6, 1.8), contrast=(0.15, 0.8),
                   length=(0.05, 0.3), border=0.0),
        "discolouration": P(_stain_defect, tint=(0.15, 0.35, 0.20), radius=(0.06, 0.22), contrast=(0.08, 0.65),
                            border=0.0),
    }),
    "brushed_metal": _Category("texture", _render_metal, {
        "dent": _dent_defect,
        "pitting": P(_particles_defect, tone=(0.20, 0.20, 0.21), count=(3, 30), radius=(0.7, 0.007),
                     spread=0.04, contrast=(0.3, 0.95), border=0.15),
        "scratch": P(_line_defect, kind="scratch", tone="either", width=(0.6, 2.0), contrast=(0.10, 0.7),
                     length=(0.08, 0.6)),
        "stain": P(_stain_defect, tint=(0.48, 0.40, 0.28), contrast=(0.05, 0.6)),
    }),
    "screw": _Category("object", _render_screw, {
        "contamination": P(_particles_defect, tone=(0.25, 0.20, 0.15), count=(1, 3), radius=(1.0, 0.02),
                           spread=0.01, contrast=(0.4, 0.9)),
        "manipulated_tip": None,
        "scratch": P(_line_defect, kind="scratch", tone="either", width=(0.6, 1.8), contrast=(0.15, 0.8),
                     length=(0.03, 0.12), border=0.0),
        "thread_damage": None,
    }),
    "wood": _Category("texture", _render_wood, {
        "crack": P(_line_defect, kind="grain_crack", tone=(0.12, 0.07, 0.04), width=(0.7, 2.5),
                   contrast=(0.2, 0.9), length=(0.08, 0.55)),
        "hole": P(_hole_defect, tone=(0.08, 0.05, 0.03), radius=(1.2, 0.045), rim=-0.2),
        "scratch": P(_line_defect, kind="scratch", tone=(0.88, 0.76, 0.60), width=(0.6, 2.0),
                     contrast=(0.08, 0.6), length=(0.08, 0.5)),
        "stain": P(_stain_defect, tint=(0.22, 0.13, 0.07), contrast=(0.06, 0.65)),
    }),
    "pcb": _Category("object", _render_pcb, {
        "contamination": P(_particles_defect, tone=(0.80, 0.80, 0.78), count=(1, 4), radius=(1.0, 0.02),
                           spread=0.02, contrast=(0.4, 0.95)),
        "misplaced_component": None,
        "missing_component": None,
        "scratch": P(_line_defect, kind="scratch", tone=(0.72, 0.60, 0.35), width=(0.6, 1.8), contrast=(0.15, 0.85),
                     length=(0.05, 0.35), border=0.0),
    }),
    "tiles": _Category("texture", _render_tiles, {
        "chip": P(_hole_defect, tone=(0.55, 0.50, 0.45), radius=(1.5, 0.07), contrast=(0.3, 0.9), rim=0.1),
        "crack": P(_line_defect, kind="crack", tone=(0.25, 0.24, 0.22), width=(0.6, 1.8), contrast=(0.15, 0.85),
                   length=(0.06, 0.4)),
        "scratch": P(_line_defect, kind="scratch", tone="dark", width=(0.6, 1.6), contrast=(0.08, 0.5),
                     length=(0.06, 0.4)),
        "stain": P(_stain_defect, tint=(0.62, 0.50, 0.28), contrast=(0.06, 0.65)),
    }),
    "hex_nut": _Category("object", _render_nut, {
        "chipped_corner": None,
        "contamination": P(_particles_defect, tone=(0.10, 0.09, 0.08), count=(1, 4), radius=(1.0, 0.025),
                           spread=0.03, contrast=(0.4, 0.9)),
        "rust": P(_stain_defect, tint=(0.55, 0.28, 0.10), radius=(0.04, 0.18), contrast=(0.10, 0.75), border=0.0,
                  speckle=0.6),
        "scratch": P(_line_defect, kind="scratch", tone="either", width=(0.6, 1.8), contrast=(0.12, 0.75),
                     length=(0.05, 0.3), border=0.0),
    }),
}
del P

CATEGORIES: tuple[str, ...] = tuple(_CATALOGUE)
CATEGORY_KINDS: dict[str, str] = {name: c.kind for name, c in _CATALOGUE.items()}
DEFECT_TYPES: dict[str, tuple[str, ...]] = {name: tuple(c.defects) for name, c in _CATALOGUE.items()}


# --------------------------------------------------------------------------------------------------
# public API: single images


def check_category(category: Any) -> _Category:
    if not isinstance(category, str) or category not in _CATALOGUE:
        raise ConfigError(f"category: unknown category {category!r} (known: {', '.join(CATEGORIES)})")
    return _CATALOGUE[category]


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"size: must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}")
    return int(size)


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def render_good(category: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A normal image of ``category``: uint8 RGB, shape (size, size, 3)."""
    cat = check_category(category)
    size = _check_size(size)
    rng = _check_rng(rng)
    scene = cat.render(rng, size, None, 0.0)
    return _finish(scene.image, rng)


def render_defective(
    category: str, defect: str, rng: np.random.Generator, size: int = 256, severity: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A defective image of ``category`` and its bool mask (non-empty).

    ``severity`` in [0, 1] sets the defect's contrast and size (0: faint and small, 1: obvious);
    by default it is drawn uniformly from ``rng``.
    """
    cat = check_category(category)
    if defect not in cat.defects:
        raise ConfigError(f"defect: unknown defect {defect!r} for {category} (known: {', '.join(cat.defects)})")
    size = _check_size(size)
    rng = _check_rng(rng)
    if severity is None:
        severity = float(rng.uniform())
    elif isinstance(severity, bool) or not isinstance(severity, numbers.Real) or not 0.0 <= severity <= 1.0:
        raise ConfigError(f"severity: must be a number from 0 to 1, got {severity!r}")
    op = cat.defects[defect]
    scene = cat.render(rng, size, defect if op is None else None, float(severity))
    if op is None:
        mask = scene.mask
    else:
        mask = op(scene.image, rng, float(severity), scene.support)
    if mask is None or not mask.any():
        raise RuntimeError(f"{category}/{defect}: the defect left an empty mask")
    return _finish(scene.image, rng), np.ascontiguousarray(mask, dtype=bool)


# --------------------------------------------------------------------------------------------------
# public API: a dataset on disk


def _split_counts(n: int, k: int) -> list[int]:
    """``n`` split into ``k`` near-equal parts, the first ones larger."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _stream(seed: int, category: str, split_code: int, index: int) -> np.random.Generator:
    entropy = [seed, CATEGORIES.index(category), split_code, index]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _category_counts(category: str, n_train: int, n_test_good: int, n_test_defective: int) -> dict[str, int]:
    counts = {"train/good": n_train, "test/good": n_test_good}
    for defect, n in zip(DEFECT_TYPES[category], _split_counts(n_test_defective, len(DEFECT_TYPES[category]))):
        counts[f"test/{defect}"] = n
    return counts


def _write_png(path: Path, array: np.ndarray) -> None:
    """PNG files inside the hidden build folder, which is renamed into place whole. Images are
    entropy-coded only (zlib's Huffman-only strategy): with sensor noise in every pixel that gives the
    same size as the default deflate for a quarter of the time."""
    if array.dtype == bool:
        data = encode_png(array)
    else:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=6, compress_type=zlib.Z_HUFFMAN_ONLY)
        data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)


def _write_category(out: str, category: str, seed: int, size: int, n_train: int, n_test_good: int,
                    n_test_defective: int) -> str:
    """Render one category into a hidden folder inside ``out``, then move it into place."""
    out_path = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=out_path))
    try:
        root = tmp / category
        for split_code, folder, n in ((_TRAIN, "train", n_train), (_TEST_GOOD, "test", n_test_good)):
            (root / folder / GOOD).mkdir(parents=True)
            for i in range(n):
                _write_png(root / folder / GOOD / f"{_name(i, n)}.png",
                           render_good(category, _stream(seed, category, split_code, i), size))
        counts = _category_counts(category, n_train, n_test_good, n_test_defective)
        for d, defect in enumerate(DEFECT_TYPES[category]):
            n = counts[f"test/{defect}"]
            if n == 0:
                continue
            (root / "test" / defect).mkdir(parents=True)
            (root / "ground_truth" / defect).mkdir(parents=True)
            for i in range(n):
                image, mask = render_defective(category, defect, _stream(seed, category, _DEFECT_BASE + d, i), size)
                _write_png(root / "test" / defect / f"{_name(i, n)}.png", image)
                _write_png(root / "ground_truth" / defect / f"{_name(i, n)}_mask.png", mask)
        final = out_path / category
        if final.exists():
            os.replace(final, tmp / ".old")  # removed with the build folder below
        os.replace(root, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return category


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _resolve_categories(categories: Any) -> list[str]:
    if isinstance(categories, str):
        categories = [categories]
    if isinstance(categories, (int, np.integer)) and not isinstance(categories, bool):
        if not 1 <= categories <= len(CATEGORIES):
            raise ConfigError(
                f"categories: must be from 1 to {len(CATEGORIES)} or a list of names, got {categories!r}"
            )
        return list(CATEGORIES[: int(categories)])
    if isinstance(categories, bool) or not isinstance(categories, Sequence) or len(categories) == 0:
        raise ConfigError(
            f"categories: expected a count from 1 to {len(CATEGORIES)} or category names, got {categories!r}"
        )
    names = list(categories)
    for name in names:
        if not isinstance(name, str) or name not in _CATALOGUE:
            raise ConfigError(f"categories: unknown category {name!r} (known: {', '.join(CATEGORIES)})")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ConfigError(f"categories: {dup!r} is listed twice")
    return names


def generate_dataset(
    out: str | os.PathLike,
    categories: int | Sequence[str] = 6,
    seed: int = 0,
    size: int = 256,
    n_train: int = 60,
    n_test_good: int = 40,
    n_test_defective: int = 40,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Write a synthetic dataset in the MVTec AD layout under ``out`` and describe it in ``synth.json``.

    ``categories`` is a count (the first N of CATEGORIES, which alternate textures and objects) or a
    list of names. Defective test images are split evenly among a category's defect types. Each
    category folder is built in a hidden folder inside ``out`` and renamed into place, replacing one
    of the same name. ``progress(category, done, total)`` is called as each category is finished.
    Returns the content written to ``synth.json``.
    """
    names = _resolve_categories(categories)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    size = _check_size(size)
    n_train = _check_count("n_train", n_train, 1)
    n_test_good = _check_count("n_test_good", n_test_good, 1)
    n_test_defective = _check_count("n_test_defective", n_test_defective, 0)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    workers = _check_count("workers", workers, 1)
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress: expected a callable, got {type(progress).__name__}")

    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise ConfigError(f"out: {out_path} exists and is not a folder")
    out_path.mkdir(parents=True, exist_ok=True)

    args = (seed, size, n_train, n_test_good, n_test_defective)
    total = len(names)
    workers = min(workers, total)
    if workers == 1:
        for done, name in enumerate(names, 1):
            _write_category(str(out_path), name, *args)
            if progress is not None:
                progress(name, done, total)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_category, str(out_path), name, *args) for name in names]
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    name = future.result()
                    if progress is not None:
                        progress(name, done, total)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    info = {
        "generator": "bayprano.platform.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defective": n_test_defective,
        "categories": [
            {
                "name": name,
                "kind": CATEGORY_KINDS[name],
                "defect_types": list(DEFECT_TYPES[name]),
                "counts": _category_counts(name, n_train, n_test_good, n_test_defective),
            }
            for name in names
        ],
    }
    atomic_write_json(out_path / "synth.json", info)
    return info
