"""Synthetic anomalies: the mask is exactly the changed pixels, inputs stay untouched, results repeat."""

from __future__ import annotations

import numpy as np
import pytest

from bayprano.platform.data.anomalies import (
    ANOMALIES,
    KINDS,
    TRAINING_KINDS,
    VALIDATION_KINDS,
    TEXTURES,
    AnomalyInjector,
    blob,
    cut_paste,
    perlin_noise,
    scratch,
    texture_blend,
)
from bayprano.platform.errors import ConfigError, DataError


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3 + yy) % 256, (yy * 2) % 256, np.full_like(xx, 140)], axis=-1)
    return np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)


def _gray_noise(h: int, w: int, seed: int = 1) -> np.ndarray:
    level = np.random.default_rng(seed).integers(90, 170, (h, w), dtype=np.uint8)
    return np.repeat(level[..., None], 3, axis=-1)


IMAGES = {
    "textured": _textured(64, 64),
    "flat_gray": np.full((48, 48, 3), 128, np.uint8),
    "gray_noise": _gray_noise(40, 56),
    "black": np.zeros((32, 32, 3), np.uint8),
    "white": np.full((32, 40, 3), 255, np.uint8),
    "tall": _textured(100, 32, seed=3),
    "colour_flat": np.broadcast_to(np.array([200, 30, 90], np.uint8), (33, 47, 3)).copy(),
}


def _check(image: np.ndarray, out: np.ndarray, mask: np.ndarray, min_pixels: int = 16) -> None:
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert mask.sum() >= min_pixels
    np.testing.assert_array_equal(mask, (out != image).any(axis=-1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(IMAGES))
def test_mask_is_exactly_the_changed_pixels(kind, name):
    image = IMAGES[name]
    before = image.copy()
    fn = ANOMALIES[kind]
    for seed in range(12):
        out, mask = fn(image, np.random.default_rng(seed))
        _check(image, out, mask)
        assert out is not image
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_under_the_generator(kind):
    image = IMAGES["textured"]
    fn = ANOMALIES[kind]
    a = fn(image, np.random.default_rng(7))
    b = fn(image, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    others = [fn(image, np.random.default_rng(s))[1] for s in range(8, 12)]
    assert any(not np.array_equal(a[1], m) for m in others)


@pytest.mark.parametrize("kind", KINDS)
def test_grayscale_images_stay_grayscale(kind):
    image = IMAGES["gray_noise"]
    for seed in range(10):
        out, _ = ANOMALIES[kind](image, np.random.default_rng(seed))
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_min_pixels_and_min_delta_are_honoured(kind):
    image = IMAGES["textured"]
    for seed in range(6):
        out, mask = ANOMALIES[kind](image, np.random.default_rng(seed), min_pixels=200, min_delta=20)
        _check(image, out, mask, min_pixels=200)
        change = np.abs(out.astype(int) - image.astype(int)).max(axis=-1)
        assert (change[mask] >= 20).all()


def test_cut_paste_scar_is_thin_and_plain_patch_is_larger():
    image = _textured(256, 256)
    scar_areas, patch_areas = [], []
    for seed in range(10):
        scar_areas.append(cut_paste(image, np.random.default_rng(seed), scar=True)[1].sum())
        patch_areas.append(cut_paste(image, np.random.default_rng(seed), scar=False, rotate=False)[1].sum())
    assert max(scar_areas) <= 16 * 25 * 1.5
    assert np.median(patch_areas) > 4 * np.median(scar_areas)


def test_texture_blend_every_texture_including_a_source_of_another_size():
    image = IMAGES["textured"]
    source = _textured(90, 70, seed=9)[::-1]
    for texture in TEXTURES:
        for seed in range(4):
            out, mask = texture_blend(image, np.random.default_rng(seed), source=source, textures=(texture,))
            _check(image, out, mask)


def test_texture_blend_faint_discolouration():
    image = _gray_noise(128, 128)
    out, mask = texture_blend(image, np.random.default_rng(0), beta=(0.1, 0.1), coverage=(0.3, 0.3), textures=("tint",))
    _check(image, out, mask)
    change = np.abs(out.astype(int) - image.astype(int)).max(axis=-1)
    assert mask.mean() > 0.05 and np.median(change[mask]) < 40


def test_scratch_is_thin_and_blob_is_compact():
    image = _textured(128, 128)
    for seed in range(6):
        _, mask = scratch(image, np.random.default_rng(seed), count=(1, 1))
        assert mask.sum() < 0.1 * mask.size
        _, mask = blob(image, np.random.default_rng(seed), radius=(0.05, 0.05))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert rows[-1] - rows[0] < 64 and cols[-1] - cols[0] < 64


def test_perlin_noise_shape_range_and_determinism():
    a = perlin_noise((70, 50), np.random.default_rng(3), cells=(2, 4), octaves=3)
    b = perlin_noise((70, 50), np.random.default_rng(3), cells=(2, 4), octaves=3)
    assert a.shape == (70, 50) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert -1.5 < a.min() < 0 < a.max() < 1.5 and a.std() > 0.05
    coarse = perlin_noise((64, 64), np.random.default_rng(0), cells=(1, 1), octaves=1)
    fine = perlin_noise((64, 64), np.random.default_rng(0), cells=(16, 16), octaves=1)
    assert np.abs(np.diff(coarse, axis=1)).mean() < np.abs(np.diff(fine, axis=1)).mean()


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32), np.uint8), "expected a uint8 array of shape (H, W, 3)"),
        (np.zeros((32, 32, 3), np.float32), "expected a uint8 array of shape (H, W, 3)"),
        (np.zeros((8, 64, 3), np.uint8), "64x8 is too small"),
    ],
)
def test_bad_images_are_named(bad, message):
    for fn in ANOMALIES.values():
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            fn(bad, np.random.default_rng(0))


