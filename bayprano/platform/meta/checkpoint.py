"""Meta-checkpoints: the meta-learned head, prior and calibration prior, with what they were trained on.

A checkpoint is one file written atomically with ``torch.save`` and read with ``weights_only=True``. It
records the backbone's name and fingerprint, so that adapting it on another backbone is refused, the
image size, the meta-training configuration, the categories it saw, and the training history. The
centralised trainer and the federated Coordinator write the same format.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bayprano.platform.errors import DataError
from bayprano.platform.fileio import atomic_write_bytes, check_kind_and_format
from bayprano.platform.model.bayes import BayesianPatchModel
from bayprano.platform.model.scoring import Calibration, NormalityPrior

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "bayprano-meta-checkpoint"


@dataclass
class MetaCheckpoint:
    model: BayesianPatchModel
    backbone: str
    backbone_fingerprint: str
    image_size: int
    calibration: Calibration
    meta_config: dict = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    created: str = ""
    sha256: str = ""
    normality: NormalityPrior | None = None

    def save(self, path: str | os.PathLike) -> Path:
        created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        payload = {
            "kind": CHECKPOINT_KIND,
            "format": CHECKPOINT_FORMAT,
            "created": created,
            "model_config": self.model.config(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "backbone": self.backbone,
            "backbone_fingerprint": self.backbone_fingerprint,
            "image_size": int(self.image_size),
            "calibration": self.calibration.as_dict(),
            "normality": self.normality.as_dict() if self.normality is not None else None,
            "meta_config": dict(self.meta_config),
            "categories": list(self.categories),
            "history": list(self.history),
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.created = created
        return atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike) -> MetaCheckpoint:
    """Read a checkpoint; a missing, truncated or foreign file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file does not exist")
    data = path.read_bytes()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged file
        raise DataError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    check_kind_and_format(payload, path, CHECKPOINT_KIND, "a bayprano meta-checkpoint", CHECKPOINT_FORMAT, "checkpoint")
    try:
        model = BayesianPatchModel(**payload["model_config"])
        model.load_state_dict(payload["state_dict"])
        cal = Calibration(**payload["calibration"])
        ckpt = MetaCheckpoint(
            model=model.eval(),
            backbone=payload["backbone"],
            backbone_fingerprint=payload["backbone_fingerprint"],
            image_size=int(payload["image_size"]),
            calibration=cal,
            meta_config=payload.get("meta_config", {}),
            categories=list(payload.get("categories", [])),
            history=list(payload.get("history", [])),
            created=payload.get("created", ""),
            sha256=hashlib.sha256(data).hexdigest(),
            normality=NormalityPrior.from_dict(payload["normality"]) if payload.get("normality") else None,
        )
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: checkpoint is incomplete or inconsistent ({exc.__class__.__name__}: {exc})") from None
    return ckpt
