"""Federated against centralised meta-training: the same synthetic images, the same number of episodes.

One synthetic set (``bayprano data synth``, 8 categories at ``--image-size``) is split into
meta-training categories and held-out categories. Each way of meta-training sees exactly the
meta-training categories' ``train/good`` images:

- centralised: ``train_centralised`` on them, ``--episodes`` episodes;
- federated: the same images sharded by category over ``--sites`` sites (each holds whole categories,
  non-IID), ``--rounds`` rounds of ``--local-steps`` local episodes on every site, so
  sites x rounds x local steps = ``--episodes``; once per ``--server-lr`` value (FedAvg's server
  step; 1 is plain averaging, a value equal to the number of sites adds the sites' deltas);
- federated with client-level DP (DP-FedAvg, noise ``--dp-noise``, clip ``--dp-clip``), with the
  epsilon it spent at delta ``--dp-delta`` from Opacus's RDP accountant.

The sites hold no images back for validation (``holdout 0``), so both see the same images. Every
checkpoint is then evaluated with the evaluation protocol (``run_evaluation``, method ``bayes``) on the
held-out categories: K = ``--shots`` support images from each category's ``train/good``, ``--seeds``
support draws, the whole ``test`` split; every checkpoint sees the same supports and tests.

Prints a Markdown table and writes ``benchmarks/results/federated_vs_central.json`` (or ``--out``).

    .venv/bin/python benchmarks/federated_vs_central.py [--image-size 128] [--episodes 120] [--sites 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated_common import evaluate_bayes, init_ray, settings_record, synthesize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
META_TRAIN = ("fabric", "brushed_metal", "screw", "tiles", "hex_nut", "pcb")
HELD_OUT = ("bottle", "wood")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=30, help="train/good images per category")
    p.add_argument("--n-test", type=int, default=20, help="good and defective test images per category (each)")
    p.add_argument("--episodes", type=int, default=120)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--server-lr", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--dp-noise", type=float, default=1.0)
    p.add_argument("--dp-clip", type=float, default=0.5)
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--no-dp", action="store_true", help="skip the DP run")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--calibration-episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for data and checkpoints (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS / "federated_vs_central.json")
    args = p.parse_args(argv)
    per_round = args.sites * args.local_steps
    if args.episodes % per_round:
        p.error(f"--episodes {args.episodes} must be a multiple of sites x local steps = {per_round}")
    args.rounds = args.episodes // per_round
    return args


def evaluate(root: Path, checkpoint: Path, out: Path, args) -> dict:
    result = evaluate_bayes(root, checkpoint, out, HELD_OUT, args.shots, args.seeds)
    per_category: dict[str, list[float]] = {}
    for r in result["records"]:
        per_category.setdefault(r["category"], []).append(r["image_auroc"])
    means = {c: sum(v) / len(v) for c, v in sorted(per_category.items())}
    return {
        "image_auroc": sum(means.values()) / len(means),
        "per_category": means,
        "pixel_auroc": result["summary"]["bayes"][str(args.shots)]["pixel_auroc"]
        if "bayes" in result["summary"] and str(args.shots) in result["summary"]["bayes"]
        else None,
    }


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bayprano.actors.coordinator_actor import train_federated
    from bayprano.config import FederatedTrainConfig, TrainConfig
    from bayprano.platform.data.shards import shard_dataset
    from bayprano.platform.fileio import atomic_write_json
    from bayprano.platform.model.names import LITE2_BACKBONE
    from bayprano.platform.train import train_centralised

    work = args.work or Path(tempfile.mkdtemp(prefix="fed_vs_central_"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(
        backbone=LITE2_BACKBONE,
        image_size=args.image_size,
        seed=args.seed,
        calibration_episodes=args.calibration_episodes,
        shots=args.shots,
    )
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:7.0f}s] {m}", flush=True)  # noqa: E731
    train_root, test_root = work / "meta_train", work / "held_out"
    for root, cats in ((train_root, META_TRAIN), (test_root, HELD_OUT)):
        synthesize(
            root,
            cats,
            seed=args.seed,
            size=args.image_size,
            n_train=args.n_train,
            n_test_good=args.n_test,
            n_test_defective=args.n_test,
        )
    shards = work / "shards"
    if not (shards / "manifest.json").is_file():
        shard_dataset(train_root, shards, sites=args.sites, mode="by-category", seed=args.seed)
    log(f"data: {len(META_TRAIN)} meta-training categories over {args.sites} sites, held out {', '.join(HELD_OUT)}")

    rows = []
    ckpt = work / "central.pt"
    t = time.perf_counter()
    train_centralised(TrainConfig(data_root=train_root, out=ckpt, episodes=args.episodes, inner_steps=1, **common))
    seconds = time.perf_counter() - t
    ev = evaluate(test_root, ckpt, work / "eval_central.json", args)
    rows.append(
        {
            "run": "centralised",
            "episodes": args.episodes,
            "rounds": None,
            "server_lr": None,
            "epsilon": None,
            "train_seconds": seconds,
            **ev,
        }
    )
    log(f"centralised: image AUROC {ev['image_auroc']:.4f} ({seconds:.0f}s training)")

    import ray

    init_ray(2)
    runs = [(f"federated, server lr {lr:g}", dict(server_lr=lr)) for lr in args.server_lr]
    if not args.no_dp:
        runs.append(
            (
                f"federated + DP (z {args.dp_noise:g}, C {args.dp_clip:g}), server lr {args.server_lr[0]:g}",
                dict(server_lr=args.server_lr[0], dp_noise=args.dp_noise, dp_clip=args.dp_clip, dp_delta=args.dp_delta),
            )
        )
    try:
        for i, (name, extra) in enumerate(runs):
            ckpt = work / f"federated_{i}.pt"
            cfg = FederatedTrainConfig(
                shards=shards,
                out=ckpt,
                rounds=args.rounds,
                local_steps=args.local_steps,
                holdout=0,
                inner_steps=1,
                round_timeout=1800.0,
                **common,
                **extra,
            )
            t = time.perf_counter()
            summary = train_federated(cfg)
            seconds = time.perf_counter() - t
            ev = evaluate(test_root, ckpt, work / f"eval_federated_{i}.json", args)
            episodes = sum(h["episodes"] for h in summary["history"])
            rows.append(
                {
                    "run": name,
                    "episodes": episodes,
                    "rounds": summary["rounds"],
                    "server_lr": extra["server_lr"],
                    "epsilon": summary["epsilon"],
                    "train_seconds": seconds,
                    "bytes": summary["bytes"],
                    "shard_bytes": summary["shard_bytes"],
                    **ev,
                }
            )
            log(f"{name}: image AUROC {ev['image_auroc']:.4f} ({seconds:.0f}s training, {episodes} episodes)")
    finally:
        ray.shutdown()

    central = rows[0]["image_auroc"]
    lines = [
        f"| run | episodes | rounds | epsilon (delta {args.dp_delta:g}) | image AUROC "
        f"({', '.join(HELD_OUT)}) | vs centralised | pixel AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        diff = "-" if r is rows[0] else f"{100 * (r['image_auroc'] - central):+.1f} pt"
        pixel = "-" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}"
        lines.append(
            f"| {r['run']} | {r['episodes']} | {r['rounds'] or '-'} | {eps} | {r['image_auroc']:.3f} "
            f"({', '.join(f'{v:.3f}' for v in r['per_category'].values())}) | {diff} | {pixel} |"
        )
    table = "\n".join(lines)
    print(table)
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "settings": settings_record(args),
        "meta_train_categories": META_TRAIN,
        "held_out": HELD_OUT,
        "rows": rows,
        "table": table,
        "load_average": os.getloadavg(),
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
