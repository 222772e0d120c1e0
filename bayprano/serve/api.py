"""The HTTP face of the gateway: the FastAPI application object, its error model and the headers and counts
every response gets.

``api`` is the FastAPI app that the gateway's routes (``gateway.py``) are declared on. Every error leaves as a
JSON ``{code, message}`` (``ApiError`` raised anywhere in a route, FastAPI's validation errors, Starlette's
404 and 405, and, as a 500 that names nothing, any unexpected exception). ``show`` quotes a request's own
value for a message and ``public`` strips server paths from one. Two ASGI middlewares wrap every response:
``SecurityHeaders`` adds the Content-Security-Policy, X-Frame-Options, X-Content-Type-Options and
Referrer-Policy headers, and ``RequestMetrics`` counts and times the request by site, route and status
(``metrics.py``). The OpenAPI descriptions of the bodies that routes read by hand live here too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bayprano.serve.metrics import UNMATCHED, note_request, request_facts, serve_metrics
from bayprano.serve.schemas import Error

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; style-src 'self' "
    "https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SERVER_PATH = re.compile(r"(?<![\w.])/(?:[\w.+@-]+/)+[\w.+@-]*")
log = logging.getLogger("ray.serve")


class ApiError(Exception):
    """An error answered to the client: HTTP status, a stable code, a message and optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def show(value: Any, limit: int = 64) -> str:
    """A request's value quoted for a message: at most ``limit`` characters, control characters escaped."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def public(message: str) -> str:
    """A message without the server's file paths."""
    return SERVER_PATH.sub("<path>", message)


def error_response(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    note_request(code=code)
    return JSONResponse(
        Error(code=code, message=message).model_dump(),
        status_code=status,
        headers={**SECURITY_HEADERS, **(headers or {})},
    )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Error} for status in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)
}

api = FastAPI(
    title="bayprano",
    version="1",
    description="Few-shot industrial anomaly detection: score images with a site's adapted model, adapt a new "
    "version from a few good images. Every site endpoint needs `Authorization: Bearer <site token>` "
    "with the endpoint's scope (score, review, adapt).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
bearer = HTTPBearer(auto_error=False, description="the site's token (or the registry's admin token)")


class SecurityHeaders:
    """Adds the security headers to every response (one that sets its own CSP keeps it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers:
                        headers[key] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestMetrics:
    """Counts every request by site, route and status, and times it (``metrics.py``)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
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
                serve_metrics().request(
                    getattr(route, "path", None) or UNMATCHED,
                    facts.get("site"),
                    status,
                    time.perf_counter() - start,
                    facts.get("code"),
                )


api.add_middleware(SecurityHeaders)
api.add_middleware(RequestMetrics)


@api.exception_handler(ApiError)
async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_response(exc.status, exc.code, exc.message, headers)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p)[:40] for p in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid value')}")


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, f"{request.method} {show(request.url.path)}: {exc.detail}")


@api.exception_handler(Exception)
async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path[:200])
    return error_response(
        500, "internal", "internal server error; the request was not processed, the server keeps serving"
    )


IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            }
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    },
}
ADAPT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "steps": {"type": "integer"},
                    "target_fpr": {"type": "number"},
                },
            }
        },
        "application/json": {"schema": {"$ref": "#/components/schemas/AdaptRequest"}},
    },
}
LABEL_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LabelRequest"}}},
}
