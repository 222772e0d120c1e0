"""Load on the Serve application: HTTP throughput and latency against in-process scoring of the same model.

Measured in one run, on synthetic good images of one product (``screw``) at ``--image-size``, with the
default backbone (EfficientNet-Lite2) and a checkpoint built without meta-training (as
``benchmarks/speed.py`` builds it: speed does not depend on the learned values):

- in-process: ``SiteModel.score`` (no maps) of the site's model in this process, ``--max-batch-size``
  images a call, one torch thread: the ceiling the server is compared with. It is measured again right
  before each HTTP measurement (the median of 3 passes over 32 images), and each ratio is taken against
  the measurement next to it, so that a change in the machine's load between them does not skew it;
- over HTTP on 127.0.0.1, for batching on (``@serve.batch`` up to ``--max-batch-size`` requests, waiting
  ``--batch-wait-ms``) and off: at concurrency 1, 8 and 32 (client threads, one image per request as a raw
  ``image/png`` body, keep-alive), the throughput in images/s, its ratio to in-process scoring, p50 and
  p99 latency, and the failed requests (any status but 200), which must be zero;
- the cost of a cold site: with ``max_models_per_replica`` 4 and 8 sites, the median latency of a request
  for a site the replica holds against one it evicted (requests cycle over the 8 sites, so each one
  reloads its model; the replica's load count confirms it), and the in-process ``SiteModel.load`` time.

The server is one model replica (``--num-cpus`` logical CPUs, one torch thread) and one ingress replica on
a local Ray; client, proxy, ingress and replica share this machine's cores, so on a small machine the
ratio measures the whole stack's overhead, not only Serve's. The load average is printed before and
after and stored with the results. Prints a Markdown table and writes ``benchmarks/results/serve_load.json``
(or ``--out``).

    .venv/bin/python benchmarks/serve_load.py [--image-size 128] [--requests-per-level 24]
"""

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from bayprano.platform.data.info import format_table
from bayprano.platform.data.synth import render_good
from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.model.backbone import build_backbone
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration
from bayprano.platform.model.site import SiteModel, adapt

RESULTS = Path(__file__).resolve().parent / "results"
BACKBONE = "efficientnet_lite2"
CATEGORY = "screw"
DIM = 64
CONCURRENCY = (1, 8, 32)
COLD_SITES = 8
MODELS_PER_REPLICA = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--requests-per-level", type=int, default=48, help="requests at concurrency c: max(this, 4 c)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--num-cpus", type=float, default=1.0, help="logical CPUs of the model replica")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "serve_load.json")
    return p.parse_args(argv)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def good_images(n: int, size: int, stream: int) -> list[np.ndarray]:
    return [render_good(CATEGORY, np.random.default_rng([stream, i]), size) for i in range(n)]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def frozen_checkpoint(extractor, images, size: int) -> MetaCheckpoint:
    feats = extractor.extract(np.stack(images), size=size).float()
    model = BayesianPatchModel(extractor.out_channels, DIM)
    model.set_feature_statistics(feats.mean((0, 2, 3)), feats.var((0, 2, 3), unbiased=False).clamp_min(1e-12).sqrt())
    h, w = feats.shape[-2:]
    prior = Calibration.from_prior(DIM, h * w / model.window**2, strength=1.0)
    return MetaCheckpoint(model.eval(), extractor.name, extractor.fingerprint(), size, prior,
                          meta_config={"inner_steps": 1})


def in_process_throughput(site: SiteModel, images: list[np.ndarray], batch: int) -> float:
    site.score(images[:batch], maps=False, batch_size=batch)  # warm-up
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            site.score(images[i : i + batch], maps=False, batch_size=batch)
        rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates)


