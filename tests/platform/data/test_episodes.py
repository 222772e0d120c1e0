"""Episode sampler: disjoint support and query, train/good images only, repeatable, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bayprano.platform.data.anomalies import AnomalyInjector
from bayprano.platform.data.episodes import ANOMALY_SUFFIX, Episode, EpisodeSampler
from bayprano.platform.data.imageio import load_image
from bayprano.platform.data.mvtec import Sample, scan_category
from bayprano.platform.errors import ConfigError, DataError


def _write_category(root: Path, category: str, n_train: int, size: int, gray: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cdir = root / category

    def image() -> np.ndarray:
        if gray:
            return rng.integers(0, 256, (size, size), dtype=np.uint8)
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    for split, defect, n in (("train", "good", n_train), ("test", "good", 2), ("test", "crack", 2)):
        (cdir / split / defect).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(image()).save(cdir / split / defect / f"{i:03d}.png")
    (cdir / "ground_truth" / "crack").mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((size, size), np.uint8)
        mask[5:15, 5:15] = 255
        Image.fromarray(mask).save(cdir / "ground_truth" / "crack" / f"{i:03d}_mask.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, list[Sample]]:
    """All samples of 'bottle' (14 train, colour, 40 px) and 'screw' (10 train, grayscale, 40 px)."""
    root = tmp_path_factory.mktemp("mvtec")
    _write_category(root, "bottle", 14, 40, gray=False, seed=0)
    _write_category(root, "screw", 10, 40, gray=True, seed=1)
    return {c: scan_category(root, c) for c in ("bottle", "screw")}


def _train(dataset: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    return {c: [s for s in samples if s.split == "train"] for c, samples in dataset.items()}


def _fake(category: str, n: int) -> list[Sample]:
    return [Sample(f"/nowhere/{category}/train/good/{i:03d}.png", category, "train", "good") for i in range(n)]


def _constant_loader(sample: Sample) -> np.ndarray:
    """An image whose value identifies the sample (its index + 1), without any file."""
    return np.full((32, 32, 3), int(Path(sample.path).stem) + 1, np.uint8)


def _assert_same(a: Episode, b: Episode) -> None:
    assert a.category == b.category and a.support_ids == b.support_ids and a.query_ids == b.query_ids
    for field in ("support", "query", "query_masks", "query_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_shapes_dtypes_labels_and_masks(dataset):
    sampler = EpisodeSampler(_train(dataset), shots=3, n_query_normal=2, n_query_anomalous=3)
    for ep in sampler.episodes(6, seed=0):
        assert ep.support.shape == (3, 40, 40, 3) and ep.support.dtype == np.uint8
        assert ep.query.shape == (5, 40, 40, 3) and ep.query.dtype == np.uint8
        assert ep.query_masks.shape == (5, 40, 40) and ep.query_masks.dtype == bool
        assert ep.query_labels.dtype == np.int64 and ep.query_labels.tolist() == [0, 0, 1, 1, 1]
        assert ep.shots == 3 and len(ep.support_ids) == 3 and len(ep.query_ids) == 5
        for label, mask, qid in zip(ep.query_labels, ep.query_masks, ep.query_ids):
            assert (label == 1) == bool(mask.any()) == qid.endswith(ANOMALY_SUFFIX)
        for img, sid in zip(ep.support, ep.support_ids):
            np.testing.assert_array_equal(img, load_image(sid))
        for img, mask, qid in zip(ep.query, ep.query_masks, ep.query_ids):
            original = load_image(qid.removesuffix(ANOMALY_SUFFIX))
            np.testing.assert_array_equal(mask, (img != original).any(axis=-1))
        if ep.category == "screw":
            assert (ep.query[..., 0] == ep.query[..., 2]).all()


def test_support_and_query_disjoint_and_only_train_good(dataset):
    train = _train(dataset)
    train_paths = {s.path for samples in train.values() for s in samples}
    test_paths = {s.path for samples in dataset.values() for s in samples if s.split == "test"}
    sampler = EpisodeSampler(train, shots=4, n_query_normal=3, n_query_anomalous=3)
    seen_categories = set()
    for ep in sampler.episodes(40, seed=1):
        seen_categories.add(ep.category)
        query_paths = [q.removesuffix(ANOMALY_SUFFIX) for q in ep.query_ids]
        assert not set(ep.support_ids) & set(query_paths)
        assert len(set(ep.support_ids)) == 4 and len(set(query_paths)) == 6
        used = set(ep.support_ids) | set(query_paths)
        assert used <= train_paths and not used & test_paths
        assert all(Path(p).parts[-4] == ep.category for p in used)
    assert seen_categories == {"bottle", "screw"}


def test_refuses_any_test_or_defect_sample(dataset):
    with pytest.raises(DataError) as err:
        EpisodeSampler(dataset, shots=1, n_query_normal=1, n_query_anomalous=1)
    first_test = next(s for s in dataset["bottle"] if s.split == "test")
    assert str(err.value).startswith(f"{first_test.path}: a test/")
    assert "only from train/good" in str(err.value)

    test_good = next(s for s in dataset["screw"] if s.split == "test" and s.defect_type == "good")
    with pytest.raises(DataError, match="a test/good image"):
        EpisodeSampler({"screw": _train(dataset)["screw"] + [test_good]}, 1, 1, 1)
    odd = Sample("/x/screw/train/good/odd.png", "screw", "train", "crack")
    with pytest.raises(DataError, match=r"/x/screw/train/good/odd.png: a train/crack image"):
        EpisodeSampler({"screw": [odd]}, 1, 1, 1)
    with pytest.raises(DataError, match="of category 'screw' listed under 'bottle'"):
        EpisodeSampler({"bottle": _fake("screw", 5)}, 1, 1, 1)
    with pytest.raises(DataError, match="listed twice"):
        EpisodeSampler({"bottle": _fake("bottle", 3) * 2}, 1, 1, 1)


def test_configuration_errors_name_the_value():
    pools = {"bottle": _fake("bottle", 20), "screw": _fake("screw", 10)}
    with pytest.raises(ConfigError, match="shots=0: expected an integer of at least 1"):
        EpisodeSampler(pools, shots=0, n_query_normal=1, n_query_anomalous=1)
    with pytest.raises(ConfigError, match="n_query_normal=-1"):
        EpisodeSampler(pools, shots=1, n_query_normal=-1, n_query_anomalous=1)
    with pytest.raises(ConfigError, match="n_query_normal=0 and n_query_anomalous=0: an episode needs a query image"):
        EpisodeSampler(pools, shots=1, n_query_normal=0, n_query_anomalous=0)
    with pytest.raises(ConfigError) as err:
        EpisodeSampler(pools, shots=8, n_query_normal=3, n_query_anomalous=3)
    assert str(err.value) == "shots=8 plus 6 query images needs 14 normal train images, category 'screw' has 10"
    with pytest.raises(ConfigError, match="image_size=8"):
        EpisodeSampler(pools, shots=1, n_query_normal=1, n_query_anomalous=1, image_size=8)
    with pytest.raises(ConfigError, match="no categories"):
        EpisodeSampler({}, shots=1, n_query_normal=1, n_query_anomalous=1)
    sampler = EpisodeSampler(pools, 8, 1, 1, load=_constant_loader)
    with pytest.raises(ConfigError, match="category 'nut': not in this sampler"):
        sampler.sample(np.random.default_rng(0), category="nut")


def test_deterministic_for_a_seed_with_or_without_cache(dataset):
    train = _train(dataset)
    a = list(EpisodeSampler(train, 2, 2, 2).episodes(5, seed=11))
    b = list(EpisodeSampler(train, 2, 2, 2, cache=False).episodes(5, seed=11))
    for x, y in zip(a, b):
        _assert_same(x, y)
    c = list(EpisodeSampler(train, 2, 2, 2).episodes(5, seed=12))
    assert any(x.support_ids != z.support_ids or x.query_ids != z.query_ids for x, z in zip(a, c))
    one = EpisodeSampler(train, 2, 2, 2).sample(np.random.default_rng(4), category="screw")
    assert one.category == "screw"
    _assert_same(one, EpisodeSampler(train, 2, 2, 2).sample(np.random.default_rng(4), category="screw"))


def test_categories_drawn_uniformly():
    pools = {c: _fake(c, 6) for c in ("a", "b", "c")}
    sampler = EpisodeSampler(pools, 2, 1, 1, load=_constant_loader, injector=AnomalyInjector(kinds=("blob",)))
    counts = {c: 0 for c in pools}
    for ep in sampler.episodes(300, seed=0):
        counts[ep.category] += 1
    assert all(70 <= n <= 130 for n in counts.values()), counts


def test_custom_loader_and_cache():
    calls: list[str] = []

    def load(sample: Sample) -> np.ndarray:
        calls.append(sample.path)
        return _constant_loader(sample)

    pools = {"bottle": _fake("bottle", 8)}
    sampler = EpisodeSampler(pools, 2, 1, 1, load=load)
    for _ in sampler.episodes(20, seed=0):
        pass
    assert len(calls) == len(set(calls)) <= 8
    calls.clear()
    uncached = EpisodeSampler(pools, 2, 1, 1, load=load, cache=False)
    for _ in uncached.episodes(3, seed=0):
        pass
    assert len(calls) >= 3 * 4
    cached = sampler.image(pools["bottle"][0])
    assert not cached.flags.writeable
    store = {s.path: _constant_loader(s) for s in pools["bottle"]}
    EpisodeSampler(pools, 2, 1, 1, load=lambda s: store[s.path]).sample(np.random.default_rng(0))
    assert all(a.flags.writeable for a in store.values())

    bad = EpisodeSampler(pools, 2, 1, 1, load=lambda s: np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match=r"/nowhere/bottle/train/good/\d+\.png: loader returned uint8 \(32, 32\)"):
        bad.sample(np.random.default_rng(0))


def test_source_image_is_never_in_the_support():
    received: list[tuple[int, int | None]] = []

    def spy(image: np.ndarray, rng: np.random.Generator, source: np.ndarray | None = None):
        received.append((int(image[0, 0, 0]), None if source is None else int(source[0, 0, 0])))
        out, mask = image.copy(), np.zeros(image.shape[:2], bool)
        out[:4, :4] = 255 - out[:4, :4]
        mask[:4, :4] = True
        return out, mask

    for n_train in (12, 7, 6):
        sampler = EpisodeSampler({"bottle": _fake("bottle", n_train)}, 3, 1, 2, injector=spy, load=_constant_loader)
        for ep in sampler.episodes(20, seed=n_train):
            support_values = {int(Path(p).stem) + 1 for p in ep.support_ids}
            for base, source in received:
                # the source is another of the category's training images, never one of the support
                assert source in set(range(1, n_train + 1)) - support_values - {base}, (base, source)
            received.clear()
            assert ep.query_masks[ep.query_labels == 1].sum() == 2 * 16


def test_image_size_resizes_and_mixed_sizes_need_it(tmp_path):
    good = tmp_path / "cat" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = []
    for i, (h, w) in enumerate([(48, 64)] * 4 + [(40, 40)]):
        path = good / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), "cat", "train", "good"))
    sampler = EpisodeSampler({"cat": samples}, 2, 1, 2, image_size=32)
    ep = sampler.sample(np.random.default_rng(0))
    assert ep.support.shape == (2, 32, 32, 3) and ep.query.shape == (3, 32, 32, 3)
    assert ep.query_masks.shape == (3, 32, 32)
    expected = np.asarray(Image.open(ep.support_ids[0]).convert("RGB").resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(ep.support[0], expected)
    with pytest.raises(DataError, match=r"image size \d+x\d+ differs from .* set image_size"):
        EpisodeSampler({"cat": samples}, 2, 1, 2).sample(np.random.default_rng(0))


def test_a_broken_injector_is_named():
    def empty(image, rng, source=None):
        return image.copy(), np.zeros(image.shape[:2], bool)

    sampler = EpisodeSampler({"bottle": _fake("bottle", 4)}, 1, 1, 1, injector=empty, load=_constant_loader)
    with pytest.raises(DataError, match="injector returned .* non-empty bool mask"):
        sampler.sample(np.random.default_rng(0))
