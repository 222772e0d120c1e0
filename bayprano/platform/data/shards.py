"""Per-site Parquet shards of an MVTec-layout dataset, for federated training across factories.

Each site (factory) holds one Parquet file with its private images. :func:`shard_dataset` splits a
dataset on disk into ``site-000.parquet``, ``site-001.parquet``, ... plus a ``manifest.json`` that
records what went where; :class:`ShardReader` streams a shard back one row group at a time;
:func:`read_manifest` and :func:`verify_shards` check a shard folder before it is used;
:func:`shard_samples` turns a shard's rows into MVTec :class:`~bayprano.platform.data.mvtec.Sample`
objects for code written against the folder layout.

Shard schema (version :data:`SCHEMA_VERSION`, stored in the Arrow schema metadata under
``bayprano.schema_version``), one row per image:

==============  ========  ==========================================================================
column          type      content
==============  ========  ==========================================================================
image           binary    PNG bytes: the source file as is when it is a PNG, else re-encoded to PNG
                          (lossless, so the decoded pixels equal those of the source file)
category        string    product line, e.g. ``bottle``
split           string    ``train`` or ``test``
label           int8      0 normal, 1 defective
defect_type     string    ``good`` for normal images
mask            binary    binarised ground-truth mask as PNG (0/255); null for normal images
source_path     string    path of the source image relative to the dataset root, ``/``-separated
height, width   int32     image size in pixels
sha256          string    hex SHA-256 of the ``image`` bytes
==============  ========  ==========================================================================

Rows are written sorted by (category, split, defect_type, source_path) in row groups of
``row_group_rows`` rows, so a reader holds at most one row group of images in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayprano.platform.data.imageio import encode_png, load_image, load_mask
from bayprano.platform.data.mvtec import SPLITS, Sample, scan_root
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write, atomic_write_json, file_sha256

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"bayprano.schema_version"
MANIFEST_NAME = "manifest.json"
MODES = ("by-category", "iid")
SHARD_URI_PREFIX = "shard://"

_FIELDS = [
    pa.field("image", pa.binary(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.int8(), nullable=False),
    pa.field("defect_type", pa.string(), nullable=False),
    pa.field("mask", pa.binary(), nullable=True),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
]
SCHEMA = pa.schema(_FIELDS, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})
COLUMNS = tuple(f.name for f in _FIELDS)
IMAGE_COLUMNS = ("image", "mask")
METADATA_COLUMNS = tuple(c for c in COLUMNS if c not in IMAGE_COLUMNS)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}
_SITE_KEYS = ("name", "file", "rows", "rows_by_split", "categories", "image_bytes", "sha256")
_MANIFEST_KEYS = (
    "schema_version", "created", "source_root", "mode", "seed", "total_rows", "categories", "sites"
)

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def site_name(index: int) -> str:
    return f"site-{index:03d}"


def _sort_key(sample: Sample) -> tuple:
    return (sample.category, _SPLIT_ORDER.get(sample.split, len(SPLITS)), sample.defect_type, sample.path)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} {value!r}: must be an integer")
    if value < minimum:
        raise ConfigError(f"{name} {value}: must be at least {minimum}")
    return int(value)


def _partition_by_category(samples: list[Sample], sites: int, rng: np.random.Generator) -> list[list[Sample]]:
    categories = sorted({s.category for s in samples})
    if sites > len(categories):
        raise ConfigError(
            f"--sites {sites}: more sites than categories ({len(categories)}); by-category sharding gives "
            f"each site whole categories, so use at most {len(categories)} sites or --iid to split images"
        )
    order = [categories[i] for i in rng.permutation(len(categories))]
    owner = {cat: i % sites for i, cat in enumerate(order)}
    parts: list[list[Sample]] = [[] for _ in range(sites)]
    for s in samples:
        parts[owner[s.category]].append(s)
    return parts


def _partition_iid(samples: list[Sample], sites: int, rng: np.random.Generator) -> list[list[Sample]]:
    n_train = sum(1 for s in samples if s.split == "train")
    if sites > n_train:
        raise ConfigError(
            f"--sites {sites}: more sites than training images ({n_train}); every site needs at least one"
        )
    groups: dict[tuple[str, str, str], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.split, s.category, s.defect_type)].append(s)
    parts: list[list[Sample]] = [[] for _ in range(sites)]
    # The deal continues across groups instead of restarting at site 0, so that the remainders of the
    # groups land on different sites; training groups are dealt first so no site is left without one.
    turn = 0
    for key in sorted(groups, key=lambda k: (_SPLIT_ORDER.get(k[0], len(SPLITS)), k[1], k[2])):
        group = sorted(groups[key], key=lambda s: s.path)
        for i in rng.permutation(len(group)):
            parts[turn % sites].append(group[i])
            turn += 1
    return parts


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _encode_row(sample: Sample, root: Path) -> dict[str, Any]:
    try:
        raw = Path(sample.path).read_bytes()
    except OSError as exc:
        raise DataError(f"{sample.path}: cannot read ({exc.strerror or exc})") from None
    image = load_image(raw, name=sample.path)
    png = raw if raw.startswith(_PNG_MAGIC) else encode_png(image)
    mask_png = None
    if sample.mask_path is not None:
        mask = load_mask(sample.mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
                f"image {sample.path} size {image.shape[1]}x{image.shape[0]}"
            )
        mask_png = encode_png(mask)
    return {
        "image": png,
        "category": sample.category,
        "split": sample.split,
        "label": sample.label,
        "defect_type": sample.defect_type,
        "mask": mask_png,
        "source_path": _relative(sample.path, root),
        "height": image.shape[0],
        "width": image.shape[1],
        "sha256": hashlib.sha256(png).hexdigest(),
    }


def _write_shard(
    path: Path,
    samples: list[Sample],
    root: Path,
    row_group_rows: int,
    on_row: Callable[[], None],
) -> dict[str, Any]:
    stats = {"rows_by_split": {s: 0 for s in SPLITS}, "image_bytes": 0, "mask_bytes": 0}

    def write(tmp: str) -> None:
        writer = pq.ParquetWriter(
            tmp,
            SCHEMA,
            # PNG bytes do not compress further; min/max statistics of image bytes would bloat the footer.
            compression={c: ("none" if c in IMAGE_COLUMNS else "snappy") for c in COLUMNS},
            write_statistics=list(METADATA_COLUMNS),
        )
        try:
            for start in range(0, len(samples), row_group_rows):
                rows = []
                for sample in samples[start : start + row_group_rows]:
                    row = _encode_row(sample, root)
                    rows.append(row)
                    stats["rows_by_split"][row["split"]] += 1
                    stats["image_bytes"] += len(row["image"])
                    stats["mask_bytes"] += len(row["mask"] or b"")
                    on_row()
                table = pa.Table.from_pylist(rows, schema=SCHEMA)
                writer.write_table(table, row_group_size=row_group_rows)
        finally:
            writer.close()

    atomic_write(path, write)
    return stats


def _previous_shard_files(out: Path) -> list[str]:
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = [str(site["file"]) for site in manifest["sites"]]
        return [f for f in files if Path(f).name == f]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def shard_dataset(
    root: str | os.PathLike,
    out: str | os.PathLike,
    sites: int,
    mode: str = "by-category",
    seed: int = 0,
    categories: Sequence[str] | None = None,
    row_group_rows: int = 64,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Split the MVTec-layout dataset at ``root`` into one Parquet shard per site under ``out``.

    ``mode`` ``"by-category"`` (non-IID) gives each site whole categories, shuffled by ``seed`` and dealt
    round-robin; ``"iid"`` deals the images of every (category, split, defect type) group across all
    sites, so each site gets a fair share of each. Every image lands in exactly one site, and the same
    ``seed`` gives the same shards. ``progress(done, total)`` is called after each image is encoded.

    Shards are written atomically; the manifest is removed first and written last, so a folder that
    holds a manifest holds the shards it lists. Shard files listed by a previous manifest in ``out``
    and not produced again are deleted. Returns the manifest.
    """
    sites = _check_int("--sites", sites, 1)
    row_group_rows = _check_int("row_group_rows", row_group_rows, 1)
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: unknown shard mode (expected one of: {', '.join(MODES)})")
    seed = _check_int("seed", seed, 0)

    root_path = Path(root).resolve()
    samples = scan_root(root, categories)
    rng = np.random.default_rng(seed)
    if mode == "by-category":
        parts = _partition_by_category(samples, sites, rng)
    else:
        parts = _partition_iid(samples, sites, rng)
    parts = [sorted(p, key=_sort_key) for p in parts]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = _previous_shard_files(out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    total = len(samples)
    done = 0

    def on_row() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    site_entries = []
    category_sites: dict[str, list[str]] = defaultdict(list)
    for index, part in enumerate(parts):
        name = site_name(index)
        file = f"{name}.parquet"
        stats = _write_shard(out / file, part, root_path, row_group_rows, on_row)
        cats = sorted({s.category for s in part})
        for cat in cats:
            category_sites[cat].append(name)
        site_entries.append(
            {
                "name": name,
                "file": file,
                "rows": len(part),
                "rows_by_split": stats["rows_by_split"],
                "categories": cats,
                "image_bytes": stats["image_bytes"],
                "mask_bytes": stats["mask_bytes"],
                "file_bytes": (out / file).stat().st_size,
                "sha256": file_sha256(out / file),
            }
        )

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_root": str(root_path),
        "mode": mode,
        "seed": seed,
        "row_group_rows": row_group_rows,
        "total_rows": total,
        "categories": {cat: category_sites[cat] for cat in sorted(category_sites)},
        "sites": site_entries,
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    written = {e["file"] for e in site_entries}
    for file in stale:
        if file not in written:
            (out / file).unlink(missing_ok=True)
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardMeta:
    """What a shard row says about its image, without the image."""

    category: str
    split: str
    label: int
    defect_type: str
    source_path: str
    height: int
    width: int
    sha256: str


@dataclass(frozen=True)
class ShardRow(ShardMeta):
    """One shard row with its image and mask.

    Decoded: ``image`` is a uint8 (H, W, 3) RGB array and ``mask`` a bool (H, W) array, or None for a
    normal image. Not decoded: both are the PNG bytes as stored (``mask`` None for a normal image).
    """

    image: np.ndarray | bytes
    mask: np.ndarray | bytes | None


def check_schema(schema: pa.Schema, path: str | os.PathLike) -> int:
    """Raise DataError unless ``schema`` is a supported shard schema; return its version."""
    for expected in _FIELDS:
        index = schema.get_field_index(expected.name)
        if index < 0:
            raise DataError(f"{path}: not a bayprano shard, column {expected.name!r} is missing")
        found = schema.field(index).type
        if not found.equals(expected.type):
            raise DataError(
                f"{path}: not a bayprano shard, column {expected.name!r} has type {found} "
                f"(expected {expected.type})"
            )
    raw = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if raw is None:
        raise DataError(f"{path}: no schema version in the Parquet metadata ({SCHEMA_VERSION_KEY.decode()})")
    version_text = raw.decode("utf-8", "replace")
    try:
        version = int(version_text)
    except ValueError:
        version = None
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{path}: shard schema version {version_text!r} is not supported "
            f"(this reader reads {SCHEMA_VERSION})"
        )
    return version


