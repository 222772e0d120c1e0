"""The ``bayprano data`` commands: generate the synthetic set, import MVTec AD or loose folders, shard a
dataset into per-site Parquet files, and show what a root, a shard or a shard folder holds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterable

from bayprano.commands.common import Progress, positive_int


def cmd_data_synth(args: argparse.Namespace) -> int:
    from bayprano.platform.data.synth import generate_dataset

    start = time.perf_counter()
    meta = generate_dataset(
        args.out,
        categories=args.categories,
        seed=args.seed,
        size=args.size,
        n_train=args.train,
        n_test_good=args.test_good,
        n_test_defective=args.test_defective,
        progress=Progress("synth"),
    )
    cats = [c["name"] if isinstance(c, dict) else c for c in meta["categories"]]
    print(f"wrote {len(cats)} categories ({', '.join(cats)}) to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from bayprano.platform.data.shards import shard_dataset

    start = time.perf_counter()
    manifest = shard_dataset(
        args.root,
        args.out,
        sites=args.sites,
        mode="iid" if args.iid else "by-category",
        seed=args.seed,
        progress=Progress("shard"),
    )
    print(manifest_table(manifest))
    print(
        f"wrote {len(manifest['sites'])} shards ({manifest['total_rows']} rows, {manifest['mode']}) "
        f"to {args.out} in {time.perf_counter() - start:.1f}s"
    )
    return 0


def cmd_data_import_mvtec(args: argparse.Namespace) -> int:
    from bayprano.platform.data.info import summarize_root

    summary = summarize_root(args.root)
    print(summary.table())
    print(f"{args.root}: valid MVTec layout, {len(summary.categories)} categories, {summary.total} images")
    return cmd_data_shard(args)


def cmd_data_import_folder(args: argparse.Namespace) -> int:
    from bayprano.platform.data.folder import import_folder

    result = import_folder(
        args.category,
        args.normal,
        args.out,
        abnormal=args.abnormal,
        masks=args.masks,
        test_fraction=args.test_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    print(f"wrote category {args.category!r} to {Path(args.out) / args.category}: {counts}")
    return 0


def manifest_table(manifest: dict) -> str:
    from bayprano.platform.data.info import format_table

    rows: list[Iterable[str]] = []
    for site in manifest["sites"]:
        by_split = site.get("rows_by_split", {})
        rows.append(
            (
                site["name"],
                ", ".join(site["categories"]),
                str(by_split.get("train", 0)),
                str(by_split.get("test", 0)),
                str(site["rows"]),
                f"{site.get('image_bytes', 0) / 1e6:.1f} MB",
            )
        )
    return format_table(("site", "categories", "train", "test", "rows", "image bytes"), rows)


def data_summary(path: str | Path):
    """Summary of an MVTec-layout root, a Parquet shard, or a folder of shards with a manifest."""
    from bayprano.platform.data.info import summarize_records, summarize_root
    from bayprano.platform.data.shards import ShardReader, read_manifest

    def records(shard: Path):
        with ShardReader(shard) as reader:
            for m in reader.iter_metadata():
                yield m.category, m.split, m.defect_type, m.height, m.width

    path = Path(path)
    if path.is_file():
        return summarize_records(path, records(path))
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        return summarize_records(path, (r for site in manifest["sites"] for r in records(path / site["file"])))
    return summarize_root(path)


def cmd_data_info(args: argparse.Namespace) -> int:
    summary = data_summary(args.path)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    path = Path(args.path)
    if path.is_dir() and (path / "manifest.json").is_file():
        from bayprano.platform.data.shards import read_manifest

        print(manifest_table(read_manifest(path)))
        print()
    print(summary.table())
    print(f"{args.path}: {len(summary.categories)} categories, {summary.total} images")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``bayprano data`` and its sub-commands to the command's sub-parsers."""
    data = sub.add_parser("data", help="generate, import, shard and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = dsub.add_parser("synth", help="generate the synthetic industrial dataset (MVTec layout)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--categories", type=positive_int("--categories"), default=6, help="number of categories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--train", type=positive_int("--train"), default=60, help="train/good images per category")
    p.add_argument("--test-good", type=positive_int("--test-good"), default=40)
    p.add_argument("--test-defective", type=positive_int("--test-defective"), default=40)
    p.set_defaults(func=cmd_data_synth)

    def shard_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", required=True, help="MVTec-layout dataset root")
        p.add_argument("--out", required=True, help="output folder for site-NNN.parquet and manifest.json")
        p.add_argument("--sites", type=int, required=True, help="number of factories")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--by-category", action="store_true", help="each site owns whole categories (default)")
        mode.add_argument("--iid", action="store_true", help="spread every category over all sites")
        p.add_argument("--seed", type=int, default=0)

    p = dsub.add_parser("shard", help="partition an MVTec-layout dataset into per-site Parquet shards")
    shard_args(p)
    p.set_defaults(func=cmd_data_shard)

    p = dsub.add_parser("import-mvtec", help="validate an MVTec AD download and shard it")
    shard_args(p)
    p.set_defaults(func=cmd_data_import_mvtec)

    p = dsub.add_parser("import-folder", help="lay loose images out as one MVTec-layout category")
    p.add_argument("--category", required=True)
    p.add_argument("--normal", required=True, help="folder of good images")
    p.add_argument("--abnormal", help="folder of defective images (flat, or one sub-folder per defect type)")
    p.add_argument("--masks", help="folder of masks named <stem>.png or <stem>_mask.png")
    p.add_argument("--out", required=True, help="dataset root to write the category into")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of normals held back for testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing category of that name")
    p.set_defaults(func=cmd_data_import_folder)

    p = dsub.add_parser("info", help="what a dataset root, a shard or a shard folder holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_data_info)
