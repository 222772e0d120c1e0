"""The Serve application over real HTTP on 127.0.0.1: scoring, adaptation, listing, tokens and scopes, a
new version going live under load, 20 sites on one replica that holds 4 models, the review page and
queue, readiness and internal errors.

One application serves the module (``server`` in conftest.py: one model replica holding 4 models,
batching on, fractional CPUs on the session's Ray). Every test makes its own sites, so that no test
depends on which ran before it.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from bayprano.cli import main
from bayprano.serve.app import SECURITY_HEADERS

from serving_fixtures import CATEGORIES, defective, good, png
from waiting import wait_until


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def score_json(server, site: str, images, token: str, query: str = "") -> requests.Response:
    body = {"images": [{"name": f"img{i}", "data": base64.b64encode(png(im)).decode()} for i, im in enumerate(images)]}
    return requests.post(f"{server['url']}/v1/sites/{site}/score{query}", json=body, headers=auth(token), timeout=120)


def expect_error(response: requests.Response, status: int, code: str, words: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert words.lower() in body["message"].lower(), body
    return body


def local_scores(model, images) -> list[float]:
    return [r.score for r in model.score(images, maps=False)]


def stats(ray_session) -> dict:
    from ray import serve

    return serve.get_deployment_handle("SiteModels", app_name="bayprano-test").stats.remote().result()


def test_score_multipart_json_and_raw_match_in_process_scoring(server):
    site, token, model = server["site"]("wood", 0)
    images = good("wood", 50, 2) + [defective("wood", 3)]
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    r = requests.post(f"{server['url']}/v1/sites/{site}/score", files=files, headers=auth(token), timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["site"] == site and body["model_version"] == "v0001"
    results = body["results"]
    assert [x["name"] for x in results] == ["0.png", "1.png", "2.png"]
    expected = model.score(images, maps=False)
    for got, want in zip(results, expected):
        assert got["status"] == "ok" and got["error"] is None
        assert got["score"] == pytest.approx(want.score, rel=1e-4)
        assert got["p_value"] == pytest.approx(want.p_value, rel=1e-3, abs=1e-6)
        assert got["threshold"] == pytest.approx(want.threshold)
        assert got["decision"] == want.decision and got["uncertainty"] == pytest.approx(want.uncertainty, abs=1e-6)
        assert got["model_version"] == "v0001" and got["latency_ms"] > 0 and got["map"] is None
    r = score_json(server, site, images, token)
    assert r.status_code == 200, r.text
    assert [x["score"] for x in r.json()["results"]] == pytest.approx([w.score for w in expected], rel=1e-4)
    raw = requests.post(
        f"{server['url']}/v1/sites/{site}/score",
        data=png(images[0]),
        headers={**auth(token), "Content-Type": "image/png"},
        timeout=120,
    )
    assert raw.status_code == 200 and raw.json()["results"][0]["score"] == pytest.approx(expected[0].score, rel=1e-4)


def test_maps_come_back_as_png_overlays_and_masks_at_the_image_size(server):
    site, token, model = server["site"]("wood", 0)
    image = np.asarray(Image.fromarray(defective("wood", 4)).resize((96, 80)))
    want = model.score([image], maps=True)[0]
    overlay = score_json(server, site, [image], token, query="?map=png").json()["results"][0]
    assert overlay["map_format"] == "png"
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay["map"]))))
    assert picture.shape == (80, 96, 3) and picture.dtype == np.uint8
    mask = score_json(server, site, [image], token, query="?map=mask").json()["results"][0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["map"])))) > 0
    assert got.shape == (80, 96)
    expected = np.asarray(Image.fromarray(want.anomaly_map).resize((96, 80), Image.BILINEAR)) >= want.map_threshold
    assert (got == expected).mean() > 0.99
    expect_error(score_json(server, site, [image], token, query="?map=jpeg"), 422, "invalid_request", "map")


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, ray_session):
    site, token, model = server["site"](CATEGORIES[1], 1)
    images = good(CATEGORIES[1], 60, 8)
    want = local_scores(model, images)
    before = len(stats(ray_session)["batch_sizes"])
    barrier = threading.Barrier(len(images))

    def post(image):
        barrier.wait(timeout=60)
        return score_json(server, site, [image], token)

    sizes: list[int] = []
    for _ in range(3):  # a burst of 8 at once; on an idle replica the first may still run alone
        with ThreadPoolExecutor(len(images)) as pool:
            responses = list(pool.map(post, images))
        assert [r.status_code for r in responses] == [200] * len(images), [r.text for r in responses]
        assert [r.json()["results"][0]["score"] for r in responses] == pytest.approx(want, rel=1e-4)
        sizes = stats(ray_session)["batch_sizes"][before:]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, f"no batch of more than one request was formed: batch sizes {sizes}"
    assert sum(sizes) >= len(images)


def test_one_bad_image_is_reported_in_its_own_item_and_fails_nothing_else(server):
    site, token, model = server["site"]("wood", 2)
    images = good("wood", 51, 8)
    want = local_scores(model, images)
    bodies = []
    for i, image in enumerate(images):
        files = [("files", (f"good-{i}.png", png(image), "image/png"))]
        if i == 3:
            files.insert(0, ("files", ("broken.png", png(image)[:200], "image/png")))
        bodies.append(files)
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: scored in the same batches
        responses = list(
            pool.map(
                lambda f: requests.post(
                    f"{server['url']}/v1/sites/{site}/score", files=f, headers=auth(token), timeout=120
                ),
                bodies,
            )
        )
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    for i, r in enumerate(responses):
        results = r.json()["results"]
        if i == 3:
            bad, ok = results
            assert bad["name"] == "broken.png" and bad["status"] == "error" and bad["score"] is None
            assert bad["error"]["code"] == "corrupt_image" and "broken.png" in bad["error"]["message"]
        else:
            (ok,) = results
        assert ok["status"] == "ok" and ok["score"] == pytest.approx(want[i], rel=1e-4)


def test_tokens_are_per_site_and_a_bad_token_is_401_whether_or_not_the_site_exists(server):
    url = server["url"]
    a, token_a, _ = server["site"]("wood", 3)
    b, token_b, _ = server["site"]("wood", 4)
    image = good("wood", 5, 1)
    expect_error(score_json(server, b, image, token_a), 403, "forbidden", b)
    expect_error(score_json(server, "no-such-site", image, token_a), 403, "forbidden", "no-such-site")
    r = requests.post(f"{url}/v1/sites/{a}/score", json={"images": []}, timeout=30)
    expect_error(r, 401, "missing_token", "bearer")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    garbage = [score_json(server, site, image, "bp_not-a-token") for site in (a, "no-such-site")]
    bodies = [expect_error(r, 401, "invalid_token") for r in garbage]
    assert bodies[0] == bodies[1] and all("site" not in body["message"] for body in bodies)
    expect_error(requests.get(f"{url}/v1/sites/{b}", headers=auth(token_a), timeout=30), 403, "forbidden")
    expect_error(requests.get(f"{url}/v1/sites", headers=auth(token_a), timeout=30), 403, "forbidden", "admin")
    expect_error(requests.get(f"{url}/v1/sites", headers=auth("bp_garbage"), timeout=30), 401, "invalid_token")
    assert score_json(server, b, image, server["admin"]).status_code == 200
    expect_error(score_json(server, "no-such-site", image, server["admin"]), 404, "unknown_site")
    assert score_json(server, b, image, token_b).status_code == 200


def test_scopes_a_site_token_cannot_adapt_without_the_adapt_scope(server):
    url = server["url"]
    site, token, _ = server["site"]("wood", 6)
    support = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(good("wood", 8, 3))]
    expect_error(
        requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), files=support, timeout=60),
        403,
        "missing_scope",
        "adapt",
    )
    assert server["registry"].current(site) == "v0001" and len(server["registry"].versions(site)) == 1
    scorer, scorer_token, _ = server["site"]("wood", 6, scopes=("score",))
    expect_error(
        requests.get(f"{url}/v1/sites/{scorer}/reviews", headers=auth(scorer_token), timeout=30),
        403,
        "missing_scope",
        "review",
    )
    assert score_json(server, scorer, good("wood", 9, 1), scorer_token).status_code == 200


def test_adapt_publishes_a_candidate_that_promote_or_activate_makes_live(server, checkpoint, extractor, capsys):
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    url, registry = server["url"], server["registry"]
    site, token, _ = server["site"]("bottle", 7, scopes=("score", "review", "adapt"))
    support = good("bottle", 31, 4)
    r = requests.post(
        f"{url}/v1/sites/{site}/adapt",
        headers=auth(token),
        data={"target_fpr": "0.1", "steps": "1"},
        files=[("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(support)],
        timeout=120,
    )
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    assert version["version"] == "v0002" and version["support_size"] == 4 and version["target_fpr"] == 0.1
    assert version["current"] is False and "source" not in version and "path" not in version
    probe = good("bottle", 32, 1)
    assert score_json(server, site, probe, token).json()["model_version"] == "v0001"  # a candidate is not live
    assert main(["registry", "promote", "--registry", str(registry.root), site]) == 0
    assert "v0001 -> v0002" in capsys.readouterr().out
    expected = adapt(load_checkpoint(checkpoint), support, steps=1, target_fpr=0.1, extractor=extractor)
    scored = score_json(server, site, probe, token).json()
    assert scored["model_version"] == "v0002"
    assert scored["results"][0]["score"] == pytest.approx(local_scores(expected, probe)[0], rel=1e-3)
    assert scored["results"][0]["threshold"] == pytest.approx(expected.threshold, rel=1e-5)
    # JSON with base64 images and ?activate=true: live at once; only max_versions_per_site (3) are kept
    body = {"images": [{"data": base64.b64encode(png(im)).decode()} for im in support[:2]], "target_fpr": 0.2}
    r = requests.post(f"{url}/v1/sites/{site}/adapt?activate=true", headers=auth(token), json=body, timeout=120)
    assert r.status_code == 200 and r.json()["version"]["version"] == "v0003" and r.json()["version"]["current"]
    assert r.json()["version"]["support_size"] == 2 and registry.current(site) == "v0003"
    r = requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json=body, timeout=120)
    assert r.status_code == 200 and r.json()["version"]["version"] == "v0004"
    assert [v.version for v in registry.versions(site)] == ["v0002", "v0003", "v0004"]
    assert registry.current(site) == "v0003"
    expect_error(
        requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={"target_fpr": 2}, timeout=30),
        422,
        "invalid_request",
        "target_fpr",
    )
    expect_error(
        requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={}, timeout=30), 400, "no_images"
    )


def test_adapt_from_a_folder_of_the_sites_storage(server):
    url = server["url"]
    site, token, _ = server["site"]("wood", 8, scopes=("score", "review", "adapt"))
    folder = server["storage"] / site / "good"
    folder.mkdir(parents=True)
    for i, image in enumerate(good("wood", 7, 3)):
        (folder / f"{i}.png").write_bytes(png(image))
    r = requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={"folder": "good"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["version"]["support_size"] == 3 and r.json()["version"]["version"] == "v0002"
    expect_error(
        requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={"folder": "../other"}, timeout=30),
        400,
        "bad_folder",
        "outside",
    )
    expect_error(
        requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={"folder": "none"}, timeout=30),
        404,
        "no_such_folder",
    )


def test_a_rewritten_model_folder_is_refused_at_load_naming_site_and_version(server, make_site_model):
    registry = server["registry"]
    site, token, _ = server["site"]("wood", 9)
    info = registry.publish(site, make_site_model("wood", 77))
    other = make_site_model("fabric", 78).save(info.path.parent / ".other")
    for name in ("model.pt", "meta.json"):  # a consistent pair, but not the one that was published
        (info.path / name).write_bytes((other / name).read_bytes())
    body = expect_error(
        score_json(server, site, good("wood", 5, 1), token),
        503,
        "model_unavailable",
        f"model {site}@v0002 cannot be loaded",
    )
    assert "does not match the sha256 recorded" in body["message"] and "/" not in body["message"].split(": ", 1)[1]
    assert str(registry.root) not in body["message"]
    registry.rollback(site)
    assert score_json(server, site, good("wood", 5, 1), token).status_code == 200


def test_list_sites_and_site_detail(server):
    url = server["url"]
    sites = [server["site"]("wood", 10 + i) for i in range(2)]
    empty, empty_token, _ = server["site"](publish=False)
    r = requests.get(f"{url}/v1/sites", headers=auth(server["admin"]), timeout=30)
    assert r.status_code == 200
    listed = {s["site"]: s for s in r.json()["sites"]}
    assert listed[empty]["current"] is None and listed[empty]["versions"] == 0
    for name, _, model in sites:
        assert listed[name]["current"] == "v0001" and listed[name]["threshold"] == pytest.approx(model.threshold)
    expect_error(requests.get(f"{url}/v1/sites", timeout=30), 401, "missing_token")
    name, token, _ = sites[0]
    r = requests.get(f"{url}/v1/sites/{name}", headers=auth(token), timeout=30)
    assert r.status_code == 200
    detail = r.json()
    assert detail["current"] == "v0001" and len(detail["versions"]) == 1
    v = detail["versions"][0]
    assert v["support_size"] == 3 and v["target_fpr"] == 0.05 and v["current"] is True
    assert v["checkpoint_sha256"] and "loo_statistics" in v["metrics"] and "source" not in v
    expect_error(score_json(server, empty, good("wood", 5, 1), empty_token), 409, "no_model", "no published model")


def test_health_readiness_docs_off_and_security_headers_on_every_response(server):
    url, registry = server["url"], server["registry"]
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}
    for path in ("/docs", "/openapi.json"):
        expect_error(requests.get(url + path, timeout=30), 404, "not_found", "off")
    responses = [
        r,
        ready,
        requests.get(f"{url}/v1/nothing", timeout=30),
        requests.post(f"{url}/v1/sites/x/score", timeout=30),
        requests.get(f"{url}/", timeout=30),
    ]
    for response in responses:
        for key, value in SECURITY_HEADERS.items():
            assert response.headers.get(key) == value, (response.url, key, response.headers)
    # not ready: the registry cannot be read; nothing but the status, and no token needed
    meta = registry.root / "registry.json"
    aside = registry.root / "registry.json.aside"
    meta.rename(aside)
    try:
        not_ready = requests.get(f"{url}/readyz", timeout=30)
    finally:
        aside.rename(meta)
    assert not_ready.status_code == 503 and not_ready.json() == {"status": "not ready"}
    assert requests.get(f"{url}/readyz", timeout=30).json() == {"status": "ok"}


def test_the_api_description_names_every_endpoint_and_its_bodies():
    from bayprano.serve.app import api

    spec = api.openapi()
    assert {
        "/v1/sites/{site}/score",
        "/v1/sites/{site}/adapt",
        "/v1/sites",
        "/v1/sites/{site}",
        "/healthz",
        "/readyz",
        "/v1/sites/{site}/reviews/{item_id}",
    } <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/sites/{site}/score"]["post"]["requestBody"]["content"]
    label = spec["paths"]["/v1/sites/{site}/reviews/{item_id}"]["post"]
    assert label["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("LabelRequest")


def test_an_internal_error_is_a_json_500_without_paths_and_the_server_keeps_serving(server):
    registry = server["registry"]
    broken, token, _ = server["site"]("wood", 12)
    fine, fine_token, _ = server["site"]("wood", 13)
    (registry.root / "sites" / broken / "site.json").write_text("{ not json")  # the server's own file is broken
    r = score_json(server, broken, good("wood", 5, 1), token)
    body = expect_error(r, 500, "internal", "internal server error")
    assert str(registry.root) not in r.text and "JSON" not in body["message"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert score_json(server, fine, good("wood", 5, 1), fine_token).status_code == 200


def test_a_new_version_goes_live_while_a_client_scores_without_a_failed_request(server, make_site_model):
    registry = server["registry"]
    site, token, _ = server["site"](CATEGORIES[4], 14)
    image = good(CATEGORIES[4], 70, 1)
    old = registry.current(site)
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client():
        session = requests.Session()
        body = {"images": [{"data": base64.b64encode(png(image[0])).decode()}]}
        while not stop.is_set():
            r = session.post(f"{server['url']}/v1/sites/{site}/score", json=body, headers=auth(token), timeout=60)
            if r.status_code != 200:
                failures.append(r.text)
            else:
                seen.append(r.json()["model_version"])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(seen) >= 5 or failures, "5 answers from the old version")
        new = registry.publish(site, make_site_model(CATEGORIES[4], 71, 0.2)).version
        n_at_publish = len(seen)
        wait_until(lambda: seen.count(new) >= 5 or failures, f"5 answers from the new version {new}")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the scoring client did not stop"
    assert failures == []
    assert seen[0] == old and seen[-1] == new and seen.count(new) >= 5
    switch = seen.index(new)
    assert all(v == old for v in seen[:switch]) and all(v == new for v in seen[switch:])
    assert switch <= n_at_publish + 1  # live for the next request after the pointer moved


def test_twenty_sites_on_one_replica_holding_four_models(server, ray_session):
    sites = [server["site"](CATEGORIES[i % len(CATEGORIES)], 100 + i, prefix="many") for i in range(20)]
    loads_before = len(stats(ray_session)["loads"])
    probes = {name: good(CATEGORIES[i % len(CATEGORIES)], 200 + i, 1) for i, (name, _, _) in enumerate(sites)}
    for _ in range(2):
        for name, token, model in sites:
            r = score_json(server, name, probes[name], token)
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["score"] == pytest.approx(local_scores(model, probes[name])[0], rel=1e-4)
    after = stats(ray_session)
    assert set(after["loaded"]) == {f"{name}@v0001" for name, _, _ in sites[-4:]}
    loads = after["loads"][loads_before:]
    assert len(loads) == 2 * len(sites)  # every round reloads every site: 20 sites through an LRU of 4
    assert sorted(set(loads)) == sorted(f"{name}@v0001" for name, _, _ in sites)


def test_score_command_as_an_http_client(server, tmp_path, capsys):
    site, token, model = server["site"](CATEGORIES[5], 15)
    images = good(CATEGORIES[5], 90, 2)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    capsys.readouterr()
    status = main(
        ["score", "--url", server["url"], "--site", site, "--token", token, *paths, "--maps", str(tmp_path / "maps")]
    )
    out = capsys.readouterr()
    assert status == 0, out.err
    lines = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [r["image"] for r in lines] == paths
    assert [r["score"] for r in lines] == pytest.approx(local_scores(model, images), rel=1e-4)
    assert all(r["model_version"] == "v0001" and r["decision"] in ("normal", "anomalous", "review") for r in lines)
    assert all(Image.open(r["map"]).size == (64, 64) for r in lines)
    assert main(["score", "--url", server["url"], "--site", site, "--token", "wrong", paths[0]]) == 2
    assert "HTTP 401 invalid_token" in capsys.readouterr().err
    assert main(["score", "--url", server["url"], "--site", site, paths[0]]) == 2
    assert "token" in capsys.readouterr().err
    assert main(["score", "--url", "http://127.0.0.1:1", "--site", site, "--token", token, paths[0]]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["score", paths[0]]) == 2
    assert "--model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ review page and queue


@pytest.fixture
def review_site(server, checkpoint, extractor):
    """A new site whose model sends almost everything to review (a wide band, ``z_review`` 50, as an
    inspector who wants to see more would set); returns its name, token and model."""
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    model = adapt(load_checkpoint(checkpoint), good("wood", 11, 3), extractor=extractor, z_review=50.0)
    return server["site"](model=model, prefix="inspect")


def review_image(model) -> np.ndarray:
    candidates = good("wood", 300, 4) + [defective("wood", s) for s in range(300, 304)]
    for image, result in zip(candidates, model.score(candidates, maps=False)):
        if result.decision == "review":
            return image
    raise AssertionError("no candidate image was sent to review")


def test_review_decisions_are_queued_least_certain_first_and_labelled(server, review_site):
    site, token, model = review_site
    other, other_token, _ = server["site"]("wood", 16)
    image = review_image(model)
    r = score_json(server, site, [image, image], token)
    assert r.status_code == 200 and [x["decision"] for x in r.json()["results"]] == ["review", "review"]
    r = requests.get(f"{server['url']}/v1/sites/{site}/reviews", headers=auth(token), timeout=30)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 2 and all(i["decision"] == "review" and i["model_version"] == "v0001" for i in items)
    uncertainty = [i["uncertainty"] for i in items]
    assert uncertainty == sorted(uncertainty, reverse=True)
    assert base64.b64decode(items[0]["thumbnail"]).startswith(b"\x89PNG")
    from bayprano.serve.review import ReviewQueue

    queue = ReviewQueue(server["registry"].root)
    stored = Image.open(io.BytesIO(queue.image_png(site, items[0]["id"])))
    assert max(stored.size) == server["cfg"].review_image_side  # stored downscaled, not at full resolution
    url = f"{server['url']}/v1/sites/{site}/reviews/{items[0]['id']}"
    r = requests.post(url, json={"label": "defective"}, headers=auth(token), timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "defective"
    pending = requests.get(f"{server['url']}/v1/sites/{site}/reviews", headers=auth(token), timeout=30).json()["items"]
    assert [i["id"] for i in pending] == [items[1]["id"]]
    assert [i["label"] for i in queue.labelled(site)] == ["defective"]
    expect_error(requests.post(url, json={"label": "maybe"}, headers=auth(token), timeout=30), 422, "invalid_request")
    expect_error(
        requests.post(
            f"{server['url']}/v1/sites/{site}/reviews/20260101T000000-00000000",
            json={"label": "good"},
            headers=auth(token),
            timeout=30,
        ),
        404,
        "unknown_review_item",
    )
    expect_error(
        requests.get(f"{server['url']}/v1/sites/{site}/reviews", headers=auth(other_token), timeout=30),
        403,
        "forbidden",
    )
    assert (
        requests.get(f"{server['url']}/v1/sites/{other}/reviews", headers=auth(other_token), timeout=30).json()["items"]
        == []
    )


def test_the_review_page_and_its_assets_without_a_browser(server):
    url = server["url"]
    page = requests.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<title>bayprano review</title>" in html
    for element in ('id="token"', 'id="site"', 'id="file"', 'id="overlay"', 'id="queue"', 'id="decision"'):
        assert element in html, element
    assert '<script src="static/review.js"' in html and 'href="static/review.css"' in html
    assert "<script>" not in html and "<style>" not in html and "style=" not in html  # nothing inline: CSP 'self'
    js = requests.get(f"{url}/static/review.js", timeout=30)
    css = requests.get(f"{url}/static/review.css", timeout=30)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text and "textContent" in js.text
    for endpoint in ("/v1/sites", "/reviews", "/score?map=png"):
        assert endpoint in js.text
    assert "#queue" in css.text
    expect_error(requests.get(f"{url}/static/..%2Fapp.py", timeout=30), 404, "not_found")
    expect_error(requests.get(f"{url}/static/review.html", timeout=30), 404, "not_found")


def test_review_page_in_a_headless_browser(server, review_site, tmp_path):
    """Load the page, upload an image, see the overlay and the decision, mark a review item as good."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed: `sudo apt-get install chromium` (Debian) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    site, token, model = review_site
    image = review_image(model)
    upload = tmp_path / "inspect-me.png"
    upload.write_bytes(png(image))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page()
            page.goto(f"{server['url']}/?site={site}")
            assert page.title() == "bayprano review"
            page.fill("#token", token)
            page.dispatch_event("#token", "change")
            page.set_input_files("#file", str(upload))
            page.wait_for_selector("#overlay[src^='data:image/png;base64,']", state="visible", timeout=60_000)
            assert page.inner_text("#decision") == "review"
            assert float(page.inner_text("#score")) == pytest.approx(model.score([image])[0].score, abs=0.01)
            shown_uncertainty = page.inner_text("#uncertainty")
            overlay = page.eval_on_selector("#overlay", "img => [img.complete, img.naturalWidth, img.naturalHeight]")
            assert overlay[0] and overlay[1] == image.shape[1] and overlay[2] == image.shape[0]
            row = page.wait_for_selector("#queue tr", timeout=60_000)
            item_id = row.get_attribute("data-id")
            row.query_selector("button[data-label='good']").click()
            # a locator waits without evaluating a string in the page, which the page's CSP forbids
            page.locator(f"#queue tr[data-id='{item_id}']").wait_for(state="detached", timeout=60_000)
            assert "marked" in page.inner_text("#status")
        finally:
            browser.close()
    from bayprano.serve.review import ReviewQueue

    labelled = ReviewQueue(server["registry"].root).labelled(site)
    assert [(i["id"], i["label"]) for i in labelled] == [(item_id, "good")]
    # the page shows (to its two decimals) the uncertainty that the JSON endpoint gives for the same image
    r = score_json(server, site, [image], token)
    assert r.status_code == 200, r.text
    uncertainty = r.json()["results"][0]["uncertainty"]
    assert uncertainty is not None and 0 <= uncertainty <= 1
    assert float(shown_uncertainty) == pytest.approx(uncertainty, abs=0.005 + 1e-9)