def test_bad_parameters_are_named():
    image = IMAGES["textured"]
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=r"area=\(0.5, 0.1\)"):
        cut_paste(image, rng, area=(0.5, 0.1))
    with pytest.raises(ConfigError, match="unknown texture 'wood'"):
        texture_blend(image, rng, textures=("wood",))
    with pytest.raises(ConfigError, match="source textures need source="):
        texture_blend(image, rng, textures=("source",))
    with pytest.raises(ConfigError, match="min_pixels=5000"):
        blob(image, rng, min_pixels=5000)
    with pytest.raises(ConfigError, match="min_delta=0"):
        scratch(image, rng, min_delta=0)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        blob(image, 0)


def test_injector_validates_kinds_and_weights():
    with pytest.raises(ConfigError) as err:
        AnomalyInjector(kinds=("cut_paste", "smudge"))
    assert "'smudge'" in str(err.value) and "cut_paste, texture_blend, scratch, blob" in str(err.value)
    with pytest.raises(ConfigError, match="none given"):
        AnomalyInjector(kinds=())
    with pytest.raises(ConfigError, match="expected 2 numbers"):
        AnomalyInjector(kinds=("blob", "scratch"), weights=(1.0,))
    with pytest.raises(ConfigError, match="numbers >= 0"):
        AnomalyInjector(kinds=("blob", "scratch"), weights=(1.0, -1.0))
    with pytest.raises(ConfigError, match="only once"):
        AnomalyInjector(kinds=("blob", "blob"))


def test_injector_follows_weights_and_matches_the_chosen_kind():
    injector = AnomalyInjector(KINDS, weights=(0, 0, 1, 0))
    rng = np.random.default_rng(0)
    assert {injector.choose(rng) for _ in range(50)} == {"scratch"}
    image = IMAGES["textured"]
    out, mask = injector(image, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    assert injector.choose(rng) == "scratch"
    ref_out, ref_mask = scratch(image, rng)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(mask, ref_mask)

    uniform = AnomalyInjector(KINDS)
    rng = np.random.default_rng(1)
    counts = {k: 0 for k in KINDS}
    for _ in range(2000):
        counts[uniform.choose(rng)] += 1
    assert all(400 < c < 600 for c in counts.values())


def test_the_default_injector_makes_only_the_training_families():
    assert set(TRAINING_KINDS) | set(VALIDATION_KINDS) == set(KINDS)
    assert not set(TRAINING_KINDS) & set(VALIDATION_KINDS)
    assert {"scratch", "blob"} <= set(VALIDATION_KINDS)
    default = AnomalyInjector()
    assert default.kinds == TRAINING_KINDS
    rng = np.random.default_rng(2)
    assert {default.choose(rng) for _ in range(200)} == set(TRAINING_KINDS)


def test_injector_output_and_source():
    injector = AnomalyInjector(kinds=("texture_blend",), min_pixels=32)
    image = IMAGES["tall"]
    source = IMAGES["textured"]
    for seed in range(5):
        out, mask = injector(image, np.random.default_rng(seed), source=source)
        _check(image, out, mask, min_pixels=32)
    a = injector(image, np.random.default_rng(3), source=source)
    b = injector(image, np.random.default_rng(3), source=source)
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(20, 200), (200, 20), (16, 16)])
def test_large_min_pixels_on_flat_narrow_images(kind, shape):
    for value in (0, 255):
        image = np.full(shape + (3,), value, np.uint8)
        limit = shape[0] * shape[1] // 4
        out, mask = ANOMALIES[kind](image, np.random.default_rng(0), min_pixels=limit)
        _check(image, out, mask, min_pixels=limit)
