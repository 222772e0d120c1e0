"""Reading what a client sends: bounded bodies, the uploads in them, and their decoding off the event loop.

``Uploads`` belongs to one gateway replica and holds what bounds it: the byte budget for bodies in memory
(``max_inflight_bytes``), the pixel budget for decoded images (``max_inflight_pixels``) and the decode pool
(``max_concurrent_decodes`` threads). Every endpoint with a body reads it through ``body`` after the token
was checked, only up to the endpoint's limit. ``parse`` turns a multipart, JSON (base64) or raw image body
into ``(name, bytes)`` uploads and the other fields; a bad upload becomes the ``ApiError`` of its own item, so
that it fails alone. ``decode`` probes and decodes the uploads in the pool with a deadline
(``images.py``), within the request's pixel limit (``max_request_pixels``), and stops a probe or decode
that is still running when the deadline passes. ``folder`` reads a folder of the site's storage as uploads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Optional, TypeVar, Union

import numpy as np
from pydantic import ValidationError
from starlette.requests import Request

from bayprano.config import ServeConfig
from bayprano.serve import images as imaging
from bayprano.serve.api import ApiError, public, show
from bayprano.serve.limits import Budget
from bayprano.serve.schemas import AdaptRequest, ScoreRequest

MAX_NAME = 256  # characters of an image name

Upload = tuple[Optional[str], Union[bytes, ApiError]]  # (name, file bytes or the reason it was refused)
Decoded = Union[np.ndarray, ApiError]
T = TypeVar("T")


def check_name(name: Optional[str], where: str) -> Optional[str]:
    """A client's name of an image or field, refused when it is too long or holds control characters."""
    if name is None:
        return None
    if len(name) > MAX_NAME:
        raise ApiError(400, "bad_name", f"{where}: name is {len(name)} characters, more than {MAX_NAME}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ApiError(400, "bad_name", f"{where}: name {show(name)} holds control characters")
    return name


def decode_base64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_base64", f"{name}: data is not valid base64") from None


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def first_error(exc: ValidationError, what: str) -> ApiError:
    """The 422 of a body that pydantic refused, naming the first field at fault."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p)[:40] for p in first.get("loc", ())) or "body"
    return ApiError(422, "invalid_request", f"{what}{where}: {first.get('msg')}")


class Uploads:
    """Bounded body reading, upload parsing and pooled decoding for one gateway replica."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrent_decodes, thread_name_prefix="decode")
        self._bytes = Budget(cfg.max_inflight_bytes, "request bytes in memory")
        self._pixels = Budget(cfg.max_inflight_pixels, "decoded pixels in memory")

    @contextlib.asynccontextmanager
    async def body(self, request: Request, limit: int, deadline: float) -> AsyncIterator[bytes]:
        """The request's body, read only up to ``limit`` bytes, held within the gateway's byte budget."""
        length = request.headers.get("content-length")
        declared = None
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                raise ApiError(400, "bad_request", f"Content-Length {show(length)} is not a number")
            declared = int(length)
            if declared > limit:
                raise ApiError(
                    413, "request_too_large", f"request body is {declared} bytes, more than the limit of {limit} bytes"
                )
        async with self._bytes.hold(limit if declared is None else declared, deadline):
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "request_too_large", f"request body is more than the limit of {limit} bytes")
                chunks.append(chunk)
            yield b"".join(chunks)

    async def parse(self, request: Request, body: bytes, what: str) -> tuple[list[Upload], dict[str, Any]]:
        """The uploads of a body (multipart files, JSON base64 or one raw image) and its other form or JSON
        fields; ``what`` is the endpoint, ``score`` or ``adapt``."""
        ctype = content_type(request)
        if ctype == "multipart/form-data":
            raw, fields = await self._multipart(request, body)
        elif ctype == "application/json":
            raw, fields = await self._json(body, ScoreRequest if what == "score" else AdaptRequest)
        elif ctype.startswith("image/") and what == "score":
            raw, fields = [(None, body)], {}
        else:
            accepted = "multipart/form-data or application/json" + (" or image/*" if what == "score" else "")
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Content-Type {show(ctype) if ctype else 'missing'} is not accepted; send {accepted}",
            )
        if len(raw) > self.cfg.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"{len(raw)} images in one request, more than the limit of {self.cfg.max_images_per_request}",
            )
        return raw, fields

    async def _multipart(self, request: Request, body: bytes) -> tuple[list[Upload], dict[str, Any]]:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream() -> AsyncGenerator[bytes, None]:
            yield body

        try:
            form = await MultiPartParser(
                request.headers,
                stream(),
                max_files=self.cfg.max_images_per_request + 1,
                max_fields=20,
                max_part_size=self.cfg.max_request_bytes,
            ).parse()
        except MultiPartException as exc:
            raise ApiError(
                400, "bad_multipart", f"multipart body cannot be read: {public(exc.message)[:200]}"
            ) from None
        except Exception:
            raise ApiError(400, "bad_multipart", "multipart body cannot be read") from None
        raw: list[Upload] = []
        fields: dict[str, Any] = {}
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    try:
                        raw.append((check_name(value.filename or key, "file"), await value.read()))
                    except ApiError as exc:
                        raw.append((None, exc))
                else:
                    check_name(key, "form field")
                    fields[key] = value
        finally:
            await form.close()
        return raw, fields

    async def _json(
        self, body: bytes, model_cls: type[ScoreRequest] | type[AdaptRequest]
    ) -> tuple[list[Upload], dict[str, Any]]:
        try:
            parsed: ScoreRequest | AdaptRequest = await asyncio.to_thread(model_cls.model_validate_json, body)
        except ValidationError as exc:
            raise first_error(exc, "JSON body: ") from None
        raw: list[Upload] = []
        for i, item in enumerate(parsed.images or []):
            try:
                name = check_name(item.name, f"images[{i}]")
                raw.append((name, decode_base64(item.data, f"images[{i}]" if name is None else show(name))))
            except ApiError as exc:
                raw.append((None, exc))
        return raw, parsed.model_dump(exclude={"images"})

    @contextlib.asynccontextmanager
    async def decode(self, raw: list[Upload], deadline: float) -> AsyncIterator[list[Decoded]]:
        """Probe and decode the uploads in the decode pool, within the request's pixel budget and the decode
        deadline; yields one item per upload: an RGB array, or the ApiError of that upload."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        decode_deadline = min(deadline, time.monotonic() + cfg.decode_timeout_s)
        cancel = threading.Event()
        too_slow = ApiError(422, "decode_timeout", f"the images could not be decoded within {cfg.decode_timeout_s:g} s")

        async def in_pool(fn: Callable[[], T]) -> T:
            future = loop.run_in_executor(self._pool, fn)
            try:
                return await asyncio.wait_for(future, timeout=max(0.0, decode_deadline - time.monotonic()))
            except asyncio.TimeoutError:
                cancel.set()  # a running probe or decode stops at its next read; a queued one never starts
                raise too_slow from None
            except imaging.DecodeCancelled:
                raise too_slow from None

        def label(i: int, name: Optional[str]) -> str:
            return f"image {i}" if name is None else show(name)

        def probe_all() -> list[imaging.Probe | ApiError]:
            out: list[imaging.Probe | ApiError] = []
            for i, (name, data) in enumerate(raw):
                if isinstance(data, ApiError):
                    out.append(data)
                    continue
                try:
                    out.append(imaging.probe(data, label(i, name), cfg.max_image_pixels, cfg.max_jpeg_scans, cancel))
                except imaging.ImageRejected as exc:
                    out.append(ApiError(exc.status, exc.code, exc.message))
            return out

        probes = await in_pool(probe_all)
        total = sum(p.pixels for p in probes if isinstance(p, imaging.Probe))
        if total > cfg.max_request_pixels:
            raise ApiError(
                413,
                "request_too_large",
                f"the request's images hold {total} pixels, more than the limit "
                f"of {cfg.max_request_pixels} pixels per request",
            )

        def decode_all() -> list[Decoded]:
            out: list[Decoded] = []
            for i, ((name, data), p) in enumerate(zip(raw, probes)):
                if not isinstance(p, imaging.Probe):
                    out.append(p)
                    continue
                assert isinstance(data, bytes)  # an upload refused earlier has no probe
                try:
                    out.append(imaging.decode(data, label(i, name), p, cfg.max_image_pixels, cancel))
                except imaging.ImageRejected as exc:
                    out.append(ApiError(exc.status, exc.code, exc.message))
            return out

        async with self._pixels.hold(total, decode_deadline):
            yield await in_pool(decode_all)

    def folder(self, site: str, folder: str) -> list[Upload]:
        """The images of ``folder`` under the site's storage as uploads, within the request's limits."""
        from bayprano.platform.data.imageio import is_image_file

        check_name(folder, "folder")
        cfg = self.cfg
        if cfg.site_storage is None:
            raise ApiError(
                400,
                "no_site_storage",
                "this server has no site storage configured (site_storage); upload the images instead",
            )
        base = (cfg.site_storage / site).resolve()
        path = (base / folder).resolve()
        if path != base and base not in path.parents:
            raise ApiError(400, "bad_folder", f"folder {show(folder)} is outside the site's storage")
        if not path.is_dir():
            raise ApiError(404, "no_such_folder", f"folder {show(folder)} does not exist in the site's storage")
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
        if len(files) > cfg.max_images_per_request:
            raise ApiError(
                413,
                "too_many_images",
                f"folder {show(folder)} holds {len(files)} images, more than the limit of {cfg.max_images_per_request}",
            )
        if sum(p.stat().st_size for p in files) > cfg.max_request_bytes:
            raise ApiError(
                413,
                "request_too_large",
                f"folder {show(folder)} holds more than the limit of {cfg.max_request_bytes} bytes",
            )
        return [(f"{folder}/{p.name}", p.read_bytes()) for p in files]
