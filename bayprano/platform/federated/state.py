"""What travels between sites: the model's trainable parameters as one flat float32 vector.

``ParameterLayout`` fixes the order, names and shapes of a ``BayesianPatchModel``'s parameters (the
head, the prior hyperparameters, the logit maps, the inner learning rate: everything meta-training
changes). Buffers (``feature_mean``, ``feature_std``) are fixed feature statistics, not trained, and are
not part of the vector. Two models have the same layout exactly when their parameters have the same
names and shapes in the same order; the layout's ``digest`` names it in a few bytes.

``encode_update`` / ``decode_update`` turn a vector in a layout (a global model or a site's delta) into
bytes and back: a 32-byte header (magic, format version, dtype, the first 16 bytes of the layout digest,
the element count) and the values as little-endian float32, or float16 to halve the traffic. A vector
encoded for another layout, truncated, or carrying NaN or infinity is refused with a ``DataError``.
``encoded_num_bytes`` and ``CommunicationLedger`` count what each site sends and receives per round.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError, DataError

MAGIC = b"BPFV"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBB2x16sQ")
HEADER_BYTES = _HEADER.size  # 32
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of a model's parameters, in ``named_parameters()`` order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ConfigError("parameter layout: a model with no parameters has nothing to federate")
        names = [n for n, _ in self.entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"parameter layout: duplicate parameter names in {names}")

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParameterLayout":
        return cls(tuple((name, tuple(int(s) for s in p.shape)) for name, p in model.named_parameters()))

    # ------------------------------------------------------------------------------------ describe

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.entries)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(s for _, s in self.entries)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def size(self) -> int:
        """Number of float32 values in a vector of this layout."""
        return sum(self.numels)

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the names, shapes and dtype: equal digests mean interchangeable vectors."""
        text = json.dumps(
            {"dtype": "float32", "entries": [[n, list(s)] for n, s in self.entries]}, separators=(",", ":")
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def num_bytes(self, fp16: bool = False) -> int:
        """Bytes of one encoded vector of this layout, header included."""
        return encoded_num_bytes(self, fp16)

    def difference(self, other: "ParameterLayout") -> str | None:
        """The first way ``other`` differs from this layout, in words, or None if they are equal."""
        if other == self:
            return None
        mine, theirs = dict(self.entries), dict(other.entries)
        for name in self.names:
            if name not in theirs:
                return f"parameter {name!r} is missing"
            if theirs[name] != mine[name]:
                return f"parameter {name!r} has shape {list(theirs[name])}, expected {list(mine[name])}"
        for name in other.names:
            if name not in mine:
                return f"unexpected parameter {name!r}"
        return "parameters are in another order"

    # ------------------------------------------------------------------------------------ vectors

    def check_vector(self, vector: Tensor | np.ndarray, what: str = "vector") -> Tensor:
        """``vector`` as a float32 CPU tensor after checking it is 1-D, of this size, and finite."""
        if isinstance(vector, np.ndarray):
            vector = torch.from_numpy(vector)
        if not isinstance(vector, Tensor):
            raise DataError(f"{what}: expected a tensor, got {type(vector).__name__}")
        if not vector.is_floating_point():
            raise DataError(f"{what}: expected floating-point values, got {vector.dtype}")
        if vector.ndim != 1 or vector.numel() != self.size:
            raise DataError(f"{what}: expected a 1-D vector of {self.size} values, got shape {list(vector.shape)}")
        vector = vector.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(vector).all()):
            bad = int((~torch.isfinite(vector)).sum())
            raise DataError(f"{what}: {bad} of {self.size} values are NaN or infinite")
        return vector

    def flatten(self, model_or_state: nn.Module | Mapping[str, Tensor]) -> Tensor:
        """A model's parameters (or a state dict's, ignoring its buffers) as one float32 CPU vector."""
        tensors: Mapping[str, Tensor]
        if isinstance(model_or_state, nn.Module):
            tensors = dict(model_or_state.named_parameters())
            where = "model"
        elif isinstance(model_or_state, Mapping):
            tensors = model_or_state
            where = "state dict"
        else:
            raise DataError(f"flatten: expected a model or a state dict, got {type(model_or_state).__name__}")
        parts = []
        for name, shape in self.entries:
            if name not in tensors:
                raise DataError(f"{where}: parameter {name!r} is missing (layout {self.digest[:12]})")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise DataError(f"{where}: parameter {name!r} has shape {list(t.shape)}, expected {list(shape)}")
            parts.append(t.detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(parts)

    def unflatten(self, vector: Tensor | np.ndarray) -> dict[str, Tensor]:
        """A vector of this layout as ``{name: tensor of its shape}`` (float32, CPU, a copy)."""
        vector = self.check_vector(vector).clone()
        return {name: part.view(shape) for (name, shape), part in zip(self.entries, vector.split(self.numels))}

    def load_into(self, model: nn.Module, vector: Tensor | np.ndarray) -> nn.Module:
        """Copy a vector of this layout into ``model``'s parameters (its buffers are left alone)."""
        diff = self.difference(ParameterLayout.from_model(model))
        if diff:
            raise DataError(f"model does not match the parameter layout {self.digest[:12]}: {diff}")
        values = self.unflatten(vector)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(values[name].to(p.device, p.dtype))
        return model


# ---------------------------------------------------------------------------------------- bytes


def encoded_num_bytes(layout: ParameterLayout, fp16: bool = False) -> int:
    """Bytes of one vector of ``layout`` encoded by ``encode_update``, header included."""
    return HEADER_BYTES + layout.size * (2 if fp16 else 4)


def encode_update(vector: Tensor | np.ndarray, layout: ParameterLayout, fp16: bool = False) -> bytes:
    """A vector of ``layout`` (a global model or a delta) as bytes: header + float32 or float16 values.

    With ``fp16`` every value must be within float16's range (|x| <= 65504), or a ``DataError`` is
    raised instead of sending infinities; precision is then about 3 significant digits.
    """
    values = layout.check_vector(vector, "update").numpy()
    code = 2 if fp16 else 1
    if fp16:
        peak = float(np.abs(values).max())
        if peak > _FP16_MAX:
            raise DataError(
                f"update: a value of magnitude {peak:.4g} is beyond float16's range ({_FP16_MAX:g}); "
                "send it as float32 or clip the update"
            )
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, code, bytes.fromhex(layout.digest[:32]), layout.size)
    return header + values.astype(_DTYPES[code], copy=False).tobytes()


