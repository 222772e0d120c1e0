"""The federation on a multi-node Ray cluster (head + one node per site, on this machine).

The suite shares one Ray session, so the cluster runs in a subprocess (``multinode_federation.py``)
and the test reads what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs Ray in a child process

SCRIPT = Path(__file__).with_name("multinode_federation.py")


def test_each_factory_runs_on_the_node_that_holds_its_site_resource_and_the_federation_trains(shard_dir, tmp_path):
    result = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(shard_dir), str(tmp_path / "fed.pt"), str(result)],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(result.read_text())
    assert out["rounds"] == 2 and out["stop_reason"] == ""
    assert out["history_sites"] == [["site-000", "site-001", "site-002"]] * 2
    site_nodes = out["site_nodes"]  # reported by each Factory from inside its actor
    assert sorted(site_nodes) == ["site-000", "site-001", "site-002"]
    assert len(set(site_nodes.values())) == 3 and out["head"] not in site_nodes.values()
    for site, node in site_nodes.items():
        assert out["nodes"][node] == [f"factory:{site}"], (site, out["nodes"])
    assert (tmp_path / "fed.pt").is_file()
