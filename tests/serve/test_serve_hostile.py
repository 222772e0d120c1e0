"""Hostile input and load against a real Serve application on 127.0.0.1: every bad request is a 4xx with a
JSON message, fast, and nothing a client sends stops the others from being served.

One case per finding of the hardening review (a header-only decompression bomb; formats outside the
allow-list; a progressive JPEG that takes long to decode; requests over the pixel budget; an
unauthenticated oversized label body; a bad image among good ones; leaks of paths and of which sites
exist; headers), plus the usual ones: empty body, truncated PNG, wrong content type, bad base64, JSON of
the wrong shape, NUL bytes and 5000-character values in every path and field, unknown site, another
site's token. After the suite the replica still scores correctly.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urlparse

import pytest
import requests

from bayprano.serve.app import SECURITY_HEADERS

from hostile_inputs import flat_png, jpeg_scan_bomb, noise, other_formats, png_header_bomb, truncated_png
from serving_fixtures import good, png

LONG = "x" * 5000
NUL = "a\x00b"


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def hostile(server):
    """A site scored by the hostile cases, another site, and a site with the adapt scope."""
    site, token, model = server["site"]("wood", 40)
    other, other_token, _ = server["site"]("wood", 41)
    adapter, adapter_token, _ = server["site"]("wood", 42, scopes=("score", "review", "adapt"))
    return {
        **server,
        "target": site,
        "token": token,
        "model": model,
        "other": other,
        "other_token": other_token,
        "adapter": adapter,
        "adapter_token": adapter_token,
    }


def refused(response: requests.Response, status: int | None = None, code: str | None = None, server=None) -> dict:
    """A 4xx (``status`` if given) with a JSON {code, message} of bounded length, the security headers, and
    no server path in it."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"code", "message"}, body
    if code is not None:
        assert body["code"] == code, body
    assert len(body["message"]) < 400, body["message"]
    if server is not None:
        assert str(server["registry"].root) not in response.text
    for key, value in SECURITY_HEADERS.items():
        assert response.headers.get(key) == value, (key, response.headers)
    return body


def post_image(
    h, data: bytes, name: str = "upload.png", site: str | None = None, token: str | None = None, query: str = ""
) -> requests.Response:
    return requests.post(
        f"{h['url']}/v1/sites/{site or h['target']}/score{query}",
        timeout=120,
        headers=auth(token or h["token"]),
        files=[("files", (name, data, "image/png"))],
    )


def scores_correctly(h) -> None:
    image = good("wood", 43, 1)
    r = post_image(h, png(image[0]))
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["score"] == pytest.approx(h["model"].score(image, maps=False)[0].score, rel=1e-4)


def test_a_header_only_decompression_bomb_is_413(hostile):
    bomb = png_header_bomb(20000, 20000)
    assert len(bomb) < 64
    refused(post_image(hostile, bomb), 413, "image_too_large", hostile)
    raw = requests.post(
        f"{hostile['url']}/v1/sites/{hostile['target']}/score",
        data=bomb,
        timeout=60,
        headers={**auth(hostile["token"]), "Content-Type": "image/png"},
    )
    assert "20000x20000 px, more than the limit" in refused(raw, 413, "image_too_large")["message"]


@pytest.mark.parametrize("fmt", ["dds", "ico", "icns", "gif", "webp"])
def test_formats_outside_the_allow_list_are_400(hostile, fmt):
    body = refused(post_image(hostile, other_formats()[fmt], name=f"x.{fmt}"), 400, "bad_image", hostile)
    assert f"x.{fmt}" in body["message"] and "PNG, JPEG, BMP, TIFF" in body["message"]