class ShardReader:
    """Streaming reader of one site's shard.

    Opening checks that the file is a readable Parquet file with the shard schema. Reads go row group by
    row group, so memory holds at most one row group of images whatever the size of the file. Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, batch_rows: int = 64):
        self.path = Path(path)
        self.batch_rows = _check_int("batch_rows", batch_rows, 1)
        if not self.path.is_file():
            raise DataError(f"{self.path}: shard file not found")
        try:
            self._file = pq.ParquetFile(self.path)
            schema = self._file.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{self.path}: not a readable Parquet shard ({exc})") from None
        try:
            self.schema_version = check_schema(schema, self.path)
        except DataError:
            self._file.close()
            raise
        self._categories: list[str] | None = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"ShardReader({str(self.path)!r}, rows={self.num_rows})"

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    @property
    def num_row_groups(self) -> int:
        return self._file.num_row_groups

    @property
    def categories(self) -> list[str]:
        """Sorted names of the categories in the shard (reads the category column only)."""
        if self._categories is None:
            found: set[str] = set()
            for batch in self.iter_batches(columns=["category"]):
                found.update(r["category"] for r in self._records(batch))
            self._categories = sorted(found)
        return list(self._categories)

    def _unreadable(self, exc: Exception) -> DataError:
        return DataError(f"{self.path}: not a readable Parquet shard ({exc})")

    def _records(self, data: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
        try:
            return data.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException) as exc:
            # Arrow leaves string validation to conversion, so corrupt text surfaces only here.
            raise self._unreadable(exc) from None

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return list(COLUMNS)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise ConfigError(f"column {unknown[0]!r}: not a shard column (columns: {', '.join(COLUMNS)})")
        return list(columns)

    def iter_batches(self, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_rows`` rows with the given columns (default: all)."""
        cols = self._check_columns(columns)
        try:
            for batch in self._file.iter_batches(batch_size=self.batch_rows, columns=cols, use_threads=False):
                yield batch
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(exc) from None

    def iter_metadata(self) -> Iterator[ShardMeta]:
        """The metadata of every row, in file order; the image and mask columns are not read."""
        for batch in self.iter_batches(columns=METADATA_COLUMNS):
            for record in self._records(batch):
                yield ShardMeta(**record)

    def _read_row_group(self, index: int, columns: Sequence[str]) -> pa.Table:
        try:
            return self._file.read_row_group(index, columns=list(columns), use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise self._unreadable(exc) from None

    def iter_rows(
        self, split: str | None = None, category: str | None = None, decode: bool = True
    ) -> Iterator[ShardRow]:
        """Rows in file order, optionally only those of one split and/or category.

        The filter is applied on the metadata columns of each row group first, and the images of a row
        group are read only when some of its rows match.
        """
        if split is not None and split not in SPLITS:
            raise ConfigError(f"split {split!r}: unknown split (expected one of: {', '.join(SPLITS)})")
        for index in range(self.num_row_groups):
            if split is None and category is None:
                keep = None
            else:
                meta = self._records(self._read_row_group(index, ["split", "category"]))
                keep = [
                    i
                    for i, r in enumerate(meta)
                    if (split is None or r["split"] == split) and (category is None or r["category"] == category)
                ]
                if not keep:
                    continue
            table = self._read_row_group(index, COLUMNS)
            if keep is not None and len(keep) < table.num_rows:
                table = table.take(pa.array(keep, type=pa.int64()))
            for batch in table.to_batches(max_chunksize=self.batch_rows):
                for record in self._records(batch):
                    yield self._row(record, decode)

    def _row(self, record: dict[str, Any], decode: bool) -> ShardRow:
        if not decode:
            return ShardRow(**record)
        where = f"{self.path} row {record['source_path']}"
        png = record["image"]
        if hashlib.sha256(png).hexdigest() != record["sha256"]:
            raise DataError(f"{where}: image bytes do not match their sha256")
        image = load_image(png, name=where)
        if image.shape[:2] != (record["height"], record["width"]):
            raise DataError(
                f"{where}: image is {image.shape[1]}x{image.shape[0]}, "
                f"the row says {record['width']}x{record['height']}"
            )
        mask = None
        if record["mask"] is not None:
            mask = load_mask(record["mask"], name=f"{where} (mask)")
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
                    f"image size {image.shape[1]}x{image.shape[0]}"
                )
        elif record["label"] != 0:
            raise DataError(f"{where}: defective image without mask")
        record.update(image=image, mask=mask)
        return ShardRow(**record)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def _manifest_path(shard_dir: str | os.PathLike) -> Path:
    p = Path(shard_dir)
    return p if p.suffix == ".json" else p / MANIFEST_NAME


