"""Export an adapted site model to one ONNX graph (and from it an OpenVINO IR) that runs without Python.

``export_site_model(model_dir, fmt, out)`` loads a site model folder (refusing a corrupt or foreign one,
as ``SiteModel.load`` does), folds backbone, head and fitted posterior into one module
(:class:`SiteGraph`) and writes it with ``torch.onnx.export`` (the TorchScript exporter, which needs
nothing beyond torch and onnx), checked with ``onnx.checker``; ``fmt="openvino"`` converts that ONNX
file with the ``openvino`` package into ``model.xml`` / ``model.bin``.

The graph:

- input ``image``: float32 (B, 3, S, S), RGB, pixel values 0..255 (not normalised), S the model's image
  size; B is dynamic. Normalisation is inside the graph.
- outputs ``anomaly_map`` (B, S, S), the patch scores upsampled and smoothed exactly as
  ``SiteModel.score`` returns them, and ``statistic`` (B,), the image statistic T of ``image_statistic``.

Each position's Student-t predictive is folded in as its location and the inverse of its Cholesky
factor (computed in float64), so the Mahalanobis distance is a batched matrix product: ONNX has no
triangular solve. What turns T into a p-value and a decision (calibration, threshold, target FPR,
review band) and how to feed the graph (input size, normalisation) is metadata: the graph's
``metadata_props`` (key ``bayprano``, one JSON object, plus a few keys for readers) and ``model.json``
beside it.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write_bytes, atomic_write_json, check_kind_and_format, file_sha256
from bayprano.platform.model.anomaly_map import map_operator, anomaly_map
from bayprano.platform.model.niw import patch_score
from bayprano.platform.model.scoring import STATISTIC_SIGMA, image_statistic

if TYPE_CHECKING:
    from bayprano.platform.model.site import SiteModel

EXPORT_KIND = "bayprano-exported-model"
EXPORT_FORMAT = 1
FORMATS = ("onnx", "openvino")
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "statistic")
INPUT_LAYOUT = "float32 (B, 3, S, S), RGB, values 0..255, not normalised"
OPSET = 17
SIDECAR = "model.json"
MAP_SIGMA = float(inspect.signature(anomaly_map).parameters["sigma"].default)  # what SiteModel.score uses


class SiteGraph(nn.Module):
    """A site model as one module: raw RGB images (B, 3, S, S), 0..255 -> (anomaly map (B, S, S), T (B,))."""

    # buffers, registered in __init__
    loc: Tensor
    whitening_t: Tensor
    pixel_mean: Tensor
    pixel_std: Tensor
    map_rows: Tensor
    map_cols: Tensor

    def __init__(self, site) -> None:
        super().__init__()
        extractor = site.extractor
        self.extractor = extractor
        self.head = site.model
        self.dim = int(site.model.dim)
        self.df = float(site.df)
        self.grid = tuple(int(g) for g in site.grid)
        self.size = int(site.image_size)
        predictive = site.predictive
        scale_tril = predictive.scale_tril.detach().cpu().double()
        eye = torch.eye(scale_tril.shape[-1], dtype=torch.float64).expand_as(scale_tril)
        whitening = torch.linalg.solve_triangular(scale_tril, eye, upper=False)  # L^-1, (P, d, d)
        self.register_buffer("loc", predictive.loc.detach().cpu().float()[:, None, :])  # (P, 1, d)
        self.register_buffer("whitening_t", whitening.transpose(-1, -2).float().contiguous())  # (P, d, d)
        self.register_buffer("pixel_mean", extractor.mean.detach().cpu().float() * 255.0)
        self.register_buffer("pixel_std", extractor.std.detach().cpu().float() * 255.0)
        # ``anomaly_map``'s two operators (rows @ scores @ cols^T), as constants: traced, ``anomaly_map``
        # would record the float64 ops that build them.
        h, w = self.grid
        self.register_buffer("map_rows", map_operator(h, self.size, MAP_SIGMA, torch.float32, torch.device("cpu")))
        self.register_buffer("map_cols", map_operator(w, self.size, MAP_SIGMA, torch.float32, torch.device("cpu")))
        self.eval()

    def mahalanobis(self, z: Tensor) -> Tensor:
        """Squared Mahalanobis maps (B, h, w) of embeddings (B, d, h, w) under each position's predictive."""
        h, w = self.grid
        diff = z.flatten(2).permute(2, 0, 1) - self.loc  # (P, B, d)
        maha = torch.bmm(diff, self.whitening_t).pow(2).sum(-1)  # (P, B)
        return maha.t().reshape(-1, h, w)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = (image - self.pixel_mean) / self.pixel_std
        maha = self.mahalanobis(self.head.embed(self.extractor(x)))
        statistic = image_statistic(maha, self.dim)
        amap = self.map_rows @ patch_score(maha, self.df, self.dim) @ self.map_cols.t()
        return amap, statistic


