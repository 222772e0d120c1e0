"""Throughput of an exported site model (ONNX under onnxruntime, OpenVINO IR) against the torch model.

A site model is adapted on ``--backbone`` (the default backbone) at ``--image-size`` (its default side) from a checkpoint built without
meta-training (as ``speed.py`` does: speed does not depend on the learned values) and exported with
``platform/export.py``. Each runtime then scores synthetic uint8 images end to end, as ``bayprano
score`` does (resize, graph, p-values, decisions, full-size anomaly maps), at batch 1 and batch 16,
with the same number of CPU threads (``--threads``); images per second is the median over
``--repeats`` passes after a warm-up, the passes of the runtimes interleaved. The machine may be
shared: the load average is printed before and after and stored with the results.

Prints a Markdown table and writes ``benchmarks/results/export_speed.json`` (or ``--out``).

    .venv/bin/python benchmarks/export_speed.py [--threads 1] [--repeats 3] [--images 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bayprano.platform.data.info import format_table
from bayprano.platform.errors import BaypranoError
from bayprano.platform.fileio import atomic_write_json
from bayprano.platform.export import export_site_model
from bayprano.platform.exported import ExportedModel
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.names import default_image_size
from bayprano.platform.model.site import adapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import BACKBONE, RESULTS, cpu_name, frozen_checkpoint, good_images, load_average  # noqa: E402

BATCHES = (1, 16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default=BACKBONE, help=f"backbone (default {BACKBONE})")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: the backbone's)")
    p.add_argument("--images", type=int, default=32, help="images per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every runtime (default 1)")
    p.add_argument("--out", type=Path, default=RESULTS / "export_speed.json", help="JSON output")
    args = p.parse_args(argv)
    args.image_size = args.image_size or default_image_size(args.backbone)
    for name in ("image_size", "images", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def measure(runtimes: dict, images: list, repeats: int) -> dict[str, float]:
    """Images per second of each runtime at each batch size: the median of ``repeats`` passes over
    ``images``, after one warm-up batch; the passes of all runtimes are interleaved, so that a change in
    the machine's load falls on all of them alike."""

    def one_pass(score, batch: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            score(images[i : i + batch], batch)
        return len(images) / (time.perf_counter() - start)

    for score in runtimes.values():
        for batch in BATCHES:
            score(images[:batch], batch)
    rates: dict[str, list[float]] = {f"{label}/batch{b}": [] for label in runtimes for b in BATCHES}
    for _ in range(repeats):
        for label, score in runtimes.items():
            for batch in BATCHES:
                rates[f"{label}/batch{batch}"].append(one_pass(score, batch))
    return {key: statistics.median(values) for key, values in rates.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    print(f"load average before: {load_before} ({os.cpu_count()} CPUs; threads {args.threads})", flush=True)
    try:
        extractor = build_backbone(args.backbone)
    except BaypranoError as exc:
        print(f"export_speed: {exc}", file=sys.stderr)
        return 2
    size = args.image_size
    site = adapt(
        frozen_checkpoint(extractor, good_images(8, size, stream=3), size, 0),
        good_images(5, size, 1),
        extractor=extractor,
    )
    images = list(good_images(args.images, size, stream=2))
    runtimes = {"torch": lambda ims, b: site.score(ims, maps=True, batch_size=b)}
    with tempfile.TemporaryDirectory() as tmp:
        site.save(Path(tmp) / "site")
        for fmt, label in (("onnx", "onnxruntime"), ("openvino", "openvino")):
            path = export_site_model(Path(tmp) / "site", fmt, Path(tmp) / fmt, site=site)
            model = ExportedModel.load(path, threads=args.threads)
            runtimes[label] = lambda ims, b, model=model: model.score(ims, maps=True, batch_size=b)
        print(
            f"{len(runtimes)} runtimes x batch {', '.join(map(str, BATCHES))}: {args.repeats} interleaved passes "
            f"over {len(images)} images at {size} px ...",
            flush=True,
        )
        results = measure(runtimes, images, args.repeats)
    rows = [
        [
            label,
            *(f"{results[f'{label}/batch{b}']:.1f}" for b in BATCHES),
            *(f"{results[f'{label}/batch{b}'] / results[f'torch/batch{b}']:.2f}x" for b in BATCHES),
        ]
        for label in runtimes
    ]
    print(
        format_table(
            ("runtime", *(f"images/s, batch {b}" for b in BATCHES), *(f"vs torch, batch {b}" for b in BATCHES)), rows
        )
    )
    load_after = load_average()
    print(f"load average after: {load_after}")
    record = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": args.threads,
        "image_size": size,
        "images": args.images,
        "repeats": args.repeats,
        "backbone": args.backbone,
        "images_per_second": results,
        "load_average": [load_before, load_after],
        "torch": torch.__version__,
    }
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
