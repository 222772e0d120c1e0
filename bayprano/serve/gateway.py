"""The ingress deployment: every HTTP route of the API and of the review page, behind authentication and limits.

``Gateway`` is the FastAPI ingress (routes declared on ``api.api``) that ``app.application`` deploys. A route
first checks the bearer token and its scope (``_guard``: a token that is no site's is 401 whether or not the
site exists, another site's valid token is 403, a missing scope is 403) and holds the token's rate and
concurrency limits (``limits.py``); only then does it read the body, through ``uploads.Uploads`` (bounded
reading, parsing, decoding off the event loop with a deadline). Scoring resolves the site's live version
from the registry's ``current`` pointer on every request and forwards the decoded images to the model
deployment (``models.py``) under the multiplexed model id ``site@vNNNN``; each image gets its own reply item,
and images sent to review are kept in the site's review queue (``review.py``). The review page and its
static files, the API docs (only with ``docs``), health and readiness are served here too.
"""

import asyncio
import base64
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional

from fastapi import Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from bayprano.config import ServeConfig
from bayprano.platform.errors import BaypranoError
from bayprano.serve.api import (
    ADAPT_BODY,
    DOCS_CSP,
    ERROR_RESPONSES,
    IMAGE_BODY,
    LABEL_BODY,
    SECURITY_HEADERS,
    ApiError,
    api,
    bearer,
    public,
    show,
)
from bayprano.serve.limits import TokenLimits
from bayprano.serve.metrics import REVIEW_RECOUNT_S, note_request, serve_metrics
from bayprano.serve.models import ModelUnavailable, error_row
from bayprano.serve.registry import Registry, hash_token, parse_model_id
from bayprano.serve.review import ReviewQueue
from bayprano.serve.schemas import (
    AdaptRequest,
    AdaptResponse,
    Health,
    ImageScore,
    LabelRequest,
    ReviewItem,
    ReviewList,
    ScoreResponse,
    SiteDetail,
    SiteList,
    SiteSummary,
    VersionOut,
)
from bayprano.serve.uploads import Uploads, content_type, first_error

STATIC = Path(__file__).with_name("static")
REVIEW_PAGE = STATIC / "review.html"
STATIC_FILES = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
MAX_TOKEN = 512  # characters of a bearer token
MAX_LABEL_BYTES = 4096  # the body of a review label
log = logging.getLogger("ray.serve")


def version_out(record: dict) -> dict:
    """A version's record as the API shows it: without the server's paths and the operator's source."""
    return {k: v for k, v in record.items() if k not in ("path", "source")}


