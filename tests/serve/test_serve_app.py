"""The Serve application over real HTTP on 127.0.0.1: scoring, adaptation, listing, tokens, bad input,
a new version going live under load, and 20 sites on one replica that holds 4 models.

One application serves the whole module (one model replica, ``max_num_models_per_replica`` 4, batching
on), on the session's Ray with fractional CPUs; Serve is shut down at the end.
"""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from bayprano.cli import main
from bayprano.serve.registry import Registry

from serving_fixtures import CATEGORIES, defective, free_port, good, png

N_SITES = 20


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, checkpoint, make_site_model):
    from ray import serve

    from bayprano.config import ServeConfig
    from bayprano.serve.app import application

    base = tmp_path_factory.mktemp("serve")
    registry, admin = Registry.init(base / "registry", checkpoint=checkpoint)
    tokens, models = {}, {}
    for i in range(N_SITES):
        site = f"site-{i:02d}"
        tokens[site] = registry.add_site(site)
        models[site] = make_site_model(CATEGORIES[i % len(CATEGORIES)], seed=i)
        registry.publish(site, models[site])
    tokens["empty"] = registry.add_site("empty")
    storage = base / "storage"
    for i, image in enumerate(good("wood", 7, 3)):
        (storage / "site-00" / "good").mkdir(parents=True, exist_ok=True)
        (storage / "site-00" / "good" / f"{i}.png").write_bytes(png(image))
    port = free_port()
    cfg = ServeConfig(registry=registry.root, host="127.0.0.1", port=port, num_cpus=0.1, ingress_num_cpus=0.1,
                      max_models_per_replica=4, max_batch_size=8, batch_wait_timeout_s=0.005,
                      max_request_bytes=512 * 1024, max_images_per_request=8, max_image_pixels=256 * 256,
                      site_storage=storage)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application(cfg), name="bayprano-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "registry": registry, "admin": admin, "tokens": tokens, "models": models}
    serve.shutdown()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def score_json(server, site: str, images, token=None, query: str = "") -> requests.Response:
    body = {"images": [{"name": f"img{i}", "data": base64.b64encode(png(im)).decode()} for i, im in enumerate(images)]}
    return requests.post(f"{server['url']}/v1/sites/{site}/score{query}", json=body,
                         headers=auth(token or server["tokens"][site]), timeout=120)


def expect_error(response: requests.Response, status: int, code: str, words: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert words.lower() in body["message"].lower(), body
    return body


def local_scores(model, images) -> list[float]:
    return [r.score for r in model.score(images, maps=False)]


def test_score_multipart_and_json_match_in_process_scoring(server):
    site = "site-00"
    images = good("wood", 50, 2) + [defective("wood", 3)]
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    r = requests.post(f"{server['url']}/v1/sites/{site}/score", files=files, headers=auth(server["tokens"][site]),
                      timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["site"] == site and body["model_version"] == "v0001"
    results = body["results"]
    assert [x["name"] for x in results] == ["0.png", "1.png", "2.png"]
    expected = server["models"][site].score(images, maps=False)
    for got, want in zip(results, expected):
        assert got["score"] == pytest.approx(want.score, rel=1e-4)
        assert got["p_value"] == pytest.approx(want.p_value, rel=1e-3, abs=1e-6)
        assert got["threshold"] == pytest.approx(want.threshold)
        assert got["decision"] in ("normal", "anomalous", "review") and 0 <= got["uncertainty"] <= 1
        assert got["model_version"] == "v0001" and got["latency_ms"] > 0 and got["map"] is None
    r = score_json(server, site, images)
    assert r.status_code == 200, r.text
    assert [x["score"] for x in r.json()["results"]] == pytest.approx([w.score for w in expected], rel=1e-4)
    raw = requests.post(f"{server['url']}/v1/sites/{site}/score", data=png(images[0]),
                        headers={**auth(server["tokens"][site]), "Content-Type": "image/png"}, timeout=120)
    assert raw.status_code == 200 and raw.json()["results"][0]["score"] == pytest.approx(expected[0].score, rel=1e-4)


def test_maps_come_back_as_png_overlays_and_masks_at_the_image_size(server):
    site = "site-00"
    image = np.asarray(Image.fromarray(defective("wood", 4)).resize((96, 80)))
    model = server["models"][site]
    want = model.score([image], maps=True)[0]
    overlay = score_json(server, site, [image], query="?map=png").json()["results"][0]
    assert overlay["map_format"] == "png"
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay["map"]))))
    assert picture.shape == (80, 96, 3) and picture.dtype == np.uint8
    mask = score_json(server, site, [image], query="?map=mask").json()["results"][0]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["map"])))) > 0
    assert got.shape == (80, 96)
    expected = np.asarray(Image.fromarray(want.anomaly_map).resize((96, 80), Image.BILINEAR)) >= want.map_threshold
    assert (got == expected).mean() > 0.99
    expect_error(score_json(server, site, [image], query="?map=jpeg"), 422, "invalid_request", "map")


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    site = "site-01"
    images = good(CATEGORIES[1], 60, 8)
    want = local_scores(server["models"][site], images)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda im: score_json(server, site, [im]), images))
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["results"][0]["score"] for r in responses] == pytest.approx(want, rel=1e-4)


