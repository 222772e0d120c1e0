"""Decoding uploads (no Ray): the allow-list, the limits before and after decoding, the scan limit, and a
decode stopped by its cancel event."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bayprano.serve import images
from bayprano.serve.images import ImageRejected, decode, probe

from hostile_inputs import encoded, flat_png, jpeg_scan_bomb, noise, other_formats, png_header_bomb, truncated_png

LIMIT = 256 * 256


def rejected(data: bytes, status: int, code: str, words: str = "", max_scans: int = 100) -> str:
    with pytest.raises(ImageRejected) as info:
        p = probe(data, "upload", LIMIT, max_scans)
        decode(data, "upload", p, LIMIT)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    assert info.value.message.startswith("upload: ") and words in info.value.message
    return info.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_the_allowed_formats_decode_to_rgb_uint8(fmt):
    image = noise(64)
    data = encoded(image, fmt)
    p = probe(data, "upload", LIMIT, 100)
    assert (p.width, p.height, p.format) == (64, 64, fmt)
    out = decode(data, "upload", p, LIMIT)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    if fmt != "JPEG":
        assert np.array_equal(out, image)


def test_sixteen_bit_and_grey_images_become_rgb():
    grey = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    data = buf.getvalue()
    out = decode(data, "upload", probe(data, "upload", LIMIT, 100), LIMIT)
    assert out.shape == (64, 64, 3) and out.max() == 255 and out.min() == 0


@pytest.mark.parametrize("fmt", sorted(other_formats()))
def test_formats_outside_the_allow_list_are_refused_before_decoding(fmt):
    rejected(other_formats()[fmt], 400, "bad_image", "PNG, JPEG, BMP, TIFF expected")


def test_limits_are_checked_from_the_header():
    rejected(png_header_bomb(20000, 20000), 413, "image_too_large", "20000x20000 px, more than the limit of 65536")
    rejected(flat_png(300), 413, "image_too_large", "300x300 px, more than the limit of 65536")
    rejected(encoded(noise(16), "PNG"), 400, "image_too_small", "16x16")
    rejected(b"", 400, "bad_image", "empty")
    rejected(b"GIF89a" + b"\0" * 50, 400, "bad_image")
    rejected(truncated_png(noise(64)), 400, "corrupt_image", "corrupt or truncated")
    rejected(encoded(noise(64), "JPEG")[:400], 400, "bad_image")  # cut inside its header
    rejected(encoded(noise(64), "JPEG")[:-2000], 400, "corrupt_image")


def test_the_pixel_limit_is_the_callers_own_and_pillows_process_wide_limit_is_left_alone():
    """Two deployments with different limits in one process: each call is held to its own limit, above and
    below Pillow's default (which refuses more than 2 x 89 M pixels in Image.open)."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    small, large = LIMIT, 300_000_000
    header = png_header_bomb(15000, 15000)  # 225 M pixels: over Pillow's default error limit, under ``large``
    medium = flat_png(300)  # 90,000 pixels: over ``small``, under ``large``
    for _ in range(2):  # interleaved, in both orders
        with pytest.raises(ImageRejected, match="15000x15000 px, more than the limit of 65536"):
            probe(header, "upload", small, 100)
        assert probe(header, "upload", large, 100) == images.Probe(15000, 15000, "PNG")
        with pytest.raises(ImageRejected, match="300x300 px, more than the limit of 65536"):
            probe(medium, "upload", small, 100)
        p = probe(medium, "upload", large, 100)
        assert decode(medium, "upload", p, large).shape == (300, 300, 3)
        with pytest.raises(ImageRejected, match="decoded image is 300x300 px"):
            decode(medium, "upload", p, small)  # the decoded size is held to the call's limit too
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_jpeg_with_too_many_scans_is_refused_from_its_header():
    bomb = jpeg_scan_bomb(64, 5000)
    assert images.jpeg_scans(bomb) > 5000 and len(bomb) < 100_000
    rejected(bomb, 413, "image_too_complex", "more than 100 scans")
    progressive = encoded(noise(64), "JPEG", progressive=True)
    assert 1 < images.jpeg_scans(progressive) <= 100
    assert decode(progressive, "upload", probe(progressive, "upload", LIMIT, 100), LIMIT).shape == (64, 64, 3)


def test_a_decode_stops_at_its_next_read_once_cancelled():
    bomb = jpeg_scan_bomb(256, 200_000)
    p = probe(bomb, "upload", LIMIT, 10**7)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(images.DecodeCancelled):
        decode(bomb, "upload", p, LIMIT, cancel)
    reads = []

    class Counting(threading.Event):
        def is_set(self):
            reads.append(1)
            return len(reads) > 3  # cancelled during the decode, after a few blocks

    with pytest.raises(images.DecodeCancelled):
        decode(bomb, "upload", p, LIMIT, Counting())
    assert 3 < len(reads) < len(bomb) // 65536


def test_a_probe_stops_at_its_next_read_once_cancelled():
    """A probe that timed out in the gateway's pool must stop, not run on: its cancel reaches the reads."""
    data = encoded(noise(64), "TIFF")
    assert probe(data, "upload", LIMIT, 100).format == "TIFF"
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(images.DecodeCancelled):
        probe(data, "upload", LIMIT, 100, cancel)
    reads = []

    class SetAfterTheFirstRead(threading.Event):
        def is_set(self):
            reads.append(1)
            return len(reads) > 1

    with pytest.raises(images.DecodeCancelled):  # not an ImageRejected: the image is not at fault
        probe(data, "upload", LIMIT, 100, SetAfterTheFirstRead())
    assert len(reads) == 2
