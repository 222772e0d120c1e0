"""The Ray Serve application: adapted per-site models scored over HTTP, hardened for a plant's network.

Two deployments:

- ``Gateway``, the FastAPI ingress: authenticates the bearer token and its scope before it reads a byte
  of the body, applies the token's rate and concurrency limits, reads the body through one bounded
  reader, decodes the images in a bounded pool off the event loop with a deadline (``images.py``: an
  allow-list of formats, limits checked before and after decoding), resolves the site's live version
  from the registry's ``current`` pointer on every request and forwards the images to the model
  deployment under the multiplexed model id ``site@vNNNN``. A newly published version is therefore live
  for the next request, while requests already in flight finish on the version they were routed with.
- ``SiteModels``, the model deployment: one frozen backbone per replica, shared by up to
  ``max_models_per_replica`` site models held in Serve's multiplexed LRU cache; concurrent requests for the
  same model id are batched with ``@serve.batch`` (Serve splits a batch by model id), and a request or an
  image that fails there fails alone. It also runs /adapt: adaptation from the registry's
  meta-checkpoint, then publication of a candidate version (live at once only with ``?activate=true``).

What the gateway holds at once is bounded: request bodies by ``max_inflight_bytes``, decoded pixels by
``max_inflight_pixels`` (and per request by ``max_request_pixels``), decodes by ``max_concurrent_decodes``;
a request that cannot get its share before its deadline is answered 429 with ``Retry-After``.

Scoring several images reports each image in its own item (``status`` ok or error): a bad image never
fails the others; a request whose every image is bad is answered with the first one's 4xx.

The gateway also serves the review page (``GET /``, ``static/``): an inspector picks a site, drops an
image and sees its overlay, score, decision and uncertainty, and works through the site's review queue
(``review.py``), least certain first, marking each good or defective.

Every request is counted by site, route and status and timed, and scored images by decision, with Ray's
metrics API (``metrics.py``), for the Prometheus endpoint of each Ray node.

Every error is a JSON ``{code, message}``: a 4xx when the request is at fault, with messages that name
the request's own values (shortened) and never a server path or an exception's text. A bad token is 401
whether or not the site exists; another site's valid token is 403. Every response carries a
Content-Security-Policy, X-Frame-Options, X-Content-Type-Options and Referrer-Policy. ``/docs`` and
``/openapi.json`` are off unless ``docs`` is set. ``build_app(args)`` is the application builder for
``serve run`` / ``serve deploy``; ``application(cfg)`` builds it from a ``ServeConfig``.
"""


import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from bayprano.config import ServeConfig, load_yaml_config
from bayprano.platform.errors import BaypranoError
from bayprano.serve import images as imaging
from bayprano.serve.metrics import UNMATCHED, note_request, request_facts, serve_metrics
from bayprano.serve.registry import Registry, hash_token, parse_model_id
from bayprano.serve.review import ReviewQueue
from bayprano.serve.schemas import (
    AdaptRequest,
    AdaptResponse,
    Error,
    Health,
    ImageScore,
    LabelRequest,
    ReviewItem,
    ReviewList,
    ScoreRequest,
    ScoreResponse,
    SiteDetail,
    SiteList,
    SiteSummary,
    VersionOut,
)

STATIC = Path(__file__).with_name("static")
REVIEW_PAGE = STATIC / "review.html"
STATIC_FILES = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
MIN_SIDE = imaging.MIN_SIDE
MAX_NAME = 256  # characters of an image name
MAX_TOKEN = 512  # characters of a bearer token
MAX_LABEL_BYTES = 4096  # the body of a review label
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; style-src 'self' "
            "https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.+@-]+/)+[\w.+@-]*")
log = logging.getLogger("ray.serve")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ModelUnavailable(RuntimeError):
    """A site's version cannot be served; the message names the site and version, never a path."""


def show(value: Any, limit: int = 64) -> str:
    """A request's value quoted for a message: at most ``limit`` characters, control characters escaped."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def public(message: str) -> str:
    """A message without the server's file paths."""
    return _PATH.sub("<path>", message)


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    note_request(code=code)
    return JSONResponse(Error(code=code, message=message).model_dump(), status_code=status,
                        headers={**SECURITY_HEADERS, **(headers or {})})


def _finite(x: Any) -> Optional[float]:
    return float(x) if x is not None and np.isfinite(x) else None


_ERRORS = {status: {"model": Error} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)}

api = FastAPI(
    title="bayprano",
    version="1",
    description="Few-shot industrial anomaly detection: score images with a site's adapted model, adapt a new "
                "version from a few good images. Every site endpoint needs `Authorization: Bearer <site token>` "
                "with the endpoint's scope (score, review, adapt).",
    docs_url=None, redoc_url=None, openapi_url=None,
)
bearer = HTTPBearer(auto_error=False, description="the site's token (or the registry's admin token)")