def test_tokens_are_per_site(server):
    url, tokens = server["url"], server["tokens"]
    image = good("wood", 5, 1)
    expect_error(score_json(server, "site-01", image, token=tokens["site-00"]), 403, "forbidden", "site-01")
    r = requests.post(f"{url}/v1/sites/site-00/score", json={"images": []}, timeout=30)
    expect_error(r, 401, "missing_token", "bearer")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    expect_error(score_json(server, "site-00", image, token="bp_not-a-token"), 403, "forbidden")
    r = requests.post(f"{url}/v1/sites/site-01/adapt", headers=auth(tokens["site-00"]),
                      files=[("files", ("a.png", png(image[0]), "image/png"))], timeout=30)
    expect_error(r, 403, "forbidden", "site-01")
    expect_error(requests.get(f"{url}/v1/sites/site-01", headers=auth(tokens["site-00"]), timeout=30), 403,
                 "forbidden")
    expect_error(requests.get(f"{url}/v1/sites", headers=auth(tokens["site-00"]), timeout=30), 403, "forbidden",
                 "admin")
    assert score_json(server, "site-01", image, token=server["admin"]).status_code == 200


def test_bad_input_is_refused_with_a_clear_4xx_and_the_replica_keeps_serving(server):
    url, token = server["url"], server["tokens"]["site-00"]
    endpoint = f"{url}/v1/sites/site-00/score"
    image = good("wood", 5, 1)[0]

    def post(**kw):
        kw.setdefault("headers", auth(token))
        return requests.post(endpoint, timeout=60, **kw)

    expect_error(score_json(server, "plant-x", [image], token=token), 404, "unknown_site", "plant-x")
    expect_error(score_json(server, "bad@name", [image], token=token), 404, "unknown_site")
    expect_error(score_json(server, "empty", [image]), 409, "no_model", "no published model")
    expect_error(post(files=[("files", ("notes.txt", b"hello, not an image", "text/plain"))]), 400, "bad_image",
                 "notes.txt: not an image")
    expect_error(post(files=[("files", ("cut.png", png(image)[:300], "image/png"))]), 400, "corrupt_image", "cut.png")
    expect_error(post(files=[("files", ("empty.png", b"", "image/png"))]), 400, "bad_image", "empty")
    expect_error(post(files=[("files", ("tiny.png", png(np.zeros((16, 16, 3), np.uint8)), "image/png"))]), 400,
                 "image_too_small", "16x16")
    big = np.full((300, 300, 3), 128, np.uint8)
    expect_error(post(files=[("files", ("big.png", png(big), "image/png"))]), 413, "image_too_large", "300x300")
    expect_error(post(files=[("files", (f"{i}.png", png(image), "image/png")) for i in range(9)]), 413,
                 "too_many_images", "9 images")
    noise = np.random.default_rng(0).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    expect_error(post(files=[("files", (f"{i}.png", png(noise), "image/png")) for i in range(3)]), 413,
                 "request_too_large", "limit")
    expect_error(post(data=b"x" * 100, headers={**auth(token), "Content-Type": "text/plain"}), 415,
                 "unsupported_media_type", "text/plain")
    expect_error(post(data=b"{not json", headers={**auth(token), "Content-Type": "application/json"}), 422,
                 "invalid_request", "JSON body")
    expect_error(post(json={"images": [{"data": "!!not base64!!"}]}), 400, "bad_base64", "base64")
    expect_error(post(json={"images": []}), 422, "invalid_request", "images")
    expect_error(post(json={"pictures": []}), 422, "invalid_request")
    expect_error(post(files=[("note", (None, "just a field"))]), 400, "no_images")
    expect_error(requests.get(f"{url}/v1/nothing", timeout=30), 404, "not_found")
    expect_error(requests.get(endpoint, headers=auth(token), timeout=30), 405, "method_not_allowed")
    ok = score_json(server, "site-00", [image])
    assert ok.status_code == 200 and ok.json()["results"][0]["score"] == pytest.approx(
        local_scores(server["models"]["site-00"], [image])[0], rel=1e-4)


