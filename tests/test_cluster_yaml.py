"""cluster.yaml is accepted by Ray's own cluster-config validator, offline."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_is_valid():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    sites = [t for t in types.values() if any(k.startswith("factory:") for k in t["resources"])]
    assert len(sites) >= 3 and all(t["resources"].get("GPU", 0) >= 1 for t in sites)
    assert "GPU" not in types[config["head_node_type"]]["resources"]


def test_validator_rejects_a_broken_config():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))
