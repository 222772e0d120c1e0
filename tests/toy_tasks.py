"""Stand-ins for the backbone and the anomaly injector, so that meta-learning tests run in seconds."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_PROJ = torch.randn(12, 3, 1, 1, generator=torch.Generator().manual_seed(0))


def toy_extract(images: np.ndarray) -> torch.Tensor:
    """A fixed stand-in for the backbone: 4x4 average pooling and a random 1x1 projection to 12 channels."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255
    return F.conv2d(F.avg_pool2d(x, 4), _PROJ)


def toy_injector(image, rng, source=None):
    """Inverts an 8x8 square: the mask is exactly the changed pixels."""
    out = image.copy()
    y, x = rng.integers(0, image.shape[0] - 8, size=2)
    out[y : y + 8, x : x + 8] = 255 - out[y : y + 8, x : x + 8]
    return out, (out != image).any(-1)