def test_a_corrupt_published_artifact_is_a_503_not_a_crash(server, make_site_model):
    registry, site = server["registry"], "site-19"
    info = registry.publish(site, make_site_model("wood", 77))
    (info.path / "model.pt").write_bytes(b"garbage")
    expect_error(score_json(server, site, good("wood", 5, 1)), 503, "model_unavailable", "cannot be loaded")
    registry.rollback(site)
    assert score_json(server, site, good("wood", 5, 1)).status_code == 200


def test_list_sites_and_site_detail(server):
    url = server["url"]
    r = requests.get(f"{url}/v1/sites", headers=auth(server["admin"]), timeout=30)
    assert r.status_code == 200
    sites = {s["site"]: s for s in r.json()["sites"]}
    assert len(sites) == N_SITES + 1 and sites["empty"]["current"] is None
    assert sites["site-03"]["current"] == "v0001" and sites["site-03"]["threshold"] == pytest.approx(
        server["models"]["site-03"].threshold)
    expect_error(requests.get(f"{url}/v1/sites", timeout=30), 401, "missing_token")
    r = requests.get(f"{url}/v1/sites/site-03", headers=auth(server["tokens"]["site-03"]), timeout=30)
    assert r.status_code == 200
    detail = r.json()
    assert detail["current"] == "v0001" and len(detail["versions"]) == 1
    v = detail["versions"][0]
    assert v["support_size"] == 3 and v["target_fpr"] == 0.05 and v["current"] is True
    assert v["checkpoint_sha256"] and "loo_statistics" in v["metrics"]
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["detail"]["model_replica"] == "ok"
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/sites/{site}/score", "/v1/sites/{site}/adapt", "/v1/sites", "/v1/sites/{site}", "/healthz",
            "/readyz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/sites/{site}/score"]["post"]["requestBody"]["content"]
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_adapt_publishes_a_new_version_that_scores_the_next_request(server, checkpoint, extractor):
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    url, site, token = server["url"], "site-02", server["tokens"]["site-02"]
    support = good("bottle", 31, 4)
    r = requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), data={"target_fpr": "0.1", "steps": "1"},
                      files=[("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(support)],
                      timeout=120)
    assert r.status_code == 200, r.text
    version = r.json()["version"]
    assert version["version"] == "v0002" and version["support_size"] == 4 and version["target_fpr"] == 0.1
    assert server["registry"].current(site) == "v0002"
    expected = adapt(load_checkpoint(checkpoint), support, steps=1, target_fpr=0.1, extractor=extractor)
    probe = good("bottle", 32, 1)
    scored = score_json(server, site, probe).json()
    assert scored["model_version"] == "v0002"
    assert scored["results"][0]["score"] == pytest.approx(local_scores(expected, probe)[0], rel=1e-3)
    assert scored["results"][0]["threshold"] == pytest.approx(expected.threshold, rel=1e-5)
    # JSON with base64 images, and a folder on the site's storage
    body = {"images": [{"data": base64.b64encode(png(im)).decode()} for im in support[:2]], "target_fpr": 0.2}
    r = requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json=body, timeout=120)
    assert r.status_code == 200 and r.json()["version"]["version"] == "v0003"
    assert r.json()["version"]["support_size"] == 2
    r = requests.post(f"{url}/v1/sites/site-00/adapt", headers=auth(server["tokens"]["site-00"]),
                      json={"folder": "good"}, timeout=120)
    assert r.status_code == 200 and r.json()["version"]["support_size"] == 3
    server["registry"].rollback("site-00", "v0001")
    expect_error(requests.post(f"{url}/v1/sites/site-00/adapt", headers=auth(server["tokens"]["site-00"]),
                               json={"folder": "../site-01"}, timeout=30), 400, "bad_folder", "outside")
    expect_error(requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={"target_fpr": 2},
                               timeout=30), 422, "invalid_request", "target_fpr")
    expect_error(requests.post(f"{url}/v1/sites/{site}/adapt", headers=auth(token), json={}, timeout=30), 400,
                 "no_images")


