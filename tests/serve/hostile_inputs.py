"""Hostile uploads, built here byte by byte or with Pillow: what a careless or malicious client sends.

Used by the hostile-input tests and by ``benchmarks/serve_load.py``'s hostile clients.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def encoded(image: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def noise(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def other_formats(side: int = 64) -> dict[str, bytes]:
    """Formats Pillow reads but the server must not: DDS, ICO, ICNS, GIF, WebP."""
    image = noise(side)
    return {fmt.lower(): encoded(image, fmt) for fmt in ("DDS", "ICO", "ICNS", "GIF", "WEBP")}


def flat_png(side: int) -> bytes:
    """A flat ``side`` x ``side`` PNG: a few kB that decode to side * side * 3 bytes."""
    return encoded(np.zeros((side, side, 3), np.uint8), "PNG", optimize=True)


def jpeg_scan_bomb(side: int = 256, repeats: int = 20000) -> bytes:
    """A progressive JPEG with one of its scans repeated ``repeats`` times: small, but every scan makes the
    decoder walk the whole image again."""
    data = encoded(np.full((side, side, 3), 100, np.uint8), "JPEG", progressive=True, quality=90)
    scans, i = [], 2
    while i < len(data) and data[i + 1] != 0xD9:
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        end = i + 2 + length
        if data[i + 1] == 0xDA:  # start of scan: the entropy-coded data runs to the next marker
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
            scans.append((i, end))
        i = end
    start, stop = min(scans, key=lambda s: s[1] - s[0])
    last = scans[-1][1]
    return data[:last] + data[start:stop] * repeats + data[last:]


def truncated_png(image: np.ndarray, keep: int = 300) -> bytes:
    return encoded(image, "PNG")[:keep]
