"""docs/grafana/bayprano.json: a Grafana dashboard model whose queries name the application's metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bayprano.serve.metrics import EXPORTED

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "bayprano.json"


def test_the_dashboard_is_a_grafana_model_of_promql_panels_on_our_metrics():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 8
    used = set()
    for panel in panels:
        assert panel["type"] in ("timeseries", "bargauge", "stat") and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = set(re.findall(r"\bray_bayprano_\w+", expr))
            assert names, expr
            for name in names:
                assert re.sub(r"_(bucket|count|sum)$", "", name) in EXPORTED, name
            used |= {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    assert used == set(EXPORTED)  # a panel for every metric
