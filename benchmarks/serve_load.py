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

- a hostile mix (``--mix``): 32 concurrent clients for a few hundred requests, a quarter of them hostile
  (header-only decompression bombs, DDS/ICO/ICNS/GIF uploads, a progressive JPEG of repeated scans,
  images and requests over the pixel limits, truncated PNGs, bad base64, JSON of the wrong shape, wrong
  content types, missing, garbage and other sites' tokens, unknown and NUL-byte site names, an
  unauthenticated 2 MB label body, and requests at the pixel budget that are accepted and decoded), next
  to the same good clients without them: the good requests' failures and p50/p99, the hostile requests'
  status codes (4xx expected; 0 5xx allowed), and the gateway's peak RSS (``VmHWM``) against its idle RSS
  plus ``ServeConfig.gateway_memory_budget`` of the settings used. ``--mix-only`` runs only this.

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
    p.add_argument("--mix", action=argparse.BooleanOptionalAction, default=True, help="the hostile mix (default on)")
    p.add_argument("--mix-only", action="store_true", help="only the hostile mix")
    p.add_argument("--mix-requests", type=int, default=10, help="requests per client in the hostile mix")
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
    return MetaCheckpoint(
        model.eval(), extractor.name, extractor.fingerprint(), size, prior, meta_config={"inner_steps": 1}
    )


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
            r = session.post(
                f"{self.url}/v1/sites/{site}/score",
                data=body,
                timeout=300,
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "image/png"},
            )
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
        return {
            "concurrency": concurrency,
            "requests": n,
            "failed": len(failures),
            "failures": failures[:5],
            "seconds": seconds,
            "images_per_s": (n - len(failures)) / seconds,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
        }


GOOD_CLIENTS, HOSTILE_CLIENTS = 24, 8
MIX_SETTINGS = dict(
    max_request_bytes=16 * 1024 * 1024,
    max_inflight_bytes=64 * 1024 * 1024,
    max_image_pixels=1024 * 1024,
    max_request_pixels=2 * 1024 * 1024,
    max_inflight_pixels=8 * 1024 * 1024,
    max_concurrent_decodes=2,
    decode_timeout_s=10.0,
    rate_limit_per_s=1000.0,
    rate_burst=1000,
    max_concurrent_per_token=64,
    max_ongoing_requests=128,
)


def hostile_requests(url: str, site: str, token: str, other_token: str, size: int) -> list:
    """(what, method, path, kwargs) of every hostile request of the mix."""
    import base64
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    import hostile_inputs as h

    score = f"/v1/sites/{site}/score"
    auth = {"Authorization": f"Bearer {token}"}
    good = png(good_images(1, size, stream=99)[0])

    def upload(data: bytes, name: str = "x.png"):
        return {"files": [("files", (name, data, "image/png"))], "headers": auth}

    formats = h.other_formats()
    flat = h.flat_png(1024)
    return [
        ("header bomb", "post", score, upload(h.png_header_bomb())),
        ("dds", "post", score, upload(formats["dds"], "x.dds")),
        ("ico", "post", score, upload(formats["ico"], "x.ico")),
        ("icns", "post", score, upload(formats["icns"], "x.icns")),
        ("gif", "post", score, upload(formats["gif"], "x.gif")),
        (
            "jpeg scans",
            "post",
            score,
            {"data": h.jpeg_scan_bomb(256, 20000), "headers": {**auth, "Content-Type": "image/jpeg"}},
        ),
        ("image over limit", "post", score, upload(h.flat_png(2048))),
        (
            "request over pixel budget",
            "post",
            score,
            {"files": [("files", (f"{i}.png", flat, "image/png")) for i in range(3)], "headers": auth},
        ),
        (
            "at pixel budget (accepted)",
            "post",
            score,
            {"files": [("files", (f"{i}.png", flat, "image/png")) for i in range(2)], "headers": auth},
        ),
        ("truncated png", "post", score, upload(good[:200])),
        ("empty body", "post", score, {"data": b"", "headers": {**auth, "Content-Type": "image/png"}}),
        ("bad base64", "post", score, {"json": {"images": [{"data": "!!"}]}, "headers": auth}),
        (
            "wrong JSON shape",
            "post",
            score,
            {"data": json.dumps([1, 2]), "headers": {**auth, "Content-Type": "application/json"}},
        ),
        ("wrong content type", "post", score, {"data": b"x" * 100, "headers": {**auth, "Content-Type": "text/plain"}}),
        ("no token", "post", score, {"data": good, "headers": {"Content-Type": "image/png"}}),
        (
            "garbage token",
            "post",
            score,
            {"data": good, "headers": {"Authorization": "Bearer bp_" + "A" * 43, "Content-Type": "image/png"}},
        ),
        (
            "other site's token",
            "post",
            score,
            {"data": good, "headers": {"Authorization": f"Bearer {other_token}", "Content-Type": "image/png"}},
        ),
        (
            "unknown site",
            "post",
            "/v1/sites/plant-x/score",
            {"data": good, "headers": {**auth, "Content-Type": "image/png"}},
        ),
        ("NUL site", "post", "/v1/sites/a%00b/score", {"data": good, "headers": {**auth, "Content-Type": "image/png"}}),
        (
            "5000-char name",
            "post",
            score,
            {"json": {"images": [{"name": "x" * 5000, "data": base64.b64encode(good).decode()}]}, "headers": auth},
        ),
        (
            "label body, no token",
            "post",
            f"/v1/sites/{site}/reviews/20260101T000000-00000000",
            {"data": b'{"label": "' + b"g" * 2_000_000 + b'"}', "headers": {"Content-Type": "application/json"}},
        ),
    ]