def decode_update(data: bytes | bytearray | memoryview, layout: ParameterLayout) -> Tensor:
    """The float32 vector that ``encode_update`` encoded; refuses bytes made for another layout."""
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise DataError(f"update: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, code, digest, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DataError(f"update: not a bayprano parameter vector (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise DataError(f"update: format version {version} is not supported (expected {FORMAT_VERSION})")
    if code not in _DTYPES:
        raise DataError(f"update: unknown dtype code {code}")
    if digest.hex() != layout.digest[:32]:
        raise DataError(
            f"update: encoded for parameter layout {digest.hex()[:12]}, this model's layout is "
            f"{layout.digest[:12]} ({layout.size} values)"
        )
    if count != layout.size:
        raise DataError(f"update: header says {count} values, the layout has {layout.size}")
    dtype = _DTYPES[code]
    expected = HEADER_BYTES + count * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"update: {len(data)} bytes, expected {expected} for {count} {dtype.name} values")
    values = np.frombuffer(data, dtype=dtype, offset=HEADER_BYTES).astype(np.float32)
    return layout.check_vector(torch.from_numpy(values), "update")


# ------------------------------------------------------------------------------- communication

DIRECTIONS = ("down", "up")


class CommunicationLedger:
    """Bytes moved per (round, site, direction): ``down`` = server to site, ``up`` = site to server."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, str, str], int] = defaultdict(int)

    def record(self, round: int, site: str, direction: str, num_bytes: int) -> None:
        if direction not in DIRECTIONS:
            raise ConfigError(f"communication: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, (int, np.integer)) or num_bytes < 0:
            raise ConfigError(f"communication: num_bytes must be a non-negative integer, got {num_bytes!r}")
        self._bytes[(int(round), str(site), direction)] += int(num_bytes)

    def total(self, round: int | None = None, site: str | None = None, direction: str | None = None) -> int:
        """Bytes over every entry matching the given round, site and direction (None: any)."""
        return sum(
            n
            for (r, s, d), n in self._bytes.items()
            if (round is None or r == round) and (site is None or s == site) and (direction is None or d == direction)
        )

    def per_site_round(self) -> dict[tuple[int, str], dict[str, int]]:
        """``{(round, site): {"down": bytes, "up": bytes}}``, sorted by round then site."""
        out: dict[tuple[int, str], dict[str, int]] = {}
        for (r, s, d), n in sorted(self._bytes.items()):
            out.setdefault((r, s), {k: 0 for k in DIRECTIONS})[d] = n
        return out

    def state_dict(self) -> dict:
        return {"rows": [[r, s, d, n] for (r, s, d), n in sorted(self._bytes.items())]}

    def load_state_dict(self, state: Mapping) -> None:
        rows: Iterable = state.get("rows", []) if isinstance(state, Mapping) else None
        if rows is None:
            raise DataError("communication ledger state: expected a mapping with 'rows'")
        self._bytes = defaultdict(int)
        for row in rows:
            if not isinstance(row, (list, tuple)) or len(row) != 4:
                raise DataError(
                    f"communication ledger state: a row must be [round, site, direction, bytes], got {row!r}"
                )
            self.record(*row)