def read_manifest(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard folder (or the manifest file itself), checked for the keys it needs."""
    path = _manifest_path(shard_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: shard manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read shard manifest ({exc})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise DataError(f"{path}: not valid JSON ({exc.msg} at {where})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: shard manifest must be a JSON object")
    for key in _MANIFEST_KEYS:
        if key not in manifest:
            raise DataError(f"{path}: shard manifest is missing key {key!r}")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {manifest['schema_version']!r} is not supported "
            f"(this reader reads {SCHEMA_VERSION})"
        )
    if manifest["mode"] not in MODES:
        raise DataError(f"{path}: mode {manifest['mode']!r} is not one of {', '.join(MODES)}")
    sites = manifest["sites"]
    if not isinstance(sites, list) or not sites:
        raise DataError(f"{path}: sites must be a non-empty list")
    for i, site in enumerate(sites):
        if not isinstance(site, dict):
            raise DataError(f"{path}: sites[{i}] must be an object")
        for key in _SITE_KEYS:
            if key not in site:
                raise DataError(f"{path}: sites[{i}] is missing key {key!r}")
        file = site["file"]
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise DataError(f"{path}: sites[{i}].file {file!r} must be a file name inside the shard folder")
        if isinstance(site["rows"], bool) or not isinstance(site["rows"], int) or site["rows"] < 0:
            raise DataError(f"{path}: sites[{i}].rows {site['rows']!r} must be a non-negative integer")
    if not isinstance(manifest["categories"], dict):
        raise DataError(f"{path}: categories must be an object mapping each category to its sites")
    if manifest["total_rows"] != sum(site["rows"] for site in sites):
        raise DataError(
            f"{path}: total_rows {manifest['total_rows']!r} is not the sum of the sites' rows "
            f"({sum(site['rows'] for site in sites)})"
        )
    return manifest


def shard_paths(shard_dir: str | os.PathLike) -> list[Path]:
    """Paths of the shard files listed in the manifest, in site order."""
    path = _manifest_path(shard_dir)
    return [path.parent / site["file"] for site in read_manifest(path)["sites"]]


def verify_shards(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Check that every shard the manifest lists exists, has its recorded SHA-256 and row count, and a
    readable shard schema. Raises DataError at the first problem; returns the manifest."""
    path = _manifest_path(shard_dir)
    manifest = read_manifest(path)
    for site in manifest["sites"]:
        file = path.parent / site["file"]
        if not file.is_file():
            raise DataError(f"{file}: shard listed in {path} is missing")
        digest = file_sha256(file)
        if digest != site["sha256"]:
            raise DataError(
                f"{file}: sha256 {digest[:12]}... does not match the manifest "
                f"({str(site['sha256'])[:12]}...); the file was modified or replaced"
            )
        with ShardReader(file) as reader:
            if reader.num_rows != site["rows"]:
                raise DataError(f"{file}: {reader.num_rows} rows, the manifest says {site['rows']}")
    return manifest


# --------------------------------------------------------------------------------------------------
# Adapter to MVTec samples
# --------------------------------------------------------------------------------------------------


def shard_uri(path: str | os.PathLike, source_path: str, mask: bool = False) -> str:
    """``shard://<absolute shard file>#<source_path>``, with ``#mask`` appended for the mask."""
    uri = f"{SHARD_URI_PREFIX}{Path(path).resolve().as_posix()}#{source_path}"
    return uri + "#mask" if mask else uri


def parse_shard_uri(uri: str) -> tuple[Path, str, bool]:
    """(shard file, source_path, is_mask) of a :func:`shard_uri`."""
    match = re.fullmatch(rf"{re.escape(SHARD_URI_PREFIX)}([^#]+)#(.+?)(#mask)?", uri)
    if match is None:
        raise DataError(f"{uri}: not a shard URI (expected {SHARD_URI_PREFIX}<file>#<source_path>)")
    return Path(match.group(1)), match.group(2), match.group(3) is not None


@dataclass(frozen=True)
class ShardSample:
    """A shard row as an MVTec :class:`Sample` plus its encoded image and mask.

    ``sample.path`` and ``sample.mask_path`` are :func:`shard_uri` strings, not files: load the
    pixels with :meth:`load` rather than ``mvtec.load_sample``.
    """

    sample: Sample
    image: bytes
    mask: bytes | None

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The RGB image and its bool mask (all False for a normal image), as ``mvtec.load_sample``."""
        image = load_image(self.image, name=self.sample.path)
        if self.mask is None:
            return image, np.zeros(image.shape[:2], dtype=bool)
        mask = load_mask(self.mask, name=self.sample.mask_path)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"{self.sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
                f"image size {image.shape[1]}x{image.shape[0]}"
            )
        return image, mask


def shard_samples(
    path: str | os.PathLike, split: str | None = "train", category: str | None = None
) -> list[ShardSample]:
    """The rows of one split (``None``: all) and optionally one category of a shard, as samples.

    The encoded bytes of every selected row are held in memory, which suits a few-shot support set;
    stream a large split with :meth:`ShardReader.iter_rows` instead.
    """
    out = []
    with ShardReader(path) as reader:
        for row in reader.iter_rows(split=split, category=category, decode=False):
            sample = Sample(
                path=shard_uri(reader.path, row.source_path),
                category=row.category,
                split=row.split,
                defect_type=row.defect_type,
                mask_path=None if row.mask is None else shard_uri(reader.path, row.source_path, mask=True),
            )
            out.append(ShardSample(sample, row.image, row.mask))
    return out
