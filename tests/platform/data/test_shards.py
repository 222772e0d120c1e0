"""Tests of per-site Parquet shards, on a small MVTec-layout dataset written to a temporary folder."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bayprano.platform.data import shards
from bayprano.platform.data.mvtec import load_sample, scan_root
from bayprano.platform.data.shards import (
    SCHEMA,
    SCHEMA_VERSION_KEY,
    ShardMeta,
    ShardReader,
    ShardRow,
    parse_shard_uri,
    read_manifest,
    shard_dataset,
    shard_samples,
    verify_shards,
)
from bayprano.platform.errors import ConfigError, DataError

CATEGORIES = ("bottle", "cable", "screw", "wood")
SIZE = 64
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT = 3, 2, 2
DEFECTS = ("crack", "scratch")
ROWS_PER_CATEGORY = N_TRAIN + N_TEST_GOOD + N_PER_DEFECT * len(DEFECTS)


def _make_dataset(root: Path) -> None:
    rng = np.random.default_rng(1234)
    for cat in CATEGORIES:
        cdir = root / cat
        for i in range(N_TRAIN):
            img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            (cdir / "train" / "good").mkdir(parents=True, exist_ok=True)
            if cat == "bottle" and i == 0:
                Image.fromarray(img).save(cdir / "train" / "good" / f"{i:03d}.jpg", quality=90)
            elif cat == "cable" and i == 0:
                Image.fromarray(img[..., 0], mode="L").save(cdir / "train" / "good" / f"{i:03d}.png")
            else:
                Image.fromarray(img).save(cdir / "train" / "good" / f"{i:03d}.png")
        (cdir / "test" / "good").mkdir(parents=True)
        for i in range(N_TEST_GOOD):
            img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(img).save(cdir / "test" / "good" / f"{i:03d}.png")
        for defect in DEFECTS:
            (cdir / "test" / defect).mkdir(parents=True)
            (cdir / "ground_truth" / defect).mkdir(parents=True)
            for i in range(N_PER_DEFECT):
                img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
                y, x = rng.integers(0, SIZE - 16, 2)
                mask[y : y + 8 + i, x : x + 12] = 255
                Image.fromarray(img).save(cdir / "test" / defect / f"{i:03d}.png")
                Image.fromarray(mask, mode="L").save(cdir / "ground_truth" / defect / f"{i:03d}_mask.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    _make_dataset(root)
    return root


@pytest.fixture(scope="module")
def by_category(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("by_category")
    return out, shard_dataset(dataset, out, sites=3, seed=7, row_group_rows=4)


@pytest.fixture(scope="module")
def iid(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("iid")
    return out, shard_dataset(dataset, out, sites=3, mode="iid", seed=7, row_group_rows=4)


def _site_metadata(out: Path, manifest: dict) -> dict[str, list[ShardMeta]]:
    result = {}
    for site in manifest["sites"]:
        with ShardReader(out / site["file"]) as reader:
            result[site["name"]] = list(reader.iter_metadata())
    return result


def _source_by_relpath(root: Path) -> dict:
    return {Path(s.path).relative_to(root).as_posix(): s for s in scan_root(root)}


# ----------------------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("which", ["by_category", "iid"])
def test_rows_add_up_and_match_manifest(which, request, dataset):
    out, manifest = request.getfixturevalue(which)
    total = len(CATEGORIES) * ROWS_PER_CATEGORY
    assert manifest["total_rows"] == total
    assert len(manifest["sites"]) == 3
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"site-00{i}.parquet" for i in range(3)]
    metas = _site_metadata(out, manifest)
    assert sum(len(m) for m in metas.values()) == total
    for site in manifest["sites"]:
        rows = metas[site["name"]]
        assert site["rows"] == len(rows) > 0
        assert site["rows_by_split"] == {
            "train": sum(r.split == "train" for r in rows),
            "test": sum(r.split == "test" for r in rows),
        }
        assert site["categories"] == sorted({r.category for r in rows})
        with ShardReader(out / site["file"]) as reader:
            images = [v for b in reader.iter_batches(["image"]) for v in b.column(0).to_pylist()]
            assert site["image_bytes"] == sum(len(v) for v in images)
            assert reader.num_rows == site["rows"]
            assert reader.categories == site["categories"]
        assert site["sha256"] == hashlib.sha256((out / site["file"]).read_bytes()).hexdigest()
    for cat, names in manifest["categories"].items():
        assert names == sorted(n for n, rows in metas.items() if any(r.category == cat for r in rows))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["sites"] == manifest["sites"]
    assert on_disk["schema_version"] == 1 and on_disk["mode"] == ("iid" if which == "iid" else "by-category")
    assert on_disk["created"].endswith("+00:00")


@pytest.mark.parametrize("which", ["by_category", "iid"])
def test_no_image_in_two_sites_and_every_source_image_present(which, request, dataset):
    out, manifest = request.getfixturevalue(which)
    metas = _site_metadata(out, manifest)
    paths = [r.source_path for rows in metas.values() for r in rows]
    hashes = [r.sha256 for rows in metas.values() for r in rows]
    assert len(set(paths)) == len(paths)
    assert len(set(hashes)) == len(hashes)
    assert set(paths) == set(_source_by_relpath(dataset))


def test_by_category_gives_each_category_to_one_site(by_category):
    out, manifest = by_category
    metas = _site_metadata(out, manifest)
    owners = defaultdict(set)
    for name, rows in metas.items():
        for r in rows:
            owners[r.category].add(name)
    assert set(owners) == set(CATEGORIES)
    assert all(len(sites) == 1 for sites in owners.values())
    assert all(len(v) == 1 for v in manifest["categories"].values())
    # 4 categories over 3 sites: every site owns one or two whole categories
    assert sorted(len(site["categories"]) for site in manifest["sites"]) == [1, 1, 2]
    for rows in metas.values():
        counts = Counter(r.category for r in rows)
        assert all(n == ROWS_PER_CATEGORY for n in counts.values())


def test_iid_spreads_every_stratum_over_the_sites(iid):
    out, manifest = iid
    metas = _site_metadata(out, manifest)
    for cat in CATEGORIES:
        assert len(manifest["categories"][cat]) == 3
    per_stratum = defaultdict(Counter)
    for name, rows in metas.items():
        for r in rows:
            per_stratum[(r.category, r.split, r.defect_type)][name] += 1
    assert len(per_stratum) == len(CATEGORIES) * (2 + len(DEFECTS))
    for counts in per_stratum.values():
        shares = [counts.get(site["name"], 0) for site in manifest["sites"]]
        assert max(shares) - min(shares) <= 1
    sizes = [site["rows"] for site in manifest["sites"]]
    assert max(sizes) - min(sizes) <= 1
    assert all(site["rows_by_split"]["train"] >= 1 for site in manifest["sites"])


@pytest.mark.parametrize("mode", ["by-category", "iid"])
def test_same_seed_same_shards(mode, dataset, tmp_path):
    a = shard_dataset(dataset, tmp_path / "a", sites=2, mode=mode, seed=3)
    b = shard_dataset(dataset, tmp_path / "b", sites=2, mode=mode, seed=3)
    assert [s["sha256"] for s in a["sites"]] == [s["sha256"] for s in b["sites"]]
    assert a["categories"] == b["categories"]
    assignments = set()
    for seed in range(6):
        m = shard_dataset(dataset, tmp_path / f"s{seed}", sites=2, mode=mode, seed=seed)
        assignments.add(tuple(s["sha256"] for s in m["sites"]))
    assert len(assignments) > 1


def test_decoded_rows_equal_source_pixels(iid, dataset):
    out, manifest = iid
    source = _source_by_relpath(dataset)
    seen = 0
    for site in manifest["sites"]:
        with ShardReader(out / site["file"], batch_rows=3) as reader:
            for row in reader.iter_rows():
                assert isinstance(row, ShardRow)
                sample = source[row.source_path]
                image, mask = load_sample(sample)
                assert row.image.dtype == np.uint8 and row.image.shape == (SIZE, SIZE, 3)
                np.testing.assert_array_equal(row.image, image)
                assert (row.category, row.split, row.defect_type, row.label) == (
                    sample.category,
                    sample.split,
                    sample.defect_type,
                    sample.label,
                )
                assert (row.height, row.width) == (SIZE, SIZE)
                if sample.defect_type == "good":
                    assert row.mask is None and row.label == 0
                else:
                    assert row.mask.dtype == bool and row.mask.any()
                    np.testing.assert_array_equal(row.mask, mask)
                seen += 1
    assert seen == len(source)


def test_png_bytes_kept_and_other_formats_reencoded(iid, dataset):
    out, manifest = iid
    stored = {}
    for site in manifest["sites"]:
        with ShardReader(out / site["file"]) as reader:
            for row in reader.iter_rows(decode=False):
                assert row.image.startswith(b"\x89PNG\r\n\x1a\n")
                assert hashlib.sha256(row.image).hexdigest() == row.sha256
                stored[row.source_path] = row.image
    assert stored["cable/train/good/000.png"] == (dataset / "cable/train/good/000.png").read_bytes()
    assert stored["wood/test/crack/001.png"] == (dataset / "wood/test/crack/001.png").read_bytes()
    jpeg = dataset / "bottle/train/good/000.jpg"
    assert stored["bottle/train/good/000.jpg"] != jpeg.read_bytes()
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(stored["bottle/train/good/000.jpg"])).convert("RGB")),
        np.asarray(Image.open(jpeg).convert("RGB")),
    )


def test_progress_and_categories_subset(dataset, tmp_path):
    calls = []
    m = shard_dataset(
        dataset, tmp_path, sites=2, categories=["screw", "wood"], progress=lambda d, t: calls.append((d, t))
    )
    total = 2 * ROWS_PER_CATEGORY
    assert m["total_rows"] == total
    assert calls[-1] == (total, total) and len(calls) == total
    assert [d for d, _ in calls] == list(range(1, total + 1))
    assert set(m["categories"]) == {"screw", "wood"}


def test_rerun_removes_shards_of_previous_run(dataset, tmp_path):
    shard_dataset(dataset, tmp_path, sites=3, mode="iid")
    assert (tmp_path / "site-002.parquet").exists()
    (tmp_path / "notes.txt").write_text("keep me")
    m = shard_dataset(dataset, tmp_path, sites=2, mode="iid")
    assert not (tmp_path / "site-002.parquet").exists()
    assert (tmp_path / "notes.txt").exists()
    assert len(m["sites"]) == 2
    verify_shards(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------- config errors


def test_sites_below_one(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"sites 0\b"):
        shard_dataset(dataset, tmp_path, sites=0)
    with pytest.raises(ConfigError, match="sites -2"):
        shard_dataset(dataset, tmp_path, sites=-2, mode="iid")
    assert not list(tmp_path.iterdir())


def test_more_sites_than_categories(dataset, tmp_path):
    with pytest.raises(ConfigError) as info:
        shard_dataset(dataset, tmp_path, sites=5)
    msg = str(info.value)
    assert "--sites 5" in msg and "(4)" in msg and "--iid" in msg
    assert not list(tmp_path.iterdir())
    total = shard_dataset(dataset, tmp_path, sites=5, mode="iid")["total_rows"]
    assert total == len(CATEGORIES) * ROWS_PER_CATEGORY


def test_iid_more_sites_than_training_images(dataset, tmp_path):
    with pytest.raises(ConfigError, match="--sites 13.*training images \\(12\\)"):
        shard_dataset(dataset, tmp_path, sites=13, mode="iid")


def test_unknown_mode_and_bad_row_group_rows(dataset, tmp_path):
    with pytest.raises(ConfigError, match="'random'"):
        shard_dataset(dataset, tmp_path, sites=2, mode="random")
    with pytest.raises(ConfigError, match="row_group_rows 0"):
        shard_dataset(dataset, tmp_path, sites=2, row_group_rows=0)


def test_bad_dataset_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        shard_dataset(tmp_path / "nope", tmp_path / "out", sites=1)


# -------------------------------------------------------------------------------------------- reading


def test_streaming_batches_and_row_groups(by_category):
    out, manifest = by_category
    site = max(manifest["sites"], key=lambda s: s["rows"])
    with ShardReader(out / site["file"], batch_rows=4) as reader:
        assert reader.num_row_groups == -(-site["rows"] // 4) > 1
        batches = list(reader.iter_batches())
        assert len(batches) > 1
        assert all(isinstance(b, pa.RecordBatch) and b.num_rows <= 4 for b in batches)
        assert sum(b.num_rows for b in batches) == site["rows"]
        assert batches[0].schema.names == list(shards.COLUMNS)
        meta_batches = list(reader.iter_batches(columns=["source_path", "label"]))
        assert meta_batches[0].schema.names == ["source_path", "label"]
        with pytest.raises(ConfigError, match="'pixels'"):
            list(reader.iter_batches(columns=["pixels"]))


def test_iter_metadata_reads_no_image_columns(by_category, monkeypatch):
    out, manifest = by_category
    reader = ShardReader(out / manifest["sites"][0]["file"])
    requested = []
    original = reader._file.iter_batches

    def spy(*args, **kwargs):
        requested.append(list(kwargs["columns"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(reader._file, "iter_batches", spy)
    metas = list(reader.iter_metadata())
    reader.close()
    assert len(metas) == manifest["sites"][0]["rows"]
    assert all(type(m) is ShardMeta for m in metas)
    assert requested and all("image" not in cols and "mask" not in cols for cols in requested)


def test_iter_rows_filters(iid):
    out, manifest = iid
    site = manifest["sites"][0]
    with ShardReader(out / site["file"], batch_rows=2) as reader:
        everything = list(reader.iter_metadata())
        train = list(reader.iter_rows(split="train", decode=False))
        assert len(train) == site["rows_by_split"]["train"]
        assert all(r.split == "train" for r in train)
        cat = everything[-1].category
        rows = list(reader.iter_rows(split="test", category=cat))
        assert [r.source_path for r in rows] == [
            m.source_path for m in everything if m.split == "test" and m.category == cat
        ]
        assert list(reader.iter_rows(category="no-such-category")) == []
        with pytest.raises(ConfigError, match="'val'"):
            list(reader.iter_rows(split="val"))


def test_truncated_file_is_a_data_error(by_category, tmp_path):
    out, manifest = by_category
    data = (out / manifest["sites"][0]["file"]).read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet shard"):
        ShardReader(cut)
    with pytest.raises(DataError, match="not found"):
        ShardReader(tmp_path / "absent.parquet")


def test_other_column_set_is_a_data_error(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image": [b"x"], "category": ["a"], "label": [0]}), other)
    with pytest.raises(DataError, match=r"other\.parquet: .*column 'split' is missing"):
        ShardReader(other)


def test_mismatched_column_type_is_a_data_error(tmp_path):
    schema = pa.schema(
        [pa.field(f.name, pa.int64() if f.name == "label" else f.type) for f in SCHEMA], metadata=SCHEMA.metadata
    )
    path = tmp_path / "types.parquet"
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(DataError, match=r"types\.parquet: .*column 'label' has type int64"):
        ShardReader(path)


def _one_row_table(schema: pa.Schema, image: bytes = b"\x89PNG not really") -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "image": image,
                "category": "bottle",
                "split": "train",
                "label": 0,
                "defect_type": "good",
                "mask": None,
                "source_path": "bottle/train/good/007.png",
                "height": 8,
                "width": 8,
                "sha256": hashlib.sha256(image).hexdigest(),
            }
        ],
        schema=schema,
    )


def test_other_schema_version_is_a_data_error(tmp_path):
    path = tmp_path / "v2.parquet"
    pq.write_table(_one_row_table(SCHEMA.with_metadata({SCHEMA_VERSION_KEY: b"2"})), path)
    with pytest.raises(DataError, match=r"v2\.parquet: .*version '2' is not supported"):
        ShardReader(path)
    none = tmp_path / "none.parquet"
    pq.write_table(_one_row_table(SCHEMA.remove_metadata()), none)
    with pytest.raises(DataError, match=r"none\.parquet: no schema version"):
        ShardReader(none)


def test_undecodable_row_names_file_and_source_path(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(_one_row_table(SCHEMA), path)
    with ShardReader(path) as reader:
        assert len(list(reader.iter_rows(decode=False))) == 1
        expected = r"bad\.parquet row bottle/train/good/007\.png: not a readable image"
        with pytest.raises(DataError, match=expected):
            list(reader.iter_rows())


# ------------------------------------------------------------------------------------------- manifest


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json: shard manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "mode": "iid"}))
    with pytest.raises(DataError, match=r"manifest\.json: .*missing key 'created'"):
        read_manifest(tmp_path)


def test_read_manifest_checks_sites(by_category, tmp_path):
    out, manifest = by_category
    broken = json.loads(json.dumps(manifest))
    del broken["sites"][1]["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"sites\[1\] is missing key 'sha256'"):
        read_manifest(tmp_path)
    escaping = json.loads(json.dumps(manifest))
    escaping["sites"][0]["file"] = "../elsewhere.parquet"
    (tmp_path / "manifest.json").write_text(json.dumps(escaping))
    with pytest.raises(DataError, match=r"sites\[0\]\.file"):
        read_manifest(tmp_path)
    assert read_manifest(out)["sites"] == manifest["sites"]
    assert read_manifest(out / "manifest.json")["total_rows"] == manifest["total_rows"]


def test_verify_shards_detects_changes(by_category, tmp_path):
    out, manifest = by_category
    assert verify_shards(out)["total_rows"] == manifest["total_rows"]

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    target = copy / manifest["sites"][1]["file"]
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{target.name}: sha256 .* does not match the manifest"):
        verify_shards(copy)

    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    (missing / manifest["sites"][2]["file"]).unlink()
    with pytest.raises(DataError, match=rf"{manifest['sites'][2]['file']}: shard listed in .* is missing"):
        verify_shards(missing)

    # A valid shard whose row count disagrees with the manifest, even though its hash was updated.
    recount = tmp_path / "recount"
    shutil.copytree(out, recount)
    doc = json.loads((recount / "manifest.json").read_text())
    doc["sites"][0]["rows"] += 1
    doc["total_rows"] += 1
    (recount / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"site-000\.parquet: \d+ rows, the manifest says \d+"):
        verify_shards(recount)


# -------------------------------------------------------------------------------------------- adapter


def test_shard_samples_feed_sample_code(by_category, dataset):
    out, manifest = by_category
    site = manifest["sites"][0]
    source = _source_by_relpath(dataset)
    train = shard_samples(out / site["file"])
    assert len(train) == site["rows_by_split"]["train"]
    for item in train:
        assert item.sample.split == "train" and item.sample.label == 0 and item.mask is None
        file, rel, is_mask = parse_shard_uri(item.sample.path)
        assert file == (out / site["file"]).resolve() and not is_mask
        image, mask = item.load()
        expected_image, expected_mask = load_sample(source[rel])
        np.testing.assert_array_equal(image, expected_image)
        assert mask.dtype == bool and not mask.any()
    test = shard_samples(out / site["file"], split="test")
    defective = [t for t in test if t.sample.label == 1]
    assert len(test) == site["rows_by_split"]["test"] and defective
    for item in defective:
        file, rel, is_mask = parse_shard_uri(item.sample.mask_path)
        assert is_mask and item.sample.path.startswith("shard://")
        image, mask = item.load()
        np.testing.assert_array_equal(mask, load_sample(source[rel])[1])
    with pytest.raises(DataError, match="not a shard URI"):
        parse_shard_uri("/plain/path.png")


def test_corrupt_bytes_anywhere_raise_data_error(dataset, tmp_path):
    shard_dataset(dataset, tmp_path / "one", sites=1, categories=["screw"], row_group_rows=4)
    data = (tmp_path / "one" / "site-000.parquet").read_bytes()
    meta = pq.ParquetFile(tmp_path / "one" / "site-000.parquet").metadata
    # Every metadata column chunk of the first row group, plus a sweep over the whole file.
    offsets = set(range(0, len(data) - 8, max(1, len(data) // 120)))
    group = meta.row_group(0)
    for j in range(group.num_columns):
        chunk = group.column(j)
        if chunk.path_in_schema not in ("image", "mask"):
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            offsets.update(range(start, start + chunk.total_compressed_size, 5))
    corrupt = tmp_path / "corrupt.parquet"
    raised = 0
    for offset in sorted(offsets):
        damaged = bytearray(data)
        damaged[offset : offset + 8] = b"\xff\xfe\x80\x00\xff\xc0\x80\x01"
        corrupt.write_bytes(bytes(damaged))
        try:
            with ShardReader(corrupt, batch_rows=2) as reader:
                list(reader.iter_metadata())
                list(reader.iter_rows(split="test"))
                list(reader.iter_rows())
        except DataError as exc:
            assert str(exc).startswith(str(corrupt))
            raised += 1
    assert raised > len(offsets) // 2
