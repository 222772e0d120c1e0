"""Scale of pooled mode and cost of secure aggregation: round time, memory and bytes per site for 10, 30 and
100 virtual sites over a pool of 2 actors, without and with secure aggregation.

One synthetic category at ``--image-size`` px is dealt over ``max(--sites)`` sites (IID, ``--per-site``
train/good images each, one Parquet shard per site); a run with N sites uses the first N shards, so a
site holds the same data in every run. Each run: a local Ray with ``--cpus`` CPUs, ``--pool-size``
pooled Factory actors (a quarter CPU each), ``--rounds`` rounds in which every site takes part
(``--sites-per-round``, default all) with ``--local-steps`` local episodes, FedAvg, float16 on the wire,
in each of ``--modes``: ``plain`` (no masking), ``secagg`` (double masking over the full graph,
Bonawitz et al.) and ``secagg-k`` (the same over ``--neighbours`` neighbours per site, SecAgg+).
Pooled mode validates on a round's participants. Measured:

- setup seconds: every site reads its shard and describes it, and the feature statistics are summed;
- round seconds: the median over rounds of broadcast, local updates, aggregation and validation;
- seconds per site-round: round seconds / sites per round;
- bytes per site and round: what a site sent and received in one round (median over sites and rounds),
  counted by the Coordinator's ledger at serialised size: every protocol message included;
- peak memory: the largest peak resident set size of a pool actor (``VmHWM``) and the driver's, and
  the sum of the resident memory of every process of the local Ray and the driver, sampled each 0.5 s.

``--protocol-sites`` adds the protocol alone, without training (no Ray): for each N, one instance of
the double-masking protocol over N sites on a vector of the model's size, one site dropping after
sharing, with the full graph and with ``--neighbours``: bytes a site sends and receives, a site's
seconds (keys, shares, masking, unmasking) and the server's seconds to remove the masks; next to the
pairwise-masking protocol this replaced (one public key and one masked vector a site: it had no
dropout recovery, so a drop meant a redo), whose bytes are computed from the same sizes.

Prints Markdown tables and writes ``benchmarks/results/federation.json`` (or ``--out``).

    nice .venv/bin/python benchmarks/federation.py [--sites 10 30 100] [--modes plain secagg secagg-k]
        [--pool-size 2] [--rounds 2] [--protocol-sites 10 30 100 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated_common import init_ray, pooled_settings, settings_record, synthesize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORY = "fabric"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, nargs="*", default=[10, 30, 100])
    p.add_argument(
        "--modes", nargs="+", default=["plain", "secagg", "secagg-k"], choices=["plain", "secagg", "secagg-k"]
    )
    p.add_argument("--neighbours", type=int, default=4, help="neighbours per site in secagg-k (SecAgg+)")
    p.add_argument("--protocol-sites", type=int, nargs="*", default=[10, 30, 100, 300])
    p.add_argument("--pool-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--sites-per-round", type=float, default=1.0)
    p.add_argument("--per-site", type=int, default=4, help="train/good images per site")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for the shards (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS / "federation.json")
    return p.parse_args(argv)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class MemorySampler:
    """The largest total RSS of this process and its descendants (the local Ray), sampled in a thread."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_rss(p) for p in _descendants(os.getpid())))
            self._stop.wait(self.every)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(n: int, shard_dir: Path, args, work: Path, mode: str = "plain") -> dict:
    import ray

    from bayprano.actors.coordinator import FederatedTrainer
    from bayprano.actors.coordinator_actor import kill_factories, spawn_factories, with_shard_bytes
    from bayprano.actors.factory import peak_rss
    from bayprano.config import FederatedTrainConfig
    from bayprano.platform.data.shards import read_manifest

    manifest = read_manifest(shard_dir)
    sites = {s["name"]: str(shard_dir / s["file"]) for s in manifest["sites"][:n]}
    privacy = {
        "plain": {},
        "secagg": {"secure_agg": True},
        "secagg-k": {"secure_agg": True, "secagg_neighbours": min(args.neighbours, n - 1)},
    }[mode]
    cfg = FederatedTrainConfig(
        sites=sites,
        out=work / f"fed_{n}_{mode}.pt",
        rounds=args.rounds,
        local_steps=args.local_steps,
        **privacy,
        sites_per_round=args.sites_per_round,
        pool_size=args.pool_size,
        **pooled_settings(args.image_size, shots=2),
    )
    init_ray(args.cpus)
    try:
        with MemorySampler() as memory:
            factories = spawn_factories(cfg, num_cpus=0.25)
            pool = next(iter(factories.values())).pool
            trainer = FederatedTrainer(cfg, factories, log=lambda m: None)
            t0 = time.perf_counter()
            trainer.setup()
            setup = time.perf_counter() - t0
            summary = trainer.run()
            summary = with_shard_bytes(summary, trainer.site_shard_bytes())
            stats = pool.stats()
            kill_factories(factories)
    finally:
        ray.shutdown()
    rounds = [h["seconds"] for h in summary["history"]]
    per_site_round = trainer.ledger.per_site_round()
    up = [v["up"] for (r, _), v in per_site_round.items() if r >= 1]
    down = [v["down"] for (r, _), v in per_site_round.items() if r >= 1]
    per_round = len(summary["history"][0]["sites"])
    sent = [b["sent"] for b in summary["site_bytes"].values()]
    fractions = [b["sent_fraction"] for b in summary["site_bytes"].values()]
    return {
        "sites": n,
        "mode": mode,
        "sites_per_round": per_round,
        "bytes_up_per_site_round": statistics.median(up),
        "bytes_down_per_site_round": statistics.median(down),
        "pool_size": args.pool_size,
        "rounds": summary["rounds"],
        "setup_seconds": setup,
        "round_seconds": rounds,
        "median_round_seconds": statistics.median(rounds),
        "seconds_per_site_round": statistics.median(rounds) / per_round,
        "actor_peak_rss": max(s["peak_rss"] or 0 for s in stats),
        "driver_peak_rss": peak_rss(),
        "ray_total_rss_peak": memory.peak,
        "switches": sum(s["switches"] for s in stats),
        "bytes_sent_total": sum(sent),
        "bytes_sent_per_site_max": max(sent),
        "sent_fraction_max": max(f for f in fractions if f is not None),
        "val_auroc": [h["val_auroc"] for h in summary["history"]],
    }


