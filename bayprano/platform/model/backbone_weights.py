"""Reading a backbone's weights from a local state-dict file and loading them into its network, with
errors that name the file and the backbone. Nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError


def read_state_dict(path: Path, backbone: str) -> tuple[dict[str, Tensor], str]:
    """The state dict stored in ``path`` and the first 16 hex digits of the file's sha256."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} for backbone {backbone!r} does not exist")
    try:
        data = path.read_bytes()
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip and runtime errors of many kinds
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"weights file {path} for backbone {backbone!r} cannot be loaded as a PyTorch state dict "
            f"({type(exc).__name__}: {first_line})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"weights file {path} for backbone {backbone!r} holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = rename_keys(obj, lambda k: k[len("module.") :])
    return obj, hashlib.sha256(data).hexdigest()[:16]


def rename_keys(state: dict[str, Tensor], rename: Callable[[str], str]) -> dict[str, Tensor]:
    """``state`` with renamed keys, keeping the per-module versions some models check when loading."""
    renamed = OrderedDict((rename(k), v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        setattr(renamed, "_metadata", OrderedDict((rename(k) if k else k, v) for k, v in metadata.items()))
    return renamed


def load_state(net: nn.Module, state: dict[str, Tensor], path: Path, backbone: str, assign: bool = False) -> None:
    try:
        result = net.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:4])
        raise ConfigError(f"weights file {path} does not fit backbone {backbone!r}: {detail}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = [
            f"{len(keys)} {kind} keys (e.g. {', '.join(keys[:3])})"
            for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
            if keys
        ]
        raise ConfigError(f"weights file {path} does not fit backbone {backbone!r}: {'; '.join(parts)}")
