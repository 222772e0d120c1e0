"""Support augmentation: exact views of the good images, originals first, distinct views, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from bayprano.platform.data.augment import AUGMENTATIONS, augment_support
from bayprano.platform.errors import ConfigError


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode,per_image", [("none", 1), ("flips", 3), ("dihedral", 8), ("shifts", 5)])
def test_views_per_image_are_distinct_exact_permutations(mode, per_image):
    support = [image(32, 32, 0), image(32, 32, 1)]
    views = augment_support(support, mode)
    assert len(views) == per_image * 2
    assert all(np.array_equal(a, b) for a, b in zip(views[:2], support))
    assert len({v.tobytes() for v in views}) == len(views)
    for v in views:
        assert v.shape == (32, 32, 3) and v.dtype == np.uint8 and v.flags["C_CONTIGUOUS"]
    if mode in ("flips", "dihedral"):  # a flip or rotation moves pixels, it never changes them
        for v in views[2:]:
            assert any(
                np.array_equal(np.sort(v.reshape(-1, 3), axis=0), np.sort(s.reshape(-1, 3), axis=0)) for s in support
            )


def test_dihedral_of_a_rectangle_keeps_its_shape():
    views = augment_support([image(20, 40)], "dihedral")
    assert len(views) == 4 and all(v.shape == (20, 40, 3) for v in views)


def test_shifted_views_are_shifts():
    base = image(16, 16)
    views = augment_support([base], "shifts", shift=3)
    down = views[2]  # padded[s + 3 :]: the image moved up by 3 rows
    assert np.array_equal(down[:-3], base[3:])
    with pytest.raises(ConfigError, match="shift must be a positive number of pixels, got 0"):
        augment_support([base], "shifts", shift=0)


def test_unknown_mode_is_refused_with_the_valid_ones():
    with pytest.raises(ConfigError, match="'rotate' is not one of " + ", ".join(AUGMENTATIONS)):
        augment_support([image(8, 8)], "rotate")
