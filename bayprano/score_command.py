"""The ``bayprano score`` command: pick the scorer (a site model folder, an exported ``.onnx`` / ``.xml``
graph, or a server with ``--url``) and run it over files, folders and globs with ``platform/predict.py``.

One JSON line per scored image goes to stdout as soon as it is known; a file that cannot be read or
scored is reported on stderr (``bayprano: error: FILE: reason``) and skipped, and the exit status is 2
when any was. ``--maps DIR`` writes an overlay for every image; ``--output DIR`` writes predict.py's
table, JSON lines, overlays of the anomalous and review images, and summary page.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from bayprano.platform.errors import ConfigError, DataError

if TYPE_CHECKING:
    from bayprano.platform.exported import ExportedModel
    from bayprano.platform.model.site import ImageResult, SiteModel

BATCH = 16


@dataclass
class ServedResult:
    score: float | None
    p_value: float | None
    threshold: float | None
    decision: str | None
    uncertainty: float | None
    extra: dict = field(default_factory=dict)
    picture: bytes | None = None
    error: str | None = None  # the server refused this image (its own item in the reply)


class LocalScorer:
    """A site model folder (torch) or an exported graph (onnxruntime / OpenVINO)."""

    model: ExportedModel | SiteModel
    level: Callable[[ImageResult], np.ndarray]

    def __init__(self, model: str, target_fpr: float | None):
        from bayprano.platform.exported import ExportedModel, is_exported_model

        if Path(model).is_file() and not is_exported_model(model):
            raise DataError(f"{model}: not a site model folder nor an exported model (.onnx, .xml)")
        if is_exported_model(model):
            exported = ExportedModel.load(model, target_fpr)
            self.model, self.version, self.level = exported, exported.version, exported.heat_level
        else:
            from bayprano.platform.export import load_site_model
            from bayprano.platform.model.anomaly_map import heat_level

            site = load_site_model(model)
            self.model = site if target_fpr is None else site.with_target_fpr(target_fpr)
            self.version = str(site.info.get("model_sha256") or "")[:12]

            def level(result: ImageResult) -> np.ndarray:
                assert result.anomaly_map is not None, "scored with maps=True"
                return heat_level(result.anomaly_map, result.score, result.threshold, site.model.dim, site.df)

            self.level = level

    def __call__(self, images):
        return self.model.score(images, maps=True, batch_size=BATCH)

    def overlay(self, image: np.ndarray, result) -> np.ndarray:
        from bayprano.platform.model.anomaly_map import overlay

        return overlay(image, self.level(result))

    @staticmethod
    def extra(result) -> dict:
        return {}


class HttpScorer:
    """A ``bayprano serve`` endpoint: images go as PNG, the overlay comes back with each result."""

    def __init__(self, args: argparse.Namespace):
        from bayprano.serve.cli import client_endpoint

        self.endpoint, self.token = client_endpoint(args)
        self.endpoint += "?map=png"
        self.timeout = args.timeout
        self.version = None

    def __call__(self, images):
        from bayprano.platform.data.imageio import encode_png
        from bayprano.serve.cli import post_json

        payload = {
            "images": [
                {"name": f"{i}.png", "data": base64.b64encode(encode_png(im)).decode()} for i, im in enumerate(images)
            ]
        }
        response = post_json(self.endpoint, self.token, payload, self.timeout)
        return [
            ServedResult(
                r.get("score"),
                r.get("p_value"),
                r.get("threshold"),
                r.get("decision"),
                r.get("uncertainty"),
                {k: r.get(k) for k in ("model_version", "latency_ms")},
                base64.b64decode(r["map"]) if r.get("map") else None,
                (r.get("error") or {}).get("message") or "refused by the server"
                if r.get("status") == "error"
                else None,
            )
            for r in response["results"]
        ]

    @staticmethod
    def overlay(image: np.ndarray, result: ServedResult) -> np.ndarray:
        from bayprano.platform.data.imageio import load_image

        return load_image(result.picture) if result.picture else image

    @staticmethod
    def extra(result: ServedResult) -> dict:
        return result.extra


def run_score(args: argparse.Namespace) -> int:
    """``bayprano score``; see the module docstring."""
    from tqdm import tqdm

    from bayprano.platform.data.imageio import save_png
    from bayprano.platform.predict import expand_inputs, overlay_names, predict

    scorer: HttpScorer | LocalScorer
    if args.url:
        scorer = HttpScorer(args)
    elif args.model:
        scorer = LocalScorer(args.model, args.target_fpr)
    else:
        raise ConfigError(
            "score needs --model MODEL_DIR or an exported .onnx/.xml (score locally) or --url URL "
            "--site S (score on a server)"
        )
    maps = Path(args.maps) if args.maps else None
    files, _ = expand_inputs(args.images)
    names = dict(zip(map(str, files), overlay_names(files)))
    pending: deque = deque()  # (image, result) in the order predict emits the scored rows

    def score(images):
        results = scorer(images)
        pending.extend(zip(images, results))
        return results

    def emit(row) -> None:
        if row.error is not None:
            print(f"bayprano: error: {row.path}: {row.error}", file=sys.stderr, flush=True)
            return
        image, result = pending.popleft()
        record = {
            "image": row.path,
            "score": row.score,
            "p_value": row.p_value,
            "threshold": row.threshold,
            "decision": row.decision,
            "uncertainty": row.uncertainty,
            **scorer.extra(result),
        }
        if maps is not None:
            record["map"] = str(save_png(maps / f"{names[row.path]}.png", scorer.overlay(image, result)))
        print(json.dumps(record), flush=True)

    def progress(batches):
        return tqdm(batches, desc="scoring", unit="batch", file=sys.stderr, disable=None)

    run = predict(
        args.images,
        score,
        output=args.output,
        overlay=scorer.overlay,
        model_version=scorer.version,
        batch_size=BATCH,
        progress=progress,
        emit=emit,
    )
    if args.output:
        counts = ", ".join(f"{v} {k}" for k, v in run.counts().items())
        print(f"wrote {Path(args.output) / 'predictions.csv'} and summary.html ({counts})", file=sys.stderr)
    return 2 if run.failed else 0