def gateway_memory(app_name: str) -> dict:
    """VmRSS and VmHWM (peak) of the gateway replica's process, in bytes (read inside that process)."""
    import ray

    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"{app_name}#Gateway" in a["name"]
    ]
    assert len(names) == 1, names
    actor = ray.get_actor(names[0], namespace="serve")
    text = ray.get(actor.__ray_call__.remote(lambda _self: Path("/proc/self/status").read_text()), timeout=60)
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def mix_run(url: str, site: str, token: str, bodies: list[bytes], hostile: list, per_client: int) -> dict:
    """Good clients (one image per request) and, if ``hostile`` is given, hostile clients cycling over it,
    all at once."""
    good_results: list[tuple[bool, float, str]] = []
    hostile_results: list[tuple[str, int]] = []
    lock = threading.Lock()
    client = Client(url, token)
    barrier = threading.Barrier(GOOD_CLIENTS + (HOSTILE_CLIENTS if hostile else 0))

    def good_client(k: int):
        barrier.wait(timeout=300)
        for i in range(per_client):
            result = client.post(site, bodies[(k * per_client + i) % len(bodies)])
            with lock:
                good_results.append(result)

    def hostile_client(k: int):
        session = requests.Session()
        barrier.wait(timeout=300)
        for i in range(per_client):
            what, method, path, kwargs = hostile[(k * per_client + i) % len(hostile)]
            try:
                status = getattr(session, method)(url + path, timeout=300, **kwargs).status_code
            except requests.RequestException as exc:  # the server closed a connection it would not read
                status = -1 if "label" not in what else 0
                what = f"{what} ({exc.__class__.__name__})"
            with lock:
                hostile_results.append((what, status))

    threads = [threading.Thread(target=good_client, args=(k,)) for k in range(GOOD_CLIENTS)]
    if hostile:
        threads += [threading.Thread(target=hostile_client, args=(k,)) for k in range(HOSTILE_CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    latencies = [ms for ok, ms, _ in good_results if ok]
    failures = [d for ok, _, d in good_results if not ok]
    codes: dict[str, int] = {}
    for _, status in hostile_results:
        key = "connection closed" if status == 0 else "error" if status < 0 else f"{status // 100}xx"
        codes[key] = codes.get(key, 0) + 1
    return {
        "hostile_clients": HOSTILE_CLIENTS if hostile else 0,
        "good_clients": GOOD_CLIENTS,
        "good_requests": len(good_results),
        "good_failed": len(failures),
        "good_failures": failures[:5],
        "hostile_requests": len(hostile_results),
        "hostile_codes": codes,
        "hostile_5xx": sum(1 for _, s in hostile_results if s >= 500),
        "hostile_unanswered": sum(1 for _, s in hostile_results if s < 0),
        "hostile_by_kind": sorted({(w, s) for w, s in hostile_results}),
        "seconds": seconds,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
    }


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

    ray.init(
        address="local",
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
    )
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs, cold, mix = [], {}, []
    try:
        for batching in () if args.mix_only else (True, False):
            cfg = ServeConfig(
                registry=registry.root,
                port=port,
                num_cpus=args.num_cpus,
                ingress_num_cpus=0.1,
                batching=batching,
                max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_ms / 1000,
                max_models_per_replica=MODELS_PER_REPLICA,
                max_ongoing_requests=128,
            )
            serve.run(application(cfg), name="bench", route_prefix="/")
            wait_ready(url)
            client = Client(url, "")
            for level in CONCURRENCY:
                client.token = tokens[sites[0]]
                client.run(sites[0], bodies, level, level)  # warm-up
                n = max(args.requests_per_level, 4 * level)
                local = in_process_throughput(models[sites[0]], query, args.max_batch_size)
                print(
                    f"batching {'on' if batching else 'off'}, concurrency {level}: {n} requests (in-process "
                    f"{local:.1f} images/s) ...",
                    flush=True,
                )
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
                cold = {
                    "warm_p50_ms": warm_ms,
                    "cold_p50_ms": cold_ms,
                    "cold_cost_ms": cold_ms - warm_ms,
                    "requests": len(cold_runs),
                    "model_loads": loads,
                    "failed": sum(not ok for ok, _, _ in warm + cold_runs),
                    "in_process_load_ms_median": statistics.median(load_times),
                }
        if args.mix or args.mix_only:
            cfg = ServeConfig(
                registry=registry.root,
                port=port,
                num_cpus=args.num_cpus,
                ingress_num_cpus=0.1,
                max_batch_size=args.max_batch_size,
                batch_wait_timeout_s=args.batch_wait_ms / 1000,
                max_models_per_replica=MODELS_PER_REPLICA,
                **MIX_SETTINGS,
            )
            hostile_site = "hostile"
            hostile_token = registry.add_site(hostile_site)
            registry.publish(hostile_site, models[sites[1]])
            hostile = hostile_requests(url, hostile_site, hostile_token, tokens[sites[2]], size)
            for with_hostile in (False, True):
                serve.run(application(cfg), name="bench", route_prefix="/")  # a fresh gateway: its own peak RSS
                wait_ready(url)
                client = Client(url, tokens[sites[0]])
                client.run(sites[0], bodies, 8, 16)  # warm-up
                requests.post(
                    f"{url}/v1/sites/{hostile_site}/score",
                    data=bodies[0],
                    timeout=300,
                    headers={"Authorization": f"Bearer {hostile_token}", "Content-Type": "image/png"},
                )
                idle = gateway_memory("bench")
                print(
                    f"mix: {GOOD_CLIENTS} good clients{' + ' + str(HOSTILE_CLIENTS) + ' hostile' if with_hostile else ''}"
                    f", {args.mix_requests} requests each ...",
                    flush=True,
                )
                result = mix_run(
                    url, sites[0], tokens[sites[0]], bodies, hostile if with_hostile else [], args.mix_requests
                )
                peak = gateway_memory("bench")
                result.update(
                    idle_rss=idle["VmRSS"],
                    peak_rss=peak["VmHWM"],
                    memory_budget=cfg.gateway_memory_budget,
                    rss_bound=idle["VmRSS"] + cfg.gateway_memory_budget,
                )
                mix.append(result)
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = load_average()

    rows = [
        (
            ("on" if r["batching"] else "off"),
            r["concurrency"],
            r["requests"],
            r["failed"],
            f"{r['images_per_s']:.1f}",
            f"{r['in_process_images_per_s']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
        )
        for r in runs
    ]
    print()
    print(
        f"in-process scoring ({BACKBONE}, {size} px, batch {args.max_batch_size}, 1 thread): "
        f"{local_rate:.1f} images/s at the start"
    )
    if runs:
        print(
            format_table(
                (
                    "batching",
                    "concurrency",
                    "requests",
                    "failed",
                    "HTTP images/s",
                    "in-process images/s",
                    "ratio",
                    "p50 ms",
                    "p99 ms",
                ),
                rows,
            )
        )
        print(
            f"cold site (max_models_per_replica {MODELS_PER_REPLICA}, {COLD_SITES} sites): "
            f"p50 {cold['cold_p50_ms']:.0f} ms against {cold['warm_p50_ms']:.0f} ms warm, "
            f"cost {cold['cold_cost_ms']:.0f} ms per reload "
            f"({cold['model_loads']} reloads in {cold['requests']} requests; SiteModel.load in-process "
            f"{cold['in_process_load_ms_median']:.0f} ms)"
        )
    mib = 1024 * 1024
    if mix:
        print()
        print(
            format_table(
                (
                    "clients (good + hostile)",
                    "good requests",
                    "good failed",
                    "good p50 ms",
                    "good p99 ms",
                    "hostile requests",
                    "hostile answers",
                    "5xx",
                    "gateway RSS idle / peak MiB",
                    "bound MiB",
                ),
                [
                    (
                        f"{m['good_clients']} + {m['hostile_clients']}",
                        m["good_requests"],
                        m["good_failed"],
                        f"{m['p50_ms']:.0f}",
                        f"{m['p99_ms']:.0f}",
                        m["hostile_requests"],
                        ", ".join(f"{k}: {v}" for k, v in sorted(m["hostile_codes"].items())) or "-",
                        m["hostile_5xx"],
                        f"{m['idle_rss'] / mib:.0f} / {m['peak_rss'] / mib:.0f}",
                        f"{m['rss_bound'] / mib:.0f}",
                    )
                    for m in mix
                ],
            )
        )
        for what, status in mix[-1]["hostile_by_kind"]:
            print(f"  hostile {what}: {status}")
    failed = sum(r["failed"] for r in runs) + cold.get("failed", 0) + sum(m["good_failed"] for m in mix)
    broken = sum(m["hostile_5xx"] + m["hostile_unanswered"] for m in mix)
    over = sum(m["peak_rss"] > m["rss_bound"] for m in mix)
    print(f"hostile answers 5xx or unanswered: {broken}; runs over the RSS bound: {over}")
    print(f"failed requests: {failed}; load average after: {load_after}; {time.perf_counter() - t_start:.0f}s")
    result = {
        "benchmark": "serve_load",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": BACKBONE,
        "image_size": size,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "replica_num_cpus": args.num_cpus,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "torch_threads": torch.get_num_threads(),
        "in_process_images_per_s": local_rate,
        "runs": runs,
        "cold_site": cold,
        "failed_requests": failed,
        "hostile_mix": mix,
        "mix_settings": MIX_SETTINGS,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bayprano.platform.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 1 if failed or broken or over else 0


if __name__ == "__main__":
    sys.exit(main())