def test_a_jpeg_that_decodes_for_longer_than_the_deadline_is_a_4xx(hostile):
    bomb = jpeg_scan_bomb(256, 650_000)
    assert len(bomb) < hostile["cfg"].max_request_bytes
    r = requests.post(
        f"{hostile['url']}/v1/sites/{hostile['target']}/score",
        data=bomb,
        timeout=120,
        headers={**auth(hostile["token"]), "Content-Type": "image/jpeg"},
    )
    refused(r, 422, "decode_timeout")


def test_a_slow_decode_does_not_stop_health_checks_and_other_requests(hostile):
    """While one request's JPEG is decoding (until its decode deadline), /healthz and a normal score request
    keep answering: shown by the order in which they complete."""
    scores_correctly(hostile)  # the gateway's handle to the model replica and the site's model are warm
    bomb = jpeg_scan_bomb(256, 650_000)
    order: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def slow():
        r = requests.post(
            f"{hostile['url']}/v1/sites/{hostile['other']}/score",
            data=bomb,
            timeout=120,
            headers={**auth(hostile["other_token"]), "Content-Type": "image/jpeg"},
        )
        with lock:
            order.append(f"bomb {r.status_code}")
        done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    image = png(good("wood", 44, 1)[0])
    try:
        while not done.is_set() and len(order) < 200:
            health = requests.get(f"{hostile['url']}/healthz", timeout=60)
            scored = post_image(hostile, image)
            with lock:
                if not done.is_set():
                    order.append(f"healthz {health.status_code}")
                    order.append(f"score {scored.status_code}")
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive(), "the slow request did not finish"
    bomb_at = next(i for i, what in enumerate(order) if what.startswith("bomb"))
    assert order[bomb_at] == "bomb 422"
    before = order[:bomb_at]
    assert before.count("healthz 200") >= 3 and before.count("score 200") >= 3, order
    assert all(what.endswith(" 200") for what in before), order


def test_requests_over_the_pixel_budget_or_image_count_are_413(hostile):
    cfg = hostile["cfg"]
    big = flat_png(4096)  # ~50 kB that decode to 48 MB
    assert len(big) < 100_000
    refused(post_image(hostile, big), 413, "image_too_large", hostile)
    side = 256
    n = cfg.max_request_pixels // (side * side) + 1  # each image within the limit, together over the budget
    files = [("files", (f"{i}.png", flat_png(side), "image/png")) for i in range(n)]
    r = requests.post(
        f"{hostile['url']}/v1/sites/{hostile['target']}/score?map=png",
        files=files,
        timeout=60,
        headers=auth(hostile["token"]),
    )
    assert "pixels per request" in refused(r, 413, "request_too_large")["message"]
    files = [("files", (f"{i}.png", png(noise(64, i)), "image/png")) for i in range(cfg.max_images_per_request + 1)]
    r = requests.post(
        f"{hostile['url']}/v1/sites/{hostile['target']}/score", files=files, timeout=60, headers=auth(hostile["token"])
    )
    refused(r, 413, "too_many_images")
    r = requests.post(
        f"{hostile['url']}/v1/sites/{hostile['target']}/score",
        timeout=60,
        data=b"\0" * (cfg.max_request_bytes + 1),
        headers={**auth(hostile["token"]), "Content-Type": "image/png"},
    )
    refused(r, 413, "request_too_large")


