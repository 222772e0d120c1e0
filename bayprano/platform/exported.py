"""Score images with an exported site model (``model.onnx`` under onnxruntime, ``model.xml`` under OpenVINO).

``ExportedModel.load(path)`` reads the graph and its metadata (written by ``platform/export.py``);
``score(images)`` resizes uint8 RGB images to the model's side as ``PatchFeatureExtractor.preprocess``
does, runs the graph for the anomaly maps and image statistics, and turns the statistics into
p-values, decisions and uncertainties with the platform's own calibration and ``decide``: the same
``ImageResult`` objects as ``SiteModel.score``.

OpenVINO is asked for float32 inference: on CPUs with bfloat16 units its default precision moves the
image statistic by several percent, enough to change decisions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.export import INPUT_NAME, OUTPUT_NAMES, read_metadata
from bayprano.platform.model.anomaly_map import heat_level
from bayprano.platform.model.niw import patch_score
from bayprano.platform.model.scoring import calibration_from_dict, decision_sd
from bayprano.platform.model.site import ImageResult
from bayprano.platform.model.site_model import image_results

EXPORTED_SUFFIXES = (".onnx", ".xml")


def is_exported_model(path: str | os.PathLike) -> bool:
    return Path(path).suffix in EXPORTED_SUFFIXES


class ExportedModel:
    """An exported graph and its metadata; ``score`` answers as ``SiteModel.score`` does."""

    def __init__(self, path: Path, meta: dict, run, target_fpr: float | None = None):
        self.path = path
        self.meta = meta
        self._run = run
        self.image_size = int(meta["input"]["image_size"])
        self.dim, self.df = int(meta["dim"]), float(meta["df"])
        self.nu_n, self.kappa_n, self.z_review = float(meta["nu_n"]), float(meta["kappa_n"]), float(meta["z_review"])
        self.calibration = calibration_from_dict(meta["calibration"])
        self.target_fpr = float(meta["target_fpr"] if target_fpr is None else target_fpr)
        self.threshold = (
            float(meta["threshold"]) if target_fpr is None else self.calibration.threshold(self.target_fpr, self.df)
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike, target_fpr: float | None = None, threads: int | None = None
    ) -> "ExportedModel":
        """``threads``: the runtime's CPU threads (default: the runtime's own choice)."""
        path = Path(path)
        meta = read_metadata(path)
        try:
            run = _onnxruntime(path, threads) if path.suffix == ".onnx" else _openvino(path, threads)
        except Exception as exc:  # the runtimes raise many kinds of errors on a damaged graph
            raise DataError(f"{path}: the runtime cannot load it ({type(exc).__name__}: {str(exc)[:200]})") from None
        try:
            return cls(path, meta, run, target_fpr)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: bayprano metadata is incomplete ({type(exc).__name__}: {exc})") from None

    @property
    def version(self) -> str:
        return str(self.meta.get("model_sha256") or "")[:12]

    def inputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 RGB images (H, W, 3) as the graph's input: float32 (B, 3, S, S), 0..255, resized (bilinear,
        antialiased) where they are not S x S."""
        size = self.image_size
        batch = []
        for image in images:
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise DataError(f"image must be uint8 RGB (H, W, 3), got {image.dtype} {tuple(image.shape)}")
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
            if tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            batch.append(x)
        return torch.cat(batch).numpy()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph on an input batch: anomaly maps (B, S, S) and image statistics (B,)."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def score(self, images: Sequence[np.ndarray], maps: bool = True, batch_size: int = 16) -> list[ImageResult]:
        if not len(images):
            raise DataError("no images given: the list is empty")
        results = []
        for start in range(0, len(images), batch_size):
            amaps, stat = self.run(self.inputs(images[start : start + batch_size]))
            results += self.results(stat, amaps if maps else None)
        return results

    def results(self, stat: np.ndarray, amaps: np.ndarray | None) -> list[ImageResult]:
        return image_results(
            stat,
            self.calibration.p_value(stat, self.df),
            self.threshold,
            decision_sd(stat, self.dim, self.nu_n, self.kappa_n, self.calibration, self.target_fpr, self.df),
            self.z_review,
            amaps,
            float(patch_score(torch.tensor(self.threshold * self.dim), self.df, self.dim)),
        )

    def heat_level(self, result: ImageResult) -> np.ndarray:
        if result.anomaly_map is None:
            raise ValueError("heat_level needs the image's anomaly map: score it with maps=True")
        return heat_level(result.anomaly_map, result.score, result.threshold, self.dim, self.df)


def _onnxruntime(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(f"{path}: scoring an ONNX model needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = list(OUTPUT_NAMES)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amaps, stat = session.run(names, {INPUT_NAME: batch})
        return amaps, stat

    return run


def _openvino(path: Path, threads: int | None):
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError(f"{path}: scoring an OpenVINO model needs openvino: pip install 'bayprano[export]'") from None
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    outputs = [compiled.output(name) for name in OUTPUT_NAMES]

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = compiled({INPUT_NAME: batch})
        return result[outputs[0]], result[outputs[1]]

    return run
