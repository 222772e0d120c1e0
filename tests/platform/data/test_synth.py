"""Tests for the synthetic MVTec-layout dataset generator."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from bayprano.platform.data import synth
from bayprano.platform.data.imageio import load_image, load_mask
from bayprano.platform.data.mvtec import load_sample, scan_root
from bayprano.platform.errors import ConfigError

SMALL = dict(size=64, n_train=3, n_test_good=2, n_test_defective=5)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Mann-Whitney U / (n0 n1), ties counted as one half."""
    scores = np.concatenate([neg, pos])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n0, n1 = len(neg), len(pos)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    calls = []
    info = synth.generate_dataset(out, categories=3, seed=7, workers=1, progress=lambda *a: calls.append(a), **SMALL)
    return out, info, calls


def test_auroc_helper():
    assert _auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert _auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert _auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_catalogue():
    assert len(synth.CATEGORIES) >= 8
    assert len(set(synth.CATEGORIES)) == len(synth.CATEGORIES)
    kinds = [synth.CATEGORY_KINDS[c] for c in synth.CATEGORIES]
    assert set(kinds) == {"texture", "object"}
    assert kinds.count("texture") == kinds.count("object")
    for n in range(2, len(kinds) + 1):
        assert set(kinds[:n]) == {"texture", "object"}, n
    assert kinds[:6] == ["texture", "object"] * 3
    for c in synth.CATEGORIES:
        defects = synth.DEFECT_TYPES[c]
        assert len(defects) >= 4 and len(set(defects)) == len(defects)
        assert "good" not in defects
        assert all(d.isidentifier() for d in defects)


def test_round_trip_through_the_mvtec_reader(small_set):
    out, info, calls = small_set
    names = list(synth.CATEGORIES[:3])
    samples = scan_root(out)
    assert sorted({s.category for s in samples}) == sorted(names)
    counts = Counter((s.category, s.split, s.defect_type) for s in samples)
    for c in names:
        assert counts[(c, "train", "good")] == 3
        assert counts[(c, "test", "good")] == 2
        per_type = [counts[(c, "test", d)] for d in synth.DEFECT_TYPES[c]]
        assert sum(per_type) == 5 and max(per_type) - min(per_type) <= 1
    for s in samples:
        image, mask = load_sample(s)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        if s.defect_type == "good":
            assert s.mask_path is None
        else:
            stem = Path(s.path).stem
            assert Path(s.mask_path) == out / s.category / "ground_truth" / s.defect_type / f"{stem}_mask.png"
            assert mask.shape == (64, 64) and mask.any()
            raw = np.asarray(Image.open(s.mask_path))
            assert raw.shape == (64, 64) and set(np.unique(raw)) <= {0, 255}
    # the description on disk is what the call returned, and says what is there
    assert json.loads((out / "synth.json").read_text()) == info
    assert info["seed"] == 7 and info["size"] == 64 and info["version"] == synth.GENERATOR_VERSION
    assert [c["name"] for c in info["categories"]] == names
    for c in info["categories"]:
        assert c["kind"] == synth.CATEGORY_KINDS[c["name"]]
        assert c["defect_types"] == list(synth.DEFECT_TYPES[c["name"]])
        for key, n in c["counts"].items():
            split, defect = key.split("/")
            assert counts[(c["name"], split, defect)] == n
    assert calls == [(c, i + 1, 3) for i, c in enumerate(names)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_defects_split_evenly_among_types(tmp_path):
    info = synth.generate_dataset(
        tmp_path, categories=["screw"], size=64, n_train=1, n_test_good=1, n_test_defective=40, workers=1
    )
    counts = info["categories"][0]["counts"]
    assert [counts[f"test/{d}"] for d in synth.DEFECT_TYPES["screw"]] == [10] * 4
    for d in synth.DEFECT_TYPES["screw"]:
        assert len(list((tmp_path / "screw" / "test" / d).glob("*.png"))) == 10
        assert len(list((tmp_path / "screw" / "ground_truth" / d).glob("*_mask.png"))) == 10


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, small_set):
    out, _, _ = small_set
    again = tmp_path / "again"
    synth.generate_dataset(again, categories=3, seed=7, workers=2, **SMALL)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    synth.generate_dataset(other, categories=3, seed=8, workers=1, **SMALL)
    a, b = _files(out), _files(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert pngs == [k for k in b if k.endswith(".png")]
    assert all(a[k] != b[k] for k in pngs if "/train/" in k)


def test_a_category_does_not_depend_on_the_others(tmp_path, small_set):
    out, _, _ = small_set
    synth.generate_dataset(tmp_path, categories=[synth.CATEGORIES[2]], seed=7, workers=1, **SMALL)
    assert _files(tmp_path / synth.CATEGORIES[2]) == _files(out / synth.CATEGORIES[2])


def test_regenerating_replaces_a_category_folder(tmp_path):
    synth.generate_dataset(
        tmp_path, categories=["wood"], size=64, n_train=4, n_test_good=1, n_test_defective=4, workers=1
    )
    (tmp_path / "wood" / "stray.txt").write_text("left over")
    (tmp_path / "keep.txt").write_text("not ours")
    synth.generate_dataset(
        tmp_path, categories=["wood"], size=64, n_train=2, n_test_good=1, n_test_defective=4, workers=1
    )
    assert len(list((tmp_path / "wood" / "train" / "good").iterdir())) == 2
    assert not (tmp_path / "wood" / "stray.txt").exists()
    assert (tmp_path / "keep.txt").read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "synth.json", "wood"]


