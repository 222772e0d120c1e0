"""Helpers of the serving tests: 64 px synthetic images, PNG bytes, a free port."""

from __future__ import annotations

import io
import socket

import numpy as np
from PIL import Image

from site_fixtures import defective, good  # noqa: F401 -- the serving tests import them from here

SIZE = 64
DIM = 32
CATEGORIES = ("wood", "fabric", "bottle", "pcb", "screw", "brushed_metal")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
