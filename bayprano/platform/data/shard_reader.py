"""Reading one site's shard: :class:`ShardReader` streams its rows one row group at a time, checked
against the shard schema, as :class:`ShardRow` (decoded images and masks, or their PNG bytes) or
:class:`ShardMeta` (the metadata only)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayprano.platform.data.imageio import check_mask_size, load_image, load_mask
from bayprano.platform.data.mvtec import SPLITS
from bayprano.platform.data.shard_schema import COLUMNS, METADATA_COLUMNS, check_int, check_schema
from bayprano.platform.errors import ConfigError, DataError


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


class ShardReader:
    """Streaming reader of one site's shard.

    Opening checks that the file is a readable Parquet file with the shard schema. Reads go row group by
    row group, so memory holds at most one row group of images whatever the size of the file. Use as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, batch_rows: int = 64):
        self.path = Path(path)
        self.batch_rows = check_int("batch_rows", batch_rows, 1)
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
            check_mask_size(mask, image, where)
        elif record["label"] != 0:
            raise DataError(f"{where}: defective image without mask")
        record.update(image=image, mask=mask)
        return ShardRow(**record)
