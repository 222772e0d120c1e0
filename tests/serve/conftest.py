"""Fixtures for the serving tests: a meta-checkpoint without meta-training, and site models adapted from it.

The checkpoint is built as ``evaluate._frozen_checkpoint`` builds one (initial head, feature standardisation
from a few good images, the analytic calibration prior) on the ``random`` control backbone at 64 px, so
that adaptation takes a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving_fixtures import DIM, SIZE, good


@pytest.fixture(scope="session")
def extractor():
    from bayprano.platform.model.backbone import build_backbone

    return build_backbone("random")


@pytest.fixture(scope="session")
def checkpoint(extractor, tmp_path_factory) -> Path:
    from site_fixtures import frozen_checkpoint

    ckpt = frozen_checkpoint(extractor, np.stack(good("wood", 0, 4) + good("fabric", 0, 4)), SIZE, DIM)
    path = tmp_path_factory.mktemp("serve-ckpt") / "meta.pt"
    ckpt.save(path)
    return path


@pytest.fixture(scope="session")
def make_site_model(checkpoint, extractor):
    """``make_site_model(category, seed, target_fpr)``: a SiteModel adapted on 3 good images."""
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    ckpt = load_checkpoint(checkpoint)

    def make(category: str = "wood", seed: int = 1, target_fpr: float = 0.05):
        return adapt(ckpt, good(category, seed, 3), target_fpr=target_fpr, extractor=extractor)

    return make


SERVER_SETTINGS = dict(
    num_cpus=0.1,
    ingress_num_cpus=0.1,
    max_models_per_replica=4,
    max_batch_size=8,
    batch_wait_timeout_s=0.02,
    max_request_bytes=8 * 1024 * 1024,
    max_inflight_bytes=32 * 1024 * 1024,
    max_images_per_request=8,
    max_image_pixels=256 * 256,
    max_request_pixels=4 * 256 * 256,
    max_inflight_pixels=16 * 256 * 256,
    max_concurrent_decodes=2,
    decode_timeout_s=2.0,
    max_jpeg_scans=10_000_000,
    rate_limit_per_s=5.0,
    rate_burst=100,
    max_concurrent_per_token=8,
    max_versions_per_site=3,
    max_review_items_per_site=50,
    review_image_side=48,
)


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, checkpoint, make_site_model):
    """A Serve application of the test settings above on 127.0.0.1, for one test module; ``server["site"](...)``
    makes a new site of its own for a test (unique name, published model) and returns its name, token and model."""
    import itertools

    from ray import serve

    from bayprano.config import ServeConfig
    from bayprano.serve.app import application
    from bayprano.serve.registry import Registry

    base = tmp_path_factory.mktemp("serve")
    registry, admin = Registry.init(base / "registry", checkpoint=checkpoint)
    storage = base / "storage"
    counter = itertools.count()

    def new_site(
        category: str = "wood",
        seed: int = 1,
        publish: bool = True,
        scopes=("score", "review"),
        model=None,
        prefix: str = "site",
    ):
        name = f"{prefix}-{next(counter):03d}"
        token = registry.add_site(name, scopes=scopes)
        if publish:
            model = model if model is not None else make_site_model(category, seed)
            registry.publish(name, model)
        return name, token, model

    cfg = ServeConfig(registry=registry.root, host="127.0.0.1", site_storage=storage, **SERVER_SETTINGS)
    url = serve_on_a_free_port(application(cfg), "bayprano-test")
    yield {"url": url, "registry": registry, "admin": admin, "site": new_site, "storage": storage, "cfg": cfg}
    serve.shutdown()


@pytest.fixture(scope="module")
def tiled_server(ray_session, tmp_path_factory, checkpoint):
    """A Serve application like ``server``'s whose pixel limits admit one 1024 x 256 image."""
    from ray import serve

    from bayprano.config import ServeConfig
    from bayprano.serve.app import application
    from bayprano.serve.registry import Registry

    base = tmp_path_factory.mktemp("serve-tiled")
    registry, _ = Registry.init(base / "registry", checkpoint=checkpoint)
    pixels = 1024 * 256  # a 1024 x 256 strip
    settings = {
        **SERVER_SETTINGS,
        "max_image_pixels": pixels,
        "max_request_pixels": 2 * pixels,
        "max_inflight_pixels": 4 * pixels,
    }
    cfg = ServeConfig(registry=registry.root, host="127.0.0.1", site_storage=base / "storage", **settings)
    url = serve_on_a_free_port(application(cfg), "bayprano-tiled-test")
    yield {"url": url, "registry": registry}
    serve.shutdown()


def serve_on_a_free_port(app, name: str, attempts: int = 3) -> str:
    """Start Serve's proxy on a free port and run ``app`` there; a port taken between choosing and binding it
    (by another process) is retried with a new one. Returns the base URL once /healthz answers as ours."""
    import requests
    from ray import serve

    from serving_fixtures import free_port
    from waiting import poll

    def ours(url: str) -> bool:
        try:
            r = requests.get(f"{url}/healthz", timeout=5)
        except requests.RequestException:
            return False
        return r.status_code == 200 and r.headers.get("X-Frame-Options") == "DENY"

    for _ in range(attempts):
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        if poll(lambda: ours(url), timeout=60, every=0.2):
            return url
        serve.shutdown()
    raise AssertionError(f"Serve did not answer on a free port in {attempts} attempts")
