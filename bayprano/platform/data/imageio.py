"""Reading and writing images and masks as numpy arrays.

Conventions used across the platform: an image is a ``uint8`` array of shape (H, W, 3) in RGB order,
whatever the file held (grayscale, palette, RGBA, 16-bit); a mask is a ``bool`` array of shape (H, W).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bayprano.platform.errors import DataError
from bayprano.platform.fileio import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _open(source: str | os.PathLike | bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{what}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{what}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    return img


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Load an image file (or encoded bytes) as an RGB ``uint8`` array of shape (H, W, 3)."""
    what = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "image bytes")
    return _to_rgb(_open(source, what))


def load_mask(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
    """Load a ground-truth mask as a ``bool`` array (H, W): any non-zero pixel is a defect pixel."""
    what = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "mask bytes")
    img = _open(source, what)
    arr = np.asarray(img.convert("L") if img.mode not in ("1", "L", "I", "I;16") else img)
    return np.ascontiguousarray(arr > 0)


def check_mask_size(mask: np.ndarray, image: np.ndarray, where: object, image_name: object = None) -> None:
    """Raise a DataError naming ``where`` (the mask's file or row) unless ``mask`` is the image's size."""
    if mask.shape != image.shape[:2]:
        of = "image" if image_name is None else f"image {image_name}"
        raise DataError(
            f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
            f"{of} size {image.shape[1]}x{image.shape[0]}"
        )


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    return h, w


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode an RGB image or a bool/uint8 mask as PNG bytes (lossless)."""
    if array.dtype == bool:
        img = Image.fromarray(array.astype(np.uint8) * 255, mode="L")
    elif array.ndim == 2:
        img = Image.fromarray(array.astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(array.astype(np.uint8), mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write an image or mask as PNG, atomically."""
    return atomic_write_bytes(path, encode_png(array, compress_level=6))


def resize_square(image: np.ndarray, size: int, mask: bool = False) -> np.ndarray:
    """An image (bilinear) or a boolean mask (nearest) resized to ``size`` x ``size``; unchanged if it is."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    if mask:
        return (
            np.asarray(Image.fromarray(image.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST))
            > 127
        )
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
