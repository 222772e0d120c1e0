"""cluster.yaml is accepted by Ray's own cluster-config validator, offline, and has the shape the federation
needs: a CPU head for the Coordinator, one GPU worker type per plant pinned by `factory:<site>`, each
installing the package and fetching its own plant's shard."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid(config):
    validate_config(prepare_config(config))


def test_a_cpu_head_runs_the_coordinator_and_each_plant_has_a_gpu_worker_type_with_its_own_data(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"] and head["resources"].get("coordinator") == 1
    assert any("pip install -e /home/ubuntu/bayprano" in c for c in config["setup_commands"])
    plants = {name: t for name, t in types.items() if any(k.startswith("factory:") for k in t["resources"])}
    assert len(plants) >= 3
    sites = []
    for name, t in plants.items():
        (site,) = [k.removeprefix("factory:") for k in t["resources"] if k.startswith("factory:")]
        sites.append(site)
        assert t["resources"]["GPU"] >= 1 and t["resources"][f"factory:{site}"] == 1
        assert t["min_workers"] >= 1 and t["max_workers"] == 1  # one node per plant, always up
        commands = t["worker_setup_commands"]  # replaces the global setup_commands on this type
        assert any("pip install -e /home/ubuntu/bayprano" in c for c in commands), name
        fetch = [c for c in commands if f"/data/bayprano/{site}.parquet" in c]
        assert len(fetch) == 1 and f"plant-{site}" in fetch[0], name  # from its own plant's bucket
        assert site in t["node_config"]["IamInstanceProfile"]["Arn"]
        others = [
            s
            for s in (
                k.removeprefix("factory:") for o in plants.values() for k in o["resources"] if k.startswith("factory:")
            )
            if s != site
        ]
        assert not any(o in c for o in others for c in commands), name
    assert len(set(sites)) == len(sites)
    assert config["max_workers"] >= len(plants)


def test_validator_rejects_a_broken_config(config):
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match=r"`head_node_type` must be one of `available_node_types`"):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(config)
    broken["available_node_types"]["factory_site_000"]["resources"]["factory:site-000"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match=r"0\.5 is not of type 'integer'"):
        validate_config(prepare_config(broken))  # custom resources are whole numbers on a node
