"""Synthetic good and defective images, and a meta-checkpoint without meta-training, as ``evaluate._frozen_checkpoint`` builds one: the initial head,
feature standardisation from a few good images and the analytic calibration prior. Adapting it takes a
fraction of a second on a small backbone at a small side."""

from __future__ import annotations

import numpy as np

SIZE = 64


def good(category: str, seed: int, n: int, size: int = SIZE) -> list[np.ndarray]:
    from bayprano.platform.data.synth import render_good

    return [render_good(category, np.random.default_rng([seed, i]), size) for i in range(n)]


def defective(category: str, seed: int, size: int = SIZE) -> np.ndarray:
    from bayprano.platform.data.synth import check_category, render_defective

    defect = sorted(check_category(category).defects)[0]
    return render_defective(category, defect, np.random.default_rng([seed, 99]), size, severity=1.0)[0]


def frozen_checkpoint(extractor, images: np.ndarray, size: int, dim: int, inner_steps: int = 1):
    from bayprano.platform.meta.checkpoint import MetaCheckpoint
    from bayprano.platform.model.bayes import BayesianPatchModel
    from bayprano.platform.model.scoring import Calibration

    feats = extractor.extract(images, size=size)
    model = BayesianPatchModel(extractor.out_channels, dim)
    model.set_feature_statistics(feats.mean((0, 2, 3)), feats.var((0, 2, 3), unbiased=False).clamp_min(1e-12).sqrt())
    h, w = feats.shape[-2:]
    prior = Calibration.from_prior(dim, h * w / model.window**2, strength=1.0)
    return MetaCheckpoint(
        model.eval(), extractor.name, extractor.fingerprint(), size, prior, meta_config={"inner_steps": inner_steps}
    )
