"""The MVTec-layout reader: what it returns, and the first problem it names on a broken layout."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from bayprano.platform.data.mvtec import list_categories, load_sample, scan_category, scan_root
from bayprano.platform.errors import DataError


def test_scan_counts_labels_and_masks(mvtec_root):
    samples = scan_root(mvtec_root)
    assert list_categories(mvtec_root) == ["alpha", "beta"]
    alpha = [s for s in samples if s.category == "alpha"]
    assert sum(s.split == "train" for s in alpha) == 4
    assert sum(s.split == "test" and s.label == 0 for s in alpha) == 2
    assert sorted(s.defect_type for s in alpha if s.label == 1) == ["hole", "scratch", "scratch"]
    for s in samples:
        assert (s.mask_path is None) == (s.label == 0)
    image, mask = load_sample(next(s for s in alpha if s.defect_type == "hole"))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.dtype == bool and mask.sum() == 8 * 8


def test_grayscale_jpeg_bmp_read_as_rgb_and_masks_binarised(tmp_path, mvtec_root):
    good = mvtec_root / "alpha" / "train" / "good"
    Image.fromarray(np.full((32, 32), 77, np.uint8)).save(good / "gray.png")
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(good / "photo.jpg", quality=95)
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(good / "old.bmp")
    mask_path = mvtec_root / "alpha" / "ground_truth" / "hole" / "000_mask.png"
    soft = np.zeros((32, 32), np.uint8)
    soft[0:3, 0:3] = 1  # anti-aliased masks have small non-zero values
    Image.fromarray(soft).save(mask_path)
    all_samples = scan_category(mvtec_root, "alpha")
    samples = {s.stem: s for s in all_samples if s.split == "train"}
    gray, _ = load_sample(samples["gray"])
    assert gray.shape == (32, 32, 3) and (gray == 77).all()
    assert load_sample(samples["photo"])[0].shape == (32, 32, 3)
    assert (load_sample(samples["old"])[0] == 9).all()
    hole = next(s for s in all_samples if s.defect_type == "hole")
    assert load_sample(hole)[1].sum() == 9


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda r: shutil.rmtree(r / "alpha" / "train" / "good"), "train/good: missing folder"),
        (lambda r: shutil.rmtree(r / "alpha" / "test"), "test: missing folder"),
        (lambda r: [p.unlink() for p in (r / "alpha" / "train" / "good").iterdir()], "empty category"),
        (lambda r: (r / "alpha" / "ground_truth" / "hole" / "000_mask.png").unlink(), "defective image without mask"),
        (
            lambda r: Image.fromarray(np.zeros((16, 16), np.uint8)).save(
                r / "alpha" / "ground_truth" / "scratch" / "001_mask.png"
            ),
            "mask size 16x16 does not match",
        ),
        (lambda r: (r / "alpha" / "train" / "good" / "notes.txt").write_text("hi"), "not an image file"),
        (
            lambda r: (r / "alpha" / "test" / "good" / "broken.png").write_bytes(b"\x89PNG garbage"),
            "not a readable image",
        ),
    ],
)
def test_first_problem_is_named(mvtec_root, breakage, message):
    breakage(mvtec_root)
    with pytest.raises(DataError, match=message.replace("(", r"\(")) as info:
        scan_root(mvtec_root)
    assert str(mvtec_root / "alpha") in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_root_and_unknown_category(tmp_path, mvtec_root):
    with pytest.raises(DataError, match="does not exist"):
        scan_root(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no category folders"):
        scan_root(tmp_path)
    with pytest.raises(DataError, match="unknown category 'gamma'"):
        scan_root(mvtec_root, ["gamma"])


def test_real_mvtec_extras_are_ignored(mvtec_root):
    """The MVTec AD download has licence and readme files at the top and hidden files here and there."""
    (mvtec_root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (mvtec_root / "readme.txt").write_text("MVTec AD")
    (mvtec_root / "alpha" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    assert len(scan_root(mvtec_root)) == 2 * (4 + 2 + 3)


def test_a_category_without_ground_truth_has_image_labels_only(mvtec_root):
    shutil.rmtree(mvtec_root / "alpha" / "ground_truth")
    alpha = scan_category(mvtec_root, "alpha")
    defective = [s for s in alpha if s.label == 1]
    assert len(defective) == 3 and all(s.mask_path is None for s in defective)
    image, mask = load_sample(defective[0])
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32) and not mask.any()
    beta = scan_category(mvtec_root, "beta")  # beta keeps its ground_truth/: masks stay required
    assert all(s.mask_path is not None for s in beta if s.label == 1)
    (mvtec_root / "beta" / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="defective image without mask"):
        scan_category(mvtec_root, "beta")
