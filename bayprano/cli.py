"""The ``bayprano`` command: data preparation now; training, evaluation, serving and sweeps build on it.

Every user error (a bad path, a malformed file, an out-of-range option) is reported as one line naming
the file, field or value, with exit status 2; a traceback means a bug in the platform.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from bayprano.platform.errors import BaypranoError, ConfigError


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value

    return parse


class _Progress:
    """Progress lines on stderr: how far, what is being done, how long it has taken; at most one a second."""

    def __init__(self, label: str, every: float = 1.0):
        self.label = label
        self.every = every
        self.start = self.last = time.perf_counter()

    def __call__(self, *args) -> None:
        item, (done, total) = (args[0], args[1:]) if len(args) == 3 else ("", args)
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        print(f"[{self.label}] {done}/{total} {item} ({now - self.start:.1f}s)".replace("  ", " "),
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from bayprano.platform.data.synth import generate_dataset

    start = time.perf_counter()
    meta = generate_dataset(
        args.out, categories=args.categories, seed=args.seed, size=args.size,
        n_train=args.train, n_test_good=args.test_good, n_test_defective=args.test_defective,
        progress=_Progress("synth"),
    )
    cats = [c["name"] if isinstance(c, dict) else c for c in meta["categories"]]
    print(f"wrote {len(cats)} categories ({', '.join(cats)}) to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from bayprano.platform.data.shards import shard_dataset

    start = time.perf_counter()
    manifest = shard_dataset(
        args.root, args.out, sites=args.sites, mode="iid" if args.iid else "by-category", seed=args.seed,
        progress=_Progress("shard"),
    )
    print(_manifest_table(manifest))
    print(f"wrote {len(manifest['sites'])} shards ({manifest['total_rows']} rows, {manifest['mode']}) "
          f"to {args.out} in {time.perf_counter() - start:.1f}s")
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
        args.category, args.normal, args.out, abnormal=args.abnormal, masks=args.masks,
        test_fraction=args.test_fraction, seed=args.seed, overwrite=args.overwrite,
    )
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    print(f"wrote category {args.category!r} to {Path(args.out) / args.category}: {counts}")
    return 0


def _manifest_table(manifest: dict) -> str:
    from bayprano.platform.data.info import format_table

    rows = []
    for site in manifest["sites"]:
        by_split = site.get("rows_by_split", {})
        rows.append((site["name"], ", ".join(site["categories"]), by_split.get("train", 0), by_split.get("test", 0),
                     site["rows"], f"{site.get('image_bytes', 0) / 1e6:.1f} MB"))
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

        print(_manifest_table(read_manifest(path)))
        print()
    print(summary.table())
    print(f"{args.path}: {len(summary.categories)} categories, {summary.total} images")
    return 0


# ---------------------------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from bayprano.platform.data.synth import generate_dataset
    from bayprano.platform.data.shards import shard_dataset

    out = Path(args.out)
    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    if args.data_root:
        data_root = Path(args.data_root)
        print(f"== 1/3 using the dataset at {data_root}", flush=True)
    else:
        data_root = out / "data"
        sizes = dict(size=128, n_train=30, n_test_good=16, n_test_defective=16) if args.fast else {}
        print(f"== 1/3 generating the synthetic industrial dataset in {data_root}", flush=True)
        generate_dataset(data_root, categories=6, seed=args.seed, progress=_Progress("synth"), **sizes)
    stages.append(("dataset", time.perf_counter() - t0))

    t0 = time.perf_counter()
    shard_dir = out / "shards"
    print(f"== 2/3 sharding it over {args.sites} factories (each owns its product lines) in {shard_dir}", flush=True)
    manifest = shard_dataset(data_root, shard_dir, sites=args.sites, seed=args.seed, progress=_Progress("shard"))
    print(_manifest_table(manifest))
    stages.append(("sharding", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 3/3 what the dataset and the shards hold", flush=True)
    source, sharded = data_summary(data_root), data_summary(shard_dir)
    print(source.table())
    same = source.as_dict()["categories"] == sharded.as_dict()["categories"]
    print(f"shards hold the same {sharded.total} images as the source: {'yes' if same else 'NO'}")
    stages.append(("info", time.perf_counter() - t0))

    print()
    print("demo done: " + ", ".join(f"{name} {secs:.1f}s" for name, secs in stages))
    print(f"  dataset: {data_root}\n  shards:  {shard_dir} (manifest.json lists sites, categories, row counts)")
    return 0 if same else 1


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayprano", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="generate, import, shard and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = dsub.add_parser("synth", help="generate the synthetic industrial dataset (MVTec layout)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--categories", type=_positive_int("--categories"), default=6, help="number of categories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--train", type=_positive_int("--train"), default=60, help="train/good images per category")
    p.add_argument("--test-good", type=_positive_int("--test-good"), default=40)
    p.add_argument("--test-defective", type=_positive_int("--test-defective"), default=40)
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

    p = sub.add_parser("demo", help="run the platform end to end on generated data")
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--data-root", help="use this MVTec-layout root instead of generating one")
    p.add_argument("--sites", type=_positive_int("--sites"), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="smaller images and fewer of them")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BaypranoError as exc:
        print(f"bayprano: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayprano: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
