"""The model deployment: per-site models multiplexed over one frozen backbone, batched scoring, adaptation.

``SiteModels`` is the class that ``app.application`` deploys as Serve's ``SiteModels`` deployment. Each replica
builds one frozen backbone (per backbone name) and holds up to ``max_models_per_replica`` site models in
Serve's multiplexed LRU cache, keyed by the model id ``site@vNNNN``; a model is loaded only after the
registry has checked its version's hash (``registry.check_version``), and a version that cannot be loaded is
a ``ModelUnavailable`` naming the site and version, never a path. Concurrent requests for the same model
are batched with ``@serve.batch``; a request or an image that fails there fails alone (``Failed`` carries a
batch item's error back as a value). ``score`` returns one row per image, with the anomaly map rendered by
``render_map`` when asked for; ``adapt`` adapts from the registry's meta-checkpoint and publishes a
candidate (live at once only with ``activate``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
from ray import serve

from bayprano.config import ServeConfig
from bayprano.platform.errors import BaypranoError
from bayprano.serve.api import public
from bayprano.serve.metrics import serve_metrics
from bayprano.serve.registry import Registry, parse_model_id

if TYPE_CHECKING:
    from bayprano.platform.meta.checkpoint import MetaCheckpoint
    from bayprano.platform.model.backbone import PatchFeatureExtractor
    from bayprano.platform.model.site import ImageResult, SiteModel

log = logging.getLogger("ray.serve")
Outcome = Union["ImageResult", "Failed"]  # one image's result, or its failure
BatchItem = tuple[str, list[np.ndarray], bool]  # model id, images, whether maps are wanted


class ModelUnavailable(RuntimeError):
    """A site's version cannot be served; the message names the site and version, never a path."""


class Failed:
    """A batch item's failure, handed back through @serve.batch as a value (it sets results, not errors)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def finite(x: Any) -> Optional[float]:
    return float(x) if x is not None and np.isfinite(x) else None


def error_row(code: str, message: str) -> dict:
    """The reply item of an image that was refused or failed: ``status: error`` with its code and message."""
    return {"status": "error", "error": {"code": code, "message": message}}


def render_map(site_model: "SiteModel", image: np.ndarray, result: "ImageResult", mode: str) -> str:
    """The anomaly map of one result as base64 PNG: a heatmap over the image (``png``) or a binary mask of
    the pixels over the threshold (``mask``), at the image's own size."""
    from PIL import Image

    from bayprano.platform.data.imageio import encode_png
    from bayprano.platform.model.anomaly_map import heat_level, overlay

    if result.anomaly_map is None:
        raise ValueError("the result holds no anomaly map (it was scored without maps)")
    h, w = image.shape[:2]
    amap = result.anomaly_map.astype(np.float32)
    if mode == "mask":
        mask = np.asarray(Image.fromarray(amap).resize((w, h), Image.Resampling.BILINEAR)) >= result.map_threshold
        return base64.b64encode(encode_png(mask)).decode()
    level = heat_level(amap, result.score, result.threshold, site_model.model.dim, site_model.df)
    picture = overlay(image, level)
    return base64.b64encode(encode_png(picture)).decode()


