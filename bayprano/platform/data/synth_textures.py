"""The texture categories of the synthetic generator: woven fabric, brushed metal, wood grain and
ceramic tiles, each a renderer ``(rng, size, part, severity) -> Scene`` of one good surface."""

from __future__ import annotations

import numpy as np

from bayprano.platform.data.synth_draw import Scene, everywhere, pixel_grid, rgb, smooth_noise, smoothstep

_F = np.float32


def _lattice(
    rng: np.random.Generator, size: int, period: float, period_jitter: float, tilt_sd: float, phase: float
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A square lattice over the image, slightly rotated and shifted at random: the drawn period in pixels,
    each pixel's cell indices (iu, iv) and its position (fu, fv) in [0, 1) inside its cell."""
    y, x = pixel_grid(size)
    period = period * (1 + period_jitter * rng.standard_normal())
    th = tilt_sd * rng.standard_normal()
    c, s = np.cos(th), np.sin(th)
    u = (c * x + s * y) / _F(period) + _F(rng.uniform(0, phase))
    v = (-s * x + c * y) / _F(period) + _F(rng.uniform(0, phase))
    iu, iv = np.floor(u), np.floor(v)
    return period, iu, iv, u - iu, v - iv


def render_fabric(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    _, iu, iv, fu, fv = _lattice(rng, size, 10.0 * size / 256, 0.01, 0.012, 2)
    warp_on_top = np.mod(iu + iv, 2) < 0.5  # plain weave: warp and weft alternate over and under
    warp_tab = (1 + 0.06 * rng.standard_normal(64)).astype(_F)
    weft_tab = (1 + 0.06 * rng.standard_normal(64)).astype(_F)
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    h_warp = np.sqrt(su) * (0.72 + 0.28 * sv) * warp_tab[np.mod(iu, 64).astype(np.int64)]
    h_weft = np.sqrt(sv) * (0.72 + 0.28 * su) * weft_tab[np.mod(iv, 64).astype(np.int64)]
    fib_warp = smooth_noise(rng, size, size / 8, size / 1.2)
    fib_weft = smooth_noise(rng, size, size / 1.2, size / 8)
    h = np.where(warp_on_top, h_warp * (1 + 0.10 * fib_warp), h_weft * (1 + 0.10 * fib_weft))
    shade = (0.30 + 0.80 * h) * (1 + 0.03 * smooth_noise(rng, size, 4))
    jitter = (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    warp_col = rgb(0.60, 0.53, 0.42) * jitter
    weft_col = rgb(0.68, 0.62, 0.50) * jitter
    img = np.where(warp_on_top[..., None], warp_col, weft_col) * shade[..., None]
    return Scene(img.astype(_F), everywhere(size))


def render_metal(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    _, x = pixel_grid(size)
    fine = smooth_noise(rng, size, size / 1.1, 3)
    medium = smooth_noise(rng, size, size / 6, 2)
    coarse = smooth_noise(rng, size, 3)
    centre, width = rng.uniform(0.25, 0.75) * size, 0.22 * size
    sheen = rng.uniform(0.05, 0.12) * np.exp(-(((x - centre) / width) ** 2))
    v = 0.55 + 0.045 * fine + 0.025 * medium + 0.03 * coarse + sheen
    tint = rgb(0.93, 0.95, 1.0) * (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    return Scene((v[..., None] * tint).astype(_F), everywhere(size))


def render_wood(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    y, x = pixel_grid(size)
    # A plank sawn along the trunk: growth rings are arcs of a far-away, stretched centre.
    cx = rng.uniform(-0.5, 1.5) * size
    cy = -rng.uniform(1.2, 2.5) * size
    r = np.sqrt(((x - cx) * 0.10) ** 2 + (y - cy) ** 2)
    ring = r / _F(0.05 * size) + 0.9 * smooth_noise(rng, size, 2.5, 2) + 0.12 * smooth_noise(rng, size, 24, 3)
    f = ring - np.floor(ring)
    late = smoothstep(0.45, 0.85, f) * (1 - smoothstep(0.9, 1.0, f))
    pores = smooth_noise(rng, size, size / 1.5, 6)
    t = np.clip(0.2 + 0.55 * late + 0.08 * pores + 0.05 * smooth_noise(rng, size, 5), 0, 1)
    jitter = (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    light, dark = rgb(0.80, 0.60, 0.40) * jitter, rgb(0.50, 0.31, 0.17) * jitter
    img = light + (dark - light) * t[..., None]
    return Scene(img.astype(_F), everywhere(size))


def render_tiles(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    period, iu, iv, fu, fv = _lattice(rng, size, size / 3.6, 0.005, 0.008, 1)
    px = 1.0 / period  # one pixel in tile units
    edge = np.minimum(np.minimum(fu, 1 - fu), np.minimum(fv, 1 - fv))
    grout_half = 0.04
    cover = smoothstep(grout_half, grout_half + 1.5 * px, edge)
    # glazed bevel: lit from the top left
    bevel = 0.06 * (smoothstep(0.12, grout_half, fu) + smoothstep(0.12, grout_half, fv))
    bevel -= 0.06 * (smoothstep(0.88, 1 - grout_half, fu) + smoothstep(0.88, 1 - grout_half, fv))
    tab = (0.03 * rng.standard_normal(97)).astype(_F)
    tile_shift = tab[np.mod(iu * 7 + iv * 13, 97).astype(np.int64)]
    glaze = 0.015 * smooth_noise(rng, size, 6) + 0.012 * smooth_noise(rng, size, size / 2)
    glaze_col = rgb(0.84, 0.81, 0.74) * (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    tile = (1 + tile_shift + glaze + bevel)[..., None] * glaze_col
    grout = (0.45 + 0.05 * smooth_noise(rng, size, size / 3))[..., None] * rgb(1.0, 0.97, 0.92)
    img = grout + (tile - grout) * cover[..., None]
    return Scene(img.astype(_F), everywhere(size))
