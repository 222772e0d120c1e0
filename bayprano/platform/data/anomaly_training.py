"""The meta-training families of synthetic anomalies: ``cut_paste`` (CutPaste: a patch of the image
pasted elsewhere, or a thin rotated scar) and ``texture_blend`` (DRAEM: a foreign texture blended in
through a thresholded fractal Perlin noise mask), with the noise and the textures they use."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from bayprano.platform.data.anomaly_compositing import (
    Box,
    bbox,
    blend,
    check_image,
    check_range,
    colour,
    crop,
    inject,
    planes,
    resize,
)
from bayprano.platform.errors import ConfigError

TEXTURES = ("noise", "stripes", "checker", "gradient", "tint", "source")


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _perlin_octave(cells: tuple[int, int], per_cell: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise on a ``cells`` lattice, ``per_cell`` pixels per cell, about [-1, 1]."""
    (cy, cx), (py, px) = cells, per_cell
    angles = rng.uniform(0.0, 2.0 * np.pi, (cy + 1, cx + 1))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    fy = np.tile((np.arange(py, dtype=np.float32) + 0.5) / py, cy)[:, None]
    fx = np.tile((np.arange(px, dtype=np.float32) + 0.5) / px, cx)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        def up(g: np.ndarray) -> np.ndarray:
            return np.repeat(np.repeat(g[dy : cy + dy, dx : cx + dx], py, axis=0), px, axis=1)

        return up(gy) * (fy - dy) + up(gx) * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + (n01 - n00) * v
    bottom = n10 + (n11 - n10) * v
    return (top + (bottom - top) * u) * np.float32(math.sqrt(2.0))