def protocol_cost(n: int, neighbours: int, size: int | None = None) -> list[dict]:
    """One double-masking instance over ``n`` sites (one drops after sharing), full graph and sparse; and
    the replaced pairwise-only protocol's bytes. Sizes are pickled messages, as on the wire: a site's
    download is the three requests the Coordinator's transport sends it (share keys, the secure-aggregation
    context of the masked-input request, unmask), built by the transport's own functions."""
    import numpy as np

    from bayprano.actors.transport import mask_context, share_calls, unmask_calls, wire_bytes as wire
    from bayprano.platform.federated.secagg import SecAggClient, SecAggServer, check_settings
    from bayprano.platform.model.bayes import BayesianPatchModel
    from bayprano.platform.federated.state import ParameterLayout

    if size is None:  # the federated vector of the benchmark's model (EfficientNet-Lite2 features, d = 64)
        size = ParameterLayout.from_model(BayesianPatchModel(168, 64)).size + 2
    vector = np.random.default_rng(0).normal(0, 0.01, size)
    sites = [f"site-{i:03d}" for i in range(n)]
    out = []
    for k in (None, neighbours):
        if k is not None and k >= n - 1:
            continue
        _, t = check_settings(n, None, k)
        instance = f"bench-{n}-{k}"
        clients = {s: SecAggClient(s, os.urandom(32), instance) for s in sites}
        me = sites[0]
        t0 = time.perf_counter()
        roster = {s: c.advertise() for s, c in clients.items()}
        site_seconds = (time.perf_counter() - t0) / n
        server = SecAggServer(instance, roster, t, k)
        views = {s: server.roster_for(s) for s in sites}
        t0 = time.perf_counter()
        shares = {s: c.share_keys(views[s], t, k) for s, c in clients.items()}
        site_seconds += (time.perf_counter() - t0) / n
        server.route(shares)
        dropped = sites[-1]
        t0 = time.perf_counter()
        masked = {s: c.mask(vector, views[s], server.shared, k, 0, 0) for s, c in clients.items() if s != dropped}
        site_seconds += (time.perf_counter() - t0) / len(masked)
        t0 = time.perf_counter()
        revealed = {s: clients[s].unmask(views[s], list(masked), [dropped], server.inbox(s), t, k) for s in masked}
        site_seconds += (time.perf_counter() - t0) / len(masked)
        t0 = time.perf_counter()
        server.finish(masked, revealed)
        server_seconds = time.perf_counter() - t0
        up = wire(roster[me]) + wire(shares[me]) + wire(masked[me]) + wire(revealed[me])
        _, share_args = share_calls(server)[me]
        _, unmask_args = unmask_calls(server, sorted(masked))[me]
        down = wire(share_args) + wire(mask_context(server, me, 0, 0)) + wire(unmask_args)
        out.append(
            {
                "sites": n,
                "protocol": "double masking" + (" (SecAgg+)" if k else ""),
                "neighbours": n - 1 if k is None else len(server.graph[me]),
                "threshold": t,
                "bytes_up": up,
                "bytes_down": down,
                "site_seconds": site_seconds,
                "server_seconds": server_seconds,
            }
        )
    old_up = 32 + wire(np.zeros(size, dtype=np.uint64))
    out.append(
        {
            "sites": n,
            "protocol": "pairwise only (replaced; a drop meant a redo)",
            "neighbours": n - 1,
            "threshold": None,
            "bytes_up": old_up,
            "bytes_down": 32 * n,
            "site_seconds": float("nan"),
            "server_seconds": float("nan"),
        }
    )
    return out


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bayprano.platform.data.shards import shard_dataset
    from bayprano.platform.fileio import atomic_write_json

    work = args.work or Path(tempfile.mkdtemp(prefix="federation_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    most = max(args.sites, default=0)
    shard_dir = work / f"shards_{most}"
    if most and not (shard_dir / "manifest.json").is_file():
        synthesize(
            work / "synth",
            [CATEGORY],
            seed=0,
            size=args.image_size,
            n_train=args.per_site * most,
            n_test_good=most,
            n_test_defective=most,
            reuse=False,
        )
        shard_dataset(work / "synth", shard_dir, sites=most, mode="iid", seed=0)
    load_before = os.getloadavg()
    protocol = [protocol_cost(n, args.neighbours) for n in sorted(args.protocol_sites)]
    rows = []
    for n in sorted(args.sites):
        for mode in args.modes:
            rows.append(run_one(n, shard_dir, args, work, mode))
            r = rows[-1]
            print(
                f"{n} sites, {mode}: setup {r['setup_seconds']:.1f}s, round {r['median_round_seconds']:.1f}s, "
                f"{r['bytes_up_per_site_round']} B up / {r['bytes_down_per_site_round']} B down per site-round, "
                f"actor peak {r['actor_peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = [
        "| virtual sites | mode | sites per round | setup s | round s (median) | s per site-round "
        "| bytes up per site-round | bytes down per site-round | actor peak RSS MiB | Ray + driver RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sites']} | {r['mode']} | {r['sites_per_round']} | {r['setup_seconds']:.1f} "
            f"| {r['median_round_seconds']:.1f} | {r['seconds_per_site_round']:.2f} "
            f"| {r['bytes_up_per_site_round']:.0f} | {r['bytes_down_per_site_round']:.0f} "
            f"| {mib(r['actor_peak_rss'])} | {mib(r['ray_total_rss_peak'])} |"
        )
    plines = [
        "| sites | protocol | neighbours | bytes up per site | bytes down per site | site s | server s |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in protocol:
        for row in p:
            plines.append(
                f"| {row['sites']} | {row['protocol']} | {row['neighbours']} | {row['bytes_up']} "
                f"| {row['bytes_down']} | {row['site_seconds']:.3f} | {row['server_seconds']:.3f} |"
            )
    table = "\n".join(lines) + "\n\n" + "\n".join(plines)
    print(table)
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "settings": settings_record(args),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "protocol": [row for p in protocol for row in p],
        "table": table,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
