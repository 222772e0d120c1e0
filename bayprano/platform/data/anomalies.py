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
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bayprano.platform.errors import ConfigError, DataError

KINDS = ("cut_paste", "texture_blend", "scratch", "blob")
# The families are split so that meta-learning is measured on defects it never saw: meta-training (train,
# evaluate's meta-training, tune, the Factory's local updates) injects only the families that ``data synth``'s
# test defects do not resemble; the families of those defects (lines, holes, stains) are kept for validation
# (the sites' validation during federated training, the meta-validation of the post-processing menu).
TRAINING_KINDS = ("cut_paste", "texture_blend")
VALIDATION_KINDS = ("scratch", "blob")
TEXTURES = ("noise", "stripes", "checker", "gradient", "tint", "source")
MIN_SIDE = 16

_STRENGTHS = (1.0, 1.5, 2.0, 3.0)
_FORCED_DELTA = 32.0

# One attempt, from (image, rng, strength, gray): the box it changes (y0, y1, x0, x1), the float
# composite of that box, and the intended region within it.
_Attempt = Callable[
    [np.ndarray, np.random.Generator, float, bool], tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]
]


# ----------------------------------------------------------------------------------------- checks


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray):
        raise DataError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{name}: expected a uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise DataError(
            f"{name}: {image.shape[1]}x{image.shape[0]} is too small, both sides must be at least {MIN_SIDE}"
        )


def _check_rng(rng: np.random.Generator) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected a pair (low, high)") from None
    if not (low <= a <= b <= high):
        raise ConfigError(f"{name}={value!r}: expected {low} <= low <= high <= {high}")
    return a, b


def _is_int(value: object, low: int, high: float) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and low <= value <= high


def _check_limits(min_pixels: int, min_delta: int, image: np.ndarray | None = None) -> None:
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


def _bbox(region: np.ndarray) -> Box:
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def _crop(array: np.ndarray, box: Box) -> np.ndarray:
    return array[box[0] : box[1], box[2] : box[3]]


def _planes(image: np.ndarray, box: Box) -> np.ndarray:
    """The box of a uint8 (H, W, 3) image as float32 (3, h, w)."""
    return _crop(image, box).transpose(2, 0, 1).astype(np.float32)


def _finish(
    image: np.ndarray, box: Box, composite: np.ndarray, gray: bool, min_delta: int
) -> tuple[np.ndarray, np.ndarray]:
    """Round the composite of ``box`` (overwritten) to uint8; keep changes of ``min_delta`` levels or more."""
    original = _planes(image, box)
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
    out = _planes(image, box)
    shift = np.where(out.mean(axis=0) > 127.5, -1.0, 1.0).astype(np.float32)
    shift *= np.float32(max(_FORCED_DELTA, float(min_delta))) * full
    out += shift
    return box, out


def _inject(
    image: np.ndarray, rng: np.random.Generator, attempt: _Attempt, min_pixels: int, min_delta: int
) -> tuple[np.ndarray, np.ndarray]:
    _check_image(image)
    _check_rng(rng)
    _check_limits(min_pixels, min_delta, image)
    gray = _is_gray(image)
    for strength in _STRENGTHS:
        box, composite, region = attempt(image, rng, strength, gray)
        out, mask = _finish(image, box, composite, gray, min_delta)
        if mask.sum() >= min_pixels:
            return out, mask
    box, composite = _forced(image, box, region, rng, min_pixels, min_delta)
    return _finish(image, box, composite, gray, min_delta)


