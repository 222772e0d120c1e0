"""Every registered method on real fabric strips (AITEX, image-level labels only), per backbone and K.

For each backbone at its side (default: EfficientNet-Lite2 at 256 px and DINOv2 ViT-S/14 at 252 px):

- a small synthetic set is generated at that side (``data synth``, ``--synth-categories`` categories of
  ``--synth-train`` good images) and is the meta-training pool: the meta-learned methods (``bayes``,
  ``protomaml``) are meta-trained on it for ``--episodes`` episodes with the training defect families
  (``TRAINING_KINDS``); ``bayes-frozen`` is the same model at its initialisation; the baselines use the
  raw features;
- each method's image statistic is chosen from the post-processing menu on meta-validation tasks made
  from those synthetic categories with the validation defect families (``VALIDATION_KINDS``), never on
  the fabrics;
- ``evaluate``'s protocol then runs on ``--data-root`` (fabric02, fabric03): K in ``--shots`` good strips
  as support, ``--seeds`` support draws, every strip resized to one square tile of the backbone's side
  (a 4096 x 256 strip is squeezed 16:1), the whole test split scored; image AUROC, and the measured
  false-positive rate at the target 0.05 for the methods with a threshold; with ``--augments``, every
  method again on the same draws under each support augmentation (rows ``bayes+flips``, ...).

Prints a Markdown table (mean and spread over the draws, per fabric) and the statistic ablation, and
writes ``benchmarks/results/real_dev.json`` (or ``--out``). The data set is not part of the project
(see its README); no test uses this benchmark.

    nice -n 10 .venv/bin/python benchmarks/real_dev.py [--backbones efficientnet_lite2:256,dinov2_vits14:252]
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

import numpy as np
import torch

from bayprano.platform.data.anomalies import TRAINING_KINDS, VALIDATION_KINDS
from bayprano.platform.data.info import format_table
from bayprano.platform.data.synth import generate_dataset
from bayprano.platform.evaluate import run_evaluation
from bayprano.platform.evaluation_report import ablation_table
from bayprano.platform.evaluation_runs import variant
from bayprano.platform.fileio import atomic_write_json, jsonable

ROOT = Path(__file__).resolve().parent.parent


def parse_backbones(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, side = item.partition(":")
        if not name or not side.isdigit():
            sys.exit(f"--backbones: expected NAME:SIDE items, got {item!r}")
        out.append((name, int(side)))
    return out


def spread(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return f"{np.mean(vals):.3f} ± {sd:.3f}"


def table(runs: list[dict], categories: list[str]) -> str:
    rows = []
    for run in runs:
        records = run["result"]["records"]
        methods = list(dict.fromkeys(variant(r) for r in records))
        for method in methods:
            for k in sorted({r["shots"] for r in records}):
                mine = [r for r in records if variant(r) == method and r["shots"] == k]
                per_cat = [spread([r["image_auroc"] for r in mine if r["category"] == c]) for c in categories]
                mean = np.mean([r["image_auroc"] for r in mine])
                stats = sorted({r["statistic"] for r in mine})
                fprs = [r["measured_fpr"] for r in mine if r["measured_fpr"] is not None]
                fpr = f"{min(fprs):.2f}..{max(fprs):.2f} (mean {np.mean(fprs):.2f})" if fprs else "-"
                rows.append((method, run["label"], k, *per_cat, f"{mean:.3f}", ", ".join(stats), fpr, decided(mine)))
    return format_table(
        (
            "method",
            "backbone",
            "K",
            *(f"{c} image AUROC" for c in categories),
            "mean",
            "statistic (meta-val.)",
            "FPR at 0.05 over draws",
            "good strips decided anomalous / to review",
        ),
        rows,
    )


def decided(records: list[dict]) -> str:
    """Mean shares of the good test strips decided anomalous and sent to review, over the draws."""
    good = [(r.get("decision_rates") or {}).get("normal_images") for r in records]
    good = [g for g in good if g]
    if not good:
        return "-"
    return f"{np.mean([g['anomalous'] for g in good]):.2f} / {np.mean([g['review'] for g in good]):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-root",
        default=os.environ.get("BAYPRANO_AITEX", "../shared/data/aitex"),
        help="the AITEX copy (MVTec layout, image-level labels); default $BAYPRANO_AITEX or ../shared/data/aitex",
    )
    p.add_argument("--categories", default="fabric02,fabric03")
    p.add_argument("--backbones", default="efficientnet_lite2:256,dinov2_vits14:252")
    p.add_argument("--shots", default="1,5")
    p.add_argument(
        "--augments", default="none", help="support augmentations, each a row per method (none,flips,dihedral,shifts)"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=None, help="methods to run, comma-separated (default: every registered one)")
    p.add_argument("--episodes", type=int, default=100, help="meta-training episodes on the synthetic pool")
    p.add_argument("--synth-categories", type=int, default=4)
    p.add_argument("--synth-train", type=int, default=12, help="good images per synthetic category")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension of the meta-learned head (default 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_dev.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.data_root).is_dir():
        sys.exit(f"--data-root {args.data_root}: no such folder (the AITEX copy is not part of the project)")
    categories = args.categories.split(",")
    shots = tuple(int(k) for k in args.shots.split(","))
    runs = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bayprano_real_dev_") as tmp:
        for name, side in parse_backbones(args.backbones):
            label = f"{name} @ {side}"
            print(
                f"== {label}: synthetic meta-training pool ({args.synth_categories} categories x "
                f"{args.synth_train} good images)",
                flush=True,
            )
            synth = Path(tmp) / f"synth{side}"
            if not synth.exists():
                generate_dataset(
                    synth,
                    categories=args.synth_categories,
                    size=side,
                    n_train=args.synth_train,
                    n_test_good=2,
                    n_test_defective=2,
                )
            t0 = time.perf_counter()
            result = run_evaluation(
                args.data_root,
                Path(tmp) / f"eval_{name}_{side}.json",
                categories=categories,
                shots=shots,
                seeds=args.seeds,
                meta_train_root=synth,
                episodes=args.episodes,
                image_size=side,
                backbone=name,
                progress=lambda m: print(m, flush=True),
                augments=args.augments.split(","),
                methods=None if args.methods is None else args.methods.split(","),
                dim=args.dim,
            )
            result.pop("pictures", None)
            runs.append(
                {
                    "label": label,
                    "backbone": name,
                    "image_size": side,
                    "seconds": time.perf_counter() - t0,
                    "result": result,
                }
            )
    text = table(runs, categories)
    ablations = "\n\n".join(f"{run['label']}:\n\n{ablation_table(run['result'])}" for run in runs)
    print(f"\nImage AUROC on {', '.join(categories)} (mean ± sd over {args.seeds} support draws):\n\n{text}\n")
    print(f"Image statistic ablation (mean test image AUROC over fabrics and draws):\n\n{ablations}")
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/real_dev.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": vars(args),
        "training_kinds": TRAINING_KINDS,
        "validation_kinds": VALIDATION_KINDS,
        "load_average": os.getloadavg(),
        "seconds": time.perf_counter() - t_start,
        "table": text,
        "ablation": ablations,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, jsonable(out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
