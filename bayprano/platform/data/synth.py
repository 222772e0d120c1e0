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

This module holds the catalogue (which renderer and which defects make each category), the public
single-image API and the dataset writer; the drawing lives in ``synth_draw``, the categories in
``synth_textures`` and ``synth_objects`` and the surface defects in ``synth_defects``.
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

from bayprano.platform.data.imageio import encode_png
from bayprano.platform.data.mvtec import GOOD
from bayprano.platform.data.synth_defects import dent_defect, hole_defect, line_defect, particles_defect, stain_defect
from bayprano.platform.data.synth_draw import Scene, camera
from bayprano.platform.data.synth_objects import render_bottle, render_nut, render_pcb, render_screw
from bayprano.platform.data.synth_textures import render_fabric, render_metal, render_tiles, render_wood
from bayprano.platform.errors import ConfigError
from bayprano.platform.fileio import atomic_write_json

GENERATOR_VERSION = 1
MIN_SIZE = 64
MAX_SIZE = 1024

_TRAIN, _TEST_GOOD, _DEFECT_BASE = 0, 1, 2  # split codes of the per-image seed


# --------------------------------------------------------------------------------------------------
# the catalogue


@dataclass(frozen=True)
class _Category:
    kind: str
    render: Callable[..., Scene]
    defects: dict[str, Callable[..., np.ndarray] | None]  # None: drawn by the renderer itself


