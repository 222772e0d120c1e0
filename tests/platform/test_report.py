"""The demo report: every figure drawn, embedded in the HTML, linked from the Markdown; tables with the numbers."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from bayprano.platform.report import (
    plot_bytes,
    plot_calibration,
    plot_extremes,
    plot_training,
    plot_uncertainty,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _results():
    return {
        "title": "test report",
        "sites": [
            {
                "site": "site-000",
                "new_product": "wood",
                "shots": 5,
                "image_auroc": 0.8731,
                "target_fpr": 0.05,
                "measured_fpr": 0.05,
                "threshold": 3.2,
                "adapt_seconds": 0.71,
                "decisions": {"normal": 21, "anomalous": 13, "review": 6},
            }
        ],
        "methods": [
            {
                "site": "site-000",
                "category": "wood",
                "method": "padim",
                "image_auroc": 0.848,
                "pixel_auroc": 0.901,
                "aupro": 0.591,
                "f1": None,
                "measured_fpr": 0.3,
            }
        ],
        "federated": {
            "rounds": 3,
            "epsilon": 4.5,
            "bytes": 1_190_000,
            "shard_bytes": 6_100_000,
            "stop_reason": "",
            "site_bytes": {
                "site-000": {"sent": 80_000, "received": 250_000, "shard_bytes": 2_000_000, "sent_fraction": 0.04}
            },
        },
        "http": [
            {
                "site": "site-000",
                "model_version": "v0001",
                "images": 4,
                "decisions": {"normal": 3, "review": 1},
                "matches_in_process": True,
                "latency_ms_p50": 41.5,
            }
        ],
        "stages_seconds": {"dataset": 11.2, "federated training": 30.5},
    }


def test_report_embeds_every_figure_and_tabulates_the_numbers(tmp_path):
    rng = np.random.default_rng(0)
    history = [{"round": r, "loss": 2.0 - 0.1 * r, "val_auroc": 0.8 + 0.01 * r, "epsilon": 1.5 * r} for r in (1, 2, 3)]
    images = rng.integers(0, 255, size=(6, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((6, 32, 32)).astype(np.float32)
    scores = rng.random(6)
    drawn = [
        plot_training(history, tmp_path / "training.png"),
        plot_bytes(_results()["federated"]["site_bytes"], tmp_path / "bytes.png"),
        plot_calibration({"site-000": [(0.01, 0.0), (0.05, 0.05), (0.2, 0.15)]}, tmp_path / "calibration.png"),
        plot_uncertainty({"normal": [0.1, 0.2], "anomalous": [0.05], "review": [0.9]}, tmp_path / "uncertainty.png"),
        plot_extremes(
            "site-000",
            images,
            maps,
            scores,
            [f"img {i}" for i in range(6)],
            tmp_path / "overlays.png",
            n=2,
            masks=maps > 0.9,
        ),
    ]
    for path in drawn:
        assert path.read_bytes().startswith(PNG)
    results = {**_results(), "figures": [(p.stem, p.name) for p in drawn]}
    out = write_report(tmp_path, results)

    page = out["html"].read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(drawn)
    assert {base64.b64decode(e) for e in embedded} == {p.read_bytes() for p in drawn}
    assert "<td>0.873</td>" in page and "<td>padim</td>" in page and "<td>4.00%</td>" in page
    md = out["markdown"].read_text()
    for p in drawn:
        assert f"]({p.name})" in md
    assert "| site-000 | wood | 5 | 0.873 | 0.05 | 0.050 | 21 | 13 | 6 | 0.71 |" in md
    assert "| total | 41.7 |" in md
    saved = json.loads(out["results"].read_text())
    assert saved["federated"]["epsilon"] == 4.5 and saved["figures"][0] == ["training", "training.png"]


def test_a_missing_figure_is_an_error_and_nothing_is_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="roc.png"):
        write_report(tmp_path, {**_results(), "figures": [("ROC", "roc.png")]})
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "results.json").exists()
