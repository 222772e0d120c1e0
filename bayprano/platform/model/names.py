"""The names of the built-in backbones that settings refer to, and their default image sides, in a
module light enough (no torch) for the configuration models to import."""

DINOV2_BACKBONE = "dinov2_vits14"
LITE2_BACKBONE = "efficientnet_lite2"
DEFAULT_BACKBONE = DINOV2_BACKBONE
DINOV2_PATCH = 14
DEFAULT_IMAGE_SIZE = 252  # 18 x 18 DINOv2 patches
CNN_IMAGE_SIZE = 256


def default_image_size(backbone: str | None = None) -> int:
    """The image side a backbone gets unless told otherwise: 252 px for DINOv2 (a multiple of its 14 px
    patch), 256 px for the CNNs."""
    return DEFAULT_IMAGE_SIZE if (backbone or DEFAULT_BACKBONE) == DINOV2_BACKBONE else CNN_IMAGE_SIZE
