"""Decoding uploaded images safely: an allow-list of formats, limits checked before and after decoding,
and a decode that can be stopped.

An upload is untrusted. ``probe`` opens it with Pillow's PNG, JPEG, BMP and TIFF readers only, reads
only its header and checks the declared size against the per-image pixel limit of the call (the limit of
the deployment that got the request: Pillow's own process-wide ``MAX_IMAGE_PIXELS`` is neither read nor
set here, so two deployments with different limits in one process do not interfere) and the minimum side;
a JPEG with more scans than ``max_jpeg_scans`` is refused there too (each scan of a progressive JPEG
makes the decoder walk the whole image again, so a small file of repeated scans takes minutes).
``decode`` then decodes it, checks that the decoded size is the declared one, and converts it to RGB
uint8. Every Pillow failure, whatever its class, becomes an ``ImageRejected`` with a 400 or 413 status
and a message naming the image, never Pillow's own text. A ``threading.Event`` passed as ``cancel``
stops a probe or a decode at its next read of the file (the gateway sets it when the request's deadline
passes), with ``DecodeCancelled``.

Nothing here imports Ray or FastAPI: the gateway runs these functions in its bounded decode pool.
"""

from __future__ import annotations

import io
import struct
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
MIN_SIDE = 32  # the backbone's minimum image side (bayprano.platform.model.backbone.MIN_IMAGE_SIZE)


class ImageRejected(Exception):
    """An image the server will not decode: the HTTP status (400 or 413), a code and a message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class DecodeCancelled(Exception):
    """The request's deadline passed while its image was being decoded."""


@dataclass(frozen=True)
class Probe:
    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


class _CancellableBytes(io.BytesIO):
    """The upload as a file whose reads raise once ``cancel`` is set (Pillow reads it block by block)."""

    def __init__(self, data: bytes, cancel: Optional[threading.Event]):
        super().__init__(data)
        self._cancel = cancel

    def read(self, size: int | None = -1) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            raise DecodeCancelled()
        return super().read(size)


def jpeg_scans(data: bytes) -> int:
    """The number of start-of-scan markers of a JPEG stream (0xFF 0xDA cannot occur inside entropy-coded
    data, where every 0xFF byte is followed by 0x00 or a restart marker)."""
    return data.count(b"\xff\xda")


def _open(data: bytes, cancel: Optional[threading.Event]) -> ImageFile.ImageFile:
    """The upload opened by the first of the allowed readers that accepts its signature. This is what
    ``Image.open(fp, formats=FORMATS)`` does, without its check of the declared size against Pillow's
    process-wide limit: the callers check it against their own limit instead."""
    Image.preinit()  # registers the PNG, JPEG and BMP readers
    from PIL import TiffImagePlugin  # noqa: F401  (registers the TIFF reader)

    fp = _CancellableBytes(data, cancel)
    prefix = fp.read(16)
    for fmt in FORMATS:
        factory, accept = Image.OPEN[fmt]
        accepted = accept(prefix) if accept is not None else True
        if isinstance(accepted, str) or not accepted:  # a str is Pillow's warning: not this format
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
            continue
    raise UnidentifiedImageError("not an allowed image format")


def _rejected(name: str, exc: BaseException, max_pixels: int) -> ImageRejected:
    if isinstance(exc, Image.DecompressionBombError):
        return ImageRejected(413, "image_too_large", f"{name}: image is larger than the limit of {max_pixels} pixels")
    return ImageRejected(400, "bad_image", f"{name}: not a readable image ({', '.join(FORMATS)} expected)")


def probe(
    data: bytes, name: str, max_pixels: int, max_jpeg_scans: int, cancel: Optional[threading.Event] = None
) -> Probe:
    """The declared size and format of an upload, read from its header; refuses what must not be decoded.
    Raises ``DecodeCancelled`` when ``cancel`` is set while the header is read."""
    if not data:
        raise ImageRejected(400, "bad_image", f"{name}: empty image")
    try:
        with _open(data, cancel) as img:
            w, h, fmt = int(img.size[0]), int(img.size[1]), str(img.format)
    except DecodeCancelled:
        raise
    except Exception as exc:  # Pillow raises many kinds of error for hostile input; every one is the image's fault
        if cancel is not None and cancel.is_set():
            raise DecodeCancelled() from None
        raise _rejected(name, exc, max_pixels) from None
    if w * h > max_pixels:
        raise ImageRejected(
            413, "image_too_large", f"{name}: image is {w}x{h} px, more than the limit of {max_pixels} pixels"
        )
    if min(w, h) < MIN_SIDE:
        raise ImageRejected(
            400, "image_too_small", f"{name}: image is {w}x{h} px, smaller than {MIN_SIDE} px on a side"
        )
    if fmt == "JPEG" and jpeg_scans(data) > max_jpeg_scans:
        raise ImageRejected(413, "image_too_complex", f"{name}: JPEG with more than {max_jpeg_scans} scans")
    return Probe(w, h, fmt)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        peak = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def decode(
    data: bytes, name: str, expected: Probe, max_pixels: int, cancel: Optional[threading.Event] = None
) -> np.ndarray:
    """Decode an upload that ``probe`` accepted, as an RGB uint8 array (H, W, 3); the decoded size must be
    the declared one. Raises ``DecodeCancelled`` when ``cancel`` is set during the decode."""
    try:
        with _open(data, cancel) as img:
            img.load()
            if img.size != (expected.width, expected.height):
                raise ImageRejected(
                    400,
                    "bad_image",
                    f"{name}: decodes to {img.size[0]}x{img.size[1]} px, not the "
                    f"{expected.width}x{expected.height} px its header declares",
                )
            image = _to_rgb(img)
    except (ImageRejected, DecodeCancelled):
        raise
    except Exception:
        if cancel is not None and cancel.is_set():
            raise DecodeCancelled() from None
        raise ImageRejected(400, "corrupt_image", f"{name}: image data is corrupt or truncated") from None
    if image.shape[0] * image.shape[1] > max_pixels or min(image.shape[:2]) < MIN_SIDE:
        raise ImageRejected(400, "bad_image", f"{name}: decoded image is {image.shape[1]}x{image.shape[0]} px")
    return image
