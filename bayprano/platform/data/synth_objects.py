"""The object categories of the synthetic generator: a bottle mouth from above, a screw in any pose, a
printed circuit board and a hex nut. Each renderer ``(rng, size, part, severity) -> Scene`` draws one
good object, or, when ``part`` names one of its structural defects (a broken rim, a cut tip, a missing
component, ...), the object with that defect and its mask."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bayprano.platform.data.synth_draw import (
    Scene,
    blend,
    coverage,
    lerp,
    mask_or_anchor,
    pixel_grid,
    rgb,
    smooth_noise,
)

_F = np.float32


def render_bottle(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    y, x = pixel_grid(size)
    cx, cy = size / 2 + rng.normal(0, 0.006 * size, 2)
    radius = 0.43 * size * (1 + 0.005 * rng.standard_normal())
    dx, dy = x - _F(cx), y - _F(cy)
    rho = np.sqrt(dx * dx + dy * dy) / _F(radius)
    phi = np.arctan2(dy, dx)
    knots = [0.0, 0.40, 0.50, 0.55, 0.60, 0.68, 0.77, 0.85, 0.92, 0.97, 1.0, 1.02]
    level = [0.05, 0.09, 0.22, 0.62, 0.42, 0.30, 0.40, 0.55, 0.30, 0.22, 0.34, 0.0]
    profile = np.interp(rho, knots, level).astype(_F)
    light = rng.normal(0.8, 0.15)
    glass = profile * (1 + 0.12 * np.cos(phi - _F(light))) * (1 + 0.05 * smooth_noise(rng, size, 8))
    glass_col = rgb(0.62, 0.50, 0.30) * (1 + 0.006 * rng.standard_normal(3)).astype(_F)
    background = (0.10 + 0.012 * smooth_noise(rng, size, size / 3))[..., None] * rgb(1.0, 1.0, 1.05)
    cover = coverage((1.0 - rho) * _F(radius))
    img = background + (glass[..., None] * glass_col / 0.62 - background) * cover[..., None]
    support = rho < 0.98
    mask = None
    if part == "broken_rim":
        # a piece of glass broken off the outer lip: background shows through a jagged edge
        a0 = rng.uniform(-np.pi, np.pi)
        half = lerp(0.04, 0.35, sev) * rng.uniform(0.6, 1.0)
        depth = lerp(0.06, 0.40, sev) * rng.uniform(0.7, 1.0)
        dphi = np.angle(np.exp(1j * (phi - a0))).astype(_F)
        jag = 0.02 * smooth_noise(rng, size, 40)
        inside_wedge = (np.abs(dphi) / _F(half)) ** 2 + ((1 - rho) / _F(depth)) ** 2 + jag < 1
        broken = inside_wedge & (rho < 1.0 + 2.0 / radius)
        soft = ndimage.gaussian_filter(broken.astype(_F), 0.7)
        edge_glint = np.clip(soft * (1 - soft) * 4, 0, 1) * 0.35
        blend(img, soft, background)
        img += edge_glint[..., None] * glass_col
        mask = ndimage.binary_dilation(broken & (rho < 1.0 + 1.0 / radius))
        mask_or_anchor(mask, cx + np.cos(a0) * radius * (1 - depth / 2), cy + np.sin(a0) * radius * (1 - depth / 2))
    return Scene(img.astype(_F), support, mask)


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
    head_cov = coverage((1 - head_f) * head_len / 2)
    saw = np.abs(np.mod((s - head0) / pitch, 1.0) - 0.5) * 2  # 0..1 triangle wave along the shaft
    thread = 1 + 0.28 * saw
    if flat is not None:
        thread = np.where((s > flat[0]) & (s < flat[1]), _F(1.02), thread)
    taper = np.clip((0.31 * size - s) / tip_len, 0.12, 1)
    half_w = core_hw * thread * taper
    shaft_cov = coverage(half_w - np.abs(t)) * coverage(tip_end - s) * coverage(s - (head0 + head_len - 2 * k))
    cover = np.maximum(head_cov, shaft_cov)
    n = np.clip(t / np.where(head_cov > shaft_cov, head_hw, half_w), -1, 1)
    n35 = (n + 0.35) * 5.0
    cyl = 0.22 + 0.45 * np.sqrt(1 - n * n) + 0.35 * np.exp(-n35 * n35)
    flank = 0.12 * np.sin(2 * np.pi * (s + 0.35 * t) / pitch)
    if flat is not None:
        flank = np.where((s > flat[0]) & (s < flat[1]), _F(0), flank)
    shade = np.where(head_cov > shaft_cov, cyl * (1 + 0.06 * np.cos(sh * 3)), cyl + flank)
    return cover.astype(_F), shade.astype(_F)


def render_screw(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    y, x = pixel_grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    cx, cy = size / 2 + np.clip(rng.normal(0, 0.04 * size, 2), -0.08 * size, 0.08 * size)
    c, s_ = np.cos(theta), np.sin(theta)
    dx, dy = x - _F(cx), y - _F(cy)
    s = dx * _F(c) + dy * _F(s_)
    t = -dx * _F(s_) + dy * _F(c)
    tip_cut, flat = 0.0, None
    if part == "manipulated_tip":
        tip_cut = max(2.5, lerp(0.015, 0.12, sev) * size * rng.uniform(0.8, 1.0))
    elif part == "thread_damage":
        length = max(2.5, lerp(0.6, 4.0, sev) * 0.034 * size)
        start = rng.uniform(-0.20 * size, 0.22 * size - length)
        flat = (start, start + length)
    cover, shade = _screw_geometry(size, s, t, tip_cut, flat)
    background = (0.74 + 0.02 * smooth_noise(rng, size, 3) + 0.012 * smooth_noise(rng, size, size / 2))[
        ..., None
    ] * rgb(1.0, 0.99, 0.96)
    k = size / 256
    shadow = ndimage.shift(ndimage.gaussian_filter(cover, 3.0 * k), (2.5 * k, 2.0 * k), order=1)
    img = background * (1 - 0.35 * shadow)[..., None]
    metal = (shade * (1 + 0.04 * smooth_noise(rng, size, size / 6)))[..., None] * rgb(0.80, 0.81, 0.83)
    img = img + (metal - img) * cover[..., None]
    mask = None
    if part == "manipulated_tip":
        full, _ = _screw_geometry(size, s, t, 0.0, None)
        mask = (full - cover) > 0.25
    elif part == "thread_damage" and flat is not None:
        mask = (s > flat[0] - 1) & (s < flat[1] + 1) & (np.abs(t) < 0.034 * size * 1.35)
    return Scene(img.astype(_F), cover > 0.5, mask)


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
    for cx, cy, hw, hh in [
        (0.5, 0.46, 0.16, 0.0025),
        (0.5, 0.74, 0.16, 0.0025),
        (0.34, 0.60, 0.0025, 0.14),
        (0.66, 0.60, 0.0025, 0.14),
    ]:
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
    spots = [
        (0.20, 0.28),
        (0.35, 0.25),
        (0.78, 0.25),
        (0.80, 0.45),
        (0.22, 0.72),
        (0.82, 0.70),
        (0.55, 0.25),
        (0.20, 0.50),
    ]
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
    cov = coverage((rect.hw - np.abs(lu)) * size) * coverage((rect.hh - np.abs(lv)) * size)
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
    y, x = pixel_grid(size)
    pose = (size / 2, size / 2, 1.0, 0.0)
    layer = np.empty((size, size, 3), _F)
    layer[:] = rgb(0.11, 0.36, 0.19)
    for r in base:
        _paint_rect(layer, None, r, pose, size)
    for hx, hy, hr in holes:
        d = np.sqrt((x / size - hx) ** 2 + (y / size - hy) ** 2) * size
        blend(layer, coverage(hr * size - d), rgb(0.80, 0.75, 0.55))
        blend(layer, coverage(hr * 0.55 * size - d), rgb(0.05, 0.05, 0.05))
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


def render_pcb(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    y, x = pixel_grid(size)
    _, components, _ = _pcb_design()
    assembled, bare = _pcb_layers(size)
    th = rng.normal(0, 0.008)
    cx0, cy0 = size / 2 + rng.normal(0, 0.008 * size, 2)
    pose = (cx0, cy0, np.cos(th), np.sin(th))
    board_half = 0.46
    dx, dy = x - _F(cx0), y - _F(cy0)
    bu = (dx * _F(pose[2]) + dy * _F(pose[3])) / size
    bv = (-dx * _F(pose[3]) + dy * _F(pose[2])) / size
    board_cov = coverage((board_half - np.abs(bu)) * size) * coverage((board_half - np.abs(bv)) * size)
    coords = np.stack([(bv + 0.5) * size, (bu + 0.5) * size])

    def place(layer: np.ndarray) -> np.ndarray:
        channels = [ndimage.map_coordinates(layer[..., k], coords, order=1, mode="nearest") for k in range(3)]
        return np.stack(channels, -1)

    board = place(assembled)
    background = (0.22 + 0.015 * smooth_noise(rng, size, size / 4))[..., None] * rgb(0.95, 0.95, 1.0)
    texture = 1 + 0.04 * smooth_noise(rng, size, 12) + 0.03 * smooth_noise(rng, size, size / 2)
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
            shift = max(lerp(0.10, 0.8, sev) * scale * rng.uniform(0.7, 1.0), 1.5 / size)
            ang = rng.uniform(0, 2 * np.pi)
            ddx, ddy = shift * np.cos(ang), shift * np.sin(ang)
            rot = np.deg2rad(lerp(2.0, 25.0, sev)) * rng.choice([-1.0, 1.0]) * (rng.uniform() < 0.6)
            ca, sa = np.cos(rot), np.sin(rot)
            new_cov = np.zeros((size, size), _F)
            for p in comp.parts:
                moved = _Rect(
                    body.cx + ddx + (p.cx - body.cx) * ca - (p.cy - body.cy) * sa,
                    body.cy + ddy + (p.cx - body.cx) * sa + (p.cy - body.cy) * ca,
                    p.hw,
                    p.hh,
                    p.color,
                    p.angle + rot,
                )
                _paint_rect(board, None, moved, pose, size)
                _paint_rect(board, new_cov, moved, pose, size)
            # where the old and the new footprint agree the image is unchanged, unless turned
            mask = (mask ^ (new_cov > 0.5)) | ((new_cov > 0.5) & (rot != 0))
        bx, by = body.cx - 0.5, body.cy - 0.5
        mask_or_anchor(mask, cx0 + (bx * pose[2] - by * pose[3]) * size, cy0 + (bx * pose[3] + by * pose[2]) * size)
    board *= texture[..., None] * jitter
    img = background + (board - background) * board_cov[..., None]
    return Scene(img.astype(_F), board_cov > 0.5, mask)


def render_nut(rng: np.random.Generator, size: int, part: str | None, sev: float) -> Scene:
    y, x = pixel_grid(size)
    cx, cy = size / 2 + rng.normal(0, 0.015 * size, 2)
    rot = rng.uniform(0, np.pi / 3)
    dx, dy = x - _F(cx), y - _F(cy)
    r = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dy, dx)
    apothem = 0.34 * size
    normals = [(np.cos(rot + k * np.pi / 3), np.sin(rot + k * np.pi / 3)) for k in range(3)]
    hex_d = np.max(np.stack([np.abs(dx * _F(nx) + dy * _F(ny)) for nx, ny in normals]), 0)
    cover = coverage(apothem - hex_d)
    face_r, hole_r, bore_r = 0.95 * apothem, 0.15 * size, 0.20 * size
    light = rng.normal(-2.2, 0.2)
    turned = 0.035 * np.sin(r * _F(2 * np.pi / (2.2 * size / 256)) + 0.8 * smooth_noise(rng, size, 6))
    face = 0.55 + 0.10 * np.cos(2 * (phi - _F(light))) + turned
    chamfer = 0.42 + 0.16 * np.cos(phi - _F(light)) + 0.04 * np.cos(3 * (phi - _F(rot)))
    bore = 0.22 + 0.04 * np.sin(r * _F(2 * np.pi / (3.0 * size / 256))) + 0.12 * np.cos(phi - _F(light) + np.pi)
    level = np.where(r < face_r, face, chamfer)
    level = np.where(r < bore_r, bore, level)
    level = level * (1 + 0.03 * smooth_noise(rng, size, size / 4))
    metal = level[..., None] * (rgb(0.74, 0.75, 0.78) * (1 + 0.006 * rng.standard_normal(3)).astype(_F))
    hole = coverage(hole_r - r)
    background = (0.16 + 0.02 * smooth_noise(rng, size, size / 2) + 0.015 * smooth_noise(rng, size, 4))[
        ..., None
    ] * rgb(0.95, 1.0, 1.12)
    solid = cover * (1 - hole)
    mask = None
    if part == "chipped_corner":
        corner = int(rng.integers(6))
        ca = rot + np.pi / 6 + corner * np.pi / 3
        circum = apothem / np.cos(np.pi / 6)
        depth = max(2.5, lerp(0.025, 0.16, sev) * size * rng.uniform(0.8, 1.0))
        tilt = rng.normal(0, 0.25)
        along = dx * _F(np.cos(ca + tilt)) + dy * _F(np.sin(ca + tilt))
        cut_line = circum * np.cos(tilt) - depth + 0.04 * size * smooth_noise(rng, size, 30) * (depth / size)
        removed = coverage(along - cut_line)
        fracture = np.clip(coverage(along - cut_line + 2.5 * size / 256) - removed, 0, 1) * cover
        metal = metal * (1 - 0.45 * fracture)[..., None]
        mask = (cover > 0.25) & ((removed > 0.25) | (fracture > 0.25))
        mask_or_anchor(mask, cx + np.cos(ca) * (circum - 2), cy + np.sin(ca) * (circum - 2))
        solid = solid * (1 - removed)
    img = background + (metal - background) * solid[..., None]
    return Scene(img.astype(_F), (cover > 0.5) & (r > hole_r + 1), mask)
