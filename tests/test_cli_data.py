"""The `bayprano data` commands, run as a user runs them: the console script in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvtec_fixtures import write_mvtec_category

BAYPRANO = str(Path(sys.executable).with_name("bayprano"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([BAYPRANO, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "root"
    result = run(
        "data",
        "synth",
        "--out",
        str(out),
        "--categories",
        "4",
        "--size",
        "64",
        "--train",
        "6",
        "--test-good",
        "3",
        "--test-defective",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 4 categories" in result.stdout
    return out


def test_synth_then_info_counts(synth_root):
    result = run("data", "info", str(synth_root), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert len(info["categories"]) == 4 and info["total"] == 4 * (6 + 3 + 4)
    for cat in info["categories"].values():
        assert cat["counts"]["train/good"] == 6 and cat["counts"]["test/good"] == 3
        assert cat["sizes"] == {"64x64": 13}
    table = run("data", "info", str(synth_root)).stdout
    assert "| category" in table and "| total" in table


def test_shard_info_matches_the_source(synth_root, tmp_path):
    shards = tmp_path / "shards"
    result = run("data", "shard", "--root", str(synth_root), "--out", str(shards), "--sites", "2", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "wrote 2 shards (52 rows, by-category)" in result.stdout
    source = json.loads(run("data", "info", str(synth_root), "--json").stdout)
    sharded = json.loads(run("data", "info", str(shards), "--json").stdout)
    assert sharded["categories"] == source["categories"]
    one = json.loads(run("data", "info", str(shards / "site-000.parquet"), "--json").stdout)
    two = json.loads(run("data", "info", str(shards / "site-001.parquet"), "--json").stdout)
    assert one["total"] + two["total"] == source["total"]
    assert not set(one["categories"]) & set(two["categories"])
    iid = run("data", "shard", "--root", str(synth_root), "--out", str(tmp_path / "iid"), "--sites", "3", "--iid")
    assert iid.returncode == 0, iid.stderr
    per_site = [
        json.loads(run("data", "info", str(tmp_path / "iid" / f"site-00{i}.parquet"), "--json").stdout)
        for i in range(3)
    ]
    assert all(len(s["categories"]) == 4 for s in per_site)


def test_import_mvtec_and_import_folder(tmp_path):
    root = tmp_path / "mvtec"
    write_mvtec_category(root, "alpha", seed=1)
    write_mvtec_category(root, "beta", seed=2)
    result = run("data", "import-mvtec", "--root", str(root), "--out", str(tmp_path / "shards"), "--sites", "2")
    assert result.returncode == 0, result.stderr
    assert "valid MVTec layout, 2 categories, 18 images" in result.stdout
    normal = tmp_path / "loose"
    normal.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(normal / f"img{i}.jpg")
    result = run("data", "import-folder", "--category", "widget", "--normal", str(normal), "--out", str(root))
    assert result.returncode == 0, result.stderr
    assert "train/good 4, test/good 1" in result.stdout
    assert json.loads(run("data", "info", str(root), "--json").stdout)["categories"]["widget"]["counts"] == {
        "test/good": 1,
        "train/good": 4,
    }


def _broken(kind: str, root: Path) -> list[str]:
    write_mvtec_category(root, "alpha")
    if kind == "empty category":
        for p in (root / "alpha" / "train" / "good").iterdir():
            p.unlink()
    elif kind == "mask of the wrong size":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "alpha" / "ground_truth" / "hole" / "000_mask.png")
    elif kind == "non-image file":
        (root / "alpha" / "test" / "good" / "notes.txt").write_text("not an image")
    return ["data", "info", str(root)]


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing root", "dataset root does not exist"),
        ("empty category", "empty category, no normal training images"),
        ("mask of the wrong size", "mask size 8x8 does not match image"),
        ("non-image file", "notes.txt: not an image file"),
        ("sites 0", "--sites 0"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(tmp_path, kind, expected):
    root = tmp_path / "root"
    if kind == "missing root":
        args = ["data", "info", str(tmp_path / "nowhere")]
    elif kind == "sites 0":
        write_mvtec_category(root, "alpha")
        args = ["data", "shard", "--root", str(root), "--out", str(tmp_path / "s"), "--sites", "0"]
    else:
        args = _broken(kind, root)
    result = run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bayprano: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


def _loose(folder: Path, names: list[str], seed: int, size: int = 40) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    for name in names:
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / name)
        images.append(image)
    return images


def test_import_folder_with_abnormal_images_masks_and_overwrite(tmp_path):
    root, loose = tmp_path / "root", tmp_path / "loose"
    _loose(loose / "good", [f"g{i}.png" for i in range(5)], seed=0)
    scratches = _loose(loose / "bad" / "scratch", ["s0.png", "s1.jpg"], seed=1)
    _loose(loose / "bad" / "dent", ["d0.png"], seed=2)
    masks = loose / "masks"
    (masks / "scratch").mkdir(parents=True)
    drawn = {}
    for i, (stem, where) in enumerate(
        (("s0", masks / "scratch" / "s0_mask.png"), ("s1", masks / "s1.png"), ("d0", masks / "d0_mask.bmp"))
    ):
        mask = np.zeros((40, 40), np.uint8)
        mask[5 + i : 15 + i, 10:30] = 255
        Image.fromarray(mask).save(where)
        drawn[stem] = mask > 0
    args = ["data", "import-folder", "--category", "widget", "--normal", str(loose / "good"), "--out", str(root)]

    result = run(*args, "--abnormal", str(loose / "bad"), "--masks", str(masks))
    assert result.returncode == 0, result.stderr
    assert "train/good 4, test/good 1, test/dent 1, test/scratch 2" in result.stdout
    widget = root / "widget"
    assert sorted(p.name for p in (widget / "test" / "scratch").iterdir()) == ["s0.png", "s1.png"]  # all PNG
    assert np.array_equal(np.asarray(Image.open(widget / "test" / "scratch" / "s0.png")), scratches[0])
    for defect, stem in (("scratch", "s0"), ("scratch", "s1"), ("dent", "d0")):
        written = np.asarray(Image.open(widget / "ground_truth" / defect / f"{stem}_mask.png")) > 0
        assert np.array_equal(written, drawn[stem]), f"{defect}/{stem}: mask changed on the way"
    assert not (widget / "category.json").exists()  # it has pixel ground truth
    info = json.loads(run("data", "info", str(root), "--json").stdout)["categories"]["widget"]["counts"]
    assert info == {"test/dent": 1, "test/good": 1, "test/scratch": 2, "train/good": 4}

    again = run(*args)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"bayprano: error: {widget}: category already exists (pass --overwrite to replace it)"
    )
    assert (widget / "test" / "scratch" / "s0.png").is_file()

    replaced = run(*args, "--overwrite", "--abnormal", str(loose / "bad" / "dent"))  # flat: defect type "defect"
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in (widget / "test").iterdir()) == ["defect", "good"]
    assert not (widget / "ground_truth").exists()
    assert json.loads((widget / "category.json").read_text()) == {"pixel_masks": False}

    (masks / "d0_mask.bmp").unlink()
    missing = run(*args, "--overwrite", "--abnormal", str(loose / "bad"), "--masks", str(masks))
    assert missing.returncode == 2
    assert f"{loose / 'bad' / 'dent' / 'd0.png'}: abnormal image without mask in {masks}" in missing.stderr
    assert sorted(p.name for p in (widget / "test").iterdir()) == ["defect", "good"]  # the old one, whole
