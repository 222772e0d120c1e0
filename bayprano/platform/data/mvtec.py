"""Reader and validator for datasets in the MVTec AD folder layout.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

PNG, JPEG and BMP are read; grayscale and RGB images are returned as RGB; masks are binarised.
Masks are optional per category, as in anomalib's Folder datamodule: a category without a
``ground_truth/`` folder (or whose ``category.json`` says ``{"pixel_masks": false}``) has image-level
labels only, and its defective images have no mask; with ``ground_truth/`` every defective image needs one.
Validation stops at the first problem and names it: the folder, the file, what is wrong with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bayprano.platform.data.imageio import check_mask_size, image_size, is_image_file, load_image, load_mask
from bayprano.platform.errors import DataError

GOOD = "good"
CATEGORY_INFO = "category.json"  # optional; {"pixel_masks": false} for a category without pixel ground truth
SPLITS = ("train", "test")
_IGNORED_FILES = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Sample:
    """One image of an MVTec-layout dataset and what is known about it."""

    path: str
    category: str
    split: str  # "train" or "test"
    defect_type: str  # "good" for normal images
    mask_path: str | None = None

    @property
    def label(self) -> int:
        """0 for a normal image, 1 for a defective one."""
        return 0 if self.defect_type == GOOD else 1

    @property
    def stem(self) -> str:
        return Path(self.path).stem


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith(".") and p.name.lower() not in _IGNORED_FILES)


def _image_files(folder: Path) -> list[Path]:
    files = []
    for p in _visible(folder.iterdir()):
        if p.is_dir():
            raise DataError(f"{p}: unexpected folder inside an image folder")
        if not is_image_file(p):
            raise DataError(f"{p}: not an image file (expected .png, .jpg, .jpeg or .bmp)")
        files.append(p)
    return files


def _require_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset root does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a folder")
    return root


def list_categories(root: str | os.PathLike) -> list[str]:
    """Names of the categories under ``root``: the sub-folders that hold a ``train`` folder."""
    root = _require_root(root)
    cats = [p.name for p in _visible(root.iterdir()) if p.is_dir() and (p / "train").is_dir()]
    if not cats:
        raise DataError(f"{root}: no category folders found (expected <root>/<category>/train/good/)")
    return cats


def _mask_for(category_dir: Path, defect: str, image: Path) -> Path | None:
    gt = category_dir / "ground_truth" / defect
    for suffix in (".png", ".bmp", ".jpg", ".jpeg"):
        candidate = gt / f"{image.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _has_pixel_masks(category_dir: Path) -> bool:
    info = category_dir / CATEGORY_INFO
    if not info.is_file():
        return (category_dir / "ground_truth").is_dir()
    try:
        value = json.loads(info.read_text()).get("pixel_masks", True)
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{info}: not a valid category description ({exc})") from None
    if not isinstance(value, bool):
        raise DataError(f"{info}: field 'pixel_masks' must be true or false, got {value!r}")
    return value


def scan_category(root: str | os.PathLike, category: str, check_images: bool = True) -> list[Sample]:
    """All samples of one category, validated.

    With ``check_images`` every image and mask header is read, so an unreadable file or a mask whose
    size differs from its image is reported here rather than in the middle of training.
    """
    root = _require_root(root)
    cdir = root / category
    if not cdir.is_dir():
        raise DataError(f"{cdir}: category folder does not exist")
    train_good = cdir / "train" / GOOD
    if not train_good.is_dir():
        raise DataError(f"{train_good}: missing folder (every category needs train/good/)")
    samples: list[Sample] = [Sample(str(p), category, "train", GOOD) for p in _image_files(train_good)]
    if not samples:
        raise DataError(f"{train_good}: empty category, no normal training images")
    extra_train = [p.name for p in _visible((cdir / "train").iterdir()) if p.name != GOOD]
    if extra_train:
        raise DataError(f"{cdir / 'train' / extra_train[0]}: unexpected entry, train/ must hold only good/")

    pixel_masks = _has_pixel_masks(cdir)
    test_dir = cdir / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir}: missing folder (every category needs test/)")
    for defect_dir in _visible(test_dir.iterdir()):
        if not defect_dir.is_dir():
            raise DataError(f"{defect_dir}: unexpected file, test/ must hold one folder per defect type")
        defect = defect_dir.name
        for img in _image_files(defect_dir):
            mask = None
            if defect != GOOD and pixel_masks:
                mask = _mask_for(cdir, defect, img)
                if mask is None:
                    raise DataError(
                        f"{img}: defective image without mask "
                        f"(expected {cdir / 'ground_truth' / defect / (img.stem + '_mask.png')})"
                    )
            samples.append(Sample(str(img), category, "test", defect, str(mask) if mask else None))
    if not any(s.split == "test" for s in samples):
        raise DataError(f"{test_dir}: no test images")

    if check_images:
        for s in samples:
            size = image_size(s.path)
            if s.mask_path is not None:
                msize = image_size(s.mask_path)
                if msize != size:
                    raise DataError(
                        f"{s.mask_path}: mask size {msize[1]}x{msize[0]} does not match "
                        f"image {s.path} size {size[1]}x{size[0]}"
                    )
    return samples


def scan_root(
    root: str | os.PathLike, categories: Sequence[str] | None = None, check_images: bool = True
) -> list[Sample]:
    """All samples of the given categories (default: every category under ``root``)."""
    available = list_categories(root)
    if categories:
        unknown = [c for c in categories if c not in available]
        if unknown:
            raise DataError(f"{root}: unknown category {unknown[0]!r} (available: {', '.join(available)})")
    else:
        categories = available
    out: list[Sample] = []
    for cat in categories:
        out.extend(scan_category(root, cat, check_images=check_images))
    return out


def load_sample(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image and its bool mask (all False for a normal image)."""
    image = load_image(sample.path)
    if sample.mask_path is None:
        return image, np.zeros(image.shape[:2], dtype=bool)
    mask = load_mask(sample.mask_path)
    check_mask_size(mask, image, sample.mask_path)
    return image, mask
