"""The validation families of synthetic anomalies, kept out of meta-training because ``data synth``'s
test defects resemble them: ``scratch`` (thin straight, curved or jagged lines) and ``blob`` (an
irregular hole or stain)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bayprano.platform.data.anomaly_compositing import Box, bbox, blend, check_range, colour, crop, inject, planes


def _curve(rng: np.random.Generator, h: int, w: int, length: float) -> list[tuple[float, float]]:
    """A smooth Bezier curve or a jagged polyline about ``length`` pixels long, as (x, y) points."""
    start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    theta = rng.uniform(0.0, 2 * np.pi)
    if rng.random() < 0.5:
        direction = np.array([math.cos(theta), math.sin(theta)])
        normal = np.array([-direction[1], direction[0]])
        p1 = start + direction * length / 3 + normal * rng.uniform(-0.4, 0.4) * length
        p2 = start + direction * 2 * length / 3 + normal * rng.uniform(-0.4, 0.4) * length
        p3 = start + direction * length
        t = np.linspace(0.0, 1.0, 32)[:, None]
        pts = (1 - t) ** 3 * start + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    else:
        n = int(rng.integers(3, 10))
        steps = rng.uniform(0.5, 1.5, n) * length / n
        angles = theta + np.cumsum(rng.uniform(-0.7, 0.7, n))
        moves = np.stack([np.cos(angles) * steps, np.sin(angles) * steps], axis=1)
        pts = np.vstack([start, start + np.cumsum(moves, axis=0)])
    return [(float(x), float(y)) for x, y in pts]


def _direction(image: np.ndarray, rng: np.random.Generator) -> float:
    """+1 (lighter) or -1 (darker), favouring the side with room to move."""
    mean = float(image[::4, ::4].mean())
    p_light = 0.5 if 60 <= mean <= 195 else (0.85 if mean < 60 else 0.15)
    return 1.0 if rng.random() < p_light else -1.0


def _soft_alpha(canvas: Image.Image, rng: np.random.Generator, max_radius: float) -> tuple[Box, np.ndarray, np.ndarray]:
    """Box, alpha (float32 in [0, 1]) and drawn region of a shape on ``canvas``; blurred half the time."""
    drawn = np.asarray(canvas) > 0
    y0, y1, x0, x1 = bbox(drawn)
    if rng.random() < 0.5 and y1 > y0:
        radius = rng.uniform(0.3, max(0.4, max_radius))
        pad = math.ceil(3 * radius) + 1
        y0, y1 = max(0, y0 - pad), min(drawn.shape[0], y1 + pad)
        x0, x1 = max(0, x0 - pad), min(drawn.shape[1], x1 + pad)
        canvas = canvas.crop((x0, y0, x1, y1)).filter(ImageFilter.GaussianBlur(radius))
    else:
        canvas = canvas.crop((x0, y0, x1, y1))
    alpha = np.asarray(canvas, dtype=np.float32) / np.float32(255.0)
    box = (y0, y1, x0, x1)
    return box, alpha, crop(drawn, box)


def scratch(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    count: tuple[int, int] = (1, 3),
    length: tuple[float, float] = (0.15, 0.8),
    contrast: tuple[float, float] = (30.0, 120.0),
    min_pixels: int = 16,
    min_delta: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Thin lines (straight, curved or jagged, like scratches and cracks), lighter or darker than the surface.

    ``count`` lines (inclusive range), each ``length`` times the shorter side long, 1-3 pixels wide at
    256 px (scaled with the image), starting anywhere, so they may run off the border. ``contrast`` is
    the grey-level change at full opacity; edges are sharp or slightly blurred.
    """
    lo, hi = (int(v) for v in check_range("count", count, 1, 64))
    length = check_range("length", length, 0.01, 4.0)
    contrast = check_range("contrast", contrast, 1.0, 255.0)

    def attempt(img: np.ndarray, g: np.random.Generator, strength: float, gray: bool):
        h, w = img.shape[:2]
        side = min(h, w)
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        max_width = max(1, round(3 * side / 256))
        for _ in range(int(g.integers(lo, hi + 1))):
            pts = _curve(g, h, w, g.uniform(*length) * side)
            draw.line(pts, fill=255, width=int(g.integers(1, max_width + 1)), joint="curve")
        box, alpha, drawn = _soft_alpha(canvas, g, 0.8)
        alpha *= np.float32(min(1.0, g.uniform(0.6, 1.0) * strength))
        delta = g.uniform(*contrast) * strength * _direction(img, g)
        shift = np.float32(delta) * colour(g, 0.85, 1.15)
        base = planes(img, box)
        return box, blend(base, base + shift, alpha), drawn

    return inject(image, rng, attempt, min_pixels, min_delta)


def blob(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    radius: tuple[float, float] = (0.015, 0.2),
    min_pixels: int = 16,
    min_delta: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blob: a dark hole, or a darker, lighter or tinted stain; hard or soft edge.

    The radius is a log-uniform fraction in ``radius`` of the shorter side (from tiny holes to large
    stains); the outline is a circle perturbed by a few random harmonics, stretched and turned; the
    centre may lie anywhere, so a blob may be cut by the border.
    """
    radius = check_range("radius", radius, 1e-3, 1.0)

    def attempt(img: np.ndarray, g: np.random.Generator, strength: float, gray: bool):
        h, w = img.shape[:2]
        r0 = max(1.5, math.exp(g.uniform(math.log(radius[0]), math.log(radius[1]))) * min(h, w))
        cy, cx = g.uniform(0, h), g.uniform(0, w)
        theta = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
        r = np.ones_like(theta)
        for k in range(2, 6):
            r += g.uniform(0.0, 0.3) / math.sqrt(k) * np.cos(k * theta + g.uniform(0, 2 * np.pi))
        r = r0 * np.maximum(r, 0.3)
        stretch, turn = g.uniform(0.5, 1.5), g.uniform(0, np.pi)
        px, py = r * np.cos(theta) * stretch, r * np.sin(theta) / stretch
        xs = cx + px * math.cos(turn) - py * math.sin(turn)
        ys = cy + px * math.sin(turn) + py * math.cos(turn)
        canvas = Image.new("L", (w, h), 0)
        ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist())), fill=255)
        box, alpha, drawn = _soft_alpha(canvas, g, 0.4 * r0)
        base = planes(img, box)
        if g.random() < 0.4:
            target = base * np.float32(g.uniform(0.0, 0.45) / strength)
            opacity = g.uniform(0.8, 1.0)
        else:
            delta = g.uniform(20.0, 100.0) * strength * _direction(img, g)
            target = base + np.float32(delta) * colour(g, 0.7, 1.3)
            opacity = g.uniform(0.4, 1.0)
        alpha *= np.float32(min(1.0, opacity * strength))
        return box, blend(base, target, alpha), drawn

    return inject(image, rng, attempt, min_pixels, min_delta)
