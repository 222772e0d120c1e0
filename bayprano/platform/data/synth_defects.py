"""Surface defects of the synthetic generator: scratches, cracks and threads, holes and chips, stains,
particles and dents. Each draws into a scene image in place, where the scene's support allows, and
returns the defect's bool mask (never empty)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bayprano.platform.data.synth_draw import (
    blend,
    coverage,
    lerp,
    mask_or_anchor,
    pixel_grid,
    radial_shape,
    resample_polyline,
    smooth_noise,
    smoothstep,
    stroke_distance,
)

_F = np.float32


def _anchor(rng: np.random.Generator, support: np.ndarray, border: float) -> tuple[float, float]:
    """A random (x, y) inside ``support``; with probability ``border`` on the image border."""
    size = support.shape[0]
    if border > 0 and rng.uniform() < border:
        side, t = int(rng.integers(4)), rng.uniform(0, size - 1)
        return [(t, 0.0), (t, size - 1.0), (0.0, t), (size - 1.0, t)][side]
    idx = np.flatnonzero(support)
    j = int(idx[rng.integers(len(idx))])
    return float(j % size), float(j // size)


def _tone(img: np.ndarray, tone: Any, sign: float) -> np.ndarray:
    """The colour a defect pulls toward: a fixed RGB, or 'light'/'dark' relative to the surface."""
    if tone == "light" or (tone == "either" and sign > 0):
        return np.minimum(img * 1.6 + 0.15, 1.0)
    if tone == "dark" or tone == "either":
        return img * 0.25
    return np.asarray(tone, _F)


def line_defect(
    img,
    rng,
    sev,
    support,
    *,
    kind="scratch",
    tone="either",
    width=(0.7, 2.2),
    contrast=(0.10, 0.75),
    length=(0.06, 0.45),
    border=0.2,
):
    """Scratches (smooth arcs), cracks (jagged, branching walks), loose threads, cuts."""
    size = img.shape[0]
    k = size / 256
    x0, y0 = _anchor(rng, support, border)
    total = lerp(*length, 0.5 * sev + 0.5 * rng.uniform()) * size
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
    w = lerp(*width, 0.6 * sev + 0.4 * rng.uniform()) * max(k, 0.5)
    c = lerp(*contrast, sev)
    alpha = np.zeros((size, size), _F)
    for i, b in enumerate(branches):
        dist, along = stroke_distance(resample_polyline(b, 4.0), size, w + 2)
        bw = w * (0.6 if i else 1.0)
        taper = np.sqrt(np.clip(np.sin(np.pi * along), 0, 1)) if kind == "scratch" else 1.0
        np.maximum(alpha, coverage(bw / 2 * taper - dist + 0.3) * np.minimum(1.0, bw), out=alpha)
    alpha *= support
    target = _tone(img, tone, rng.choice([-1.0, 1.0]))
    if kind == "thread":
        # a loose thread is a shaded cylinder lying on the surface
        target = target * (0.7 + 0.3 * alpha[..., None])
    blend(img, alpha * _F(c), target)
    return mask_or_anchor(alpha > 0.25, x0, y0)


def hole_defect(
    img, rng, sev, support, *, tone=(0.05, 0.05, 0.05), radius=(1.3, 0.08), contrast=(0.35, 0.95), rim=0.25, border=0.15
):
    """Holes, chips, pin holes: an irregular dark disc with a lighter (or darker) rim."""
    size = img.shape[0]
    y, x = pixel_grid(size)
    x0, y0 = _anchor(rng, support, border)
    r = max(radius[0], lerp(radius[0] / size, radius[1], sev * rng.uniform(0.5, 1.0)) * size)
    dx, dy = x - _F(x0), y - _F(y0)
    d = np.sqrt(dx * dx + dy * dy)
    re = r * radial_shape(rng, dx, dy, 0.15)
    inside = coverage(re - d)
    ring = coverage(re + 1.2 + 0.15 * r - d) - inside
    c = lerp(*contrast, sev)
    img *= (1 + rim * c * ring * support)[..., None]
    blend(img, inside * support * _F(c), _tone(img, tone, -1))
    return mask_or_anchor((inside * support) > 0.25, x0, y0)


def stain_defect(
    img,
    rng,
    sev,
    support,
    *,
    tint=(0.40, 0.28, 0.14),
    radius=(0.05, 0.28),
    contrast=(0.06, 0.45),
    border=0.25,
    speckle=0.0,
):
    """Discolouration: a soft blob of tint. Its mask is where the blend weight exceeds a quarter of its peak."""
    size = img.shape[0]
    y, x = pixel_grid(size)
    x0, y0 = _anchor(rng, support, border)
    r = rng.uniform(*radius) * size
    dx, dy = x - _F(x0), y - _F(y0)
    q = 1 - np.sqrt(dx * dx + dy * dy) / _F(r) + 0.25 * np.clip(smooth_noise(rng, size, max(3, 0.6 * size / r)), -2, 2)
    w = smoothstep(0, 0.6, q) * support
    if speckle:
        w *= 1 + speckle * np.clip(smooth_noise(rng, size, size / 3), -2, 2)
        w = np.clip(w, 0, 1)
    peak = float(w.max())
    blend(img, w * _F(lerp(*contrast, sev)), _tone(img, tint, -1))
    return mask_or_anchor((w > 0.25 * peak) & (w > 0), x0, y0)


def particles_defect(
    img,
    rng,
    sev,
    support,
    *,
    tone=(0.12, 0.10, 0.08),
    count=(1, 4),
    radius=(1.0, 0.025),
    spread=0.05,
    contrast=(0.45, 0.95),
    border=0.0,
):
    """Contamination or pitting: a cluster of small irregular specks."""
    size = img.shape[0]
    y, x = pixel_grid(size)
    x0, y0 = _anchor(rng, support, border)
    n = int(round(lerp(count[0], count[1], sev * rng.uniform(0.5, 1.0))))
    alpha = np.zeros((size, size), _F)
    for i in range(max(1, n)):
        px, py = (x0, y0) if i == 0 else (x0 + rng.normal(0, spread * size), y0 + rng.normal(0, spread * size))
        r = max(radius[0], lerp(radius[0] / size, radius[1], sev * rng.uniform(0.3, 1.0)) * size)
        lo_x, hi_x = max(0, int(px - 2 * r - 3)), min(size, int(px + 2 * r + 4))
        lo_y, hi_y = max(0, int(py - 2 * r - 3)), min(size, int(py + 2 * r + 4))
        if lo_x >= hi_x or lo_y >= hi_y:
            continue
        dx, dy = x[lo_y:hi_y, lo_x:hi_x] - _F(px), y[lo_y:hi_y, lo_x:hi_x] - _F(py)
        d = np.sqrt(dx * dx + dy * dy)
        a = coverage(r * radial_shape(rng, dx, dy, 0.25) - d)
        np.maximum(alpha[lo_y:hi_y, lo_x:hi_x], a, out=alpha[lo_y:hi_y, lo_x:hi_x])
    alpha *= support
    blend(img, alpha * _F(lerp(*contrast, sev)), _tone(img, tone, -1))
    return mask_or_anchor(alpha > 0.25, x0, y0)


def dent_defect(img, rng, sev, support, *, radius=(0.02, 0.10), contrast=(0.08, 0.7), border=0.15):
    """A dent in a shiny surface: lit on one side, shaded on the other."""
    size = img.shape[0]
    y, x = pixel_grid(size)
    x0, y0 = _anchor(rng, support, border)
    r = max(2.0, rng.uniform(*radius) * size * (0.6 + 0.4 * sev))
    dx, dy = (x - _F(x0)) / _F(r), (y - _F(y0)) / _F(r)
    la = rng.uniform(0, 2 * np.pi)
    bump = np.exp(-(dx * dx + dy * dy))
    shade = -(dx * _F(np.cos(la)) + dy * _F(np.sin(la))) * bump * 2.3
    img *= (1 + lerp(*contrast, sev) * shade * support)[..., None]
    return mask_or_anchor((bump > 0.25) & support, x0, y0)
