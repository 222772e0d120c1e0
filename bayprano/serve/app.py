"""The Ray Serve application: adapted per-site models scored over HTTP.

Two deployments:

- ``Gateway``, the FastAPI ingress: authenticates the site's bearer token, enforces the request and image
  size limits, decodes the images, resolves the site's live version from the registry's ``current``
  pointer on every request and forwards the images to the model deployment under the multiplexed model
  id ``site@vNNNN``. A newly published version is therefore live for the next request, while requests
  already in flight finish on the version they were routed with.
- ``SiteModels``, the model deployment: one frozen backbone per replica, shared by up to
  ``max_models_per_replica`` site models held in Serve's multiplexed LRU cache; concurrent requests for the
  same model id are batched with ``@serve.batch`` (Serve splits a batch by model id). It also runs
  /adapt: adaptation from the registry's meta-checkpoint, then publication of a new version.

The gateway also serves the review page (``GET /``, ``static/review.html``): an inspector picks a site,
drops an image and sees its overlay, score, decision and uncertainty, and works through the site's
review queue (every image scored ``review`` is queued in the registry, ``review.py``), least certain
first, marking each good or defective (``/v1/sites/{site}/reviews``).

Every error is a JSON ``{code, message}`` with a 4xx status when the request is at fault; an unexpected
failure is a 500 with the same shape, and the replica keeps serving. ``build_app(args)`` is the
application builder for ``serve run`` / ``serve deploy``; ``application(cfg)`` builds it from a
``ServeConfig``.
"""


import asyncio
import base64
import binascii
import io
import json
import time
from pathlib import Path
from typing import Any, AsyncGenerator, Literal, Optional

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from bayprano.config import ServeConfig, load_yaml_config
from bayprano.platform.errors import BaypranoError
from bayprano.serve.registry import Registry, check_site_name, parse_model_id
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

REVIEW_PAGE = Path(__file__).with_name("static") / "review.html"
MIN_SIDE = 32  # the backbone's minimum image side (bayprano.platform.model.backbone.MIN_IMAGE_SIZE)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(Error(code=code, message=message).model_dump(), status_code=status, headers=headers)


def _finite(x: Any) -> Optional[float]:
    return float(x) if x is not None and np.isfinite(x) else None


_ERRORS = {status: {"model": Error} for status in (400, 401, 403, 404, 409, 413, 415, 422, 500, 503, 504)}

api = FastAPI(
    title="bayprano",
    version="1",
    description="Few-shot industrial anomaly detection: score images with a site's adapted model, adapt a new "
                "version from a few good images. Every site endpoint needs `Authorization: Bearer <site token>`.",
)
bearer = HTTPBearer(auto_error=False, description="the site's token (or the registry's admin token)")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.code, exc.message, headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return _error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, "internal", f"unexpected server error ({exc.__class__.__name__}); the request was not "
                                   "processed, the server keeps serving")


