"""Lay a plant's own loose images out as one MVTec-layout category.

The equivalent of anomalib's Folder datamodule: a folder of normal images, optionally a folder of
abnormal images (flat, or one sub-folder per defect type) and a folder of masks matched by file stem.
Some normals are held back as ``test/good`` so that the category can be evaluated; the rest become
``train/good``, the pool that support sets are drawn from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from bayprano.platform.data.imageio import check_mask_size, encode_png, is_image_file, load_image, load_mask
from bayprano.platform.data.mvtec import CATEGORY_INFO, GOOD, scan_category
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_directory, atomic_write_json

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _images_in(folder: Path, what: str) -> list[Path]:
    if not folder.exists():
        raise DataError(f"{folder}: {what} folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} path is not a folder")
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if not is_image_file(p):
            raise DataError(f"{p}: not an image file (expected .png, .jpg, .jpeg or .bmp)")
        files.append(p)
    if not files:
        raise DataError(f"{folder}: {what} folder holds no images")
    return files


def _find_mask(masks: Path, stem: str, defect: str) -> Path | None:
    for base in (masks / defect, masks):
        for name in (f"{stem}_mask", stem):
            for suffix in (".png", ".bmp", ".jpg", ".jpeg"):
                candidate = base / f"{name}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def import_folder(
    category: str,
    normal: str | os.PathLike,
    out: str | os.PathLike,
    abnormal: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write ``<out>/<category>/`` in the MVTec layout and return counts of what was written.

    Normal images are shuffled with ``seed``; a ``test_fraction`` of them (at least one) goes to
    ``test/good``. Abnormal images go to ``test/<defect>`` where ``<defect>`` is the sub-folder name, or
    ``defect`` for a flat folder. An abnormal image without a mask gets none only if ``masks`` is not
    given; with ``masks`` every abnormal image needs one of the same size. Without ``masks`` the category
    records that it has no pixel ground truth (``category.json``), and only image-level metrics apply.
    Images are re-encoded as PNG.
    The category appears whole or not at all.
    """
    if not _NAME.match(category):
        raise ConfigError(f"--category {category!r}: use letters, digits, '_', '-' or '.'")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {test_fraction}: must be between 0 and 1 (exclusive)")
    if masks is not None and abnormal is None:
        raise ConfigError("--masks needs --abnormal: masks belong to abnormal images")
    out = Path(out)
    target = out / category
    if target.exists() and not overwrite:
        raise DataError(f"{target}: category already exists (pass --overwrite to replace it)")

    normals = _images_in(Path(normal), "normal")
    if len(normals) < 2:
        raise DataError(f"{normal}: need at least 2 normal images (one for training, one for testing)")
    order = np.random.default_rng(seed).permutation(len(normals))
    n_test = min(max(1, int(round(test_fraction * len(normals)))), len(normals) - 1)
    test_idx = set(order[:n_test].tolist())

    abnormal_sets: dict[str, list[Path]] = {}
    if abnormal is not None:
        adir = Path(abnormal)
        subdirs = (
            [p for p in sorted(adir.iterdir()) if p.is_dir() and not p.name.startswith(".")] if adir.is_dir() else []
        )
        if subdirs:
            for sub in subdirs:
                if sub.name == GOOD:
                    raise DataError(f"{sub}: a defect type cannot be called 'good'")
                abnormal_sets[sub.name] = _images_in(sub, "abnormal")
        else:
            abnormal_sets["defect"] = _images_in(adir, "abnormal")
    mask_dir = Path(masks) if masks is not None else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: masks folder does not exist")

    counts = {"train/good": 0, "test/good": 0}
    with atomic_directory(target) as staging:
        for i, src in enumerate(normals):
            split = "test" if i in test_idx else "train"
            _write(staging / split / GOOD / f"{src.stem}.png", encode_png(load_image(src)))
            counts[f"{split}/good"] += 1
        for defect, files in abnormal_sets.items():
            for src in files:
                image = load_image(src)
                _write(staging / "test" / defect / f"{src.stem}.png", encode_png(image))
                if mask_dir is not None:
                    mpath = _find_mask(mask_dir, src.stem, defect)
                    if mpath is None:
                        raise DataError(
                            f"{src}: abnormal image without mask in {mask_dir} (expected {src.stem}_mask.png)"
                        )
                    mask = load_mask(mpath)
                    check_mask_size(mask, image, mpath, image_name=src)
                    _write(staging / "ground_truth" / defect / f"{src.stem}_mask.png", encode_png(mask))
                counts[f"test/{defect}"] = counts.get(f"test/{defect}", 0) + 1
        (staging / "test").mkdir(exist_ok=True)
        if abnormal_sets and mask_dir is None:
            atomic_write_json(staging / CATEGORY_INFO, {"pixel_masks": False})
        scan_category(out, staging.name)
    return {"category": category, "root": str(out), "counts": counts}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise DataError(f"{path}: two input images share the stem {path.stem!r}; rename one of them")
    path.write_bytes(data)
