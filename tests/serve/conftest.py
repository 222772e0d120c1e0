"""Fixtures for the serving tests: a meta-checkpoint without meta-training, and site models adapted from it.

The checkpoint is built as ``evaluate._frozen_checkpoint`` builds one (initial head, feature standardisation
from a few good images, the analytic calibration prior) on the ``random`` control backbone at 64 px, so
that adaptation takes a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving_fixtures import DIM, SIZE, good


@pytest.fixture(scope="session")
def extractor():
    from bayprano.platform.model.backbone import build_backbone

    return build_backbone("random")


@pytest.fixture(scope="session")
def checkpoint(extractor, tmp_path_factory) -> Path:
    from site_fixtures import frozen_checkpoint

    ckpt = frozen_checkpoint(extractor, np.stack(good("wood", 0, 4) + good("fabric", 0, 4)), SIZE, DIM)
    path = tmp_path_factory.mktemp("serve-ckpt") / "meta.pt"
    ckpt.save(path)
    return path


@pytest.fixture(scope="session")
def make_site_model(checkpoint, extractor):
    """``make_site_model(category, seed, target_fpr)``: a SiteModel adapted on 3 good images."""
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    ckpt = load_checkpoint(checkpoint)

    def make(category: str = "wood", seed: int = 1, target_fpr: float = 0.05):
        return adapt(ckpt, good(category, seed, 3), target_fpr=target_fpr, extractor=extractor)

    return make
