"""The frozen patch feature extractor that every backbone is wrapped in (see ``backbone`` for the
registry that builds one by name), its input normalisations and its checks of the images it is given."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayprano.platform.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights are converted from TensorFlow's EfficientNet-Lite, which was trained on
# (x - 127) / 128; with ImageNet mean/std the stem would see about five times its training variance.
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

MIN_IMAGE_SIZE = 32


class PatchFeatureExtractor(nn.Module):
    """A frozen trunk that maps normalised images (B, 3, H, W) to patch features (B, C, H/s, W/s).

    ``s`` is ``stride`` (8 for the CNNs, 14 for DINOv2). The trunk returns one or more maps; the later
    ones are upsampled to the first one's grid and all are concatenated along channels, then averaged
    over ``local_average`` x ``local_average`` neighbourhoods (1: none). Image sides must be multiples of
    ``side_multiple``. Build one with :func:`build_backbone`. It stays in eval mode whatever ``train()``
    is asked, its parameters never require gradients and its BatchNorm statistics are never updated.
    """

    mean: Tensor  # buffers (1, 3, 1, 1) of the input normalisation
    std: Tensor

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
        self, images_uint8: np.ndarray | Sequence[np.ndarray], size: int | None = None, batch_size: int = 16
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
        return f"name={self.name!r}, out_channels={self.out_channels}, stride={self.stride}, layers={self.layers!r}"


def nearest_multiple(side: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``side`` (at least ``multiple``)."""
    return max(multiple, int(round(side / multiple)) * multiple)


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
            f"images must be a uint8 array (B, H, W, 3) or a list of (H, W, 3) arrays, got {type(images).__name__}"
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
