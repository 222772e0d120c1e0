"""The names of the built-in backbones that settings refer to, in a module light enough (no torch) for
the configuration models to import."""

DEFAULT_BACKBONE = "efficientnet_lite2"
DINOV2_BACKBONE = "dinov2_vits14"