def _raw_http(url: str, head: str, body: bytes) -> tuple[int, dict, bytes]:
    """Send a request's head and only the start of its body; read the answer."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
            dict(
                line.split(": ", 1) for line in data.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:] if ": " in line
            ).get("content-length", "0")
        ):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, payload


def test_the_label_endpoint_authenticates_before_reading_its_body(hostile):
    path = f"/v1/sites/{hostile['target']}/reviews/20260101T000000-00000000"
    host = urlparse(hostile["url"]).netloc
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 1024 * 1024}\r\nConnection: close\r\n\r\n"
    )
    status, headers, payload = _raw_http(hostile["url"], head, b'{"label": "' + b"g" * 65536)
    assert status == 401, payload[:300]  # answered after 64 kB of a declared 200 MB: the rest was never read
    assert json.loads(payload)["code"] == "missing_token" and headers["x-content-type-options"] == "nosniff"
    r = requests.post(
        hostile["url"] + path,
        data=json.dumps({"label": "good", "pad": "x" * 10_000}),
        headers={**auth(hostile["token"]), "Content-Type": "application/json"},
        timeout=60,
    )
    refused(r, 413, "request_too_large")
    r = requests.post(
        hostile["url"] + path,
        data="label=good",
        headers={**auth(hostile["token"]), "Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    refused(r, 415, "unsupported_media_type")


def test_a_bad_image_among_good_ones_fails_alone(hostile):
    images = good("wood", 45, 2)
    files = [
        ("files", ("a.png", png(images[0]), "image/png")),
        ("files", ("x.dds", other_formats()["dds"], "image/png")),
        ("files", ("b.png", png(images[1]), "image/png")),
    ]
    r = requests.post(
        f"{hostile['url']}/v1/sites/{hostile['target']}/score", files=files, timeout=60, headers=auth(hostile["token"])
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["ok", "error", "ok"]
    assert results[1]["error"]["code"] == "bad_image" and results[1]["name"] == "x.dds"
    want = hostile["model"].score(images, maps=False)
    assert [results[0]["score"], results[2]["score"]] == pytest.approx([w.score for w in want], rel=1e-4)


def test_no_site_name_oracle_and_no_paths_in_errors(hostile):
    url = hostile["url"]
    garbage = [
        requests.get(f"{url}/v1/sites/{site}", headers=auth("bp_" + "A" * 43), timeout=30)
        for site in (hostile["target"], "plant-that-does-not-exist")
    ]
    assert [r.status_code for r in garbage] == [401, 401] and garbage[0].json() == garbage[1].json()
    other = requests.get(f"{url}/v1/sites/{hostile['target']}", headers=auth(hostile["other_token"]), timeout=30)
    refused(other, 403, "forbidden")
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.json() == {"status": "ok"}
    detail = requests.get(f"{url}/v1/sites/{hostile['target']}", headers=auth(hostile["token"]), timeout=30).json()
    assert str(hostile["registry"].root) not in json.dumps(detail)


def test_the_usual_bad_requests_are_4xx(hostile):
    url, site, token = hostile["url"], hostile["target"], hostile["token"]
    endpoint = f"{url}/v1/sites/{site}/score"

    def post(**kw):
        kw.setdefault("headers", auth(token))
        return requests.post(endpoint, timeout=60, **kw)

    image = png(good("wood", 46, 1)[0])
    refused(post(data=b"", headers={**auth(token), "Content-Type": "image/png"}), 400, "bad_image")
    refused(post(data=b""), 415, "unsupported_media_type")
    refused(post_image(hostile, b"", name="empty.png"), 400, "bad_image")
    refused(post_image(hostile, truncated_png(noise(64))), 400, "corrupt_image")
    refused(post_image(hostile, png(noise(16))), 400, "image_too_small")
    refused(post_image(hostile, b"hello, not an image", name="notes.txt"), 400, "bad_image")
    refused(post(data=b"x" * 100, headers={**auth(token), "Content-Type": "text/plain"}), 415, "unsupported_media_type")
    refused(post(data=image, headers={**auth(token), "Content-Type": "multipart/form-data; boundary=zz"}), 400)
    refused(post(data=image, headers={**auth(token), "Content-Type": "multipart/form-data"}), 400)
    refused(post(json={"images": [{"data": "!!not base64!!"}]}), 400, "bad_base64")
    refused(post(json={"images": [{"data": base64.b64encode(image).decode()[:-3]}]}), 400, "bad_base64")
    for shape in (
        [],
        [1, 2],
        "images",
        3,
        None,
        {"images": "x"},
        {"images": [1]},
        {"images": [{"data": 5}]},
        {"images": [{"name": "a"}]},
        {"images": []},
        {"pictures": []},
        {"images": [{"data": "", "name": ["a"]}]},
        {"images": [{"data": "", "extra": 1}]},
    ):
        refused(
            post(data=json.dumps(shape), headers={**auth(token), "Content-Type": "application/json"}),
            422,
            "invalid_request",
        )
    refused(post(data=b"{not json", headers={**auth(token), "Content-Type": "application/json"}), 422)
    refused(post(data=b"\xff\xfe\x00", headers={**auth(token), "Content-Type": "application/json"}), 422)
    refused(post(files=[("note", (None, "just a field"))]), 400, "no_images")
    refused(requests.get(f"{url}/v1/nothing", timeout=30), 404, "not_found")
    refused(requests.get(endpoint, headers=auth(token), timeout=30), 405, "method_not_allowed")
    refused(
        requests.post(
            f"{url}/v1/sites/no-such-site/score", files=[("files", ("a.png", image))], headers=auth(token), timeout=30
        ),
        403,
        "forbidden",
    )
    refused(
        requests.post(
            f"{url}/v1/sites/no-such-site/score",
            files=[("files", ("a.png", image))],
            headers=auth(hostile["admin"]),
            timeout=30,
        ),
        404,
        "unknown_site",
    )
    refused(post_image(hostile, image, token=hostile["other_token"]), 403, "forbidden")
    refused(
        requests.post(
            endpoint, files=[("files", ("a.png", image))], timeout=30, headers={"Authorization": "Basic dXNlcjpwYXNz"}
        ),
        401,
    )


def test_nul_bytes_and_5000_character_values_in_every_path_and_field(hostile):
    url, site, token = hostile["url"], hostile["target"], hostile["token"]
    image = png(good("wood", 47, 1)[0])
    b64 = base64.b64encode(image).decode()
    adapter, adapter_token = hostile["adapter"], hostile["adapter_token"]
    for bad in (NUL, LONG, "\x00" * 10, "../" * 50):
        q = quote(bad, safe="")
        refused(
            requests.post(
                f"{url}/v1/sites/{q}/score", files=[("files", ("a.png", image))], headers=auth(token), timeout=30
            ),
            server=hostile,
        )
        refused(requests.get(f"{url}/v1/sites/{q}", headers=auth(token), timeout=30), server=hostile)
        refused(requests.get(f"{url}/v1/sites/{q}/reviews", headers=auth(token), timeout=30), server=hostile)
        refused(
            requests.post(f"{url}/v1/sites/{q}/adapt", json={}, headers=auth(adapter_token), timeout=30), server=hostile
        )
        refused(
            requests.post(
                f"{url}/v1/sites/{site}/reviews/{q}", json={"label": "good"}, headers=auth(token), timeout=30
            ),
            404,
            server=hostile,
        )
        refused(
            requests.post(
                f"{url}/v1/sites/{site}/reviews/20260101T000000-00000000",
                json={"label": bad},
                headers=auth(token),
                timeout=30,
            ),
            413 if bad == LONG else 422,
            server=hostile,
        )
        refused(
            requests.post(
                f"{url}/v1/sites/{site}/score?map={q}",
                files=[("files", ("a.png", image))],
                headers=auth(token),
                timeout=30,
            ),
            422,
            "invalid_request",
            hostile,
        )
        refused(requests.get(f"{url}/v1/sites/{site}/reviews?limit={q}", headers=auth(token), timeout=30), 422)
        refused(requests.get(f"{url}/static/{q}", timeout=30), 404)
        if "/" not in bad:  # a name may hold '../'; only a path may not
            refused(
                requests.post(
                    f"{url}/v1/sites/{site}/score",
                    json={"images": [{"name": bad, "data": b64}]},
                    headers=auth(token),
                    timeout=30,
                ),
                400,
                "bad_name",
                hostile,
            )
            # a multipart file or field name: refused as a name, or by the multipart parser itself
            refused(
                requests.post(
                    f"{url}/v1/sites/{site}/score",
                    files=[("files", (bad, image, "image/png"))],
                    headers=auth(token),
                    timeout=30,
                ),
                400,
                server=hostile,
            )
            refused(
                requests.post(
                    f"{url}/v1/sites/{site}/score",
                    files=[(bad, (None, "v")), ("files", ("a.png", image))],
                    headers=auth(token),
                    timeout=30,
                ),
                400,
                server=hostile,
            )
        refused(
            requests.post(
                f"{url}/v1/sites/{adapter}/adapt", json={"folder": bad}, headers=auth(adapter_token), timeout=30
            ),
            server=hostile,
        )
        refused(
            requests.post(
                f"{url}/v1/sites/{adapter}/adapt",
                data={"target_fpr": bad, "steps": bad},
                files=[("files", ("a.png", image))],
                headers=auth(adapter_token),
                timeout=30,
            ),
            422,
            server=hostile,
        )
        if "\x00" not in bad:  # a header cannot carry NUL
            refused(
                requests.post(
                    f"{url}/v1/sites/{site}/score", files=[("files", ("a.png", image))], headers=auth(bad), timeout=30
                ),
                401,
                server=hostile,
            )
            refused(
                requests.post(
                    f"{url}/v1/sites/{site}/score",
                    data=image,
                    timeout=30,
                    headers={**auth(token), "Content-Type": "application/" + bad},
                ),
                415,
                server=hostile,
            )
    assert hostile["registry"].current(adapter) == "v0001"  # nothing was adapted


def test_rate_and_concurrency_limits_are_429_with_retry_after(hostile, server):
    site, token, _ = server["site"]("wood", 48)
    cfg = hostile["cfg"]
    n = cfg.rate_burst + 40
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        codes = list(
            pool.map(
                lambda _: requests.get(f"{hostile['url']}/v1/sites/{site}", headers=auth(token), timeout=60), range(n)
            )
        )
    refilled = cfg.rate_limit_per_s * (time.monotonic() - start)
    limited = [r for r in codes if r.status_code == 429]
    assert all(r.status_code in (200, 429) for r in codes)
    assert sum(r.status_code == 200 for r in codes) <= cfg.rate_burst + refilled + 1  # the burst and what refilled
    assert limited, f"no request of {n} was limited (burst {cfg.rate_burst}, {refilled:.0f} refilled)"
    body = refused(limited[0], 429, "rate_limited")
    assert int(limited[0].headers["Retry-After"]) >= 1 and "per second" in body["message"]
    # another token is not affected
    assert (
        requests.get(
            f"{hostile['url']}/v1/sites/{hostile['other']}", headers=auth(hostile["other_token"]), timeout=30
        ).status_code
        == 200
    )
    # concurrency: more slow requests at once than the token may have
    busy, busy_token, _ = server["site"]("wood", 49)
    bomb = jpeg_scan_bomb(256, 650_000)
    n = cfg.max_concurrent_per_token + 3
    barrier = threading.Barrier(n)

    def slow(_):
        barrier.wait(timeout=60)
        return requests.post(
            f"{hostile['url']}/v1/sites/{busy}/score",
            data=bomb,
            timeout=120,
            headers={**auth(busy_token), "Content-Type": "image/jpeg"},
        )

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(slow, range(n)))
    assert all(400 <= r.status_code < 500 for r in answers), [r.status_code for r in answers]
    concurrent = [r for r in answers if r.status_code == 429]
    assert concurrent and refused(concurrent[0], 429, "too_many_concurrent")
    assert concurrent[0].headers["Retry-After"] == "1"


def test_after_the_hostile_cases_the_replica_still_scores_correctly(hostile):
    scores_correctly(hostile)
    assert requests.get(f"{hostile['url']}/readyz", timeout=30).json() == {"status": "ok"}
