"""The serving application's own metrics, for an operator's Prometheus and Grafana.

Defined with Ray's metrics API (``ray.util.metrics``), so every replica reports them to its node's
metrics agent, and they appear on the node's Prometheus endpoint (``ray start --metrics-export-port``)
beside Ray's and Serve's own metrics, prefixed ``ray_`` and, for counters, suffixed ``_total``:

=======================================  =========  ==============================================
exported name                            tags       counts
=======================================  =========  ==============================================
``ray_bayprano_requests_total``          site,      every answered request (``site`` is ``-`` until
                                         endpoint,  the request's token was accepted for the site,
                                         status     so that unknown names never become series)
``ray_bayprano_errors_total``            endpoint,  every answer with status >= 400, with its JSON
                                         status,    error ``code`` (``rate_limited``, ``busy``, ...)
                                         code
``ray_bayprano_request_latency_seconds`` endpoint   histogram of the gateway's time per request
``ray_bayprano_images_total``            site,      images of score requests: ``ok`` (scored) or
                                         status     ``error`` (refused or failed alone)
``ray_bayprano_decisions_total``         site,      decisions on scored images: ``normal``,
                                         decision   ``anomalous`` or ``review``
``ray_bayprano_model_loads_total``       site       site models loaded into a model replica
``ray_bayprano_model_evictions_total``   site       site models dropped from a replica's LRU cache
``ray_bayprano_models_loaded``           (replica)  site models a replica holds now
``ray_bayprano_review_queue_length``     site       unlabelled review items of the site
=======================================  =========  ==============================================

``endpoint`` is the route's template (``/v1/sites/{site}/score``), never the raw path, and
``unmatched`` for a path that is no route. Ray adds its own tags (``WorkerId``, ``NodeAddress``, ...):
sum over them for a cluster-wide count of a counter. Each Gateway replica reports every site's review
queue (recounted from the registry when it starts, on every change it makes and every
``REVIEW_RECOUNT_S``), so take the ``max`` by site, not the sum. Histograms' ``_sum`` is Ray's estimate
from bucket midpoints; use the buckets and ``_count``. The metric objects are made once per process, on
first use.

Ray's metrics agent drops a gauge's series when the process has not set it for two report intervals,
so this process sets every gauge again, at its last value, twice per interval until it changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Iterable, Iterator, Optional

from ray.util.metrics import Counter, Gauge, Histogram

PREFIX = "bayprano_"
NO_SITE = "-"
UNMATCHED = "unmatched"
DECISIONS = ("normal", "anomalous", "review")
REVIEW_RECOUNT_S = 30.0  # how often a Gateway replica recounts every site's review queue from the registry
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
# the names on the Prometheus endpoint (a histogram's series add _bucket, _count and _sum)
EXPORTED = (
    "ray_bayprano_requests_total",
    "ray_bayprano_errors_total",
    "ray_bayprano_request_latency_seconds",
    "ray_bayprano_images_total",
    "ray_bayprano_decisions_total",
    "ray_bayprano_model_loads_total",
    "ray_bayprano_model_evictions_total",
    "ray_bayprano_models_loaded",
    "ray_bayprano_review_queue_length",
)


class ServeMetrics:
    """The application's metric objects and the few ways the application records into them."""

    def __init__(self) -> None:
        self.requests = Counter(
            PREFIX + "requests",
            description="Requests answered by the gateway.",
            tag_keys=("site", "endpoint", "status"),
        )
        self.errors = Counter(
            PREFIX + "errors",
            description="Requests answered with an error status.",
            tag_keys=("endpoint", "status", "code"),
        )
        self.latency = Histogram(
            PREFIX + "request_latency_seconds",
            description="Gateway time per request.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("endpoint",),
        )
        self.images = Counter(
            PREFIX + "images", description="Images in score requests, by outcome.", tag_keys=("site", "status")
        )
        self.decisions = Counter(
            PREFIX + "decisions", description="Decisions on scored images.", tag_keys=("site", "decision")
        )
        self.model_loads = Counter(
            PREFIX + "model_loads", description="Site models loaded into a model replica.", tag_keys=("site",)
        )
        self.model_evictions = Counter(
            PREFIX + "model_evictions",
            description="Site models dropped from a model replica's LRU cache.",
            tag_keys=("site",),
        )
        self.models_loaded = Gauge(PREFIX + "models_loaded", description="Site models held by this model replica.")
        self.review_queue = Gauge(
            PREFIX + "review_queue_length", description="Unlabelled review items of a site.", tag_keys=("site",)
        )
        self._gauge_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauge_lock = threading.Lock()
        self._refresher: Optional[threading.Thread] = None

    def _set_gauge(self, gauge: Gauge, value: float, tags: Optional[dict[str, str]] = None) -> None:
        """Set ``gauge`` and keep its series alive at that value until the next set."""
        tags = tags or {}
        gauge.set(value, tags=tags)
        with self._gauge_lock:
            self._gauge_values[(gauge.info["name"], tuple(sorted(tags.items())))] = float(value)
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_gauges, name="gauge-refresh", daemon=True)
                self._refresher.start()

    def forget_gauge(self, gauge: Gauge, tags: Optional[dict[str, str]] = None) -> None:
        """Stop refreshing a series (a removed site's): Ray's agent drops it two report intervals later."""
        with self._gauge_lock:
            self._gauge_values.pop((gauge.info["name"], tuple(sorted((tags or {}).items()))), None)

    def _refresh_gauges(self) -> None:
        import ray

        gauges = {g.info["name"]: g for g in (self.models_loaded, self.review_queue)}
        every = max(int(ray._config.metrics_report_interval_ms()), 1000) / 2000.0
        while True:
            time.sleep(every)
            with self._gauge_lock:
                values = list(self._gauge_values.items())
            for (name, tags), value in values:
                gauges[name].set(value, tags=dict(tags))

    def request(
        self, endpoint: str, site: Optional[str], status: int, seconds: float, code: Optional[str] = None
    ) -> None:
        status_tag = str(int(status))
        self.requests.inc(1, tags={"site": site or NO_SITE, "endpoint": endpoint, "status": status_tag})
        self.latency.observe(max(0.0, float(seconds)), tags={"endpoint": endpoint})
        if status >= 400:
            self.errors.inc(1, tags={"endpoint": endpoint, "status": status_tag, "code": code or "unknown"})

    def scored(self, site: str, rows: Iterable[dict]) -> None:
        """One score request's rows: each ``status`` ok (with its decision) or error."""
        ok, failed, decisions = 0, 0, dict.fromkeys(DECISIONS, 0)
        for row in rows:
            if row.get("status") == "ok":
                ok += 1
                if row.get("decision") in decisions:
                    decisions[row["decision"]] += 1
            else:
                failed += 1
        for status, n in (("ok", ok), ("error", failed)):
            if n:
                self.images.inc(n, tags={"site": site, "status": status})
        for decision, n in decisions.items():
            if n:
                self.decisions.inc(n, tags={"site": site, "decision": decision})

    def model_loaded(self, site: str, held: int) -> None:
        self.model_loads.inc(1, tags={"site": site})
        self._set_gauge(self.models_loaded, held)

    def models_evicted(self, sites: Iterable[str]) -> None:
        for site in sites:
            self.model_evictions.inc(1, tags={"site": site})

    def review_queue_length(self, site: str, pending: int) -> None:
        self._set_gauge(self.review_queue, int(pending), {"site": site})

    def review_queue_gone(self, site: str) -> None:
        self.forget_gauge(self.review_queue, {"site": site})


_metrics: Optional[ServeMetrics] = None
_lock = threading.Lock()


def serve_metrics() -> ServeMetrics:
    """This process's metric objects (made on the first call, in the replica that records them)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = ServeMetrics()
        return _metrics


# What a request's handlers learn for its metrics: the site once its token is accepted, the error code.
_request_facts: contextvars.ContextVar[dict] = contextvars.ContextVar("bayprano_request_facts")


@contextlib.contextmanager
def request_facts() -> Iterator[dict]:
    """The facts of the request handled inside the block (``note_request`` fills them)."""
    facts: dict = {}
    token = _request_facts.set(facts)
    try:
        yield facts
    finally:
        _request_facts.reset(token)


def note_request(**facts) -> None:
    """Record facts about the request being handled (a no-op outside ``request_facts``)."""
    current = _request_facts.get(None)
    if current is not None:
        current.update(facts)
