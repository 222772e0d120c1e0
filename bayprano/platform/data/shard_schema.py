"""The Parquet schema of a site's shard (see ``shards`` for the columns), and the checks that the writer
(``shard_writer``), the reader (``shard_reader``) and the manifest code share."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from bayprano.platform.errors import ConfigError, DataError

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"bayprano.schema_version"
MANIFEST_NAME = "manifest.json"
MODES = ("by-category", "iid")
SHARD_URI_PREFIX = "shard://"

FIELDS = [
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
SCHEMA = pa.schema(FIELDS, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})
COLUMNS = tuple(f.name for f in FIELDS)
IMAGE_COLUMNS = ("image", "mask")
METADATA_COLUMNS = tuple(c for c in COLUMNS if c not in IMAGE_COLUMNS)


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} {value!r}: must be an integer")
    if value < minimum:
        raise ConfigError(f"{name} {value}: must be at least {minimum}")
    return int(value)


def check_schema(schema: pa.Schema, path: str | os.PathLike) -> int:
    """Raise DataError unless ``schema`` is a supported shard schema; return its version."""
    for expected in FIELDS:
        index = schema.get_field_index(expected.name)
        if index < 0:
            raise DataError(f"{path}: not a bayprano shard, column {expected.name!r} is missing")
        found = schema.field(index).type
        if not found.equals(expected.type):
            raise DataError(
                f"{path}: not a bayprano shard, column {expected.name!r} has type {found} (expected {expected.type})"
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
            f"{path}: shard schema version {version_text!r} is not supported (this reader reads {SCHEMA_VERSION})"
        )
    return version
