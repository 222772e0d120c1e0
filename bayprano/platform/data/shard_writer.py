"""Writing per-site shards: :func:`shard_dataset` splits an MVTec-layout dataset on disk into one
Parquet file per site, by category (non-IID) or image by image (IID), and writes the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bayprano.platform.data.imageio import check_mask_size, encode_png, load_image, load_mask
from bayprano.platform.data.mvtec import SPLITS, Sample, scan_root
from bayprano.platform.data.shard_schema import (
    COLUMNS,
    IMAGE_COLUMNS,
    MANIFEST_NAME,
    METADATA_COLUMNS,
    MODES,
    SCHEMA,
    SCHEMA_VERSION,
    check_int,
)
from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write, atomic_write_json, file_sha256

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SPLIT_ORDER = {s: i for i, s in enumerate(SPLITS)}

Progress = Callable[[int, int], None]


def site_name(index: int) -> str:
    return f"site-{index:03d}"


def _sort_key(sample: Sample) -> tuple:
    return (sample.category, _SPLIT_ORDER.get(sample.split, len(SPLITS)), sample.defect_type, sample.path)


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
        check_mask_size(mask, image, sample.mask_path, image_name=sample.path)
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
    path: Path, samples: list[Sample], root: Path, row_group_rows: int, on_row: Callable[[], None]
) -> dict[str, Any]:
    rows_by_split = {s: 0 for s in SPLITS}
    sizes = {"image_bytes": 0, "mask_bytes": 0}

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
                    rows_by_split[row["split"]] += 1
                    sizes["image_bytes"] += len(row["image"])
                    sizes["mask_bytes"] += len(row["mask"] or b"")
                    on_row()
                table = pa.Table.from_pylist(rows, schema=SCHEMA)
                writer.write_table(table, row_group_size=row_group_rows)
        finally:
            writer.close()

    atomic_write(path, write)
    return {"rows_by_split": rows_by_split, **sizes}


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
    sites = check_int("--sites", sites, 1)
    row_group_rows = check_int("row_group_rows", row_group_rows, 1)
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: unknown shard mode (expected one of: {', '.join(MODES)})")
    seed = check_int("seed", seed, 0)

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
