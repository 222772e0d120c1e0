"""Fixtures shared by the whole suite: small MVTec-layout datasets written with PIL, one torch thread, one Ray.

Every test that needs Ray (through ``ray_session``, directly or through another fixture) is marked
``integration``; the rest are ``unit`` tests, which run in seconds without a cluster:
``pytest -m unit`` (``make test-unit``) for a quick check, ``make test`` for all of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mvtec_fixtures import write_mvtec_category


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Two categories: 'alpha' (4 train, 2 test good, 2 scratch + 1 hole) and 'beta' (same shape)."""
    root = tmp_path / "mvtec"
    write_mvtec_category(root, "alpha", seed=1)
    write_mvtec_category(root, "beta", seed=2)
    return root


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with Ray workers, more threads spin and slow down."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (actors, Serve and Tune tests share it); shut down at the end."""
    import os

    import ray  # a hard dependency: a broken install fails here rather than skipping the Ray tests

    # Workers report their metrics to the node's Prometheus endpoint every second rather than every 10 s, so that
    # a test that scrapes it waits less; read by the processes that ray.init starts.
    previous = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    sites = {f"factory:site-{i:03d}": 1 for i in range(3)}  # as a cluster whose nodes each hold one site
    ray.init(
        address="local",
        num_cpus=2,
        resources=sites,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_metrics_report_interval_ms", None)
    else:
        os.environ["RAY_metrics_report_interval_ms"] = previous
