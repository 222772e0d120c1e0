"""The demo pipeline, end to end on a small generated set: shards, federated training, adapted site models."""

from __future__ import annotations

import json

import pytest

from bayprano.cli import main
from bayprano.demo import run_demo
from bayprano.platform.data.mvtec import list_categories
from bayprano.platform.data.shards import read_manifest
from bayprano.platform.data.synth import generate_dataset
from bayprano.platform.federated.privacy import PrivacyAccountant
from bayprano.platform.meta.checkpoint import load_checkpoint
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
    # 20 + 20 test images per new product: measured 0.83 on site-000's and 0.42 on site-001's (a product the
    # fast settings do not learn); a reversed score would give 0.17 and 0.58, shuffled features about 0.5
    aurocs = sorted(r["image_auroc"] for r in summary["sites"])
    assert aurocs[-1] >= 0.75 and sum(aurocs) / len(aurocs) >= 0.55, summary["sites"]

    report = tmp_path / "demo" / "report"
    results = json.loads((report / "results.json").read_text())
    page = (report / "report.html").read_text()
    assert len(results["figures"]) >= 4 + 2 * 2  # training, bytes, calibration, uncertainty; overlays and ROC per site
    assert page.count('src="data:image/png;base64,') == len(results["figures"])
    for _, name in results["figures"]:
        assert (report / name).stat().st_size > 1000 and f"]({name})" in (report / "report.md").read_text()
    methods = {(r["site"], r["method"]) for r in results["methods"]}
    assert methods == {
        (s["site"], m)
        for s in summary["sites"]
        for m in ("bayes", "bayes-frozen", "protomaml", "patchcore", "padim", "anomalydino")
    }
    assert len(summary["http"]) == 2
    for served in summary["http"]:
        assert served["images"] == 4 and served["matches_in_process"] and served["model_version"] == "v0001"
    registry = Registry(summary["registry"])
    assert registry.sites() == sorted(s["site"] for s in summary["sites"])
    tokens = json.loads((tmp_path / "demo" / "tokens.json").read_text())
    assert all(registry.check_token(site, tokens[site]) for site in registry.sites())


def test_demo_with_dp_on_a_given_data_root(ray_session, tmp_path, capsys):
    """`bayprano demo --dp --data-root DIR`: the given root's categories, nothing generated; secure aggregation
    and client-level DP in the federated stage, with the epsilon of its rounds."""
    data = tmp_path / "mine"
    generate_dataset(data, categories=4, seed=3, size=128, n_train=12, n_test_good=5, n_test_defective=5, workers=1)
    categories = list_categories(data)
    out = tmp_path / "demo"
    assert (
        main(["demo", "--fast", "--dp", "--data-root", str(data), "--sites", "2", "--shots", "3", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert f"== 1/6 using the dataset at {data}" in printed and "secure aggregation, client-level DP" in printed
    assert not (out / "data").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_root"] == str(data)
    manifest = read_manifest(out / "shards")
    assert sorted(c for site in manifest["sites"] for c in site["categories"]) == categories[:2]
    assert sorted(r["new_product"] for r in summary["sites"]) == categories[2:]
    for record in summary["sites"]:
        assert sum(record["decisions"].values()) == 10  # the given root's 5 + 5 test images

    federated = summary["federated"]
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt.meta_config["secure_agg"] is True
    assert (ckpt.meta_config["dp_noise"], ckpt.meta_config["dp_clip"]) == (0.8, 1.0)
    accountant = PrivacyAccountant(0.8, 1.0, ckpt.meta_config["dp_delta"])
    expected = [accountant.step() for _ in range(federated["rounds"])]
    assert federated["rounds"] == 3 and federated["stop_reason"] == ""
    assert [h["epsilon"] for h in federated["history"]] == pytest.approx(expected, rel=1e-12)
    assert federated["epsilon"] == pytest.approx(expected[-1], rel=1e-12) and expected[-1] < 50
    report = (out / "report" / "report.md").read_text()
    assert "with secure aggregation and client-level differential privacy" in report
    assert "federated meta-training per round and epsilon spent" in report
