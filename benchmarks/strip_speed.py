"""End-to-end time to score one 4096 x 256 line-scan strip with a tiled site model, on this machine.

A site model on ``--backbone`` (default: the platform's, DINOv2 ViT-S/14) at its default side (252 px
tiles for DINOv2, 256 for a CNN; overlap 0.25: 22 and 21 tiles on the strip) is adapted on ``--shots`` synthetic strips (every tile a support view),
from a checkpoint built without meta-training as ``benchmarks/speed.py`` builds one (speed does not
depend on the learned values). Then ``SiteModel.score`` of one strip, anomaly map at 4096 x 256
included, is timed ``--repeats`` times after a warm-up; the median and every repeat are printed, with
the adaptation time and the load average (the machine may be shared).

    .venv/bin/python benchmarks/strip_speed.py [--device cpu|cuda] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import BACKBONE, frozen_checkpoint, good_images  # noqa: E402

from bayprano.platform.model.backbone import build_backbone  # noqa: E402
from bayprano.platform.model.names import default_image_size  # noqa: E402
from bayprano.platform.model.site import adapt  # noqa: E402

WIDTH, HEIGHT = 4096, 256


def strips(n: int, stream: int) -> list[np.ndarray]:
    """``n`` strips of HEIGHT x WIDTH, each WIDTH / HEIGHT synthetic good images of HEIGHT px side by side
    (whatever the model's tile side)."""
    per = WIDTH // HEIGHT
    images = good_images(n * per, HEIGHT, stream)
    return [np.ascontiguousarray(np.concatenate(list(images[i * per : (i + 1) * per]), axis=1)) for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", default=BACKBONE, help=f"backbone (default {BACKBONE})")
    p.add_argument("--image-size", type=int, default=None, help="tile side (default: the backbone's)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"load average before: {[round(x, 2) for x in os.getloadavg()]} ({os.cpu_count()} CPUs; "
        f"torch threads {args.threads})",
        flush=True,
    )
    extractor = build_backbone(args.backbone, device=args.device)
    size = args.image_size or default_image_size(args.backbone)
    ckpt = frozen_checkpoint(extractor, good_images(8, size, stream=3), size, args.steps)
    start = time.perf_counter()
    site = adapt(ckpt, strips(args.shots, stream=1), extractor=extractor, scoring="tile")
    adapt_seconds = time.perf_counter() - start
    strip = strips(1, stream=2)[0]
    plan = site.tile_plan(*strip.shape[:2])
    site.score([strip])  # warm-up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = site.score([strip], maps=True)[0]
        if extractor.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    assert result.anomaly_map.shape == (HEIGHT, WIDTH) and np.isfinite(result.score)
    print(
        f"adapt (K={args.shots} strips, S={args.steps}, {site.info['support_views']} tile views): "
        f"{adapt_seconds:.2f} s (stages: "
        f"{', '.join(f'{k} {v:.2f} s' for k, v in site.info['adapt_stage_seconds'].items())})"
    )
    print(
        f"4096x256 strip scored end to end ({args.backbone}, {len(plan.origins)} tiles of {size} px, map "
        f"{result.anomaly_map.shape[1]}x{result.anomaly_map.shape[0]}): median {statistics.median(times):.3f} s "
        f"over {args.repeats} ({', '.join(f'{t:.3f}' for t in times)}), device {extractor.device}"
    )
    print(f"load average after: {[round(x, 2) for x in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
