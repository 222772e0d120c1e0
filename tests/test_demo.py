"""The demo pipeline, end to end on a small generated set: shards, federated training, adapted site models."""

from __future__ import annotations

import json

from bayprano.demo import run_demo
from bayprano.platform.data.shards import read_manifest
from bayprano.platform.model.site import SiteModel
from bayprano.serve.registry import Registry


def test_fast_demo_leaves_adapted_calibrated_site_models(tmp_path):
    lines: list[str] = []
    summary = run_demo(tmp_path / "demo", sites=2, shots=3, fast=True, log=lines.append)
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["sites"] == summary["sites"] and len(summary["sites"]) == 2
    manifest = read_manifest(tmp_path / "demo" / "shards")
    trained = {c for site in manifest["sites"] for c in site["categories"]}
    assert summary["federated"]["rounds"] == 3 and summary["federated"]["bytes"] > 0
    for record in summary["sites"]:
        assert record["new_product"] not in trained, "a new product must never be in the training shards"
        assert 0.0 <= record["image_auroc"] <= 1.0 and 0.0 <= record["measured_fpr"] <= 1.0
        assert sum(record["decisions"].values()) == 40  # 20 good + 20 defective test images in --fast
        model = SiteModel.load(record["model"])
        assert model.info["support_size"] == 3 and model.threshold == record["threshold"]
    assert any(line.startswith("| site") for line in lines)

    report = tmp_path / "demo" / "report"
    results = json.loads((report / "results.json").read_text())
    page = (report / "report.html").read_text()
    assert len(results["figures"]) >= 4 + 2 * 2  # training, bytes, calibration, uncertainty; overlays and ROC per site
    assert page.count('src="data:image/png;base64,') == len(results["figures"])
    for _, name in results["figures"]:
        assert (report / name).stat().st_size > 1000 and f"]({name})" in (report / "report.md").read_text()
    methods = {(r["site"], r["method"]) for r in results["methods"]}
    assert methods == {(s["site"], m) for s in summary["sites"]
                       for m in ("bayes", "bayes-frozen", "protomaml", "patchcore", "padim")}
    assert len(summary["http"]) == 2
    for served in summary["http"]:
        assert served["images"] == 4 and served["matches_in_process"] and served["model_version"] == "v0001"
    registry = Registry(summary["registry"])
    assert registry.sites() == sorted(s["site"] for s in summary["sites"])
    tokens = json.loads((tmp_path / "demo" / "tokens.json").read_text())
    assert all(registry.check_token(site, tokens[site]) for site in registry.sites())