def test_a_new_version_goes_live_while_a_client_scores_without_a_failed_request(server, make_site_model):
    registry, site = server["registry"], "site-04"
    image = good(CATEGORIES[4], 70, 1)
    old = registry.current(site)
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def client():
        session = requests.Session()
        while not stop.is_set():
            body = {"images": [{"data": base64.b64encode(png(image[0])).decode()}]}
            r = session.post(f"{server['url']}/v1/sites/{site}/score", json=body, headers=auth(server["tokens"][site]),
                             timeout=60)
            if r.status_code != 200:
                failures.append(r.text)
            else:
                seen.append(r.json()["model_version"])

    thread = threading.Thread(target=client)
    thread.start()
    try:
        while len(seen) < 5 and not failures:
            threading.Event().wait(0.05)
        new = registry.publish(site, make_site_model(CATEGORIES[4], 71, 0.2)).version
        n_at_publish = len(seen)
        deadline = threading.Event()
        for _ in range(400):
            if seen.count(new) >= 5 or failures:
                break
            deadline.wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []
    assert seen[0] == old and seen[-1] == new and seen.count(new) >= 5
    switch = seen.index(new)
    assert all(v == old for v in seen[:switch]) and all(v == new for v in seen[switch:])
    assert switch <= n_at_publish + 1  # live for the next request after the pointer moved


def test_twenty_sites_on_one_replica_holding_four_models(server, ray_session):
    from ray import serve

    handle = serve.get_deployment_handle("SiteModels", app_name="bayprano-test")
    loads_before = len(handle.stats.remote().result()["loads"])
    sites = [f"site-{i:02d}" for i in range(N_SITES) if i not in (2, 4, 19)]  # those have new versions above
    probes = {s: good(CATEGORIES[int(s[-2:]) % len(CATEGORIES)], 200 + int(s[-2:]), 1) for s in sites}
    for _ in range(2):
        for site in sites:
            r = score_json(server, site, probes[site])
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["score"] == pytest.approx(
                local_scores(server["models"][site], probes[site])[0], rel=1e-4)
    stats = handle.stats.remote().result()
    assert len(stats["loaded"]) == 4 and set(stats["loaded"]) == {f"{s}@v0001" for s in sites[-4:]}
    assert len(stats["loads"]) - loads_before >= 2 * len(sites) - 4  # every round reloads the evicted sites


def test_score_command_as_an_http_client(server, tmp_path, capsys):
    import json

    site, token = "site-05", server["tokens"]["site-05"]
    images = good(CATEGORIES[5], 90, 2)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im).save(paths[-1])
    capsys.readouterr()
    status = main(["score", "--url", server["url"], "--site", site, "--token", token, *paths, "--maps",
                   str(tmp_path / "maps")])
    out = capsys.readouterr()
    assert status == 0, out.err
    lines = [json.loads(line) for line in out.out.strip().splitlines()]
    assert [r["image"] for r in lines] == paths
    assert [r["score"] for r in lines] == pytest.approx(local_scores(server["models"][site], images), rel=1e-4)
    assert all(r["model_version"] == "v0001" and r["decision"] in ("normal", "anomalous", "review") for r in lines)
    assert all(Image.open(r["map"]).size == (64, 64) for r in lines)
    assert main(["score", "--url", server["url"], "--site", site, "--token", "wrong", paths[0]]) == 2
    assert "HTTP 403 forbidden" in capsys.readouterr().err
    assert main(["score", "--url", server["url"], "--site", site, paths[0]]) == 2
    assert "token" in capsys.readouterr().err
    assert main(["score", "--url", "http://127.0.0.1:1", "--site", site, "--token", token, paths[0]]) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main(["score", paths[0]]) == 2
    assert "--model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ review page and queue


