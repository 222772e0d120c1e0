"""One local Ray for the whole actor test session, and a tiny synthetic dataset sharded over three sites."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_session():
    sites = {f"factory:site-{i:03d}": 1 for i in range(3)}  # as a cluster whose nodes each hold one site
    ray.init(num_cpus=2, resources=sites, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    """Three categories at 64 px, one per site (by category): 10 train/good images each."""
    from bayprano.platform.data.shards import shard_dataset
    from bayprano.platform.data.synth import generate_dataset

    base = tmp_path_factory.mktemp("federated")
    generate_dataset(base / "synth", categories=3, seed=0, size=64, n_train=10, n_test_good=2, n_test_defective=2,
                     workers=1)
    shard_dataset(base / "synth", base / "shards", sites=3, mode="by-category", seed=0)
    return base / "shards"
