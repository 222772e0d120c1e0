"""Helpers of the serving tests: 64 px synthetic images, PNG bytes, a free port."""

from __future__ import annotations

import io
import socket

import numpy as np
from PIL import Image

SIZE = 64
DIM = 32
CATEGORIES = ("wood", "fabric", "bottle", "pcb", "screw", "brushed_metal")


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def good(category: str, seed: int, n: int, size: int = SIZE) -> list[np.ndarray]:
    from bayprano.platform.data.synth import render_good

    return [render_good(category, np.random.default_rng([seed, i]), size) for i in range(n)]


def defective(category: str, seed: int, size: int = SIZE) -> np.ndarray:
    from bayprano.platform.data.synth import _check_category, render_defective

    defect = sorted(_check_category(category).defects)[0]
    return render_defective(category, defect, np.random.default_rng([seed, 99]), size, severity=1.0)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