# ----------------------------------------------------------------------------------------- images


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """An encoded image (PNG, JPEG, BMP, ...) as an RGB uint8 array; refuses empty, non-image, corrupt, too
    large (checked from the header, before decoding) and too small images with an ApiError naming ``name``."""
    from PIL import Image, UnidentifiedImageError

    from bayprano.platform.data.imageio import load_image

    if not data:
        raise ApiError(400, "bad_image", f"{name}: empty image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(400, "bad_image", f"{name}: not an image (PNG, JPEG or BMP expected)") from None
    if w * h > max_pixels:
        raise ApiError(413, "image_too_large", f"{name}: image is {w}x{h} px, more than the limit of {max_pixels} "
                                               "pixels")
    if min(w, h) < MIN_SIDE:
        raise ApiError(400, "image_too_small", f"{name}: image is {w}x{h} px, smaller than {MIN_SIDE} px on a side")
    try:
        return load_image(data, name=name)
    except BaypranoError as exc:
        raise ApiError(400, "corrupt_image", str(exc)) from None


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{name}: data is not valid base64") from None


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
        path = self.registry.model_path(site, version)

        def load():
            try:
                backbone = json.loads((path / "meta.json").read_text())["backbone"]
                return SiteModel.load(path, extractor=self._extractor(backbone))
            except (BaypranoError, OSError, ValueError, KeyError) as exc:
                # the artifact on the server is at fault, not the request: not a 4xx
                raise RuntimeError(f"model {mid} cannot be loaded: {exc}") from None

        model = await asyncio.to_thread(load)
        self.loads.append(mid)
        return model

    def _run(self, model, images: list[np.ndarray], maps: bool):
        return model.score(images, maps=maps, batch_size=max(1, min(len(images), 32)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple[str, list[np.ndarray], bool]]) -> list:
        out: list = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (mid, _, _) in enumerate(items):
            groups.setdefault(mid, []).append(i)
        for mid, idx in groups.items():
            try:
                model = await self.get_model(mid)
                images = [im for i in idx for im in items[i][1]]
                results = await asyncio.to_thread(self._run, model, images, any(items[i][2] for i in idx))
                start = 0
                for i in idx:
                    n = len(items[i][1])
                    out[i] = (model, results[start : start + n])
                    start += n
            except Exception as exc:  # one model's failure must not fail the other models' requests
                for i in idx:
                    out[i] = _Failed(exc)
        return out

    async def score(self, mid: str, images: list[np.ndarray], map_mode: Optional[str]) -> list[dict]:
        model = await self.get_model(mid)  # a cold site loads here, outside the batch loop
        if self.cfg.batching:
            got = await self._score_batch((mid, images, map_mode is not None))
            if isinstance(got, _Failed):
                raise got.exc
            model, results = got
        else:
            async with self._compute:
                results = await asyncio.to_thread(self._run, model, images, map_mode is not None)

        def records():
            rows = []
            for image, r in zip(images, results):
                row = {"score": _finite(r.score), "p_value": _finite(r.p_value), "threshold": _finite(r.threshold),
                       "decision": r.decision, "uncertainty": _finite(r.uncertainty)}
                if map_mode is not None:
                    row["map"] = render_map(model, image, r, map_mode)
                    row["map_format"] = map_mode
                rows.append(row)
            return rows

        return await asyncio.to_thread(records) if map_mode is not None else records()

    async def adapt(self, site: str, images: list[np.ndarray], steps: Optional[int], target_fpr: float) -> dict:
        from bayprano.platform.meta.checkpoint import load_checkpoint
        from bayprano.platform.model.site import adapt

        def run() -> dict:
            path = self.registry.checkpoint_path()
            mtime = path.stat().st_mtime if path.is_file() else 0.0
            if self._checkpoint is None or self._checkpoint[:2] != (path, mtime):
                self._checkpoint = (path, mtime, load_checkpoint(path))
            ckpt = self._checkpoint[2]
            model = adapt(ckpt, images, steps=steps, target_fpr=target_fpr, extractor=self._extractor(ckpt.backbone))
            info = self.registry.publish(site, model, source="POST /v1/sites/{site}/adapt")
            return {**info.record, "current": True, "adapt_seconds": model.info["adapt_seconds"]}

        async with self._adapting:
            return await asyncio.to_thread(run)

    def stats(self) -> dict:
        wrapper = getattr(self._load_fn, "__serve_multiplex_wrapper", None)  # Serve's LRU, made on first use
        loaded = list(wrapper.models) if wrapper is not None else []
        return {"loads": list(self.loads), "loaded": loaded}

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        if not (self.registry.root / "registry.json").is_file():
            raise RuntimeError(f"registry {self.registry.root} is no longer readable")


# ------------------------------------------------------------------------------------------- gateway


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise ApiError(413, "request_too_large", f"request body is {int(length)} bytes, more than the limit "
                                                         f"of {limit} bytes")
        except ValueError:
            raise ApiError(400, "bad_request", f"Content-Length {length!r} is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"request body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Gateway:
    def __init__(self, models: DeploymentHandle, settings: dict):
        self.cfg = ServeConfig.model_validate(settings)
        self.registry = Registry(self.cfg.registry)
        self.reviews = ReviewQueue(self.cfg.registry)
        self.models = models

    # ------------------------------------------------------------------------------ authentication

    def _authorize(self, site: str, credentials: Optional[HTTPAuthorizationCredentials]) -> None:
        if credentials is None or not credentials.credentials:
            raise ApiError(401, "missing_token", "missing bearer token (send 'Authorization: Bearer <site token>')")
        try:
            check_site_name(site)
        except BaypranoError as exc:
            raise ApiError(404, "unknown_site", str(exc)) from None
        if not self.registry.has_site(site):
            raise ApiError(404, "unknown_site", f"unknown site {site!r}")
        token = credentials.credentials
        if not (self.registry.check_token(site, token) or self.registry.check_admin_token(token)):
            raise ApiError(403, "forbidden", f"the token is not valid for site {site!r}")

    def _authorize_admin(self, credentials: Optional[HTTPAuthorizationCredentials]) -> None:
        if credentials is None or not credentials.credentials:
            raise ApiError(401, "missing_token", "missing bearer token (send 'Authorization: Bearer <admin token>')")
        if not self.registry.check_admin_token(credentials.credentials):
            raise ApiError(403, "forbidden", "listing sites needs the registry's admin token")

    # ------------------------------------------------------------------------------------- reading

    async def _images(self, request: Request, what: str) -> tuple[list[np.ndarray], list[Optional[str]], dict]:
        """The images of a request body (multipart files, JSON base64 or one raw image), decoded and checked;
        with the other form or JSON fields."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        cfg = self.cfg
        body = await _read_body(request, cfg.max_request_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw: list[tuple[Optional[str], bytes]] = []
        fields: dict = {}
        if ctype == "multipart/form-data":
            async def stream() -> AsyncGenerator[bytes, None]:
                yield body

            try:
                form = await MultiPartParser(request.headers, stream(), max_files=cfg.max_images_per_request + 1,
                                             max_fields=20, max_part_size=cfg.max_request_bytes).parse()
            except MultiPartException as exc:
                raise ApiError(400, "bad_multipart", f"multipart body cannot be read: {exc.message}") from None
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    raw.append((value.filename or key, await value.read()))
                else:
                    fields[key] = value
            await form.close()
        elif ctype == "application/json":
            model_cls = ScoreRequest if what == "score" else AdaptRequest
            try:
                parsed = model_cls.model_validate_json(body)
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first.get("loc", ())) or "body"
                raise ApiError(422, "invalid_request", f"JSON body: {where}: {first.get('msg')}") from None
            fields = parsed.model_dump(exclude={"images"})
            for i, item in enumerate(parsed.images or []):
                label = item.name or f"images[{i}]"
                raw.append((item.name, _b64(item.data, label)))
        elif ctype.startswith("image/") and what == "score":
            raw.append((None, body))
        else:
            accepted = "multipart/form-data or application/json" + (" or image/*" if what == "score" else "")
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {ctype or 'missing'!r} is not accepted; send {accepted}")
        if len(raw) > cfg.max_images_per_request:
            raise ApiError(413, "too_many_images", f"{len(raw)} images in one request, more than the limit of "
                                                   f"{cfg.max_images_per_request}")
        images = [decode_image(data, name or f"image {i}", cfg.max_image_pixels) for i, (name, data) in enumerate(raw)]
        return images, [name for name, _ in raw], fields

    def _live(self, site: str) -> tuple[str, str]:
        mid = self.registry.current_model_id(site)
        if mid is None:
            raise ApiError(409, "no_model", f"site {site!r} has no published model yet (POST "
                                            f"/v1/sites/{site}/adapt or `bayprano registry publish`)")
        return mid, parse_model_id(mid)[1]

    async def _call(self, response, what: str):
        try:
            return await asyncio.wait_for(response, timeout=self.cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"{what} took longer than {self.cfg.request_timeout_s:g}s") from None
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc  # a replica's exception arrives wrapped in a RayTaskError
            if isinstance(cause, BaypranoError):
                raise ApiError(422, "unprocessable", str(cause)) from None
            raise ApiError(503, "model_unavailable", f"{what} failed on the model replica "
                                                     f"({cause.__class__.__name__}: {cause})") from None

    # ------------------------------------------------------------------------------------ endpoints

    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def review_page(self):
        return HTMLResponse(REVIEW_PAGE.read_text())

    @api.post("/v1/sites/{site}/score", response_model=ScoreResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _IMAGE_BODY},
              summary="Score one or more images with the site's live model")
    async def score(self, site: str, request: Request,
                    map_mode: Optional[Literal["png", "mask"]] = Query(
                        None, alias="map", description="png: heatmap overlay; mask: binary mask at the threshold"),
                    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ScoreResponse:
        start = time.perf_counter()
        self._authorize(site, credentials)
        images, names, _ = await self._images(request, "score")
        if not images:
            raise ApiError(400, "no_images", "the request holds no image")
        mid, version = self._live(site)
        rows = await self._call(self.models.options(multiplexed_model_id=mid).score.remote(mid, images, map_mode),
                                f"scoring on site {site!r}")
        latency = (time.perf_counter() - start) * 1000
        for image, row in zip(images, rows):
            if row.get("decision") == "review":
                await asyncio.to_thread(self.reviews.add, site, image, {**row, "model_version": version})
        return ScoreResponse(site=site, model_version=version, results=[
            ImageScore(name=name, model_version=version, latency_ms=latency, **row) for name, row in zip(names, rows)])

    @api.post("/v1/sites/{site}/adapt", response_model=AdaptResponse, responses=_ERRORS,
              openapi_extra={"requestBody": _ADAPT_BODY},
              summary="Adapt a new version from K good images and publish it")
    async def adapt(self, site: str, request: Request,
                    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> AdaptResponse:
        self._authorize(site, credentials)
        images, _, fields = await self._images(request, "adapt")
        try:
            options = AdaptRequest.model_validate({k: v for k, v in fields.items() if k in ("steps", "target_fpr",
                                                                                            "folder")})
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise ApiError(422, "invalid_request", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        if options.folder is not None:
            if images:
                raise ApiError(400, "bad_request", "give either images or a folder, not both")
            images = self._folder_images(site, options.folder)
        if not images:
            raise ApiError(400, "no_images", "adaptation needs at least one good image (files, images or folder)")
        try:
            self.registry.checkpoint_path()
        except BaypranoError as exc:
            raise ApiError(409, "no_checkpoint", str(exc)) from None
        record = await self._call(self.models.adapt.remote(site, images, options.steps, options.target_fpr),
                                  f"adaptation of site {site!r}")
        seconds = record.pop("adapt_seconds")
        return AdaptResponse(site=site, version=VersionOut(**{k: v for k, v in record.items() if k != "path"}),
                             adapt_seconds=seconds)

    def _folder_images(self, site: str, folder: str) -> list[np.ndarray]:
        from bayprano.platform.data.imageio import is_image_file

        if self.cfg.site_storage is None:
            raise ApiError(400, "no_site_storage", "this server has no site storage configured (site_storage); "
                                                   "upload the images instead")
        base = (self.cfg.site_storage / site).resolve()
        path = (base / folder).resolve()
        if path != base and base not in path.parents:
            raise ApiError(400, "bad_folder", f"folder {folder!r} is outside the site's storage")
        if not path.is_dir():
            raise ApiError(404, "no_such_folder", f"folder {folder!r} does not exist in the site's storage")
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
        if len(files) > self.cfg.max_images_per_request:
            raise ApiError(413, "too_many_images", f"folder {folder!r} holds {len(files)} images, more than the "
                                                   f"limit of {self.cfg.max_images_per_request}")
        return [decode_image(p.read_bytes(), f"{folder}/{p.name}", self.cfg.max_image_pixels) for p in files]

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
             summary="A site's versions, thresholds and metrics")
    async def site_detail(self, site: str,
                          credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> SiteDetail:
        self._authorize(site, credentials)
        info = self.registry.describe(site)
        return SiteDetail(site=site, created=info["created"], current=info["current"],
                          versions=[VersionOut(**v) for v in info["versions"]])

    @api.get("/v1/sites/{site}/reviews", response_model=ReviewList, responses=_ERRORS,
             summary="Images the site's model sent to review, least certain first")
    async def reviews(self, site: str, pending: bool = Query(True, description="only the unlabelled ones"),
                      limit: int = Query(50, ge=1, le=500),
                      credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ReviewList:
        self._authorize(site, credentials)

        def items() -> list[ReviewItem]:
            return [ReviewItem(**item, thumbnail=base64.b64encode(self.reviews.thumbnail_png(site, item["id"]))
                               .decode("ascii")) for item in self.reviews.list(site, pending=pending, limit=limit)]

        return ReviewList(site=site, items=await asyncio.to_thread(items))

    @api.post("/v1/sites/{site}/reviews/{item_id}", response_model=ReviewItem, responses=_ERRORS,
              summary="Mark a review item as good or defective (kept as the site's labelled data)")
    async def label_review(self, site: str, item_id: str, body: LabelRequest,
                           credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> ReviewItem:
        self._authorize(site, credentials)
        try:
            return ReviewItem(**await asyncio.to_thread(self.reviews.label, site, item_id, body.label))
        except BaypranoError as exc:
            raise ApiError(404, "unknown_review_item", str(exc)) from None

    @api.get("/healthz", response_model=Health, summary="The gateway is up")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, responses={503: {"model": Health}},
             summary="The registry is readable and a model replica answers")
    async def readyz(self):
        detail: dict = {}
        try:
            detail["sites"] = len(self.registry.sites())
            await asyncio.wait_for(self.models.ready.remote(), timeout=5)
            detail["model_replica"] = "ok"
        except Exception as exc:
            detail["error"] = f"{exc.__class__.__name__}: {exc}"
            return JSONResponse(Health(status="not ready", detail=detail).model_dump(), status_code=503)
        return Health(status="ok", detail=detail)


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