def perlin_noise(
    shape: tuple[int, int],
    rng: np.random.Generator,
    cells: tuple[int, int] = (4, 4),
    octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """Fractal Perlin noise, float32 of ``shape``, roughly in [-1, 1].

    ``cells`` is the lattice of the coarsest octave (rows, columns); each further octave doubles it and
    weighs ``persistence`` times less, up to a lattice cell of 8 pixels. Octaves are computed at about
    a quarter of the resolution (2 to 8 samples per cell), summed and resized bilinearly: thresholded,
    the noise then has smooth outlines at a fraction of the cost.
    """
    height, width = int(shape[0]), int(shape[1])
    if octaves < 1 or min(cells) < 1:
        raise ConfigError(f"perlin_noise: octaves={octaves} and cells={cells} must be at least 1")
    layers, weights = [], []
    for octave in range(octaves):
        cy, cx = cells[0] * 2**octave, cells[1] * 2**octave
        if octave > 0 and (cy > height / 8 or cx > width / 8):
            break
        py = int(np.clip((height // 4) // cy, 2, 8))
        px = int(np.clip((width // 4) // cx, 2, 8))
        layers.append(_perlin_octave((cy, cx), (py, px), rng))
        weights.append(persistence**octave)
    rh, rw = max(a.shape[0] for a in layers), max(a.shape[1] for a in layers)
    total = np.zeros((rh, rw), dtype=np.float32)
    for layer, weight in zip(layers, weights):
        total += np.float32(weight) * resize(layer, rh, rw)
    total /= np.float32(sum(weights))
    return resize(total, height, width)


def _source_texture(source: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    sh, sw = source.shape[:2]
    frac = rng.uniform(0.25, 1.0)
    ch, cw = max(1, int(sh * frac)), max(1, int(sw * frac))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = np.rot90(source[y : y + ch, x : x + cw], int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return resize(np.ascontiguousarray(crop), height, width).transpose(2, 0, 1).astype(np.float32)


def _foreign_texture(
    image: np.ndarray, box: Box, rng: np.random.Generator, source: np.ndarray | None, kind: str
) -> np.ndarray:
    """A float32 (3, h, w) texture for ``box`` of the image, unrelated to the image's own surface."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    if kind == "source":
        if source is None:
            raise ConfigError("texture 'source' needs a source image")
        return _source_texture(source, h, w, rng)
    if kind == "tint":
        tinted = planes(image, box)
        tinted *= colour(rng, 0.5, 1.5)
        tinted += colour(rng, -40.0, 40.0)
        return tinted
    c1, c2 = colour(rng), colour(rng)
    if kind == "noise":
        cells = int(rng.integers(1, 9))
        t = perlin_noise((h, w), rng, (cells, cells), octaves=2)
        t *= np.float32(0.5)
        t += np.float32(0.5)
    else:
        theta = rng.uniform(0.0, np.pi)
        cos, sin = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        yy = np.arange(y0, y1, dtype=np.float32)[:, None]
        xx = np.arange(x0, x1, dtype=np.float32)[None, :]
        along = xx * cos + yy * sin
        if kind == "gradient":
            t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        else:
            side = min(image.shape[:2])
            omega = np.float32(2 * np.pi / rng.uniform(3.0, max(4.0, side / 3)))
            wave = np.sin(along * omega)
            if kind == "checker":
                t = (wave * np.sin((yy * cos - xx * sin) * omega) > 0).astype(np.float32)
            elif rng.random() < 0.5:
                t = wave * 0.5 + 0.5
            else:
                t = (wave > 0).astype(np.float32)
    texture = t * (c2 - c1)
    texture += c1
    return texture


def cut_paste(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    scar: bool | None = None,
    area: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 3.3),
    rotate: bool | None = None,
    jitter: float = 0.1,
    min_pixels: int = 16,
    min_delta: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste a patch of the image elsewhere in it (CutPaste).

    ``scar``: a thin long patch (2-16 by 10-25 pixels at 256 px, scaled with the image), always rotated
    by up to 45 degrees; None picks scar or plain patch with equal odds. A plain patch covers a fraction
    ``area`` of the image, with height/width ratio in ``aspect``; ``rotate`` None rotates half of them.
    ``jitter`` is the brightness, contrast and colour jitter of the patch (0.1: up to 10%).
    """
    area = check_range("area", area, 1e-4, 0.5)
    aspect = check_range("aspect", aspect, 0.05, 20.0)
    if not 0.0 <= jitter <= 1.0:
        raise ConfigError(f"jitter={jitter!r}: expected a value from 0 to 1")

    def attempt(img: np.ndarray, g: np.random.Generator, strength: float, gray: bool):
        h, w = img.shape[:2]
        unit = min(h, w) / 256.0
        is_scar = bool(g.random() < 0.5) if scar is None else scar
        if is_scar:
            ph = int(min(h, max(4, round(g.uniform(10, 25) * unit))))
            pw = int(min(w, max(1, round(g.uniform(2, 16) * unit))))
            angle = g.uniform(-45.0, 45.0)
        else:
            a = g.uniform(*area) * h * w
            r = math.exp(g.uniform(math.log(aspect[0]), math.log(aspect[1])))
            ph = int(np.clip(round(math.sqrt(a * r)), 2, h - 1))
            pw = int(np.clip(round(math.sqrt(a / r)), 2, w - 1))
            turn = bool(g.random() < 0.5) if rotate is None else rotate
            angle = g.uniform(-180.0, 180.0) if turn else 0.0
        y0, x0 = int(g.integers(0, h - ph + 1)), int(g.integers(0, w - pw + 1))
        patch = img[y0 : y0 + ph, x0 : x0 + pw]
        keep = np.ones((ph, pw), dtype=bool)
        if angle:
            patch = np.asarray(Image.fromarray(patch).rotate(angle, Image.Resampling.BILINEAR, expand=True))[:h, :w]
            full = Image.fromarray(np.full((ph, pw), 255, np.uint8)).rotate(
                angle, Image.Resampling.NEAREST, expand=True
            )
            keep = (np.asarray(full) > 0)[:h, :w]
        j = jitter * strength
        patch = patch.transpose(2, 0, 1).astype(np.float32)
        mean = np.float32(patch.mean())
        contrast, brightness = np.float32(1.0 + g.uniform(-j, j)), np.float32(1.0 + g.uniform(-j, j))
        patch -= mean
        patch *= contrast
        patch += mean
        patch *= brightness * colour(g, 1.0 - j / 2, 1.0 + j / 2)
        qh, qw = keep.shape
        dy, dx = int(g.integers(0, h - qh + 1)), int(g.integers(0, w - qw + 1))
        box = (dy, dy + qh, dx, dx + qw)
        composite = planes(img, box)
        composite[:, keep] = patch[:, keep]
        return box, composite, keep

    return inject(image, rng, attempt, min_pixels, min_delta)


def texture_blend(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    source: np.ndarray | None = None,
    beta: tuple[float, float] = (0.15, 1.0),
    coverage: tuple[float, float] = (0.005, 0.4),
    textures: Sequence[str] | None = None,
    min_pixels: int = 16,
    min_delta: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend a foreign texture into the image through a thresholded Perlin noise mask (DRAEM).

    The noise lattice is drawn per axis from 1 to 16 cells, so regions range from large smooth patches
    to scattered specks and elongated streaks; the threshold makes the region cover a log-uniform
    fraction in ``coverage`` of the image, with a soft edge of random width. The texture is one of
    ``textures`` (default all of ``TEXTURES``; "source" only when ``source`` is given: a random crop of
    it, rotated, flipped and resized), blended with a factor drawn from ``beta``; a low factor over a
    large area gives the faint, low-contrast discolourations that real defects include.
    """
    beta = check_range("beta", beta, 0.0, 1.0)
    coverage = check_range("coverage", coverage, 1e-4, 0.9)
    chosen = tuple(TEXTURES if textures is None else textures)
    unknown = [t for t in chosen if t not in TEXTURES]
    if unknown:
        raise ConfigError(f"textures: unknown texture {unknown[0]!r} (valid: {', '.join(TEXTURES)})")
    if source is not None:
        check_image(source, "source")
    else:
        chosen = tuple(t for t in chosen if t != "source")
    if not chosen:
        raise ConfigError(f"textures={textures!r}: no usable texture (source textures need source=)")

    def attempt(img: np.ndarray, g: np.random.Generator, strength: float, gray: bool):
        h, w = img.shape[:2]
        cells = (int(2 ** g.integers(0, 5)), int(2 ** g.integers(0, 5)))
        noise = perlin_noise((h, w), g, cells, octaves=int(g.integers(1, 5)))
        frac = math.exp(g.uniform(math.log(coverage[0]), math.log(coverage[1])))
        frac = min(coverage[1], frac * strength)
        threshold = np.float32(np.quantile(noise[::2, ::2], 1.0 - frac))
        alpha = noise - threshold
        alpha /= np.float32(g.uniform(0.005, 0.15))
        np.clip(alpha, 0.0, 1.0, out=alpha)
        box = bbox(alpha > 0)
        alpha = crop(alpha, box) * np.float32(min(1.0, g.uniform(*beta) * strength))
        texture = _foreign_texture(img, box, g, source, chosen[int(g.integers(0, len(chosen)))])
        return box, blend(planes(img, box), texture, alpha), crop(noise, box) >= threshold

    return inject(image, rng, attempt, min_pixels, min_delta)