@pytest.fixture
def review_site(server, checkpoint, extractor):
    """``review_site(name)``: a new site whose model sends almost everything to review (a wide band,
    ``z_review`` 50, as an inspector who wants to see more would set); returns its token and model."""
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    def make(name: str):
        token = server["registry"].add_site(name)
        model = adapt(load_checkpoint(checkpoint), good("wood", 11, 3), extractor=extractor, z_review=50.0)
        server["registry"].publish(name, model)
        return token, model

    return make


def review_image(model) -> np.ndarray:
    candidates = good("wood", 300, 4) + [defective("wood", s) for s in range(300, 304)]
    for image, result in zip(candidates, model.score(candidates, maps=False)):
        if result.decision == "review":
            return image
    raise AssertionError("no candidate image was sent to review")


def test_review_decisions_are_queued_least_certain_first_and_labelled(server, review_site):
    site = "inspect-1"
    token, model = review_site(site)
    server["tokens"][site] = token
    image = review_image(model)
    r = score_json(server, site, [image, image])
    assert r.status_code == 200 and [x["decision"] for x in r.json()["results"]] == ["review", "review"]
    r = requests.get(f"{server['url']}/v1/sites/{site}/reviews", headers=auth(server["tokens"][site]), timeout=30)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 2 and all(i["decision"] == "review" and i["model_version"] == "v0001" for i in items)
    uncertainty = [i["uncertainty"] for i in items]
    assert uncertainty == sorted(uncertainty, reverse=True)
    assert base64.b64decode(items[0]["thumbnail"]).startswith(b"\x89PNG")
    url = f"{server['url']}/v1/sites/{site}/reviews/{items[0]['id']}"
    r = requests.post(url, json={"label": "defective"}, headers=auth(server["tokens"][site]), timeout=30)
    assert r.status_code == 200 and r.json()["label"] == "defective"
    pending = requests.get(f"{server['url']}/v1/sites/{site}/reviews", headers=auth(server["tokens"][site]),
                           timeout=30).json()["items"]
    assert [i["id"] for i in pending] == [items[1]["id"]]
    from bayprano.serve.review import ReviewQueue

    assert [i["label"] for i in ReviewQueue(server["registry"].root).labelled(site)] == ["defective"]
    expect_error(requests.post(url, json={"label": "maybe"}, headers=auth(server["tokens"][site]), timeout=30), 422,
                 "invalid_request")
    expect_error(requests.post(f"{server['url']}/v1/sites/{site}/reviews/20260101T000000-00000000",
                               json={"label": "good"}, headers=auth(server["tokens"][site]), timeout=30), 404,
                 "unknown_review_item")
    expect_error(requests.get(f"{server['url']}/v1/sites/{site}/reviews", headers=auth(server["tokens"]["site-04"]),
                              timeout=30), 403, "forbidden")
    assert requests.get(f"{server['url']}/v1/sites/site-04/reviews", headers=auth(server["tokens"]["site-04"]),
                        timeout=30).json()["items"] == []


def test_review_page_in_a_headless_browser(server, review_site, tmp_path):
    """Load the page, upload an image, see the overlay and the decision, mark a review item as good."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed: `sudo apt-get install chromium` (Debian) to run this test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra has it)")
    site = "inspect-2"
    token, model = review_site(site)
    image = review_image(model)
    upload = tmp_path / "inspect-me.png"
    upload.write_bytes(png(image))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
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
            assert 0 <= float(page.inner_text("#uncertainty")) <= 1
            overlay = page.eval_on_selector("#overlay", "img => [img.complete, img.naturalWidth, img.naturalHeight]")
            assert overlay[0] and overlay[1] == image.shape[1] and overlay[2] == image.shape[0]
            row = page.wait_for_selector("#queue tr", timeout=60_000)
            item_id = row.get_attribute("data-id")
            row.query_selector("button[data-label='good']").click()
            page.wait_for_function(f"!document.querySelector(\"#queue tr[data-id='{item_id}']\")", timeout=60_000)
            assert "marked" in page.inner_text("#status")
        finally:
            browser.close()
    from bayprano.serve.review import ReviewQueue

    labelled = ReviewQueue(server["registry"].root).labelled(site)
    assert [(i["id"], i["label"]) for i in labelled] == [(item_id, "good")]
