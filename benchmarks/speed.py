"""Speed of adaptation and scoring on this machine, against the platform's targets.

Measured in one run, on synthetic good images of one product (``screw``) at ``--image-size``:

- backbone: throughput of the bare frozen backbone (``--backbone``, default EfficientNet-Lite2), uint8 images to patch
  features with ``PatchFeatureExtractor.extract``, ``--batch-size`` images a batch, after a warm-up;
- scoring: throughput of ``SiteModel.score`` on the same images (features, Mahalanobis distances, image
  statistic, p-values, decisions and anomaly maps at full size), its ratio to the bare backbone
  (target >= 0.80; the median over repeats, each timing the two batch by batch, back to back), and
  the split of its time between features, the Bayesian part (Mahalanobis, statistic, p-values,
  decisions) and the anomaly maps, timed stage by stage in a separate pass;
- adaptation: ``adapt`` with K = ``--shots`` support images and S = ``--steps`` inner steps, features
  included (target < 2 s), the median over ``--repeats`` after one warm-up, with the stage times that
  ``adapt`` records (features, inner loop, posterior fit, leave-one-out calibration);
- peak memory: the process's maximum resident set size (``getrusage``), and on CUDA the peak of
  ``torch.cuda.max_memory_allocated`` per measurement.

The checkpoint is built without meta-training, as ``evaluate._frozen_checkpoint`` does (initial head and
prior, feature standardisation from a few good images), but with ``--steps`` inner steps: speed does
not depend on the learned values. When a measurement misses its target (or with ``--profile``), one
more call of it runs under ``torch.profiler`` and the operators that took the most time are printed.

The machine may be shared: the load average is printed before and after and stored with the results.
Prints a Markdown table and writes ``benchmarks/results/speed.json`` (or ``--out``).

    .venv/bin/python benchmarks/speed.py [--device cpu|cuda] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bayprano.platform.data.info import format_table
from bayprano.platform.data.synth import render_good
from bayprano.platform.errors import BaypranoError
from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.model.anomaly_map import anomaly_map
from bayprano.platform.model.backbone import PatchFeatureExtractor, build_backbone
from bayprano.platform.model.names import DEFAULT_BACKBONE, default_image_size
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration
from bayprano.platform.model.site import SiteModel, adapt

BACKBONE = DEFAULT_BACKBONE  # the speed benchmarks' backbone unless --backbone says otherwise
RESULTS = Path(__file__).resolve().parent / "results"
CATEGORY = "screw"
DIM = 64
TARGET_SCORE_RATIO = 0.80
TARGET_ADAPT_SECONDS = 2.0
PROFILE_ROWS = 12


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", default=BACKBONE, help=f"backbone (default {BACKBONE})")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side (default: the backbone's, 252 for dinov2_vits14, 256 for a CNN)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=32, help="images per throughput pass (default 2 batches)")
    p.add_argument("--shots", type=int, default=5, help="support images K")
    p.add_argument("--steps", type=int, default=5, help="inner steps S")
    p.add_argument(
        "--inner-positions",
        type=int,
        default=None,
        help="patch positions of the inner loop (default: adapt's default; 0: all)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 threads can be slower)",
    )
    p.add_argument("--profile", action="store_true", help="profile every measurement, not only the failing ones")
    p.add_argument("--no-profile", action="store_true", help="never profile")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    p.add_argument("--out", type=Path, default=RESULTS / "speed.json", help="JSON output")
    args = p.parse_args(argv)
    args.image_size = args.image_size or default_image_size(args.backbone)
    for name in ("image_size", "batch_size", "images", "shots", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps < 0:
        p.error("--steps must be at least 0")
    return args


# --------------------------------------------------------------------------------------------- helpers


class Clock:
    """Wall-clock timing that waits for queued CUDA work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def good_images(n: int, size: int, stream: int) -> np.ndarray:
    return np.stack([render_good(CATEGORY, np.random.default_rng([stream, i]), size) for i in range(n)])


def frozen_checkpoint(
    extractor: PatchFeatureExtractor, images: np.ndarray, image_size: int, steps: int
) -> MetaCheckpoint:
    """Initial head and prior (as ``evaluate._frozen_checkpoint``), ``steps`` inner steps."""
    feats = extractor.extract(images, size=image_size).float().cpu()
    mean = feats.mean((0, 2, 3))
    std = feats.var((0, 2, 3), unbiased=False).clamp_min(1e-12).sqrt()
    model = BayesianPatchModel(extractor.out_channels, DIM)
    model.set_feature_statistics(mean, std)
    h, w = feats.shape[-2:]
    prior = Calibration.from_prior(DIM, h * w / model.window**2, strength=1.0)
    return MetaCheckpoint(
        model.eval(), extractor.name, extractor.fingerprint(), image_size, prior, meta_config={"inner_steps": steps}
    )