P = functools.partial
_CATALOGUE: dict[str, _Category] = {
    "fabric": _Category(
        "texture",
        render_fabric,
        {
            "cut": P(
                line_defect,
                kind="crack",
                tone=(0.10, 0.08, 0.06),
                width=(1.0, 3.0),
                contrast=(0.3, 0.9),
                length=(0.05, 0.35),
            ),
            "hole": P(hole_defect, tone=(0.07, 0.06, 0.05), radius=(1.3, 0.07), rim=0.3),
            "stain": P(stain_defect, tint=(0.36, 0.25, 0.12), contrast=(0.08, 0.7)),
            "thread": P(
                line_defect,
                kind="thread",
                tone=(0.22, 0.24, 0.48),
                width=(1.2, 3.0),
                contrast=(0.25, 0.9),
                length=(0.15, 0.6),
            ),
        },
    ),
    "bottle": _Category(
        "object",
        render_bottle,
        {
            "broken_rim": None,
            "contamination": P(
                particles_defect,
                tone=(0.28, 0.22, 0.14),
                count=(1, 5),
                radius=(1.2, 0.035),
                spread=0.03,
                contrast=(0.35, 0.9),
            ),
            "crack": P(
                line_defect,
                kind="crack",
                tone="light",
                width=(0.6, 1.8),
                contrast=(0.15, 0.8),
                length=(0.05, 0.3),
                border=0.0,
            ),
            "discolouration": P(
                stain_defect, tint=(0.15, 0.35, 0.20), radius=(0.06, 0.22), contrast=(0.08, 0.65), border=0.0
            ),
        },
    ),
    "brushed_metal": _Category(
        "texture",
        render_metal,
        {
            "dent": dent_defect,
            "pitting": P(
                particles_defect,
                tone=(0.20, 0.20, 0.21),
                count=(3, 30),
                radius=(0.7, 0.007),
                spread=0.04,
                contrast=(0.3, 0.95),
                border=0.15,
            ),
            "scratch": P(
                line_defect, kind="scratch", tone="either", width=(0.6, 2.0), contrast=(0.10, 0.7), length=(0.08, 0.6)
            ),
            "stain": P(stain_defect, tint=(0.48, 0.40, 0.28), contrast=(0.05, 0.6)),
        },
    ),
    "screw": _Category(
        "object",
        render_screw,
        {
            "contamination": P(
                particles_defect,
                tone=(0.25, 0.20, 0.15),
                count=(1, 3),
                radius=(1.0, 0.02),
                spread=0.01,
                contrast=(0.4, 0.9),
            ),
            "manipulated_tip": None,
            "scratch": P(
                line_defect,
                kind="scratch",
                tone="either",
                width=(0.6, 1.8),
                contrast=(0.15, 0.8),
                length=(0.03, 0.12),
                border=0.0,
            ),
            "thread_damage": None,
        },
    ),
    "wood": _Category(
        "texture",
        render_wood,
        {
            "crack": P(
                line_defect,
                kind="grain_crack",
                tone=(0.12, 0.07, 0.04),
                width=(0.7, 2.5),
                contrast=(0.2, 0.9),
                length=(0.08, 0.55),
            ),
            "hole": P(hole_defect, tone=(0.08, 0.05, 0.03), radius=(1.2, 0.045), rim=-0.2),
            "scratch": P(
                line_defect,
                kind="scratch",
                tone=(0.88, 0.76, 0.60),
                width=(0.6, 2.0),
                contrast=(0.08, 0.6),
                length=(0.08, 0.5),
            ),
            "stain": P(stain_defect, tint=(0.22, 0.13, 0.07), contrast=(0.06, 0.65)),
        },
    ),
    "pcb": _Category(
        "object",
        render_pcb,
        {
            "contamination": P(
                particles_defect,
                tone=(0.80, 0.80, 0.78),
                count=(1, 4),
                radius=(1.0, 0.02),
                spread=0.02,
                contrast=(0.4, 0.95),
            ),
            "misplaced_component": None,
            "missing_component": None,
            "scratch": P(
                line_defect,
                kind="scratch",
                tone=(0.72, 0.60, 0.35),
                width=(0.6, 1.8),
                contrast=(0.15, 0.85),
                length=(0.05, 0.35),
                border=0.0,
            ),
        },
    ),
    "tiles": _Category(
        "texture",
        render_tiles,
        {
            "chip": P(hole_defect, tone=(0.55, 0.50, 0.45), radius=(1.5, 0.07), contrast=(0.3, 0.9), rim=0.1),
            "crack": P(
                line_defect,
                kind="crack",
                tone=(0.25, 0.24, 0.22),
                width=(0.6, 1.8),
                contrast=(0.15, 0.85),
                length=(0.06, 0.4),
            ),
            "scratch": P(
                line_defect, kind="scratch", tone="dark", width=(0.6, 1.6), contrast=(0.08, 0.5), length=(0.06, 0.4)
            ),
            "stain": P(stain_defect, tint=(0.62, 0.50, 0.28), contrast=(0.06, 0.65)),
        },
    ),
    "hex_nut": _Category(
        "object",
        render_nut,
        {
            "chipped_corner": None,
            "contamination": P(
                particles_defect,
                tone=(0.10, 0.09, 0.08),
                count=(1, 4),
                radius=(1.0, 0.025),
                spread=0.03,
                contrast=(0.4, 0.9),
            ),
            "rust": P(
                stain_defect,
                tint=(0.55, 0.28, 0.10),
                radius=(0.04, 0.18),
                contrast=(0.10, 0.75),
                border=0.0,
                speckle=0.6,
            ),
            "scratch": P(
                line_defect,
                kind="scratch",
                tone="either",
                width=(0.6, 1.8),
                contrast=(0.12, 0.75),
                length=(0.05, 0.3),
                border=0.0,
            ),
        },
    ),
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
    return camera(scene.image, rng)


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
    return camera(scene.image, rng), np.ascontiguousarray(mask, dtype=bool)


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


def _write_category(
    out: str, category: str, seed: int, size: int, n_train: int, n_test_good: int, n_test_defective: int
) -> str:
    """Render one category into a hidden folder inside ``out``, then move it into place."""
    out_path = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.", suffix=".tmp", dir=out_path))
    try:
        root = tmp / category
        for split_code, folder, n in ((_TRAIN, "train", n_train), (_TEST_GOOD, "test", n_test_good)):
            (root / folder / GOOD).mkdir(parents=True)
            for i in range(n):
                _write_png(
                    root / folder / GOOD / f"{_name(i, n)}.png",
                    render_good(category, _stream(seed, category, split_code, i), size),
                )
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
            raise ConfigError(f"categories: must be from 1 to {len(CATEGORIES)} or a list of names, got {categories!r}")
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
