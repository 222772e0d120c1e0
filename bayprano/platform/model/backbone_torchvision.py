"""Any torchvision classification CNN as a backbone: the network is traced and cut at its last stride-8
and stride-16 feature maps (found from the shapes of a pass on the meta device), with ImageNet weights
from torchvision's local cache or a file."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.backbone_weights import load_state, read_state_dict, rename_keys
from bayprano.platform.model.extractor import IMAGENET_MEAN, IMAGENET_STD, PatchFeatureExtractor

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
# torchvision builds these two with aux heads and input re-normalisation when it loads ImageNet weights.
_TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": True, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": False},
}
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class _GraphTrunk(nn.Module):
    """A torchvision model traced up to two named nodes; returns (stride-8 map, stride-16 map)."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.graph(x)
        return out["s8"], out["s16"]


def build_torchvision(name: str, path: Path | None) -> PatchFeatureExtractor:
    from torchvision.models.feature_extraction import create_feature_extractor

    if path is None:
        path = _torchvision_cache_file(name)
    state, digest = read_state_dict(path, name)
    if name.startswith("densenet"):
        state = rename_keys(state, lambda k: _DENSENET_OLD_KEY.sub(r"\1\2", k))
    kwargs = _TORCHVISION_KWARGS.get(name, {})
    try:
        with torch.device("meta"):
            net = torchvision.models.get_model(name, weights=None, **kwargs)
    except (NotImplementedError, RuntimeError):  # an initialiser that copies data, which meta tensors lack
        net = torchvision.models.get_model(name, weights=None, **kwargs).to("meta")
    net.eval()
    (node8, c8), (node16, c16) = _stride_nodes(net, name)
    load_state(net, state, path, name, assign=True)
    try:
        graph = create_feature_extractor(net, return_nodes={node8: "s8", node16: "s16"}, suppress_diff_warning=True)
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