class SecurityHeaders:
    """Adds the security headers to every response (one that sets its own CSP keeps it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers:
                        headers[key] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestMetrics:
    """Counts every request by site, route and status, and times it (``metrics.py``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        with request_facts() as facts:
            try:
                await self.app(scope, receive, send_and_note)
            except asyncio.CancelledError:  # the client went away
                status, facts["code"] = 499, "cancelled"
                raise
            except Exception:  # answered 500 by the outermost error handler
                status = 500
                facts.setdefault("code", "internal")
                raise
            finally:
                route = scope.get("route")
                serve_metrics().request(getattr(route, "path", None) or UNMATCHED, facts.get("site"), status,
                                        time.perf_counter() - start, facts.get("code"))


api.add_middleware(SecurityHeaders)
api.add_middleware(RequestMetrics)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return _error(exc.status, exc.code, exc.message, headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p)[:40] for p in first.get("loc", ()))
    return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, f"{request.method} {show(request.url.path)}: {exc.detail}")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path[:200])
    return _error(500, "internal", "internal server error; the request was not processed, the server keeps serving")


# ----------------------------------------------------------------------------------------- images


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{name}: data is not valid base64") from None


def _check_name(name: Optional[str], where: str) -> Optional[str]:
    if name is None:
        return None
    if len(name) > MAX_NAME:
        raise ApiError(400, "bad_name", f"{where}: name is {len(name)} characters, more than {MAX_NAME}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ApiError(400, "bad_name", f"{where}: name {show(name)} holds control characters")
    return name


def render_map(site_model, image: np.ndarray, result, mode: str) -> str:
    """The anomaly map of one result as base64 PNG: a heatmap over the image (``png``) or a binary mask of
    the pixels over the threshold (``mask``), at the image's own size."""
    from PIL import Image

    from bayprano.platform.data.imageio import encode_png
    from bayprano.platform.model.anomaly_map import heat_level, overlay

    h, w = image.shape[:2]
    amap = result.anomaly_map.astype(np.float32)
    if mode == "mask":
        mask = np.asarray(Image.fromarray(amap).resize((w, h), Image.BILINEAR)) >= result.map_threshold
        return base64.b64encode(encode_png(mask)).decode()
    level = heat_level(amap, result.score, result.threshold, site_model.model.dim, site_model.df)
    picture = overlay(image, level)
    return base64.b64encode(encode_png(picture)).decode()


class _Failed:
    """A batch item's failure, handed back through @serve.batch as a value (it sets results, not errors)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _version_out(record: dict) -> dict:
    """A version's record as the API shows it: without the server's paths and the operator's source."""
    return {k: v for k, v in record.items() if k not in ("path", "source")}


def _error_row(code: str, message: str) -> dict:
    return {"status": "error", "error": {"code": code, "message": message}}


# ----------------------------------------------------------------------------------- model replica


@serve.deployment(ray_actor_options={"num_cpus": 1})
class SiteModels:
    """Per-site models multiplexed over one backbone; batched scoring; adaptation and publication."""

    def __init__(self, settings: dict):
        cfg = ServeConfig.model_validate(settings)
        self.cfg = cfg
        self.registry = Registry(cfg.registry)
        self._extractors: dict[str, Any] = {}
        self._checkpoint: tuple[Path, float, Any] | None = None
        self._compute = asyncio.Lock()
        self._adapting = asyncio.Lock()
        self.loads: list[str] = []
        self._held: set[str] = set()  # model ids in Serve's LRU after our last load
        self.batch_sizes: list[int] = []

        async def load(mid: str):
            return await self._load(mid)

        # Built here rather than as a decorated method so that the LRU size comes from the config.
        self._load_fn = load
        self.get_model = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        self._score_batch.set_max_batch_size(cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        checkpoint = self.registry.meta.get("checkpoint")
        if checkpoint:  # build the backbone now, so that the replica is ready when it says so
            self._extractor(checkpoint["backbone"])

    def _extractor(self, backbone: str):
        from bayprano.platform.model.backbone import build_backbone

        if backbone not in self._extractors:
            self._extractors[backbone] = build_backbone(backbone, device=self.cfg.device)
        return self._extractors[backbone]

    async def _load(self, mid: str):
        from bayprano.platform.model.site import SiteModel

        site, version = parse_model_id(mid)

        def load():
            try:
                path = self.registry.check_version(site, version)
                backbone = json.loads((path / "meta.json").read_text())["backbone"]
                return SiteModel.load(path, extractor=self._extractor(backbone))
            except (BaypranoError, OSError, ValueError, KeyError) as exc:
                # the artifact on the server is at fault, not the request: not a 4xx
                log.error("model %s cannot be loaded: %s", mid, exc)
                reason = str(exc) if str(exc).startswith(f"site {site!r} version") else "its files are unreadable"
                raise ModelUnavailable(f"model {mid} cannot be loaded: {public(reason)}") from None

        wrapper = getattr(self._load_fn, "__serve_multiplex_wrapper", None)  # it evicts before it loads
        held = set(wrapper.models) if wrapper is not None else set()
        model = await asyncio.to_thread(load)
        self.loads.append(mid)
        metrics = serve_metrics()
        metrics.models_evicted(parse_model_id(m)[0] for m in self._held - held)
        self._held = held | {mid}
        metrics.model_loaded(site, len(self._held))
        return model

    def _run(self, model, images: list[np.ndarray], maps: bool):
        return model.score(images, maps=maps, batch_size=max(1, min(len(images), 32)))

    def _run_each(self, model, images: list[np.ndarray], maps: bool) -> list:
        """Score images one by one, so that one that fails is the only one to fail."""
        out = []
        for image in images:
            try:
                out.append(self._run(model, [image], maps)[0])
            except Exception as exc:
                log.warning("an image failed in scoring: %s", exc)
                out.append(_Failed(exc))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[str, list[np.ndarray], bool]]) -> list:
        self.batch_sizes.append(len(items))
        out: list = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (mid, _, _) in enumerate(items):
            groups.setdefault(mid, []).append(i)
        for mid, idx in groups.items():
            try:
                model = await self.get_model(mid)
            except Exception as exc:  # one model's failure must not fail the other models' requests
                for i in idx:
                    out[i] = _Failed(exc)
                continue
            maps = any(items[i][2] for i in idx)
            try:
                images = [im for i in idx for im in items[i][1]]
                results = await asyncio.to_thread(self._run, model, images, maps)
            except Exception:  # one bad image must not fail the other requests of the group: score them alone
                results = await asyncio.to_thread(self._run_each, model, images, maps)
            start = 0
            for i in idx:
                n = len(items[i][1])
                out[i] = (model, results[start : start + n])
                start += n
        return out

    async def score(self, mid: str, images: list[np.ndarray], map_mode: Optional[str],
                    deadline: Optional[float] = None) -> list[dict]:
        """One row per image: the result, or ``status: error`` for an image that failed in scoring. Map
        rendering stops at ``deadline`` (a time.time() value), once the gateway has given up."""
        model = await self.get_model(mid)  # a cold site loads here, outside the batch loop
        if self.cfg.batching:
            got = await self._score_batch((mid, images, map_mode is not None))
            if isinstance(got, _Failed):
                raise got.exc
            model, results = got
        else:
            async with self._compute:
                try:
                    results = await asyncio.to_thread(self._run, model, images, map_mode is not None)
                except Exception:
                    results = await asyncio.to_thread(self._run_each, model, images, map_mode is not None)

        def records():
            rows = []
            for image, r in zip(images, results):
                if isinstance(r, _Failed):
                    rows.append(_error_row("scoring_failed", "the model could not score this image"))
                    continue
                row = {"status": "ok", "score": _finite(r.score), "p_value": _finite(r.p_value),
                       "threshold": _finite(r.threshold), "decision": r.decision, "uncertainty": _finite(r.uncertainty)}
                if map_mode is not None:
                    if deadline is not None and time.time() > deadline:
                        raise TimeoutError("the request's deadline passed while its maps were rendered")
                    row["map"] = render_map(model, image, r, map_mode)
                    row["map_format"] = map_mode
                rows.append(row)
            return rows

        return await asyncio.to_thread(records) if map_mode is not None else records()

    async def adapt(self, site: str, images: list[np.ndarray], steps: Optional[int], target_fpr: float,
                    activate: bool = False, deadline: Optional[float] = None) -> dict:
        """Adapt from the registry's meta-checkpoint and publish the result: a candidate, or the live version
        with ``activate``; nothing is published once ``deadline`` (time.time()) has passed."""
        from bayprano.platform.meta.checkpoint import load_checkpoint
        from bayprano.platform.model.site import adapt

        def run() -> dict:
            path = self.registry.checkpoint_path()
            mtime = path.stat().st_mtime if path.is_file() else 0.0
            if self._checkpoint is None or self._checkpoint[:2] != (path, mtime):
                self._checkpoint = (path, mtime, load_checkpoint(path))
            ckpt = self._checkpoint[2]
            model = adapt(ckpt, images, steps=steps, target_fpr=target_fpr, extractor=self._extractor(ckpt.backbone))
            if deadline is not None and time.time() > deadline:
                raise TimeoutError("the request's deadline passed during adaptation; nothing was published")
            info = self.registry.publish(site, model, source="POST /v1/sites/{site}/adapt", make_current=activate,
                                         keep=self.cfg.max_versions_per_site)
            return {**info.record, "current": activate, "adapt_seconds": model.info["adapt_seconds"]}

        async with self._adapting:
            return await asyncio.to_thread(run)

    def stats(self) -> dict:
        wrapper = getattr(self._load_fn, "__serve_multiplex_wrapper", None)  # Serve's LRU, made on first use
        loaded = list(wrapper.models) if wrapper is not None else []
        return {"loads": list(self.loads), "loaded": loaded, "batch_sizes": list(self.batch_sizes)}

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        if not self.registry.root.is_dir():
            raise RuntimeError("the registry folder is gone")