def export_metadata(site) -> dict:
    """Everything a runtime needs besides the graph: how to feed it and how to decide from T."""
    return {
        "kind": EXPORT_KIND,
        "format": EXPORT_FORMAT,
        "input": {
            "name": INPUT_NAME,
            "layout": INPUT_LAYOUT,
            "image_size": site.image_size,
            "resize": "bilinear, antialiased, to S x S",
        },
        "outputs": list(OUTPUT_NAMES),
        "normalisation": {
            "mean": [float(v) for v in site.extractor.mean.flatten()],
            "std": [float(v) for v in site.extractor.std.flatten()],
            "applied": "inside the graph: (image / 255 - mean) / std",
        },
        "statistic": {
            "definition": "max over patches of the Gaussian-smoothed (sigma in patch cells) m / d",
            "sigma": STATISTIC_SIGMA,
        },
        "threshold": site.threshold,
        "target_fpr": site.target_fpr,
        "calibration": site.calibration.as_dict(),
        "z_review": site.z_review,
        "dim": int(site.model.dim),
        "df": site.df,
        "nu_n": site.nu_n,
        "kappa_n": site.kappa_n,
        "grid": list(site.grid),
        "backbone": site.backbone,
        "backbone_fingerprint": site.info.get("backbone_fingerprint"),
        "model_sha256": site.info.get("model_sha256"),
        "checkpoint_sha256": site.info.get("checkpoint_sha256"),
        "support_size": site.info.get("support_size"),
        "created": site.info.get("created"),
    }


def load_site_model(model_dir: str | os.PathLike) -> SiteModel:
    """The site model in ``model_dir`` with its backbone, refused (naming the file) when corrupt or foreign."""
    from bayprano.platform.model.backbone import build_backbone
    from bayprano.platform.model.site import SiteModel

    site = SiteModel.load(model_dir)
    return SiteModel.load(model_dir, extractor=build_backbone(site.backbone))


def export_site_model(model_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, site=None) -> Path:
    """Write ``out/model.onnx`` (and for ``openvino`` ``out/model.xml`` + ``.bin``) and ``out/model.json``;
    returns the path of the graph a runtime loads. ``site`` skips loading when the caller has it."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    site = site if site is not None else load_site_model(model_dir)
    if getattr(site, "scoring", "resize") != "resize" or getattr(site, "roi", None) is not None:
        raise ConfigError(
            f"{model_dir}: export covers resize scoring without a region of interest; this model "
            f"scores {site.scoring} with region {site.roi.describe() if site.roi else 'none'}"
        )
    meta = export_metadata(site)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = write_onnx(site, meta, out / "model.onnx")
    target = onnx_path
    if fmt == "openvino":
        target = write_openvino(onnx_path, meta, out / "model.xml")
    sidecar = {
        **meta,
        "files": {p.name: file_sha256(p) for p in sorted(out.iterdir()) if p.suffix in (".onnx", ".xml", ".bin")},
    }
    atomic_write_json(out / SIDECAR, sidecar)
    return target


def write_onnx(site, meta: dict, path: Path) -> Path:
    import onnx

    graph = SiteGraph(site)
    size = site.image_size
    example = torch.full((2, 3, size, size), 128.0)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
            )
        model = onnx.load(str(raw))
    model.doc_string = f"bayprano site model {meta.get('model_sha256', '')[:12]}: {INPUT_LAYOUT} -> anomaly map, T"
    props = {
        "bayprano": json.dumps(meta, sort_keys=True),
        "threshold": repr(meta["threshold"]),
        "target_fpr": repr(meta["target_fpr"]),
        "image_size": str(meta["input"]["image_size"]),
        "model_sha256": str(meta["model_sha256"]),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return atomic_write_bytes(path, model.SerializeToString())


def write_openvino(onnx_path: Path, meta: dict, xml_path: Path) -> Path:
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("--format openvino needs the openvino package: pip install 'bayprano[export]'") from None
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(meta, sort_keys=True), ["bayprano"])
    with tempfile.TemporaryDirectory(dir=xml_path.parent) as tmp:
        staged = Path(tmp) / xml_path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(staged, xml_path)
    return xml_path


def read_metadata(path: str | os.PathLike) -> dict:
    """The export metadata stored in an exported ``.onnx`` or ``.xml`` graph, checked for kind and format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such exported model file")
    try:
        if path.suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            text = {p.key: p.value for p in model.metadata_props}.get("bayprano")
        elif path.suffix == ".xml":
            import openvino as ov

            model = ov.Core().read_model(str(path))
            text = model.get_rt_info(["bayprano"]).astype(str) if model.has_rt_info(["bayprano"]) else None
        else:
            raise DataError(f"{path}: an exported model is a .onnx or .xml file")
    except DataError:
        raise
    except ImportError as exc:
        raise ConfigError(f"{path}: reading it needs {exc.name}: pip install 'bayprano[export]'") from None
    except Exception as exc:  # onnx and openvino raise many kinds of errors on a damaged file
        raise DataError(f"{path}: not a readable exported model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if text is None:
        raise DataError(f"{path}: has no bayprano metadata; not exported by `bayprano export`")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: bayprano metadata is not valid JSON ({exc})") from None
    check_kind_and_format(meta, path, EXPORT_KIND, "a bayprano exported model", EXPORT_FORMAT, "export")
    return meta
