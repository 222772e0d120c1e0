"""Utility at a stated epsilon: client-level DP-FedAvg where it is meant to work, many sites per round.

A synthetic set (``bayprano data synth``) is split leave-categories-out: ``--meta-categories`` for
meta-training, ``--held-out`` for evaluation. Each meta-training category's ``train/good`` images are
dealt IID over its share of ``--sites`` virtual sites (so every site holds one category, about
``--per-site`` images), played in pooled mode by ``--pool-size`` actors. Every run trains
``--rounds`` rounds with Poisson sampling of ``--per-round`` sites in expectation (q = per-round /
sites), ``--local-steps`` local episodes, clip ``--dp-clip``, secure aggregation on:

- no DP;
- DP at each epsilon of ``--epsilons`` (delta ``--dp-delta``): the noise multiplier z is the smallest
  (to 1e-3) for which Opacus's RDP accountant gives at most that epsilon after ``--rounds`` rounds at
  rate q; the run also carries ``target_epsilon`` so the hard stop guards it.

Each checkpoint is evaluated with the evaluation protocol (``run_evaluation``, method ``bayes``) on the
held-out categories: K = ``--shots``, ``--seeds`` support draws, the whole test split: image and pixel
AUROC. Prints a Markdown table and writes ``benchmarks/results/dp_utility.json`` (or ``--out``).

    nice .venv/bin/python benchmarks/dp_utility.py [--sites 100 --per-round 20 --rounds 10 --epsilons 1 4 8]
    nice .venv/bin/python benchmarks/dp_utility.py --smoke      # 10 sites, 5 a round, 2 rounds, epsilon 8
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
from federated_common import evaluate_bayes, init_ray, pooled_settings, settings_record, synthesize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
META = ("fabric", "brushed_metal", "screw", "tiles")
HELD_OUT = ("bottle", "wood")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=100)
    p.add_argument("--per-round", type=int, default=20, help="expected sites per round (Poisson sampling)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--dp-clip", type=float, default=0.5)
    p.add_argument("--dp-delta", type=float, default=1e-3)
    p.add_argument("--per-site", type=int, default=4, help="train/good images per site")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-test", type=int, default=10, help="good and defective test images per held-out category")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="10 sites, 5 a round, 2 rounds, epsilon 8 only")
    p.add_argument("--work", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS / "dp_utility.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.sites, args.per_round, args.rounds, args.epsilons, args.seeds = 12, 6, 2, [8.0], 1
    if args.sites % len(META):
        p.error(f"--sites {args.sites}: must be a multiple of the {len(META)} meta-training categories")
    if not 2 <= args.per_round <= args.sites:
        p.error(f"--per-round {args.per_round}: between 2 and --sites")
    return args


def noise_for(epsilon: float, rounds: int, q: float, delta: float) -> float:
    """The smallest z (to 1e-3) with epsilon(z, q, rounds) <= ``epsilon`` under Opacus's RDP accountant."""
    from bayprano.platform.federated.privacy import PrivacyAccountant

    def eps(z: float) -> float:
        return PrivacyAccountant(z, q, delta).epsilon_after(rounds)

    lo, hi = 0.05, 1.0
    while eps(hi) > epsilon:
        hi *= 2
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return hi


def evaluate(root: Path, checkpoint: Path, out: Path, args) -> dict:
    result = evaluate_bayes(root, checkpoint, out, HELD_OUT, args.shots, args.seeds)
    summary = result["summary"]["bayes"][str(args.shots)]
    return {"image_auroc": summary["image_auroc"], "pixel_auroc": summary.get("pixel_auroc")}


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bayprano.actors.coordinator_actor import train_federated
    from bayprano.config import FederatedTrainConfig
    from bayprano.platform.data.shards import read_manifest, shard_dataset
    from bayprano.platform.fileio import atomic_write_json

    work = args.work or Path(tempfile.mkdtemp(prefix="dp_utility_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:7.0f}s] {m}", flush=True)  # noqa: E731
    per_category = args.sites // len(META)
    train_root, test_root = work / "meta_train", work / "held_out"
    synthesize(
        train_root,
        META,
        seed=0,
        size=args.image_size,
        n_train=args.per_site * per_category,
        n_test_good=1,
        n_test_defective=1,
    )
    synthesize(
        test_root,
        HELD_OUT,
        seed=1,
        size=args.image_size,
        n_train=20,
        n_test_good=args.n_test,
        n_test_defective=args.n_test,
    )
    sites: dict[str, str] = {}
    for c in META:
        out = work / f"shards_{c}_{per_category}"
        if not (out / "manifest.json").is_file():
            shard_dataset(train_root, out, sites=per_category, mode="iid", seed=0, categories=[c])
        for s in read_manifest(out)["sites"]:
            sites[f"{c}-{s['name']}"] = str(out / s["file"])
    q = args.per_round / args.sites
    log(f"{len(sites)} virtual sites ({per_category} per category), q = {q:g}, held out {', '.join(HELD_OUT)}")

    runs = [("no DP", {})]
    for e in args.epsilons:
        z = noise_for(e, args.rounds, q, args.dp_delta)
        runs.append(
            (f"DP epsilon {e:g}", dict(dp_noise=z, dp_clip=args.dp_clip, dp_delta=args.dp_delta, target_epsilon=e))
        )
    import ray

    init_ray(args.cpus)
    rows = []
    try:
        for i, (name, extra) in enumerate(runs):
            ckpt = work / f"run_{i}.pt"
            cfg = FederatedTrainConfig(
                sites=sites,
                out=ckpt,
                rounds=args.rounds,
                local_steps=args.local_steps,
                sites_per_round=args.per_round,
                pool_size=args.pool_size,
                secure_agg=True,
                inner_steps=1,
                **pooled_settings(args.image_size, args.shots),
                **extra,
            )
            t = time.perf_counter()
            summary = train_federated(cfg)
            seconds = time.perf_counter() - t
            ev = evaluate(test_root, ckpt, work / f"eval_{i}.json", args)
            rows.append(
                {
                    "run": name,
                    "noise_multiplier": extra.get("dp_noise"),
                    "rounds": summary["rounds"],
                    "epsilon": summary["epsilon"],
                    "train_seconds": seconds,
                    **ev,
                }
            )
            log(
                f"{name}: z {extra.get('dp_noise')}, {summary['rounds']} rounds, epsilon {summary['epsilon']}, "
                f"image AUROC {ev['image_auroc']:.3f}, pixel {ev['pixel_auroc']}"
            )
    finally:
        ray.shutdown()
    lines = [
        f"| run | z | rounds | epsilon (delta {args.dp_delta:g}) | image AUROC | pixel AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        pixel = "-" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}"
        lines.append(f"| {r['run']} | {z} | {r['rounds']} | {eps} | {r['image_auroc']:.3f} | {pixel} |")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(
        args.out,
        {
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "settings": settings_record(args),
            "sites": len(sites),
            "sample_rate": q,
            "rows": rows,
            "table": table,
            "load_average": os.getloadavg(),
            "seconds": time.perf_counter() - t0,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