# ------------------------------------------------------------------------------------------- gateway


class Budget:
    """A quantity (bytes, pixels) that requests reserve and give back; a reservation waits for room until
    its deadline."""

    def __init__(self, capacity: int, what: str):
        self.capacity, self.what, self.used = int(capacity), what, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, amount: int, deadline: float) -> AsyncIterator[None]:
        amount = int(amount)
        async with self._changed:
            while self.used + amount > self.capacity:
                left = deadline - time.monotonic()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
                except asyncio.TimeoutError:
                    raise ApiError(429, "busy", f"the server is holding its limit of {self.what}; retry later",
                                   {"Retry-After": "1"}) from None
            self.used += amount
        try:
            yield
        finally:
            async with self._changed:
                self.used -= amount
                self._changed.notify_all()


class TokenLimits:
    """Per-token token-bucket rate limit and concurrency limit (per gateway replica)."""

    def __init__(self, rate: float, burst: int, concurrency: int):
        self.rate, self.burst, self.concurrency = float(rate), int(burst), int(concurrency)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._active: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: str):
        now = time.monotonic()
        level, last = self._buckets.get(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - last) * self.rate)
        if level < 1.0:
            self._buckets[key] = (level, now)
            wait = math.ceil((1.0 - level) / self.rate)
            raise ApiError(429, "rate_limited", f"more than {self.rate:g} requests per second with this token; "
                                                f"retry in {wait} s", {"Retry-After": str(wait)})
        if self._active.get(key, 0) >= self.concurrency:
            self._buckets[key] = (level, now)
            raise ApiError(429, "too_many_concurrent", f"more than {self.concurrency} requests at once with this "
                                                       "token; retry when one has finished", {"Retry-After": "1"})
        self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > 100_000:  # forget idle tokens
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60 or k in self._active}
        self._active[key] = self._active.get(key, 0) + 1
        try:
            yield
        finally:
            self._active[key] -= 1
            if not self._active[key]:
                del self._active[key]


_IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    },
}
_ADAPT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
            "steps": {"type": "integer"}, "target_fpr": {"type": "number"}}}},
        "application/json": {"schema": {"$ref": "#/components/schemas/AdaptRequest"}},
    },
}
_LABEL_BODY = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/"
                                                                                     "LabelRequest"}}}}


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Gateway:
    def __init__(self, models: DeploymentHandle, settings: dict):
        self.cfg = cfg = ServeConfig.model_validate(settings)
        self.registry = Registry(cfg.registry)
        self.reviews = ReviewQueue(cfg.registry, max_items=cfg.max_review_items_per_site,
                                   image_side=cfg.review_image_side)
        self.models = models
        imaging.set_pixel_limit(cfg.max_image_pixels)
        self._decoder = ThreadPoolExecutor(max_workers=cfg.max_concurrent_decodes, thread_name_prefix="decode")
        self._bytes = Budget(cfg.max_inflight_bytes, "request bytes in memory")
        self._pixels = Budget(cfg.max_inflight_pixels, "decoded pixels in memory")
        self._limits = TokenLimits(cfg.rate_limit_per_s, cfg.rate_burst, cfg.max_concurrent_per_token)

    # ------------------------------------------------------------------------------ authentication

    def _authorize(self, site: str, credentials: Optional[HTTPAuthorizationCredentials], scope: str) -> str:
        """Checks the token for ``site`` and ``scope`` before anything is read; returns the key its limits are
        kept under. A token that is no site's is 401 whether the site exists or not; another site's is 403."""
        token = credentials.credentials if credentials is not None else None
        if not token:
            raise ApiError(401, "missing_token", "missing bearer token (send 'Authorization: Bearer <site token>')")
        if len(token) > MAX_TOKEN:
            raise ApiError(401, "invalid_token", "the bearer token is not valid")
        if self.registry.check_admin_token(token):
            if not self.registry.has_site(site):
                raise ApiError(404, "unknown_site", f"unknown site {show(site)}")
            return "admin"
        scopes = self.registry.token_scopes(site, token)
        if scopes is None:
            if self.registry.site_of_token(token) is not None:
                raise ApiError(403, "forbidden", f"the token is not valid for site {show(site)}")
            raise ApiError(401, "invalid_token", "the bearer token is not valid")
        if scope not in scopes:
            raise ApiError(403, "missing_scope", f"the token of site {show(site)} does not have the {scope!r} scope "
                                                 f"(it has: {', '.join(scopes)})")
        return hash_token(token)

    def _authorize_admin(self, credentials: Optional[HTTPAuthorizationCredentials]) -> None:
        if credentials is None or not credentials.credentials:
            raise ApiError(401, "missing_token", "missing bearer token (send 'Authorization: Bearer <admin token>')")
        if not self.registry.check_admin_token(credentials.credentials[:MAX_TOKEN + 1]):
            if self.registry.site_of_token(credentials.credentials[:MAX_TOKEN + 1]) is not None:
                raise ApiError(403, "forbidden", "listing sites needs the registry's admin token")
            raise ApiError(401, "invalid_token", "the bearer token is not valid")

    @contextlib.asynccontextmanager
    async def _guard(self, site: str, credentials, scope: str) -> AsyncIterator[float]:
        """Authorization, then the token's limits for the duration of the request; yields its deadline
        (time.monotonic())."""
        key = self._authorize(site, credentials, scope)
        note_request(site=site)
        with self._limits.hold(key):
            yield time.monotonic() + self.cfg.request_timeout_s

    # ------------------------------------------------------------------------------------- reading

    @contextlib.asynccontextmanager
    async def _body(self, request: Request, limit: int, deadline: float) -> AsyncIterator[bytes]:
        """The request's body, read only up to ``limit`` bytes, held within the gateway's byte budget. Every
        endpoint with a body reads it here, after authorization."""
        length = request.headers.get("content-length")
        declared = None
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                raise ApiError(400, "bad_request", f"Content-Length {show(length)} is not a number")
            declared = int(length)
            if declared > limit:
                raise ApiError(413, "request_too_large", f"request body is {declared} bytes, more than the limit of "
                                                         f"{limit} bytes")
        async with self._bytes.hold(limit if declared is None else declared, deadline):
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "request_too_large", f"request body is more than the limit of {limit} bytes")
                chunks.append(chunk)
            yield b"".join(chunks)

    async def _parse(self, request: Request, body: bytes, what: str) -> tuple[list, dict]:
        """The uploads of a body (multipart files, JSON base64 or one raw image) as ``(name, bytes or
        ApiError)`` and the other form or JSON fields."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        cfg = self.cfg
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw: list[tuple[Optional[str], Any]] = []
        fields: dict = {}
        if ctype == "multipart/form-data":
            async def stream():
                yield body

            try:
                form = await MultiPartParser(request.headers, stream(), max_files=cfg.max_images_per_request + 1,
                                             max_fields=20, max_part_size=cfg.max_request_bytes).parse()
            except MultiPartException as exc:
                raise ApiError(400, "bad_multipart", f"multipart body cannot be read: {public(exc.message)[:200]}") \
                    from None
            except Exception:
                raise ApiError(400, "bad_multipart", "multipart body cannot be read") from None
            try:
                for key, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        name = value.filename or key
                        try:
                            raw.append((_check_name(name, "file"), await value.read()))
                        except ApiError as exc:
                            raw.append((None, exc))
                    else:
                        _check_name(key, "form field")
                        fields[key] = value
            finally:
                await form.close()
        elif ctype == "application/json":
            model_cls = ScoreRequest if what == "score" else AdaptRequest
            try:
                parsed = await asyncio.to_thread(model_cls.model_validate_json, body)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p)[:40] for p in first.get("loc", ())) or "body"
                raise ApiError(422, "invalid_request", f"JSON body: {where}: {first.get('msg')}") from None
            fields = parsed.model_dump(exclude={"images"})
            for i, item in enumerate(parsed.images or []):
                try:
                    name = _check_name(item.name, f"images[{i}]")
                    raw.append((name, _b64(item.data, f"images[{i}]" if name is None else show(name))))
                except ApiError as exc:
                    raw.append((None, exc))
        elif ctype.startswith("image/") and what == "score":
            raw.append((None, body))
        else:
            accepted = "multipart/form-data or application/json" + (" or image/*" if what == "score" else "")
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {show(ctype) if ctype else 'missing'} is not accepted; send {accepted}")
        if len(raw) > cfg.max_images_per_request:
            raise ApiError(413, "too_many_images", f"{len(raw)} images in one request, more than the limit of "
                                                   f"{cfg.max_images_per_request}")
        return raw, fields

    @contextlib.asynccontextmanager
    async def _decode(self, raw: list, deadline: float) -> AsyncIterator[list]:
        """Probe and decode the uploads in the decode pool, within the request's pixel budget and the decode
        deadline; yields one item per upload: an RGB array, or the ApiError of that upload."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        decode_deadline = min(deadline, time.monotonic() + cfg.decode_timeout_s)
        cancel = threading.Event()

        async def in_pool(fn, *args):
            future = loop.run_in_executor(self._decoder, fn, *args)
            try:
                return await asyncio.wait_for(future, timeout=max(0.0, decode_deadline - time.monotonic()))
            except asyncio.TimeoutError:
                cancel.set()  # a running decode stops at its next read; a queued one never starts
                raise ApiError(422, "decode_timeout", f"the images could not be decoded within "
                                                      f"{cfg.decode_timeout_s:g} s") from None

        def label(i: int, name: Optional[str]) -> str:
            return f"image {i}" if name is None else show(name)

        def probe_all():
            out = []
            for i, (name, data) in enumerate(raw):
                if isinstance(data, ApiError):
                    out.append(data)
                    continue
                try:
                    out.append(imaging.probe(data, label(i, name), cfg.max_image_pixels, cfg.max_jpeg_scans))
                except imaging.ImageRejected as exc:
                    out.append(ApiError(exc.status, exc.code, exc.message))
            return out

        probes = await in_pool(probe_all)
        total = sum(p.pixels for p in probes if isinstance(p, imaging.Probe))
        if total > cfg.max_request_pixels:
            raise ApiError(413, "request_too_large", f"the request's images hold {total} pixels, more than the limit "
                                                     f"of {cfg.max_request_pixels} pixels per request")

        def decode_all():
            out = []
            for i, ((name, data), p) in enumerate(zip(raw, probes)):
                if not isinstance(p, imaging.Probe):
                    out.append(p)
                    continue
                try:
                    out.append(imaging.decode(data, label(i, name), p, cfg.max_image_pixels, cancel))
                except imaging.ImageRejected as exc:
                    out.append(ApiError(exc.status, exc.code, exc.message))
            return out

        async with self._pixels.hold(total, decode_deadline):
            try:
                decoded = await in_pool(decode_all)
            except imaging.DecodeCancelled:
                raise ApiError(422, "decode_timeout", f"the images could not be decoded within "
                                                      f"{cfg.decode_timeout_s:g} s") from None
            yield decoded

    def _live(self, site: str) -> tuple[str, str]:
        mid = self.registry.current_model_id(site)
        if mid is None:
            raise ApiError(409, "no_model", f"site {show(site)} has no published model yet (POST "
                                            "/v1/sites/{site}/adapt, then promote it)")
        return mid, parse_model_id(mid)[1]

    async def _call(self, response, what: str, deadline: float):
        try:
            return await asyncio.wait_for(response, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, "timeout", f"{what} took longer than {self.cfg.request_timeout_s:g}s") from None
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # a replica's exception arrives wrapped in a RayTaskError
            if isinstance(cause, ModelUnavailable):
                raise ApiError(503, "model_unavailable", str(cause)) from None
            if isinstance(cause, BaypranoError):
                raise ApiError(422, "unprocessable", public(str(cause))[:300]) from None
            log.error("%s failed on the model replica: %s", what, cause)
            raise ApiError(503, "model_unavailable", f"{what} failed on the model replica") from None

    # ------------------------------------------------------------------------------------ endpoints

    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def review_page(self):
        return HTMLResponse(REVIEW_PAGE.read_text())

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        if name not in STATIC_FILES:
            raise ApiError(404, "not_found", f"no static file {show(name)}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        if not self.cfg.docs:
            raise ApiError(404, "not_found", "the API description is off on this server (serve setting docs)")
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        if not self.cfg.docs:
            raise ApiError(404, "not_found", "the API docs are off on this server (serve setting docs)")
        page = get_swagger_ui_html(openapi_url="openapi.json", title="bayprano API")
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @api.post("/v1/sites/{site}/score", response_model=ScoreResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _IMAGE_BODY},
              summary="Score one or more images with the site's live model (scope: score)")
    async def score(self, site: str, request: Request,
                    map_mode: Optional[Literal["png", "mask"]] = Query(
                        None, alias="map", description="png: heatmap overlay; mask: binary mask at the threshold"),
                    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ScoreResponse:
        start = time.perf_counter()
        async with self._guard(site, credentials, "score") as deadline:
            async with self._body(request, self.cfg.max_request_bytes, deadline) as body:
                raw, _ = await self._parse(request, body, "score")
                if not raw:
                    raise ApiError(400, "no_images", "the request holds no image")
                names = [name for name, _ in raw]
                mid, version = self._live(site)
                async with self._decode(raw, deadline) as decoded:
                    good = [i for i, d in enumerate(decoded) if not isinstance(d, ApiError)]
                    if not good:
                        serve_metrics().scored(site, [{"status": "error"}] * len(decoded))
                        raise decoded[0]
                    images = [decoded[i] for i in good]
                    rows = await self._call(
                        self.models.options(multiplexed_model_id=mid).score.remote(
                            mid, images, map_mode, time.time() + max(0.0, deadline - time.monotonic())),
                        f"scoring on site {show(site)}", deadline)
                    out: list[dict] = [_error_row(d.code, d.message) if isinstance(d, ApiError) else {}
                                       for d in decoded]
                    queued = False
                    for i, image, row in zip(good, images, rows):
                        out[i] = row
                        if row.get("decision") == "review":
                            await asyncio.to_thread(self.reviews.add, site, image, {**row, "model_version": version})
                            queued = True
                    serve_metrics().scored(site, out)
                    if queued:
                        await self._note_review_queue(site)
        latency = (time.perf_counter() - start) * 1000
        return ScoreResponse(site=site, model_version=version, results=[
            ImageScore(name=name, model_version=version, latency_ms=latency, **row) for name, row in zip(names, out)])

    @api.post("/v1/sites/{site}/adapt", response_model=AdaptResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _ADAPT_BODY},
              summary="Adapt a new version from K good images and publish it as a candidate (scope: adapt)")
    async def adapt(self, site: str, request: Request,
                    activate: bool = Query(False, description="make the new version live at once"),
                    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> AdaptResponse:
        async with self._guard(site, credentials, "adapt") as deadline:
            async with self._body(request, self.cfg.max_request_bytes, deadline) as body:
                raw, fields = await self._parse(request, body, "adapt")
                try:
                    options = AdaptRequest.model_validate({k: v for k, v in fields.items()
                                                           if k in ("steps", "target_fpr", "folder")})
                except ValidationError as exc:
                    first = exc.errors(include_url=False)[0]
                    raise ApiError(422, "invalid_request", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") \
                        from None
                if options.folder is not None:
                    if raw:
                        raise ApiError(400, "bad_request", "give either images or a folder, not both")
                    raw = self._folder_uploads(site, options.folder)
                if not raw:
                    raise ApiError(400, "no_images", "adaptation needs at least one good image (files, images or "
                                                     "folder)")
                try:
                    self.registry.checkpoint_path()
                except BaypranoError:
                    raise ApiError(409, "no_checkpoint", "the registry names no meta-checkpoint to adapt from") \
                        from None
                async with self._decode(raw, deadline) as decoded:
                    bad = [d for d in decoded if isinstance(d, ApiError)]
                    if bad:
                        raise bad[0]
                    record = await self._call(self.models.adapt.remote(
                        site, decoded, options.steps, options.target_fpr, activate,
                        time.time() + max(0.0, deadline - time.monotonic())), f"adaptation of site {show(site)}",
                        deadline)
        seconds = record.pop("adapt_seconds")
        return AdaptResponse(site=site, version=VersionOut(**_version_out(record)), adapt_seconds=seconds)

    def _folder_uploads(self, site: str, folder: str) -> list:
        from bayprano.platform.data.imageio import is_image_file

        _check_name(folder, "folder")
        if self.cfg.site_storage is None:
            raise ApiError(400, "no_site_storage", "this server has no site storage configured (site_storage); "
                                                   "upload the images instead")
        base = (self.cfg.site_storage / site).resolve()
        path = (base / folder).resolve()
        if path != base and base not in path.parents:
            raise ApiError(400, "bad_folder", f"folder {show(folder)} is outside the site's storage")
        if not path.is_dir():
            raise ApiError(404, "no_such_folder", f"folder {show(folder)} does not exist in the site's storage")
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
        if len(files) > self.cfg.max_images_per_request:
            raise ApiError(413, "too_many_images", f"folder {show(folder)} holds {len(files)} images, more than the "
                                                   f"limit of {self.cfg.max_images_per_request}")
        if sum(p.stat().st_size for p in files) > self.cfg.max_request_bytes:
            raise ApiError(413, "request_too_large", f"folder {show(folder)} holds more than the limit of "
                                                     f"{self.cfg.max_request_bytes} bytes")
        return [(f"{folder}/{p.name}", p.read_bytes()) for p in files]

    @api.get("/v1/sites", response_model=SiteList, responses=_ERRORS, summary="Every site (admin token)")
    async def list_sites(self, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> SiteList:
        self._authorize_admin(credentials)
        out = []
        for site in self.registry.sites():
            cur = self.registry.current(site)
            versions = self.registry.versions(site)
            threshold = next((v.record.get("threshold") for v in versions if v.version == cur), None)
            out.append(SiteSummary(site=site, current=cur, versions=len(versions), threshold=threshold))
        return SiteList(sites=out)

    @api.get("/v1/sites/{site}", response_model=SiteDetail, responses=_ERRORS,
             summary="A site's versions, thresholds and metrics (scope: score)")
    async def site_detail(self, site: str,
                          credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> SiteDetail:
        async with self._guard(site, credentials, "score"):
            info = self.registry.describe(site)
        return SiteDetail(site=site, created=info["created"], current=info["current"],
                          versions=[VersionOut(**_version_out(v)) for v in info["versions"]])

    @api.get("/v1/sites/{site}/reviews", response_model=ReviewList, responses=_ERRORS,
             summary="Images the site's model sent to review, least certain first (scope: review)")
    async def reviews(self, site: str, pending: bool = Query(True, description="only the unlabelled ones"),
                      limit: int = Query(50, ge=1, le=500),
                      credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ReviewList:
        async with self._guard(site, credentials, "review"):
            def items() -> list[ReviewItem]:
                return [ReviewItem(**item, thumbnail=base64.b64encode(self.reviews.thumbnail_png(site, item["id"]))
                                   .decode("ascii")) for item in self.reviews.list(site, pending=pending, limit=limit)]

            listed = ReviewList(site=site, items=await asyncio.to_thread(items))
            await self._note_review_queue(site)
            return listed

    @api.post("/v1/sites/{site}/reviews/{item_id}", response_model=ReviewItem, responses=_ERRORS,
              openapi_extra={"requestBody": _LABEL_BODY},
              summary="Mark a review item as good or defective, kept as the site's labelled data (scope: review)")
    async def label_review(self, site: str, item_id: str, request: Request,
                           credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ReviewItem:
        # The body is a plain Request, not a pydantic parameter: FastAPI would read and parse it before the token
        # is checked.
        async with self._guard(site, credentials, "review") as deadline:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise ApiError(415, "unsupported_media_type",
                               f"Content-Type {show(ctype) if ctype else 'missing'} is not accepted; send "
                               "application/json")
            async with self._body(request, MAX_LABEL_BYTES, deadline) as body:
                try:
                    label = LabelRequest.model_validate_json(body).label
                except ValidationError as exc:
                    first = exc.errors(include_url=False)[0]
                    where = ".".join(str(p)[:40] for p in first.get("loc", ())) or "body"
                    raise ApiError(422, "invalid_request", f"JSON body: {where}: {first.get('msg')}") from None
            try:
                item = ReviewItem(**await asyncio.to_thread(self.reviews.label, site, item_id, label))
            except BaypranoError:
                raise ApiError(404, "unknown_review_item", f"site {show(site)} has no review item "
                                                           f"{show(item_id, 40)}") from None
            await self._note_review_queue(site)
            return item

    async def _note_review_queue(self, site: str) -> None:
        serve_metrics().review_queue_length(site, await asyncio.to_thread(self.reviews.pending_count, site))

    @api.get("/healthz", response_model=Health, summary="The gateway is up")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, responses={503: {"model": Health}},
             summary="Ready to serve: the registry is readable and a model replica answers")
    async def readyz(self):
        try:
            await asyncio.to_thread(Registry, self.cfg.registry)
            await asyncio.wait_for(self.models.ready.remote(), timeout=5)
        except Exception as exc:
            log.warning("not ready: %s", exc)
            return JSONResponse(Health(status="not ready").model_dump(), status_code=503, headers=SECURITY_HEADERS)
        return Health(status="ok")


# ------------------------------------------------------------------------------------------ builders


def application(cfg: ServeConfig):
    """The bound application (ingress + model deployment) for a ServeConfig."""
    settings = cfg.model_dump(mode="json")
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.autoscaling:
        options["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    models = SiteModels.options(**options).bind(settings)
    # The ingress only awaits the model replicas: it must let through as many requests as they can batch.
    return Gateway.options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.max_ongoing_requests,
                           ray_actor_options={"num_cpus": cfg.ingress_num_cpus}).bind(models, settings)


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` holds ServeConfig keys, and
    optionally ``config``, a YAML file of them that the other keys override."""
    args = {str(k).replace("-", "_"): v for k, v in dict(args or {}).items()}
    config = args.pop("config", None)
    cfg = load_yaml_config(config, ServeConfig, args)
    Registry(cfg.registry)  # refuse a missing registry before anything is deployed
    return application(cfg)
