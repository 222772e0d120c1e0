"""Serving a tiled site model over real HTTP: a 1024 x 256 image gets its map at that size, the mask of a
region of interest given as an image travels with the published model, and the map is zero outside it.

Its own Serve application (``tiled_server`` in conftest.py), with pixel limits that admit a 1024 x 256
image; the random control backbone at 64 px tiles keeps it small."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from serving_fixtures import good, png

WIDTH, HEIGHT = 1024, 256


def strip(seed: int) -> np.ndarray:
    tiles = good("fabric", seed, 16)
    rows = [np.concatenate(tiles[r * 4 : r * 4 + 4], axis=1) for r in range(4)]  # 256 x 256 of 64 px images
    square = np.concatenate(rows, axis=0)
    return np.ascontiguousarray(np.concatenate([square] * 4, axis=1))


def test_a_tiled_model_returns_a_map_of_the_image_size_zero_outside_its_region(
    tiled_server, checkpoint, extractor, tmp_path
):
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt
    from bayprano.platform.model.tiling import RegionOfInterest

    region = np.zeros((HEIGHT, WIDTH), dtype=bool)
    region[:, : WIDTH // 2] = True
    model = adapt(
        load_checkpoint(checkpoint),
        [strip(1)],
        extractor=extractor,
        scoring="tile",
        roi=RegionOfInterest.from_mask(region),
    )
    model.save(tmp_path / "model")
    registry = tiled_server["registry"]
    token = registry.add_site("strip-line", scopes=("score",))
    registry.publish("strip-line", tmp_path / "model")  # a folder: the mask must travel with it
    image = strip(7)
    want = model.score([image])[0]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    r = requests.post(
        f"{tiled_server['url']}/v1/sites/strip-line/score?map=mask", data=png(image), headers=headers, timeout=120
    )
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["score"] == pytest.approx(want.score, rel=1e-4)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["map"])))) > 0
    assert mask.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(mask, want.anomaly_map >= want.map_threshold)
    assert not mask[:, WIDTH // 2 :].any()
    assert (want.anomaly_map[:, WIDTH // 2 :] == 0).all() and (want.anomaly_map[:, : WIDTH // 2] > 0).all()
    r = requests.post(
        f"{tiled_server['url']}/v1/sites/strip-line/score?map=png", data=png(image), headers=headers, timeout=120
    )
    assert r.status_code == 200, r.text
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["results"][0]["map"]))))
    assert overlay.shape == (HEIGHT, WIDTH, 3)
