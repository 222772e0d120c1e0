"""The images an evaluation runs on: one category's train/good and test images at one side, the pixel
hashes that check the support, meta-training and test pools are disjoint, and seeded support draws."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayprano.platform.data.imageio import resize_square
from bayprano.platform.data.mvtec import load_sample, scan_category
from bayprano.platform.errors import ConfigError, DataError


@dataclass
class CategoryData:
    name: str
    train_images: np.ndarray  # (N, S, S, 3) uint8, train/good
    train_ids: list[str]
    test_images: np.ndarray
    test_masks: np.ndarray  # (M, S, S) bool
    test_labels: np.ndarray
    test_ids: list[str]
    has_pixel_masks: bool


def load_category(root: str | Path, category: str, size: int) -> CategoryData:
    samples = scan_category(root, category)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    tr = [resize_square(load_sample(s)[0], size) for s in train]
    te = [load_sample(s) for s in test]
    has_masks = all(s.mask_path is not None for s in test if s.label == 1)
    labels = np.array([s.label for s in test])
    if len(set(labels.tolist())) < 2:
        raise DataError(f"{Path(root) / category}: the test split needs both good and defective images")
    return CategoryData(
        category,
        np.stack(tr),
        [s.path for s in train],
        np.stack([resize_square(im, size) for im, _ in te]),
        np.stack([resize_square(m, size, mask=True) for _, m in te]),
        labels,
        [s.path for s in test],
        has_masks,
    )


def pixel_hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def check_disjoint(pools: dict[str, set[str]]) -> None:
    """Raise if any two named pools of image hashes share an image."""
    names = list(pools)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = pools[a] & pools[b]
            if shared:
                raise DataError(f"leakage: {len(shared)} image(s) are in both the {a} and the {b} pool")


def support_indices(n: int, shots: int, seed: int, category: str) -> np.ndarray:
    if shots > n:
        raise ConfigError(f"--shots {shots} is more than the {n} good training images of category {category!r}")
    digest = int(hashlib.sha256(f"{category}/{shots}/{seed}".encode()).hexdigest()[:8], 16)
    return np.sort(np.random.default_rng(digest).choice(n, size=shots, replace=False))
