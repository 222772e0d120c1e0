"""Support augmentation for few shots: more views of the K good images before the normality model is fit.

With one to eight good images a normality model has seen too little of what normal looks like. Views
that a normal product can take on the line (a mirrored texture, a quarter turn of a surface, a shift of a
few pixels) add evidence at no labelling cost; AnomalyDINO's one-shot results use rotations this way.
Which views help depends on the product (a texture is the same under every view, a placed part is not
rotated on the line), so the mode is a setting:

- ``none``: the support as given;
- ``flips``: plus the horizontal and the vertical mirror image (3 views per image);
- ``dihedral``: the 8 flips and 90-degree rotations of a square image (non-square images keep the 4
  that preserve their shape);
- ``shifts``: plus 4 copies shifted by ``shift`` pixels (up, down, left, right, reflect-padded).

Views are exact pixel permutations (or reflect-padded crops), never resampled, so no interpolation blur
enters the normal statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bayprano.platform.errors import ConfigError

AUGMENTATIONS = ("none", "flips", "dihedral", "shifts")
DEFAULT_SHIFT = 4


def _dihedral(image: np.ndarray) -> list[np.ndarray]:
    views = []
    square = image.shape[0] == image.shape[1]
    for k in range(4) if square else (0, 2):
        rotated = np.rot90(image, k)
        views += [rotated, rotated[:, ::-1]]
    return views


def _shifted(image: np.ndarray, shift: int) -> list[np.ndarray]:
    h, w = image.shape[:2]
    s = min(shift, h - 1, w - 1)
    padded = np.pad(image, ((s, s), (s, s), (0, 0)), mode="reflect")
    return [image] + [padded[s + dy : s + dy + h, s + dx : s + dx + w] for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s))]


def check_augmentation(mode: str) -> str:
    """``mode`` if it is a support augmentation, else a ConfigError naming it and the valid ones."""
    if mode not in AUGMENTATIONS:
        raise ConfigError(f"support augmentation {mode!r} is not one of {', '.join(AUGMENTATIONS)}")
    return mode


def augment_support(images: Sequence[np.ndarray], mode: str = "none", shift: int = DEFAULT_SHIFT) -> list[np.ndarray]:
    """The support images and their views under ``mode`` (see the module docstring), originals first."""
    check_augmentation(mode)
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 1:
        raise ConfigError(f"support augmentation shift must be a positive number of pixels, got {shift!r}")
    originals = [np.ascontiguousarray(im) for im in images]
    if mode == "none":
        return originals
    views: list[np.ndarray] = []
    for image in originals:
        if mode == "flips":
            extra = [image[:, ::-1], image[::-1]]
        elif mode == "dihedral":
            extra = _dihedral(image)[1:]
        else:
            extra = _shifted(image, shift)[1:]
        views += [np.ascontiguousarray(v) for v in extra]
    return originals + views