class Client:
    """Sends one image per request from ``concurrency`` threads; records latency and failures."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.local = threading.local()

    def post(self, site: str, body: bytes) -> tuple[bool, float, str]:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        start = time.perf_counter()
        try:
            r = session.post(f"{self.url}/v1/sites/{site}/score", data=body, timeout=300,
                             headers={"Authorization": f"Bearer {self.token}", "Content-Type": "image/png"})
            ok, detail = r.status_code == 200, "" if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as exc:
            ok, detail = False, f"{exc.__class__.__name__}: {exc}"
        return ok, (time.perf_counter() - start) * 1000, detail

    def run(self, site: str, bodies: list[bytes], concurrency: int, n: int) -> dict:
        with ThreadPoolExecutor(concurrency) as pool:
            start = time.perf_counter()
            results = list(pool.map(lambda i: self.post(site, bodies[i % len(bodies)]), range(n)))
            seconds = time.perf_counter() - start
        latencies = [ms for ok, ms, _ in results if ok]
        failures = [d for ok, _, d in results if not ok]
        return {"concurrency": concurrency, "requests": n, "failed": len(failures), "failures": failures[:5],
                "seconds": seconds, "images_per_s": (n - len(failures)) / seconds,
                "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def wait_ready(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not become ready in {timeout:.0f}s")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    load_before = load_average()
    print(f"load average before: {load_before} ({os.cpu_count()} CPUs)", flush=True)

    import ray
    from ray import serve

    from bayprano.config import ServeConfig
    from bayprano.serve.app import application
    from bayprano.serve.registry import Registry

    size = args.image_size
    extractor = build_backbone(BACKBONE)
    ckpt = frozen_checkpoint(extractor, good_images(8, size, stream=3), size)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    ckpt_path = work / "meta.pt"
    ckpt.save(ckpt_path)
    registry, _ = Registry.init(work / "registry", checkpoint=ckpt_path)
    sites = [f"site-{i}" for i in range(COLD_SITES)]
    tokens = {}
    models = {}
    for i, site in enumerate(sites):
        tokens[site] = registry.add_site(site)
        models[site] = adapt(ckpt, good_images(args.shots, size, stream=10 + i), extractor=extractor)
        registry.publish(site, models[site])
    query = good_images(32, size, stream=2)
    bodies = [png(im) for im in query]
    print(f"in-process scoring of {len(query)} images at {size} px, batch {args.max_batch_size} ...", flush=True)
    local_rate = in_process_throughput(models[sites[0]], query, args.max_batch_size)
    load_times = []
    for site in sites:
        start = time.perf_counter()
        SiteModel.load(registry.model_path(site, "v0001"), extractor=extractor)
        load_times.append((time.perf_counter() - start) * 1000)

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs, cold = [], {}
    try:
        for batching in (True, False):
            cfg = ServeConfig(registry=registry.root, port=port, num_cpus=args.num_cpus, ingress_num_cpus=0.1,
                              batching=batching, max_batch_size=args.max_batch_size,
                              batch_wait_timeout_s=args.batch_wait_ms / 1000, max_models_per_replica=MODELS_PER_REPLICA,
                              max_ongoing_requests=128)
            serve.run(application(cfg), name="bench", route_prefix="/")
            wait_ready(url)
            client = Client(url, "")
            for level in CONCURRENCY:
                client.token = tokens[sites[0]]
                client.run(sites[0], bodies, level, level)  # warm-up
                n = max(args.requests_per_level, 4 * level)
                local = in_process_throughput(models[sites[0]], query, args.max_batch_size)
                print(f"batching {'on' if batching else 'off'}, concurrency {level}: {n} requests (in-process "
                      f"{local:.1f} images/s) ...", flush=True)
                result = client.run(sites[0], bodies, level, n)
                result.update(batching=batching, in_process_images_per_s=local, ratio=result["images_per_s"] / local)
                runs.append(result)
            if batching:
                handle = serve.get_deployment_handle("SiteModels", app_name="bench")
                warm = []
                for _ in range(10):
                    client.token = tokens[sites[0]]
                    warm.append(client.post(sites[0], bodies[0]))
                loads_before = len(handle.stats.remote().result()["loads"])
                cold_runs = []
                for i in range(2 * COLD_SITES):
                    site = sites[(i + 1) % COLD_SITES]
                    client.token = tokens[site]
                    cold_runs.append(client.post(site, bodies[0]))
                loads = len(handle.stats.remote().result()["loads"]) - loads_before
                warm_ms = statistics.median(ms for _, ms, _ in warm)
                cold_ms = statistics.median(ms for _, ms, _ in cold_runs)
                cold = {"warm_p50_ms": warm_ms, "cold_p50_ms": cold_ms, "cold_cost_ms": cold_ms - warm_ms,
                        "requests": len(cold_runs), "model_loads": loads,
                        "failed": sum(not ok for ok, _, _ in warm + cold_runs),
                        "in_process_load_ms_median": statistics.median(load_times)}
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = load_average()

    rows = [(("on" if r["batching"] else "off"), r["concurrency"], r["requests"], r["failed"],
             f"{r['images_per_s']:.1f}", f"{r['in_process_images_per_s']:.1f}", f"{r['ratio']:.2f}",
             f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}") for r in runs]
    print()
    print(f"in-process scoring ({BACKBONE}, {size} px, batch {args.max_batch_size}, 1 thread): "
          f"{local_rate:.1f} images/s at the start")
    print(format_table(("batching", "concurrency", "requests", "failed", "HTTP images/s", "in-process images/s",
                        "ratio", "p50 ms", "p99 ms"), rows))
    print(f"cold site (max_models_per_replica {MODELS_PER_REPLICA}, {COLD_SITES} sites): "
          f"p50 {cold['cold_p50_ms']:.0f} ms against {cold['warm_p50_ms']:.0f} ms warm, "
          f"cost {cold['cold_cost_ms']:.0f} ms per reload "
          f"({cold['model_loads']} reloads in {cold['requests']} requests; SiteModel.load in-process "
          f"{cold['in_process_load_ms_median']:.0f} ms)")
    failed = sum(r["failed"] for r in runs) + cold["failed"]
    print(f"failed requests: {failed}; load average after: {load_after}; {time.perf_counter() - t_start:.0f}s")
    result = {
        "benchmark": "serve_load", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": BACKBONE, "image_size": size, "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms, "replica_num_cpus": args.num_cpus, "cpus": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after,
        "torch_threads": torch.get_num_threads(),
        "in_process_images_per_s": local_rate, "runs": runs, "cold_site": cold, "failed_requests": failed,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bayprano.platform.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
