"""The demo pipeline: from nothing to adapted, calibrated per-site models, on generated data.

Stages: generate the synthetic industrial set (or use a given MVTec-layout root); give each of N
factories one product line to train on and hold one more product per factory back as its "new
product"; shard the training lines into one private Parquet shard per factory; run federated
meta-training on a local Ray (secure aggregation and differential privacy with ``dp=True``); then at
each factory adapt the shared model to its new product from K good images, score that product's whole
test split, and report image AUROC, the false-positive rate measured at the calibrated threshold, and
the decisions; evaluate every method of the harness on the new products with the same support images;
publish the site models to a registry, serve them with Ray Serve on 127.0.0.1 and score a few test
images per site over HTTP; stop Serve. Every stage prints its progress; the summary goes to
``summary.json`` and the report (``report/report.html``, ``report.md``, ``results.json`` and the
figures) beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from bayprano.platform.errors import ConfigError
from bayprano.platform.fileio import atomic_write_json

if TYPE_CHECKING:
    from bayprano.platform.evaluation_data import CategoryData
    from bayprano.platform.model.site import ImageResult

STAGES = 6
TARGET_FPR = 0.05
CALIBRATION_TARGETS = (0.01, 0.02, 0.05, 0.1, 0.2)


def run_demo(out: str | Path, **options) -> dict:
    """Run the whole pipeline (see the module docstring); keyword options as ``_pipeline``.

    The demo starts its own local Ray unless one is running, and whatever happens (an error, Ctrl-C)
    stops what it started: the Serve stage shuts Serve down on its way out, and Ray goes with all its
    processes.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    try:
        return _pipeline(out, **options)
    finally:
        if started:
            ray.shutdown()


