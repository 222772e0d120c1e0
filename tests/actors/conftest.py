"""A tiny synthetic dataset sharded over three sites, for the actor tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> Path:
    """Three categories at 64 px, one per site (by category): 10 train/good images each."""
    from bayprano.platform.data.shards import shard_dataset
    from bayprano.platform.data.synth import generate_dataset

    base = tmp_path_factory.mktemp("federated")
    generate_dataset(
        base / "synth", categories=3, seed=0, size=64, n_train=10, n_test_good=6, n_test_defective=6, workers=1
    )
    shard_dataset(base / "synth", base / "shards", sites=3, mode="by-category", seed=0)
    return base / "shards"


@pytest.fixture(scope="module")
def factories(ray_session, shard_dir, tmp_path_factory):
    """A Factory actor per site of ``shard_dir``, shared by a module's tests; no test may kill one of them
    (a test that kills a site takes ``own_factories``)."""
    from bayprano.actors.coordinator_actor import kill_factories, spawn_factories
    from federation_helpers import fed_cfg

    handles = spawn_factories(fed_cfg(shard_dir, tmp_path_factory.mktemp("unused") / "c.pt"), num_cpus=0.2)
    yield handles
    kill_factories(handles)


@pytest.fixture
def own_factories(ray_session, shard_dir, tmp_path):
    """Factory actors for one test alone (it may kill them)."""
    from bayprano.actors.coordinator_actor import kill_factories, spawn_factories
    from federation_helpers import fed_cfg

    handles = spawn_factories(fed_cfg(shard_dir, tmp_path / "unused.pt"), num_cpus=0.2)
    yield handles
    kill_factories(handles)
