"""The application's own metrics on the Prometheus endpoint of a running Serve application.

The endpoint is the one an operator's Prometheus scrapes: the metrics export port of each Ray node, as
``ray.nodes()`` lists it (``MetricsExportPort``). Ray's workers report to it every
``RAY_metrics_report_interval_ms`` (1 s in the test session, see tests/conftest.py), so every check polls
the endpoint until the expected values are there or a deadline passes. Each test makes sites with names
of its own, so the counts it expects are exactly its own requests.
"""

from __future__ import annotations

import base64
import secrets

import pytest
import requests

from serving_fixtures import defective, good, png
from waiting import wait_until

DEADLINE_S = 60.0


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def score(server, site: str, token: str, images: list, corrupt: int = 0) -> dict:
    body = [{"name": f"img{i}", "data": base64.b64encode(png(im)).decode()} for i, im in enumerate(images)]
    body += [{"name": f"bad{i}", "data": base64.b64encode(b"not an image").decode()} for i in range(corrupt)]
    r = requests.post(f"{server['url']}/v1/sites/{site}/score", json={"images": body}, headers=auth(token), timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def prometheus_endpoints() -> list[str]:
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


def scrape() -> list:
    """Every sample of every node's endpoint, as prometheus_client parses them."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for url in prometheus_endpoints():
        text = requests.get(url, timeout=10).text
        samples += [s for family in text_string_to_metric_families(text) for s in family.samples]
    return samples


def total(samples, name: str, **labels) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels`` (over Ray's own tags too)."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for_metrics(expected: dict, what: str) -> list:
    """Scrape until every ``(name, labels) -> value`` of ``expected`` holds (``None``: at least 1, for a series
    that other tests add to as well); returns the last scrape."""
    wrong: dict = {}

    def holds(got: float, want) -> bool:
        return got >= 1 if want is None else got == want

    def scrape_matches() -> tuple[list] | None:  # a tuple: truthy even when the scrape is empty
        samples = scrape()
        got = {key: total(samples, key[0], **dict(key[1])) for key in expected}
        wrong.clear()
        wrong.update(
            {
                f"{name}{dict(labels)}": (got[(name, labels)], ">= 1" if want is None else want)
                for (name, labels), want in expected.items()
                if not holds(got[(name, labels)], want)
            }
        )
        return None if wrong else (samples,)

    return wait_until(
        scrape_matches,
        what,
        timeout=DEADLINE_S,
        every=0.5,
        detail=lambda: f"the endpoint still shows (got, expected) {wrong}",
    )[0]


def key(name: str, **labels) -> tuple:
    return name, tuple(sorted(labels.items()))


@pytest.fixture
def prefix() -> str:
    return "metrics-" + secrets.token_hex(3)


def test_the_endpoint_counts_requests_images_and_decisions_per_site(server, checkpoint, extractor, prefix):
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    a, token_a, _ = server["site"]("wood", 21, prefix=prefix)
    # a model with a wide review band, so that site b's queue fills
    wide = adapt(load_checkpoint(checkpoint), good("wood", 11, 3), extractor=extractor, z_review=50.0)
    b, token_b, _ = server["site"](model=wide, prefix=prefix)

    replies = {
        a: [
            score(server, a, token_a, good("wood", 400, 2) + [defective("wood", 401)]),
            score(server, a, token_a, good("wood", 402, 1)),
        ],
        b: [score(server, b, token_b, [defective("wood", s) for s in (403, 404)] + good("wood", 405, 1), corrupt=1)],
    }
    bad = requests.post(
        f"{server['url']}/v1/sites/{a}/score", json={"images": []}, headers=auth("bp_wrong"), timeout=30
    )
    assert bad.status_code == 401, bad.text
    refused = requests.post(
        f"{server['url']}/v1/sites/{b}/score",
        data=b"not an image",
        headers={**auth(token_b), "Content-Type": "image/png"},
        timeout=30,
    )
    assert 400 <= refused.status_code < 500, refused.text

    decisions = {
        site: {
            d: sum(r["decision"] == d for reply in rs for r in reply["results"])
            for d in ("normal", "anomalous", "review")
        }
        for site, rs in replies.items()
    }
    assert sum(decisions[a].values()) == 4 and sum(decisions[b].values()) == 3
    assert decisions[b]["review"] > 0, decisions
    pending = requests.get(f"{server['url']}/v1/sites/{b}/reviews", headers=auth(token_b), timeout=30)
    assert pending.status_code == 200 and len(pending.json()["items"]) == decisions[b]["review"]

    score_route = "/v1/sites/{site}/score"
    expected = {
        key("ray_bayprano_images_total", site=a, status="ok"): 4.0,
        key("ray_bayprano_images_total", site=a, status="error"): 0.0,
        key("ray_bayprano_images_total", site=b, status="ok"): 3.0,
        key("ray_bayprano_images_total", site=b, status="error"): 2.0,  # one alone in its request
        key("ray_bayprano_requests_total", site=a, endpoint=score_route, status="200"): 2.0,
        key("ray_bayprano_requests_total", site=b, endpoint=score_route, status="200"): 1.0,
        key("ray_bayprano_requests_total", site=b, endpoint=score_route, status=str(refused.status_code)): 1.0,
        key(
            "ray_bayprano_errors_total",
            endpoint=score_route,
            status=str(refused.status_code),
            code=refused.json()["code"],
        ): None,
        key("ray_bayprano_requests_total", site=b, endpoint="/v1/sites/{site}/reviews", status="200"): 1.0,
        key("ray_bayprano_model_loads_total", site=a): 1.0,
        key("ray_bayprano_model_loads_total", site=b): 1.0,
        key("ray_bayprano_review_queue_length", site=b): float(decisions[b]["review"]),
        **{
            key("ray_bayprano_decisions_total", site=site, decision=d): float(n)
            for site, counts in decisions.items()
            for d, n in counts.items()
        },
    }
    samples = wait_for_metrics(expected, "per-site counters after 3 score requests")
    from bayprano.serve.metrics import EXPORTED

    histogram = [name + suffix for name in EXPORTED for suffix in ("_bucket", "_count", "_sum")]
    assert {s.name for s in samples if s.name.startswith("ray_bayprano_")} <= set(EXPORTED) | set(histogram)
    # the refused token is counted as an error of the route, without a site
    assert total(samples, "ray_bayprano_errors_total", endpoint=score_route, status="401", code="invalid_token") >= 1
    assert total(samples, "ray_bayprano_requests_total", site="-", endpoint=score_route, status="401") >= 1
    assert not [s for s in samples if s.name.startswith("ray_bayprano_") and s.labels.get("site") == "bp_wrong"]
    # every scored request was timed under its route
    assert total(samples, "ray_bayprano_request_latency_seconds_count", endpoint=score_route) >= 4
    bounds = {s.labels["le"] for s in samples if s.name == "ray_bayprano_request_latency_seconds_bucket"}
    buckets = sorted(
        (float(le), total(samples, "ray_bayprano_request_latency_seconds_bucket", endpoint=score_route, le=le))
        for le in bounds
    )
    assert buckets[-1] == (
        float("inf"),
        total(samples, "ray_bayprano_request_latency_seconds_count", endpoint=score_route),
    )
    assert all(x[1] <= y[1] for x, y in zip(buckets, buckets[1:])), buckets

    item = pending.json()["items"][0]["id"]
    r = requests.post(
        f"{server['url']}/v1/sites/{b}/reviews/{item}", json={"label": "good"}, headers=auth(token_b), timeout=30
    )
    assert r.status_code == 200, r.text
    wait_for_metrics(
        {key("ray_bayprano_review_queue_length", site=b): float(decisions[b]["review"] - 1)},
        "the review queue after one label",
    )


def test_the_endpoint_counts_model_loads_and_evictions(server, prefix):
    capacity = server["cfg"].max_models_per_replica
    sites = [server["site"]("wood", 30 + i, prefix=prefix)[:2] for i in range(capacity + 1)]
    for site, token in sites:  # the last load evicts the least recently used model: the first site's
        score(server, site, token, good("wood", 410, 1))
    first = sites[0][0]
    expected = {key("ray_bayprano_model_loads_total", site=site): 1.0 for site, _ in sites}
    expected.update({key("ray_bayprano_model_evictions_total", site=site): 0.0 for site, _ in sites[1:]})
    expected[key("ray_bayprano_model_evictions_total", site=first)] = 1.0
    samples = wait_for_metrics(expected, f"{capacity + 1} sites on a replica that holds {capacity}")
    assert max(s.value for s in samples if s.name == "ray_bayprano_models_loaded") == capacity


def test_a_gateway_replica_reports_the_review_queues_when_it_starts_and_keeps_them(server, prefix):
    """A replica that starts (a restart, a scale-up) shows each site's queue before anything changes it: the
    items here reach the disk without a Gateway, so only a replica reading them at start can report them.
    The series stays while nothing changes: Ray's agent drops a gauge not set for two report intervals
    (1 s each in the test session), so every scrape for several seconds after must see it. Each Gateway
    replica reports every site's queue (the first application's recounts it too), so the queue is the
    maximum over the series, as an operator's ``max by (site)`` reads it."""
    import time

    from ray import serve

    from bayprano.serve.app import application
    from bayprano.serve.review import ReviewQueue

    site, _, _ = server["site"]("wood", 60, prefix=prefix)
    queue = ReviewQueue(server["registry"].root)
    for i, image in enumerate(good("wood", 61, 3)):
        queue.add(site, image, {"score": float(i), "decision": "review"})
    serve.run(application(server["cfg"]), name="metrics-restarted", route_prefix="/restarted")
    try:

        def queue_length() -> float:
            series = [
                s.value
                for s in scrape()
                if s.name == "ray_bayprano_review_queue_length" and s.labels.get("site") == site
            ]
            return max(series, default=0.0)

        wait_until(lambda: queue_length() == 3.0, "the queue of a site from a starting replica", timeout=DEADLINE_S)
        seen = []
        for _ in range(6):  # each scrape sees it, not one now and then
            time.sleep(1.0)
            seen.append(queue_length())
        assert seen == [3.0] * 6, f"the series came and went: {seen}"
    finally:
        serve.delete("metrics-restarted")