def _pipeline(
    out: str | Path,
    data_root: str | Path | None = None,
    sites: int = 3,
    shots: int = 5,
    dp: bool = False,
    fast: bool = False,
    seed: int = 0,
    progress: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    from bayprano.config import FederatedTrainConfig
    from bayprano.platform.data.info import format_table
    from bayprano.platform.data.mvtec import list_categories
    from bayprano.platform.data.shards import shard_dataset
    from bayprano.platform.data.synth import generate_dataset
    from bayprano.platform.evaluate import run_evaluation
    from bayprano.platform.evaluation_data import load_category, support_indices
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.metrics import fpr_at_threshold, image_auroc
    from bayprano.platform.model.backbone import build_backbone
    from bayprano.platform.model.names import DEFAULT_IMAGE_SIZE
    from bayprano.platform.model.site import adapt
    from bayprano.platform.report import (
        plot_bytes,
        plot_calibration,
        plot_extremes,
        plot_training,
        plot_uncertainty,
        write_report,
    )

    out = Path(out)
    stages: dict[str, float] = {}
    data_size = 128 if fast else 256
    size = DEFAULT_IMAGE_SIZE // 2 if fast else DEFAULT_IMAGE_SIZE  # the side the backbone sees
    t0 = time.perf_counter()
    if data_root is None:
        data_root = out / "data"
        counts = dict(n_train=30, n_test_good=20, n_test_defective=20) if fast else {}
        log(
            f"== 1/{STAGES} generating the synthetic industrial dataset ({2 * sites} categories, {data_size} px) in {data_root}"
        )
        generate_dataset(data_root, categories=2 * sites, seed=seed, size=data_size, progress=progress, **counts)
    else:
        log(f"== 1/{STAGES} using the dataset at {data_root}")
    categories = list_categories(data_root)
    if len(categories) < 2 * sites:
        raise ConfigError(
            f"--sites {sites}: the demo needs {2 * sites} categories (one to train on and one new "
            f"product per site), {data_root} has {len(categories)}"
        )
    train_lines, new_products = categories[:sites], categories[sites : 2 * sites]
    stages["dataset"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shard_dir = out / "shards"
    log(f"== 2/{STAGES} sharding the training lines {', '.join(train_lines)} over {sites} factories in {shard_dir}")
    manifest = shard_dataset(data_root, shard_dir, sites=sites, seed=seed, categories=train_lines, progress=progress)
    owner = {c: site["name"] for site in manifest["sites"] for c in site["categories"]}
    site_product = {owner[line]: product for line, product in zip(train_lines, new_products)}
    stages["sharding"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ckpt_path = out / "meta.pt"
    rounds = 3 if fast else 6
    settings = dict(
        shards=shard_dir,
        out=ckpt_path,
        rounds=rounds,
        sites_per_round=1.0,
        local_steps=3,
        shots=shots,
        inner_steps=1,
        image_size=size,
        seed=seed,
        calibration_episodes=3,
        holdout=4,
    )
    if dp:
        settings.update(secure_agg=True, dp_noise=0.8, dp_clip=1.0, target_epsilon=50.0)
    cfg = FederatedTrainConfig(**settings)
    log(
        f"== 3/{STAGES} federated meta-training: {sites} factories, {rounds} rounds"
        + (", secure aggregation, client-level DP" if dp else "")
    )
    from bayprano.actors.coordinator_actor import train_federated

    fed = train_federated(cfg)
    stages["federated training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"== 4/{STAGES} each factory adapts to its new product from {shots} good images and scores its test split")
    ckpt = load_checkpoint(ckpt_path)
    extractor = build_backbone(ckpt.backbone)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    rows: list[Iterable[str]] = []
    results: list[dict] = []
    calibration_points: dict[str, list[tuple[float, float]]] = {}
    new_product_data: dict[str, CategoryData] = {}
    uncertainty: dict[str, list[float]] = {d: [] for d in ("normal", "anomalous", "review")}
    for site, product in sorted(site_product.items()):
        data = new_product_data[site] = load_category(data_root, product, size)
        idx = support_indices(len(data.train_images), shots, seed, product)
        model = adapt(ckpt, list(data.train_images[idx]), target_fpr=TARGET_FPR, extractor=extractor)
        model.save(out / "models" / site)
        scored = model.score(data.test_images, maps=True)
        scores = np.array([r.score for r in scored])
        decisions = [r.decision for r in scored]
        for r in scored:
            uncertainty[r.decision].append(r.uncertainty)
        normals = scores[data.test_labels == 0]
        calibration_points[site] = [
            (a, float(np.mean(normals > model.with_target_fpr(a).threshold))) for a in CALIBRATION_TARGETS
        ]
        name = f"overlays_{site}.png"
        plot_extremes(
            f"{site}, new product {product}: most and least anomalous test images (K={shots})",
            data.test_images,
            _anomaly_maps(scored),
            scores,
            [
                f"{Path(i).parent.name} {r.decision}\nscore {r.score:.2f} p {r.p_value:.3f}"
                for i, r in zip(data.test_ids, scored)
            ],
            report_dir / name,
            masks=data.test_masks,
        )
        figures.append((f"{site} ({product}): heatmap overlays of its most and least anomalous test images", name))
        record = {
            "site": site,
            "new_product": product,
            "shots": shots,
            "image_auroc": image_auroc(data.test_labels, scores),
            "target_fpr": TARGET_FPR,
            "measured_fpr": fpr_at_threshold(data.test_labels, scores, model.threshold),
            "threshold": model.threshold,
            "decisions": {d: decisions.count(d) for d in ("normal", "anomalous", "review")},
            "adapt_seconds": model.info["adapt_seconds"],
            "model": str(out / "models" / site),
        }
        results.append(record)
        rows.append(
            (
                site,
                product,
                str(shots),
                f"{record['image_auroc']:.3f}",
                f"{record['measured_fpr']:.3f}",
                " / ".join(str(record["decisions"][d]) for d in ("normal", "anomalous", "review")),
                f"{record['adapt_seconds']:.2f}",
            )
        )
        log(
            f"  {site}: {product} adapted in {record['adapt_seconds']:.2f}s, image AUROC {record['image_auroc']:.3f}, "
            f"FPR {record['measured_fpr']:.3f} at target {TARGET_FPR}"
        )
    plot_calibration(calibration_points, report_dir / "calibration.png")
    plot_uncertainty(uncertainty, report_dir / "uncertainty.png")
    figures += [
        (
            "calibration: false-positive rate measured on each new product's good test images against the target",
            "calibration.png",
        ),
        ("uncertainty of every decision on the new products' test images", "uncertainty.png"),
    ]
    stages["adapt and score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"== 5/{STAGES} every method of the evaluation harness on the new products (K={shots}, same support images)")
    evaluation = run_evaluation(
        data_root,
        report_dir / "evaluation.json",
        categories=sorted(site_product.values()),
        shots=(shots,),
        seeds=1,
        checkpoint=ckpt_path,
        inner_steps=1,
        target_fpr=TARGET_FPR,
        episodes=rounds * cfg.local_steps * sites,
        image_size=size,
        seed=seed,
        pool_categories=train_lines,
        progress=lambda m: log(f"  {m.strip()}"),
    )
    site_of = {product: site for site, product in site_product.items()}
    methods = method_rows(evaluation, site_of)
    for site, product in sorted(site_product.items()):
        name = f"evaluation_roc_{product}.png"
        if (report_dir / name).is_file():
            figures.append((f"{site} ({product}): image ROC of every method", name))
    stages["evaluate methods"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"== 6/{STAGES} publishing the site models to a registry, serving them with Ray Serve, scoring over HTTP")
    http = _serve_and_score(out, ckpt_path, site_product, new_product_data, seed, log)
    stages["serve and score over HTTP"] = time.perf_counter() - t0

    history = fed.get("history", [])
    if history:
        plot_training(history, report_dir / "training.png")
        figures.insert(0, ("federated meta-training per round" + (" and epsilon spent" if dp else ""), "training.png"))
    if fed.get("site_bytes"):
        plot_bytes(fed["site_bytes"], report_dir / "bytes.png")
        figures.insert(
            1, ("bytes each factory sent and received over the whole training, against its images", "bytes.png")
        )

    table = format_table(
        ("site", "new product", "K", "image AUROC", "FPR at 0.05", "normal / anomalous / review", "adapt s"), rows
    )
    federated = {
        k: fed.get(k) for k in ("rounds", "epsilon", "bytes", "shard_bytes", "stop_reason", "site_bytes", "history")
    }
    summary = {
        "data_root": str(data_root),
        "shards": str(shard_dir),
        "checkpoint": str(ckpt_path),
        "federated": federated,
        "sites": results,
        "methods": methods,
        "http": http["sites"],
        "registry": http["registry"],
        "stages_seconds": stages,
        "report": str(report_dir / "report.html"),
    }
    t0 = time.perf_counter()
    write_report(
        report_dir,
        {
            "title": "bayprano demo report",
            "intro": (
                f"{sites} factories meta-trained one model together on their own product lines "
                f"({', '.join(train_lines)}) without sharing images, then each adapted it to a new product "
                f"({', '.join(new_products)}) from {shots} good images. Images: {size} px"
                + (", with secure aggregation and client-level differential privacy." if dp else ".")
            ),
            **summary,
            "figures": figures,
        },
    )
    stages["report"] = time.perf_counter() - t0
    atomic_write_json(out / "summary.json", summary)
    log("")
    log(table)
    eps = "" if fed["epsilon"] is None else f", epsilon {fed['epsilon']:.2f}"
    log(
        f"federated: {fed['rounds']} rounds{eps}, {fed['bytes'] / 1e6:.2f} MB moved against "
        f"{fed['shard_bytes'] / 1e6:.1f} MB of images that stayed in the factories"
    )
    log("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))
    log(f"models: {out / 'models'}; report: {report_dir / 'report.html'}; summary: {out / 'summary.json'}")
    log(
        f"review page: `bayprano serve --registry {http['registry']}`, then open "
        f"http://127.0.0.1:8000/?site={min(site_product)} with a token from {http['tokens']}"
    )
    return summary


HTTP_IMAGES_PER_SITE = 4


def _anomaly_maps(results: list[ImageResult]) -> np.ndarray:
    """(B, H, W): the anomaly maps of images scored with ``maps=True``."""
    maps = [r.anomaly_map for r in results if r.anomaly_map is not None]
    if len(maps) != len(results):
        raise ValueError("every image must be scored with maps=True")
    return np.stack(maps)


def method_rows(evaluation: dict, site_of: dict[str, str]) -> list[dict]:
    """The report's method table: one row per evaluation record (every registered method), by site."""
    return sorted(
        (
            {"site": site_of[r["category"]], **{k: v for k, v in r.items() if k != "calibration"}}
            for r in evaluation["records"]
        ),
        key=lambda r: r["site"],
    )


def _serve_and_score(
    out: Path, ckpt_path: Path, site_product: dict, new_product_data: dict, seed: int, log: Callable[[str], None]
) -> dict:
    """Publish every site's model to a fresh registry, serve it on 127.0.0.1, score a few of each new
    product's test images over HTTP (checked against in-process scoring), and shut Serve down."""
    import io
    import os
    import shutil
    import socket

    import requests
    from PIL import Image
    from ray import serve

    from bayprano.config import ServeConfig
    from bayprano.platform.model.site import SiteModel
    from bayprano.serve.app import application
    from bayprano.serve.registry import Registry

    root = out / "registry"
    if root.exists():
        shutil.rmtree(root)
    registry, admin = Registry.init(root, checkpoint=ckpt_path)
    tokens = {"admin": admin}
    for site in sorted(site_product):
        tokens[site] = registry.add_site(site)
        version = registry.publish(site, out / "models" / site, source="demo").version
        log(f"  {site}: published {version}")
    token_file = out / "tokens.json"  # readable by its owner only: the registry itself keeps only hashes
    token_file.unlink(missing_ok=True)
    with os.fdopen(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(json.dumps(tokens, indent=2) + "\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = ServeConfig(
        registry=root,
        host="127.0.0.1",
        port=port,
        num_cpus=0.5,
        ingress_num_cpus=0.1,
        max_models_per_replica=len(site_product),
    )
    url = f"http://127.0.0.1:{port}"
    results = []
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # the demo prints its own line per request
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    try:
        serve.run(application(cfg), name="bayprano-demo", route_prefix="/", logging_config=quiet)
        log(f"  serving {len(site_product)} sites at {url} (review page at {url}/)")
        for site, product in sorted(site_product.items()):
            data = new_product_data[site]
            rng = np.random.default_rng(seed)
            good = rng.choice(np.flatnonzero(data.test_labels == 0), HTTP_IMAGES_PER_SITE // 2, replace=False)
            bad = rng.choice(np.flatnonzero(data.test_labels == 1), HTTP_IMAGES_PER_SITE // 2, replace=False)
            chosen = np.concatenate([good, bad])
            files = []
            for i in chosen:
                buf = io.BytesIO()
                Image.fromarray(data.test_images[i]).save(buf, format="PNG")
                files.append(
                    (
                        "files",
                        (
                            Path(data.test_ids[i]).parent.name + "_" + Path(data.test_ids[i]).name,
                            buf.getvalue(),
                            "image/png",
                        ),
                    )
                )
            latencies, rows = [], []
            for upload in files:  # one request per image, as a line camera sends them
                r = requests.post(
                    f"{url}/v1/sites/{site}/score",
                    files=[upload],
                    timeout=300,
                    headers={"Authorization": f"Bearer {tokens[site]}"},
                )
                r.raise_for_status()
                rows += r.json()["results"]
                latencies.append(r.json()["results"][0]["latency_ms"])
            local = SiteModel.load(out / "models" / site).score(data.test_images[chosen], maps=False)
            same = all(
                abs(a["score"] - b.score) <= 1e-3 * max(1.0, abs(b.score)) and a["decision"] == b.decision
                for a, b in zip(rows, local)
            )
            decisions = {d: sum(r["decision"] == d for r in rows) for d in ("normal", "anomalous", "review")}
            results.append(
                {
                    "site": site,
                    "new_product": product,
                    "model_version": rows[0]["model_version"],
                    "images": len(rows),
                    "decisions": decisions,
                    "matches_in_process": same,
                    "latency_ms_p50": float(np.median(latencies)),
                    "scored": [
                        {"image": f[1][0], **{k: r[k] for k in ("score", "p_value", "decision", "uncertainty")}}
                        for f, r in zip(files, rows)
                    ],
                }
            )
            log(
                f"  {site}: {len(rows)} {product} images over HTTP: "
                + ", ".join(f"{f[1][0]} {r['decision']}" for f, r in zip(files, rows))
                + f"; same as in-process: {'yes' if same else 'NO'}; median latency {np.median(latencies):.0f} ms"
            )
    finally:
        serve.shutdown()
    log("  Serve stopped")
    return {"sites": results, "registry": str(root), "tokens": str(token_file)}