class SiteModels:
    """Per-site models multiplexed over one backbone; batched scoring; adaptation and publication (deployed
    by ``app.application``)."""

    def __init__(self, settings: dict):
        cfg = ServeConfig.model_validate(settings)
        self.cfg = cfg
        self.registry = Registry(cfg.registry)
        self._extractors: dict[str, PatchFeatureExtractor] = {}
        self._checkpoint: tuple[Path, float, MetaCheckpoint] | None = None
        self._compute = asyncio.Lock()
        self._adapting = asyncio.Lock()
        self.loads: list[str] = []
        self._held: set[str] = set()  # model ids in Serve's LRU after our last load
        self.batch_sizes: list[int] = []

        async def load(mid: str) -> SiteModel:
            return await self._load(mid)

        # Built here rather than as a decorated method so that the LRU size comes from the config.
        self._load_fn = load
        self.get_model = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        # Ray's stub types the batched method as a plain callable; at run time it carries these setters.
        self._score_batch.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)  # type: ignore[attr-defined]
        checkpoint = self.registry.meta.get("checkpoint")
        if checkpoint:  # build the backbone now, so that the replica is ready when it says so
            self._extractor(checkpoint["backbone"])

    def _extractor(self, backbone: str) -> PatchFeatureExtractor:
        from bayprano.platform.model.backbone import build_backbone

        if backbone not in self._extractors:
            self._extractors[backbone] = build_backbone(backbone, device=self.cfg.device)
        return self._extractors[backbone]

    async def _load(self, mid: str) -> SiteModel:
        from bayprano.platform.model.site import SiteModel

        site, version = parse_model_id(mid)

        def load() -> SiteModel:
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

    def _run(self, model: SiteModel, images: list[np.ndarray], maps: bool) -> list[ImageResult]:
        return model.score(images, maps=maps, batch_size=max(1, min(len(images), 32)))

    def _run_each(self, model: SiteModel, images: list[np.ndarray], maps: bool) -> list[Outcome]:
        """Score images one by one, so that one that fails is the only one to fail."""
        out: list[Outcome] = []
        for image in images:
            try:
                out.append(self._run(model, [image], maps)[0])
            except Exception as exc:
                log.warning("an image failed in scoring: %s", exc)
                out.append(Failed(exc))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[BatchItem]) -> list[tuple[SiteModel, list[Outcome]] | Failed]:
        self.batch_sizes.append(len(items))
        out: list[tuple[SiteModel, list[Outcome]] | Failed] = [Failed(RuntimeError("not scored"))] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (mid, _, _) in enumerate(items):
            groups.setdefault(mid, []).append(i)
        for mid, idx in groups.items():
            try:
                model = await self.get_model(mid)
            except Exception as exc:  # one model's failure must not fail the other models' requests
                for i in idx:
                    out[i] = Failed(exc)
                continue
            maps = any(items[i][2] for i in idx)
            images = [im for i in idx for im in items[i][1]]
            results: list[Outcome]
            try:
                results = list(await asyncio.to_thread(self._run, model, images, maps))
            except Exception:  # one bad image must not fail the other requests of the group: score them alone
                results = await asyncio.to_thread(self._run_each, model, images, maps)
            start = 0
            for i in idx:
                n = len(items[i][1])
                out[i] = (model, results[start : start + n])
                start += n
        return out

    async def score(
        self, mid: str, images: list[np.ndarray], map_mode: Optional[str], deadline: Optional[float] = None
    ) -> list[dict]:
        """One row per image: the result, or ``status: error`` for an image that failed in scoring. Map
        rendering stops at ``deadline`` (a time.time() value), once the gateway has given up."""
        model = await self.get_model(mid)  # a cold site loads here, outside the batch loop
        results: list[Outcome]
        if self.cfg.batching:
            got = await self._score_batch((mid, images, map_mode is not None))
            if isinstance(got, Failed):
                raise got.exc
            model, results = got
        else:
            async with self._compute:
                try:
                    results = list(await asyncio.to_thread(self._run, model, images, map_mode is not None))
                except Exception:
                    results = await asyncio.to_thread(self._run_each, model, images, map_mode is not None)

        def records() -> list[dict]:
            rows: list[dict] = []
            for image, r in zip(images, results):
                if isinstance(r, Failed):
                    rows.append(error_row("scoring_failed", "the model could not score this image"))
                    continue
                row = {
                    "status": "ok",
                    "score": finite(r.score),
                    "p_value": finite(r.p_value),
                    "threshold": finite(r.threshold),
                    "decision": r.decision,
                    "uncertainty": finite(r.uncertainty),
                }
                if map_mode is not None:
                    if deadline is not None and time.time() > deadline:
                        raise TimeoutError("the request's deadline passed while its maps were rendered")
                    row["map"] = render_map(model, image, r, map_mode)
                    row["map_format"] = map_mode
                rows.append(row)
            return rows

        return await asyncio.to_thread(records) if map_mode is not None else records()

    async def adapt(
        self,
        site: str,
        images: list[np.ndarray],
        steps: Optional[int],
        target_fpr: float,
        activate: bool = False,
        deadline: Optional[float] = None,
    ) -> dict:
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
            info = self.registry.publish(
                site,
                model,
                source="POST /v1/sites/{site}/adapt",
                make_current=activate,
                keep=self.cfg.max_versions_per_site,
            )
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
