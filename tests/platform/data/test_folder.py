"""Importing a plant's loose images as one MVTec-layout category."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bayprano.platform.data.folder import import_folder
from bayprano.platform.data.mvtec import load_sample, scan_category
from bayprano.platform.errors import ConfigError, DataError


def _loose(tmp_path, n_normal=10, defects=("dent", "smear"), n_abnormal=2, with_masks=True):
    rng = np.random.default_rng(0)
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(n_normal):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(normal / f"n{i}.jpg", quality=98)
    abnormal, masks = tmp_path / "abnormal", tmp_path / "masks"
    for d in defects:
        (abnormal / d).mkdir(parents=True)
        for i in range(n_abnormal):
            Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(abnormal / d / f"{d}{i}.png")
            if with_masks:
                m = np.zeros((40, 48), np.uint8)
                m[5:9, 10 + i : 20] = 200
                masks.mkdir(exist_ok=True)
                Image.fromarray(m).save(masks / f"{d}{i}_mask.png")
    return normal, abnormal, masks


def test_import_folder_writes_a_valid_category(tmp_path):
    normal, abnormal, masks = _loose(tmp_path)
    result = import_folder("widget", normal, tmp_path / "root", abnormal=abnormal, masks=masks, test_fraction=0.3)
    assert result["counts"] == {"train/good": 7, "test/good": 3, "test/dent": 2, "test/smear": 2}
    samples = scan_category(tmp_path / "root", "widget")
    assert len(samples) == 14
    dent = next(s for s in samples if s.defect_type == "dent")
    image, mask = load_sample(dent)
    assert image.shape == (40, 48, 3) and mask.sum() > 0
    assert not list((tmp_path / "root").glob(".*")), "no staging folder is left behind"


def test_import_without_masks_keeps_image_level_labels(tmp_path):
    normal, abnormal, _ = _loose(tmp_path, with_masks=False)
    import_folder("widget", normal, tmp_path / "root", abnormal=abnormal)
    samples = scan_category(tmp_path / "root", "widget")
    assert sum(s.label for s in samples) == 4
    assert all(s.mask_path is None for s in samples)


def test_import_folder_bad_input(tmp_path):
    normal, abnormal, masks = _loose(tmp_path)
    with pytest.raises(DataError, match="normal folder does not exist"):
        import_folder("widget", tmp_path / "nope", tmp_path / "root")
    (masks / "smear1_mask.png").unlink()
    with pytest.raises(DataError, match="smear1.png: abnormal image without mask"):
        import_folder("widget", normal, tmp_path / "root", abnormal=abnormal, masks=masks)
    assert not (tmp_path / "root" / "widget").exists(), "a failed import leaves nothing behind"
    with pytest.raises(ConfigError, match="--category"):
        import_folder("../evil", normal, tmp_path / "root")
    import_folder("widget", normal, tmp_path / "root")
    with pytest.raises(DataError, match="already exists"):
        import_folder("widget", normal, tmp_path / "root")
    (normal / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="readme.txt: not an image file"):
        import_folder("other", normal, tmp_path / "root")