@serve.ingress(api)
class Gateway:
    """The ingress: authentication, limits, reading, routing to the site's live model (deployed by
    ``app.application``)."""

    def __init__(self, models: DeploymentHandle, settings: dict):
        self.cfg = cfg = ServeConfig.model_validate(settings)
        self.registry = Registry(cfg.registry)
        self.review_queue = ReviewQueue(
            cfg.registry, max_items=cfg.max_review_items_per_site, image_side=cfg.review_image_side
        )
        self.models = models
        self.uploads = Uploads(cfg)
        self._limits = TokenLimits(cfg.rate_limit_per_s, cfg.rate_burst, cfg.max_concurrent_per_token)
        self._queue_count_lock = threading.Lock()
        # A new replica reports every site's queue from the start, not only after the next change it makes.
        threading.Thread(target=self._recount_review_queues, name="review-queue-recount", daemon=True).start()

    def _recount_review_queues(self) -> None:
        counted: set[str] = set()
        while True:
            sites = set(self.registry.sites())
            for site in sorted(counted - sites):
                serve_metrics().review_queue_gone(site)
            for site in sorted(sites):
                try:
                    self._count_review_queue(site)
                except (BaypranoError, OSError, ValueError) as exc:  # removed, or an item rewritten meanwhile
                    log.warning("review queue of site %s not counted: %s", site, exc)
            counted = sites
            time.sleep(REVIEW_RECOUNT_S)

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
            raise ApiError(
                403,
                "missing_scope",
                f"the token of site {show(site)} does not have the {scope!r} scope (it has: {', '.join(scopes)})",
            )
        return hash_token(token)

    def _authorize_admin(self, credentials: Optional[HTTPAuthorizationCredentials]) -> None:
        if credentials is None or not credentials.credentials:
            raise ApiError(401, "missing_token", "missing bearer token (send 'Authorization: Bearer <admin token>')")
        if not self.registry.check_admin_token(credentials.credentials[: MAX_TOKEN + 1]):
            if self.registry.site_of_token(credentials.credentials[: MAX_TOKEN + 1]) is not None:
                raise ApiError(403, "forbidden", "listing sites needs the registry's admin token")
            raise ApiError(401, "invalid_token", "the bearer token is not valid")

    @contextlib.asynccontextmanager
    async def _guard(
        self, site: str, credentials: Optional[HTTPAuthorizationCredentials], scope: str
    ) -> AsyncIterator[float]:
        """Authorization, then the token's limits for the duration of the request; yields its deadline
        (time.monotonic())."""
        key = self._authorize(site, credentials, scope)
        note_request(site=site)
        with self._limits.hold(key):
            yield time.monotonic() + self.cfg.request_timeout_s

    def _live(self, site: str) -> tuple[str, str]:
        mid = self.registry.current_model_id(site)
        if mid is None:
            raise ApiError(
                409,
                "no_model",
                f"site {show(site)} has no published model yet (POST /v1/sites/{{site}}/adapt, then promote it)",
            )
        return mid, parse_model_id(mid)[1]

    async def _call(
        self, response: DeploymentResponse | DeploymentResponseGenerator, what: str, deadline: float
    ) -> Any:
        """The model replica's answer by ``deadline``, its failures mapped to 503, 422 or 504."""
        if not isinstance(response, DeploymentResponse):  # the handle does not stream
            raise TypeError("expected a unary response from the model deployment")
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
    async def review_page(self) -> HTMLResponse:
        return HTMLResponse(REVIEW_PAGE.read_text())

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, "not_found", f"no static file {show(name)}")
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        if not self.cfg.docs:
            raise ApiError(404, "not_found", "the API description is off on this server (serve setting docs)")
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        from fastapi.openapi.docs import get_swagger_ui_html

        if not self.cfg.docs:
            raise ApiError(404, "not_found", "the API docs are off on this server (serve setting docs)")
        page = get_swagger_ui_html(openapi_url="openapi.json", title="bayprano API")
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @api.post(
        "/v1/sites/{site}/score",
        response_model=ScoreResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": IMAGE_BODY},
        summary="Score one or more images with the site's live model (scope: score)",
    )
    async def score(
        self,
        site: str,
        request: Request,
        map_mode: Optional[Literal["png", "mask"]] = Query(
            None, alias="map", description="png: heatmap overlay; mask: binary mask at the threshold"
        ),
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
    ) -> ScoreResponse:
        start = time.perf_counter()
        async with self._guard(site, credentials, "score") as deadline:
            async with self.uploads.body(request, self.cfg.max_request_bytes, deadline) as body:
                raw, _ = await self.uploads.parse(request, body, "score")
                if not raw:
                    raise ApiError(400, "no_images", "the request holds no image")
                names = [name for name, _ in raw]
                mid, version = self._live(site)
                async with self.uploads.decode(raw, deadline) as decoded:
                    good = [i for i, d in enumerate(decoded) if not isinstance(d, ApiError)]
                    images = [d for d in decoded if not isinstance(d, ApiError)]
                    if not images:
                        serve_metrics().scored(site, [{"status": "error"}] * len(decoded))
                        raise next(d for d in decoded if isinstance(d, ApiError))
                    rows = await self._call(
                        self.models.options(multiplexed_model_id=mid).score.remote(
                            mid, images, map_mode, time.time() + max(0.0, deadline - time.monotonic())
                        ),
                        f"scoring on site {show(site)}",
                        deadline,
                    )
                    out: list[dict] = [error_row(d.code, d.message) if isinstance(d, ApiError) else {} for d in decoded]
                    queued = False
                    for i, image, row in zip(good, images, rows):
                        out[i] = row
                        if row.get("decision") == "review":
                            await asyncio.to_thread(
                                self.review_queue.add, site, image, {**row, "model_version": version}
                            )
                            queued = True
                    serve_metrics().scored(site, out)
                    if queued:
                        await self._note_review_queue(site)
        latency = (time.perf_counter() - start) * 1000
        return ScoreResponse(
            site=site,
            model_version=version,
            results=[
                ImageScore(name=name, model_version=version, latency_ms=latency, **row) for name, row in zip(names, out)
            ],
        )

    @api.post(
        "/v1/sites/{site}/adapt",
        response_model=AdaptResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": ADAPT_BODY},
        summary="Adapt a new version from K good images and publish it as a candidate (scope: adapt)",
    )
    async def adapt(
        self,
        site: str,
        request: Request,
        activate: bool = Query(False, description="make the new version live at once"),
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
    ) -> AdaptResponse:
        async with self._guard(site, credentials, "adapt") as deadline:
            async with self.uploads.body(request, self.cfg.max_request_bytes, deadline) as body:
                raw, fields = await self.uploads.parse(request, body, "adapt")
                try:
                    options = AdaptRequest.model_validate(
                        {k: v for k, v in fields.items() if k in ("steps", "target_fpr", "folder")}
                    )
                except ValidationError as exc:
                    raise first_error(exc, "") from None
                if options.folder is not None:
                    if raw:
                        raise ApiError(400, "bad_request", "give either images or a folder, not both")
                    raw = self.uploads.folder(site, options.folder)
                if not raw:
                    raise ApiError(
                        400, "no_images", "adaptation needs at least one good image (files, images or folder)"
                    )
                try:
                    self.registry.checkpoint_path()
                except BaypranoError:
                    raise ApiError(
                        409, "no_checkpoint", "the registry names no meta-checkpoint to adapt from"
                    ) from None
                async with self.uploads.decode(raw, deadline) as decoded:
                    bad = [d for d in decoded if isinstance(d, ApiError)]
                    if bad:
                        raise bad[0]
                    record = await self._call(
                        self.models.adapt.remote(
                            site,
                            decoded,
                            options.steps,
                            options.target_fpr,
                            activate,
                            time.time() + max(0.0, deadline - time.monotonic()),
                        ),
                        f"adaptation of site {show(site)}",
                        deadline,
                    )
        seconds = record.pop("adapt_seconds")
        return AdaptResponse(site=site, version=VersionOut(**version_out(record)), adapt_seconds=seconds)

    @api.get("/v1/sites", response_model=SiteList, responses=ERROR_RESPONSES, summary="Every site (admin token)")
    async def list_sites(self, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> SiteList:
        self._authorize_admin(credentials)
        out = []
        for site in self.registry.sites():
            cur = self.registry.current(site)
            versions = self.registry.versions(site)
            threshold = next((v.record.get("threshold") for v in versions if v.version == cur), None)
            out.append(SiteSummary(site=site, current=cur, versions=len(versions), threshold=threshold))
        return SiteList(sites=out)

    @api.get(
        "/v1/sites/{site}",
        response_model=SiteDetail,
        responses=ERROR_RESPONSES,
        summary="A site's versions, thresholds and metrics (scope: score)",
    )
    async def site_detail(
        self, site: str, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)
    ) -> SiteDetail:
        async with self._guard(site, credentials, "score"):
            info = self.registry.describe(site)
        return SiteDetail(
            site=site,
            created=info["created"],
            current=info["current"],
            versions=[VersionOut(**version_out(v)) for v in info["versions"]],
        )

    @api.get(
        "/v1/sites/{site}/reviews",
        response_model=ReviewList,
        responses=ERROR_RESPONSES,
        summary="Images the site's model sent to review, least certain first (scope: review)",
    )
    async def reviews(
        self,
        site: str,
        pending: bool = Query(True, description="only the unlabelled ones"),
        limit: int = Query(50, ge=1, le=500),
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
    ) -> ReviewList:
        async with self._guard(site, credentials, "review"):

            def items() -> list[ReviewItem]:
                return [
                    ReviewItem(
                        **item,
                        thumbnail=base64.b64encode(self.review_queue.thumbnail_png(site, item["id"])).decode("ascii"),
                    )
                    for item in self.review_queue.list(site, pending=pending, limit=limit)
                ]

            listed = ReviewList(site=site, items=await asyncio.to_thread(items))
            await self._note_review_queue(site)
            return listed

    @api.post(
        "/v1/sites/{site}/reviews/{item_id}",
        response_model=ReviewItem,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": LABEL_BODY},
        summary="Mark a review item as good or defective, kept as the site's labelled data (scope: review)",
    )
    async def label_review(
        self,
        site: str,
        item_id: str,
        request: Request,
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
    ) -> ReviewItem:
        # The body is a plain Request, not a pydantic parameter: FastAPI would read and parse it before the token
        # is checked.
        async with self._guard(site, credentials, "review") as deadline:
            ctype = content_type(request)
            if ctype != "application/json":
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"Content-Type {show(ctype) if ctype else 'missing'} is not accepted; send application/json",
                )
            async with self.uploads.body(request, MAX_LABEL_BYTES, deadline) as body:
                try:
                    label = LabelRequest.model_validate_json(body).label
                except ValidationError as exc:
                    raise first_error(exc, "JSON body: ") from None
            try:
                item = ReviewItem(**await asyncio.to_thread(self.review_queue.label, site, item_id, label))
            except BaypranoError:
                raise ApiError(
                    404, "unknown_review_item", f"site {show(site)} has no review item {show(item_id, 40)}"
                ) from None
            await self._note_review_queue(site)
            return item

    async def _note_review_queue(self, site: str) -> None:
        await asyncio.to_thread(self._count_review_queue, site)

    def _count_review_queue(self, site: str) -> None:
        # Counted and set under one lock, so that a recount read before a change never overwrites it after.
        with self._queue_count_lock:
            serve_metrics().review_queue_length(site, self.review_queue.pending_count(site))

    @api.get("/healthz", response_model=Health, summary="The gateway is up")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health}},
        summary="Ready to serve: the registry is readable and a model replica answers",
    )
    async def readyz(self) -> Health | JSONResponse:
        try:
            await asyncio.to_thread(Registry, self.cfg.registry)
            await asyncio.wait_for(self.models.ready.remote(), timeout=5)
        except Exception as exc:
            log.warning("not ready: %s", exc)
            return JSONResponse(Health(status="not ready").model_dump(), status_code=503, headers=SECURITY_HEADERS)
        return Health(status="ok")