def test_every_defect_renders_with_a_mask_inside_the_image():
    for c in synth.CATEGORIES:
        for d in synth.DEFECT_TYPES[c]:
            for seed, severity in enumerate([0.0, 0.05, 0.5, 1.0, None, None]):
                size = 64 if seed % 2 else 96
                image, mask = synth.render_defective(c, d, np.random.default_rng([seed, 11]), size, severity)
                assert image.shape == (size, size, 3) and image.dtype == np.uint8, (c, d)
                assert mask.shape == (size, size) and mask.dtype == bool, (c, d)
                assert 0 < mask.sum() < 0.6 * size * size, (c, d, severity)


def test_some_texture_defects_touch_the_border_and_most_do_not():
    touching = total = 0
    for c in [c for c in synth.CATEGORIES if synth.CATEGORY_KINDS[c] == "texture"]:
        for d in synth.DEFECT_TYPES[c]:
            for i in range(6):
                _, mask = synth.render_defective(c, d, np.random.default_rng([i, 5]), 64)
                total += 1
                touching += bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert 0.05 * total < touching < 0.6 * total


def test_good_images_vary_but_stay_the_same_product():
    size, n = 96, 5
    imgs = {c: [synth.render_good(c, np.random.default_rng([3, i]), size) for i in range(n)] for c in synth.CATEGORIES}

    def histogram(img):
        counts = [np.histogram(img[..., k], bins=16, range=(0, 256))[0] for k in range(3)]
        return np.concatenate(counts) / img[..., 0].size

    hists = {c: [histogram(i) for i in v] for c, v in imgs.items()}
    for c in synth.CATEGORIES:
        pairs = [(a, b) for i, a in enumerate(imgs[c]) for b in imgs[c][i + 1 :]]
        mad = [np.abs(a.astype(float) - b.astype(float)).mean() for a, b in pairs]
        assert min(mad) > 2.0, c
        within = np.mean([np.abs(a - b).sum() for i, a in enumerate(hists[c]) for b in hists[c][i + 1 :]])
        for other in synth.CATEGORIES:
            if other != c:
                across = np.mean([np.abs(a - b).sum() for a in hists[c] for b in hists[other]])
                assert within < across, (c, other)


def test_severity_makes_defects_more_visible():
    def visibility(image, mask):
        """Colour difference between the defect and a ring around it, times sqrt(area): severity
        sets contrast, size or both."""
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        img = image.astype(float)
        return np.abs(img[mask].mean(0) - img[ring].mean(0)).sum() * np.sqrt(mask.sum())

    for c in synth.CATEGORIES:
        weak, strong = [], []
        for d in synth.DEFECT_TYPES[c]:
            for i in range(3):
                for severity, out in ((0.1, weak), (1.0, strong)):
                    rng = np.random.default_rng([i, 9])
                    out.append(visibility(*synth.render_defective(c, d, rng, 128, severity=severity)))
        assert np.mean(strong) > 1.5 * np.mean(weak), (c, np.mean(weak), np.mean(strong))