def _blend(base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base * (1 - alpha) + target * alpha``, computed in ``target``: (3, h, w) arrays, alpha (h, w)."""
    target -= base
    target *= alpha
    target += base
    return target


def _colour(rng: np.random.Generator, low: float = 0.0, high: float = 255.0) -> np.ndarray:
    """A random (3, 1, 1) float32 colour (or gain, or offset), broadcastable against (3, h, w)."""
    return rng.uniform(low, high, (3, 1, 1)).astype(np.float32)


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 image or a float32 (H, W) array."""
    if array.shape[:2] == (height, width):
        return array
    return np.array(Image.fromarray(array).resize((width, height), Image.BILINEAR), dtype=array.dtype)


# ------------------------------------------------------------------------------------------ noise


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
        total += np.float32(weight) * _resize(layer, rh, rw)
    total /= np.float32(sum(weights))
    return _resize(total, height, width)


# --------------------------------------------------------------------------------------- textures


def _source_texture(source: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    sh, sw = source.shape[:2]
    frac = rng.uniform(0.25, 1.0)
    ch, cw = max(1, int(sh * frac)), max(1, int(sw * frac))
    y, x = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    crop = np.rot90(source[y : y + ch, x : x + cw], int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _resize(np.ascontiguousarray(crop), height, width).transpose(2, 0, 1).astype(np.float32)


def _foreign_texture(
    image: np.ndarray, box: Box, rng: np.random.Generator, source: np.ndarray | None, kind: str
) -> np.ndarray:
    """A float32 (3, h, w) texture for ``box`` of the image, unrelated to the image's own surface."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    if kind == "source":
        return _source_texture(source, h, w, rng)
    if kind == "tint":
        tinted = _planes(image, box)
        tinted *= _colour(rng, 0.5, 1.5)
        tinted += _colour(rng, -40.0, 40.0)
        return tinted
    c1, c2 = _colour(rng), _colour(rng)
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


# ---------------------------------------------------------------------------------- the four kinds


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
    area = _check_range("area", area, 1e-4, 0.5)
    aspect = _check_range("aspect", aspect, 0.05, 20.0)
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
            patch = np.asarray(Image.fromarray(patch).rotate(angle, Image.BILINEAR, expand=True))[:h, :w]
            full = Image.fromarray(np.full((ph, pw), 255, np.uint8)).rotate(angle, Image.NEAREST, expand=True)
            keep = (np.asarray(full) > 0)[:h, :w]
        j = jitter * strength
        patch = patch.transpose(2, 0, 1).astype(np.float32)
        mean = np.float32(patch.mean())
        contrast, brightness = np.float32(1.0 + g.uniform(-j, j)), np.float32(1.0 + g.uniform(-j, j))
        patch -= mean
        patch *= contrast
        patch += mean
        patch *= brightness * _colour(g, 1.0 - j / 2, 1.0 + j / 2)
        qh, qw = keep.shape
        dy, dx = int(g.integers(0, h - qh + 1)), int(g.integers(0, w - qw + 1))
        box = (dy, dy + qh, dx, dx + qw)
        composite = _planes(img, box)
        composite[:, keep] = patch[:, keep]
        return box, composite, keep

    return _inject(image, rng, attempt, min_pixels, min_delta)


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
    beta = _check_range("beta", beta, 0.0, 1.0)
    coverage = _check_range("coverage", coverage, 1e-4, 0.9)
    chosen = tuple(TEXTURES if textures is None else textures)
    unknown = [t for t in chosen if t not in TEXTURES]
    if unknown:
        raise ConfigError(f"textures: unknown texture {unknown[0]!r} (valid: {', '.join(TEXTURES)})")
    if source is not None:
        _check_image(source, "source")
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
        box = _bbox(alpha > 0)
        alpha = _crop(alpha, box) * np.float32(min(1.0, g.uniform(*beta) * strength))
        texture = _foreign_texture(img, box, g, source, chosen[int(g.integers(0, len(chosen)))])
        return box, _blend(_planes(img, box), texture, alpha), _crop(noise, box) >= threshold

    return _inject(image, rng, attempt, min_pixels, min_delta)


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


def _soft_alpha(
    canvas: Image.Image, rng: np.random.Generator, max_radius: float
) -> tuple[Box, np.ndarray, np.ndarray]:
    """Box, alpha (float32 in [0, 1]) and drawn region of a shape on ``canvas``; blurred half the time."""
    drawn = np.asarray(canvas) > 0
    y0, y1, x0, x1 = _bbox(drawn)
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
    return box, alpha, _crop(drawn, box)


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
    lo, hi = (int(v) for v in _check_range("count", count, 1, 64))
    length = _check_range("length", length, 0.01, 4.0)
    contrast = _check_range("contrast", contrast, 1.0, 255.0)

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
        shift = np.float32(delta) * _colour(g, 0.85, 1.15)
        base = _planes(img, box)
        return box, _blend(base, base + shift, alpha), drawn

    return _inject(image, rng, attempt, min_pixels, min_delta)


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
    radius = _check_range("radius", radius, 1e-3, 1.0)

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
        base = _planes(img, box)
        if g.random() < 0.4:
            target = base * np.float32(g.uniform(0.0, 0.45) / strength)
            opacity = g.uniform(0.8, 1.0)
        else:
            delta = g.uniform(20.0, 100.0) * strength * _direction(img, g)
            target = base + np.float32(delta) * _colour(g, 0.7, 1.3)
            opacity = g.uniform(0.4, 1.0)
        alpha *= np.float32(min(1.0, opacity * strength))
        return box, _blend(base, target, alpha), drawn

    return _inject(image, rng, attempt, min_pixels, min_delta)


# ---------------------------------------------------------------------------------------- injector

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
        _check_limits(min_pixels, min_delta)
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
        _check_rng(rng)
        kind = self.choose(rng)
        params = {"min_pixels": self.min_pixels, "min_delta": self.min_delta}
        if kind == "texture_blend":
            params["source"] = source
        return ANOMALIES[kind](image, rng, **params)

    def __repr__(self) -> str:
        return f"AnomalyInjector(kinds={self.kinds}, weights={tuple(round(w, 4) for w in self.weights)})"
