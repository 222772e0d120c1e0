"""Small MVTec-layout datasets written with PIL, for tests that build their own roots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_mvtec_category(
    root: Path,
    category: str,
    n_train: int = 4,
    n_test_good: int = 2,
    defects: dict[str, int] | None = None,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """A small category in the MVTec layout with random images and rectangular defect masks."""
    rng = np.random.default_rng(seed)
    defects = {"scratch": 2, "hole": 1} if defects is None else defects
    cdir = root / category

    def image() -> np.ndarray:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    for split, n in (("train", n_train), ("test", n_test_good)):
        (cdir / split / "good").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(image()).save(cdir / split / "good" / f"{i:03d}.png")
    for defect, n in defects.items():
        (cdir / "test" / defect).mkdir(parents=True, exist_ok=True)
        (cdir / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(image()).save(cdir / "test" / defect / f"{i:03d}.png")
            mask = np.zeros((size, size), np.uint8)
            mask[4 + i : 12 + i, 6:14] = 255
            Image.fromarray(mask).save(cdir / "ground_truth" / defect / f"{i:03d}_mask.png")
    return cdir