def test_a_naive_detector_finds_some_defects_but_not_all():
    """Per-position mean and std of gain-normalised 8x8 block means over the training images, image
    score = max z-score: well above chance on average, never perfect everywhere."""
    size, n_train, n_good, n_bad = 128, 20, 20, 32

    def features(img):
        blocks = img.astype(float).reshape(16, 8, 16, 8, 3).mean((1, 3))
        return blocks / blocks.mean()

    aurocs = {}
    for ci, c in enumerate(synth.CATEGORIES):
        train = np.stack(
            [features(synth.render_good(c, np.random.default_rng([1, ci, 0, i]), size)) for i in range(n_train)]
        )
        mu, sd = train.mean(0), train.std(0) + 0.01

        def score(img):
            return float((np.abs(features(img) - mu) / sd).max())

        neg = np.array([score(synth.render_good(c, np.random.default_rng([1, ci, 1, i]), size)) for i in range(n_good)])
        defects = synth.DEFECT_TYPES[c]
        pos = np.array(
            [
                score(
                    synth.render_defective(c, defects[i % len(defects)], np.random.default_rng([1, ci, 2, i]), size)[0]
                )
                for i in range(n_bad)
            ]
        )
        aurocs[c] = _auroc(neg, pos)
    print("naive detector image AUROC:", {c: round(a, 3) for c, a in aurocs.items()})
    assert not all(a > 0.999 for a in aurocs.values()), aurocs
    assert np.mean(list(aurocs.values())) > 0.6, aurocs
    assert max(aurocs.values()) > 0.7, aurocs


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(size=32), "size"),
        (dict(size=2048), "size"),
        (dict(size=100.0), "size"),
        (dict(n_train=0), "n_train"),
        (dict(n_test_good=0), "n_test_good"),
        (dict(n_test_defective=-1), "n_test_defective"),
        (dict(categories=0), "categories"),
        (dict(categories=len(synth.CATEGORIES) + 1), "categories"),
        (dict(categories=["wood", "plywood"]), "categories"),
        (dict(categories=["wood", "wood"]), "categories"),
        (dict(categories=[]), "categories"),
        (dict(seed=-1), "seed"),
        (dict(workers=0), "workers"),
        (dict(progress="yes"), "progress"),
    ],
)
def test_bad_dataset_arguments(tmp_path, kwargs, field):
    with pytest.raises(ConfigError) as err:
        synth.generate_dataset(tmp_path / "out", **kwargs)
    message = str(err.value)
    assert message.startswith(f"{field}:") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_bad_render_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="^category:"):
        synth.render_good("plywood", rng)
    with pytest.raises(ConfigError, match="^size:"):
        synth.render_good("wood", rng, size=63)
    with pytest.raises(ConfigError, match="^rng:"):
        synth.render_good("wood", 0)
    with pytest.raises(ConfigError, match="^defect:"):
        synth.render_defective("wood", "missing_component", rng)
    with pytest.raises(ConfigError, match="^severity:"):
        synth.render_defective("wood", "crack", rng, severity=1.5)


def test_single_image_api_is_deterministic():
    a = synth.render_good("pcb", np.random.default_rng(5), 64)
    b = synth.render_good("pcb", np.random.default_rng(5), 64)
    c = synth.render_good("pcb", np.random.default_rng(6), 64)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    img1, m1 = synth.render_defective("pcb", "missing_component", np.random.default_rng(5), 64)
    img2, m2 = synth.render_defective("pcb", "missing_component", np.random.default_rng(5), 64)
    assert np.array_equal(img1, img2) and np.array_equal(m1, m2)


def test_files_match_the_single_image_api(small_set):
    """What is on disk is what render_good / render_defective give for the documented per-image seed."""
    out, _, _ = small_set
    c = synth.CATEGORIES[1]
    ci = synth.CATEGORIES.index(c)

    def stream(*entropy):
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))

    expected = synth.render_good(c, stream(7, ci, 0, 2), 64)
    assert np.array_equal(load_image(out / c / "train" / "good" / "002.png"), expected)
    d = synth.DEFECT_TYPES[c][0]
    image, mask = synth.render_defective(c, d, stream(7, ci, 2, 1), 64)
    assert np.array_equal(load_image(out / c / "test" / d / "001.png"), image)
    assert np.array_equal(load_mask(out / c / "ground_truth" / d / "001_mask.png"), mask)
