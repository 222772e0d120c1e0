"""Wall-clock time of the data stages: generating the synthetic dataset and sharding it over sites.

Times ``generate_dataset`` (what ``bayprano data synth`` runs; default set: 6 categories x (60 train +
40 good test + 40 defective test) images at 256 px) and ``shard_dataset`` (``bayprano data shard``:
3 sites, by category) in a temporary folder that is removed afterwards, ``--repeats`` times. With
``--cli`` the same two commands also run as ``bayprano`` subprocesses, which adds interpreter start-up
and imports. For each stage: images (files generated, or rows sharded), seconds (median over the
repeats), images per second, and megabytes written (the sizes of the files in the stage's output).

The machine may be shared: the load average is printed before and after and stored with the results.
Prints a Markdown table and writes ``benchmarks/results/data_timing.json`` (or ``--out``).

    .venv/bin/python benchmarks/data_timing.py [--repeats 1] [--size 256] [--categories 6] [--cli]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bayprano.platform.data.info import format_table
from bayprano.platform.data.shards import shard_dataset
from bayprano.platform.data.synth import CATEGORIES, generate_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "data_timing.json", help="JSON output")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--categories", type=int, default=6, help=f"number of categories (1..{len(CATEGORIES)})")
    p.add_argument("--train", type=int, default=60, help="train/good images per category")
    p.add_argument("--test-good", type=int, default=40)
    p.add_argument("--test-defective", type=int, default=40)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=None, help="processes for generation (default: generate_dataset's, min(2, CPUs))"
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cli", action="store_true", help="also time the `bayprano data` commands as subprocesses")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes (default: system temp)")
    args = p.parse_args(argv)
    if not 1 <= args.categories <= len(CATEGORIES):
        p.error(f"--categories must be from 1 to {len(CATEGORIES)}")
    for name in ("size", "train", "test_good", "sites", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.sites > args.categories:
        p.error(f"--sites {args.sites}: sharding by category needs at least as many categories ({args.categories})")
    if args.test_defective < 0:
        p.error("--test-defective must be at least 0")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("bayprano")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bayprano.cli"]


def run_stage(name: str, out: Path, fn: Callable[[], int]) -> dict:
    """Run one stage that writes into ``out``; ``fn`` returns the number of images it handled."""
    load = load_average()
    start = time.perf_counter()
    images = fn()
    seconds = time.perf_counter() - start
    written = folder_bytes(out)
    print(f"  {name}: {images} images in {seconds:.1f} s, {written / 1e6:.1f} MB (load {load[0]})", flush=True)
    return {"stage": name, "images": images, "seconds": seconds, "bytes_written": written, "load_average": load}


def one_repeat(args: argparse.Namespace, tmp: Path) -> list[dict]:
    counts = dict(n_train=args.train, n_test_good=args.test_good, n_test_defective=args.test_defective)
    per_category = args.train + args.test_good + args.test_defective

    def synth(out: Path) -> int:
        info = generate_dataset(
            out, categories=args.categories, seed=args.seed, size=args.size, workers=args.workers, **counts
        )
        return sum(sum(c["counts"].values()) for c in info["categories"])

    def shard(root: Path, out: Path) -> int:
        return shard_dataset(root, out, sites=args.sites, mode="by-category", seed=args.seed)["total_rows"]

    def cli(*argv: str) -> None:
        subprocess.run(cli_command() + list(argv), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    runs = [
        run_stage("data synth", tmp / "synth", lambda: synth(tmp / "synth")),
        run_stage("data shard", tmp / "shards", lambda: shard(tmp / "synth", tmp / "shards")),
    ]
    if args.cli:
        synth_argv = [
            "data",
            "synth",
            "--out",
            str(tmp / "synth-cli"),
            "--categories",
            str(args.categories),
            "--seed",
            str(args.seed),
            "--size",
            str(args.size),
            "--train",
            str(args.train),
            "--test-good",
            str(args.test_good),
            "--test-defective",
            str(args.test_defective),
        ]
        shard_argv = [
            "data",
            "shard",
            "--root",
            str(tmp / "synth-cli"),
            "--out",
            str(tmp / "shards-cli"),
            "--sites",
            str(args.sites),
            "--by-category",
            "--seed",
            str(args.seed),
        ]
        n_images = args.categories * per_category
        runs.append(run_stage("data synth (CLI)", tmp / "synth-cli", lambda: cli(*synth_argv) or n_images))
        runs.append(run_stage("data shard (CLI)", tmp / "shards-cli", lambda: cli(*shard_argv) or n_images))
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    stages = list(dict.fromkeys(r["stage"] for r in runs))
    out = []
    for stage in stages:
        rs = [r for r in runs if r["stage"] == stage]
        seconds = statistics.median(r["seconds"] for r in rs)
        images = rs[0]["images"]
        out.append(
            {
                "stage": stage,
                "images": images,
                "seconds": seconds,
                "images_per_s": images / seconds,
                "mb_written": statistics.median(r["bytes_written"] for r in rs) / 1e6,
                "seconds_min": min(r["seconds"] for r in rs),
                "seconds_max": max(r["seconds"] for r in rs),
                "repeats": len(rs),
            }
        )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_before = load_average()
    print(f"load average before: {load_before} ({os.cpu_count()} CPUs)", flush=True)
    runs = []
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        with tempfile.TemporaryDirectory(prefix="bayprano-data-timing-", dir=args.workdir) as tmp:
            runs.extend(one_repeat(args, Path(tmp)))
    load_after = load_average()
    summary = summarize(runs)

    print()
    print(
        f"data stages: {args.categories} categories x ({args.train} train + {args.test_good} good test + "
        f"{args.test_defective} defective test) at {args.size} px, {args.sites} sites by category; "
        f"median of {args.repeats} run(s); load average before {load_before}, after {load_after}"
    )
    print(
        format_table(
            ("stage", "images", "seconds", "images/s", "MB written"),
            [
                (s["stage"], s["images"], f"{s['seconds']:.1f}", f"{s['images_per_s']:.1f}", f"{s['mb_written']:.1f}")
                for s in summary
            ],
        )
    )

    result = {
        "benchmark": "data_timing",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "summary": summary,
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
