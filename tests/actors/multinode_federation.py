"""A federation on a multi-node Ray cluster on one machine: the script the multi-node test runs.

``ray.cluster_utils.Cluster`` starts a head node and one node per site, each holding the custom resource
``factory:<site>``; ``train_federated`` then runs a short federation on it. Writes JSON to the path given:
the summary's rounds, each site's node as reported from inside its actor, and every node's id and
resources. Run in its own process because the test suite shares one Ray session.

    python tests/actors/multinode_federation.py SHARD_DIR OUT.pt RESULT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(shards: str, out: str, result: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from bayprano.actors.coordinator_actor import train_federated
    from bayprano.config import FederatedTrainConfig
    from bayprano.platform.data.shards import read_manifest
    from federation_helpers import SMALL

    sites = [s["name"] for s in read_manifest(shards)["sites"]]
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for site in sites:
            cluster.add_node(num_cpus=1, resources={f"factory:{site}": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=False, configure_logging=False)
        head = ray.get_runtime_context().get_node_id()
        cfg = FederatedTrainConfig(
            shards=Path(shards), out=Path(out), rounds=2, local_steps=1, **{**SMALL, "round_timeout": 300.0}
        )
        summary = train_federated(cfg)
        nodes = {
            n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("factory:"))
            for n in ray.nodes()
            if n["Alive"]
        }
        Path(result).write_text(
            json.dumps(
                {
                    "rounds": summary["rounds"],
                    "stop_reason": summary["stop_reason"],
                    "site_nodes": summary["site_nodes"],
                    "nodes": nodes,
                    "head": head,
                    "history_sites": [h["sites"] for h in summary["history"]],
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:4]))
