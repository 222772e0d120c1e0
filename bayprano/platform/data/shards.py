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

The writer lives in ``shard_writer``, the reader in ``shard_reader`` and the schema in ``shard_schema``;
their public names are importable from here. This module holds the manifest checks and the adapter to
MVTec samples.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bayprano.platform.data.imageio import check_mask_size, load_image, load_mask
from bayprano.platform.data.mvtec import Sample
from bayprano.platform.data.shard_reader import ShardMeta, ShardReader, ShardRow
from bayprano.platform.data.shard_schema import (
    COLUMNS,
    IMAGE_COLUMNS,
    MANIFEST_NAME,
    METADATA_COLUMNS,
    MODES,
    SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    SHARD_URI_PREFIX,
    check_schema,
)
from bayprano.platform.data.shard_writer import Progress, shard_dataset, site_name
from bayprano.platform.errors import DataError
from bayprano.platform.fileio import file_sha256

__all__ = [
    "COLUMNS",
    "IMAGE_COLUMNS",
    "MANIFEST_NAME",
    "METADATA_COLUMNS",
    "MODES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_KEY",
    "SHARD_URI_PREFIX",
    "Progress",
    "ShardMeta",
    "ShardReader",
    "ShardRow",
    "ShardSample",
    "check_schema",
    "parse_shard_uri",
    "read_manifest",
    "shard_dataset",
    "shard_paths",
    "shard_samples",
    "shard_uri",
    "site_name",
    "verify_shards",
]

_SITE_KEYS = ("name", "file", "rows", "rows_by_split", "categories", "image_bytes", "sha256")
_MANIFEST_KEYS = ("schema_version", "created", "source_root", "mode", "seed", "total_rows", "categories", "sites")


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
        check_mask_size(mask, image, self.sample.mask_path)
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
            # not decoded: the image and the mask are the PNG bytes as stored
            assert isinstance(row.image, bytes) and (row.mask is None or isinstance(row.mask, bytes))
            out.append(ShardSample(sample, row.image, row.mask))
    return out