def profile_top(fn: Callable, device: torch.device, rows: int = PROFILE_ROWS) -> list[dict]:
    """Operators of one call of ``fn`` by self time (CUDA time first on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages(group_by_input_shape=True)
    cuda = device.type == "cuda"

    def self_us(e) -> float:
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:rows]
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:70],
            "calls": e.count,
            "self_ms": round(self_us(e) / 1000, 2),
            "share": round(self_us(e) / total, 3),
        }
        for e in top
    ]


def print_profile(title: str, rows: list[dict]) -> None:
    print(f"\nprofile: {title}")
    print(
        format_table(
            ("op", "input shapes", "calls", "self ms", "share"),
            [(r["op"], r["shapes"], r["calls"], f"{r['self_ms']:.1f}", f"{100 * r['share']:.0f}%") for r in rows],
        )
    )


def median(xs) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------------------------------ measurements


def measure_scoring(args, extractor: PatchFeatureExtractor, site: SiteModel, images: np.ndarray, clock: Clock) -> dict:
    size, bs = args.image_size, args.batch_size
    full = (size, size)
    n = len(images)
    extractor.extract(images[:bs], size=size, batch_size=bs)  # warm-up
    site.score(images[:bs], maps=True, batch_size=bs)
    backbone, scoring, ratios, split = [], [], [], {"features": [], "bayes": [], "maps": []}
    peaks = {"backbone": None, "scoring": None}

    def timed(name: str, fn: Callable) -> float:
        clock.reset_peak()
        _, seconds = clock.time(fn)
        peaks[name] = max(filter(None, [peaks[name], clock.peak_mib()]), default=None)
        return seconds

    for _ in range(args.repeats):
        # Batch by batch, the backbone and the full scoring back to back (alternating which goes first),
        # so that a change in the machine's load hits both alike.
        elapsed = {"backbone": 0.0, "scoring": 0.0}
        for b, start in enumerate(range(0, n, bs)):
            batch = images[start : start + bs]
            runs = {
                "backbone": lambda: extractor.extract(batch, size=size, batch_size=bs),
                "scoring": lambda: site.score(batch, maps=True, batch_size=bs),
            }
            for name in runs if b % 2 == 0 else reversed(runs):
                elapsed[name] += timed(name, runs[name])
        backbone.append(n / elapsed["backbone"])
        scoring.append(n / elapsed["scoring"])
        ratios.append(elapsed["backbone"] / elapsed["scoring"])
        # the same calls as SiteModel.score, one stage at a time
        feats, t_f = clock.time(lambda: extractor.extract(images, size=size, batch_size=bs))
        maha, t_m = clock.time(lambda: site.mahalanobis(feats))
        _, t_r = clock.time(lambda: site.results_from_mahalanobis(maha, None))
        _, t_a = clock.time(lambda: anomaly_map(site.patch_scores(maha), full).cpu().numpy().astype(np.float32))
        split["features"].append(t_f)
        split["bayes"].append(t_m + t_r)
        split["maps"].append(t_a)
    split_med = {k: median(v) for k, v in split.items()}
    total = sum(split_med.values())
    return {
        "images": n,
        "backbone_images_per_s": backbone,
        "scoring_images_per_s": scoring,
        "ratio_per_repeat": ratios,
        "backbone_images_per_s_median": median(backbone),
        "scoring_images_per_s_median": median(scoring),
        "ratio": median(ratios),
        "ratio_from_split": split_med["features"] / total,
        "split_seconds": split,
        "split_seconds_median": split_med,
        "split_share": {k: v / total for k, v in split_med.items()},
        "cuda_peak_mib_backbone": peaks["backbone"],
        "cuda_peak_mib_scoring": peaks["scoring"],
    }


def measure_adaptation(
    args, ckpt: MetaCheckpoint, extractor: PatchFeatureExtractor, support: np.ndarray, clock: Clock
) -> tuple[dict, SiteModel]:
    def run() -> SiteModel:
        return adapt(ckpt, list(support), steps=args.steps, extractor=extractor, inner_positions=args.inner_positions)

    site = run()  # warm-up
    totals, stages, peak = [], [], None
    for _ in range(args.repeats):
        clock.reset_peak()
        site, seconds = clock.time(run)
        peak = max(filter(None, [peak, clock.peak_mib()]), default=None)
        totals.append(seconds)
        stages.append(site.info.get("adapt_stage_seconds", {}))
    names = list(stages[0])
    stage_med = {k: median([s[k] for s in stages]) for k in names}
    other = [t - sum(s.values()) for t, s in zip(totals, stages)]  # outside adapt's stages
    return {
        "shots": args.shots,
        "steps": args.steps,
        "inner_positions": site.info.get("inner_positions"),
        "seconds": totals,
        "seconds_median": median(totals),
        "seconds_min": min(totals),
        "stage_seconds": stages,
        "stage_seconds_median": stage_med,
        "other_seconds_median": median(other),
        "cuda_peak_mib": peak,
    }, site


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    print(f"load average before: {load_before} ({os.cpu_count()} CPUs; torch threads {args.threads})", flush=True)
    try:
        extractor = build_backbone(args.backbone, device=args.device)
    except BaypranoError as exc:
        print(f"speed: {exc}", file=sys.stderr)
        return 2
    device = extractor.device
    clock = Clock(device)
    size = args.image_size

    support = good_images(args.shots, size, stream=1)
    query = good_images(args.images, size, stream=2)
    ckpt = frozen_checkpoint(extractor, good_images(8, size, stream=3), size, args.steps)
    rss = {"setup": max_rss_mib()}

    print(f"adaptation: K={args.shots}, S={args.steps}, {args.repeats} repeats after a warm-up ...", flush=True)
    adaptation, site = measure_adaptation(args, ckpt, extractor, support, clock)
    rss["adaptation"] = max_rss_mib()
    print(
        f"scoring: {args.images} images, batch {args.batch_size}, {args.repeats} repeats after a warm-up ...",
        flush=True,
    )
    scoring = measure_scoring(args, extractor, site, query, clock)
    rss["scoring"] = max_rss_mib()

    score_ok = scoring["ratio"] >= TARGET_SCORE_RATIO
    adapt_ok = adaptation["seconds_median"] < TARGET_ADAPT_SECONDS
    profiles = {}
    if not args.no_profile:
        if args.profile or not score_ok:
            profiles["scoring"] = profile_top(
                lambda: site.score(query[: args.batch_size], maps=True, batch_size=args.batch_size), device
            )
        if args.profile or not adapt_ok:
            profiles["adaptation"] = profile_top(
                lambda: adapt(
                    ckpt, list(support), steps=args.steps, extractor=extractor, inner_positions=args.inner_positions
                ),
                device,
            )
    load_after = load_average()

    split = scoring["split_seconds_median"]
    share = scoring["split_share"]
    st = adaptation["stage_seconds_median"]
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    rows = [
        (
            f"backbone forward ({args.backbone}, {size} px, batch {args.batch_size})",
            f"{scoring['backbone_images_per_s_median']:.1f} images/s",
            "-",
            "-",
        ),
        (
            "full scoring (features + Mahalanobis + statistic + p-values + decisions + maps)",
            f"{scoring['scoring_images_per_s_median']:.1f} images/s",
            "-",
            "-",
        ),
        (
            "scoring / backbone throughput",
            f"{scoring['ratio']:.2f} (from split: {scoring['ratio_from_split']:.2f})",
            f">= {TARGET_SCORE_RATIO:.2f}",
            verdict(score_ok),
        ),
        (
            f"scoring time split ({args.images} images)",
            f"features {split['features']:.2f} s ({100 * share['features']:.0f}%), "
            f"Bayesian {split['bayes']:.3f} s ({100 * share['bayes']:.1f}%), "
            f"maps {split['maps']:.3f} s ({100 * share['maps']:.1f}%)",
            "-",
            "-",
        ),
        (
            f"adaptation K={args.shots}, S={args.steps} (median of {args.repeats})",
            f"{adaptation['seconds_median']:.2f} s (fastest {adaptation['seconds_min']:.2f} s)",
            f"< {TARGET_ADAPT_SECONDS:.0f} s",
            verdict(adapt_ok),
        ),
        (
            f"adaptation breakdown (inner loop on {adaptation['inner_positions']} positions)",
            ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in st.items())
            + f", other {adaptation['other_seconds_median']:.2f} s",
            "-",
            "-",
        ),
        ("peak memory (max RSS)", f"{rss['scoring']:.0f} MiB", "-", "-"),
    ]
    if device.type == "cuda":
        peaks = [scoring["cuda_peak_mib_backbone"], scoring["cuda_peak_mib_scoring"], adaptation["cuda_peak_mib"]]
        rows.append(
            (
                "peak CUDA memory allocated (backbone / scoring / adaptation)",
                " / ".join(f"{p:.0f} MiB" for p in peaks),
                "-",
                "-",
            )
        )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print()
    print(
        f"speed on {device} ({device_name}), torch {torch.__version__}, {args.threads} thread(s); "
        f"load average before {load_before}, after {load_after}"
    )
    print(format_table(("measurement", "value", "target", "result"), rows))
    for name, top in profiles.items():
        print_profile(f"one {name} call, operators by self time", top)

    result = {
        "benchmark": "speed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "device": str(device),
            "device_name": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "backbone": extractor.fingerprint(),
        "category": CATEGORY,
        "scoring": scoring,
        "adaptation": adaptation,
        "memory": {"max_rss_mib": rss["scoring"], "max_rss_mib_by_stage": rss},
        "targets": {"score_ratio_min": TARGET_SCORE_RATIO, "adapt_seconds_max": TARGET_ADAPT_SECONDS},
        "pass": {"score_ratio": score_ok, "adaptation": adapt_ok},
        "profiles": profiles,
        "seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")
    return 1 if args.strict and not (score_ok and adapt_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
