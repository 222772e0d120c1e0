"""BayPrAnoMeta: the meta-learned head and NIW prior adapted to the support (the site model), Student-t
patch scores, the smoothed-maximum image statistic and the calibrated threshold.

``bayes`` uses the meta-trained checkpoint with the harness's inner steps; ``bayes-frozen`` the same model
at its initialisation, without inner steps (no meta-learning at all).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

import torch
from torch import Tensor

from bayprano.platform.meta.checkpoint import MetaCheckpoint
from bayprano.platform.methods.base import MethodContext, MethodScores, originals, register_method
from bayprano.platform.methods.bayes.torch_model import SiteModel, adapt_features
from bayprano.platform.model.scoring import decide, image_statistic
from bayprano.platform.model.site_support import SupportLayout


class BayesMethod:
    def __init__(self, checkpoint: MetaCheckpoint, steps: int, target_fpr: float = 0.05, extractor=None):
        self.checkpoint, self.steps, self.target_fpr, self.extractor = checkpoint, steps, target_fpr, extractor

    def fit(self, support: Tensor, groups: Sequence[int] | None = None) -> "BayesMethod":
        layout = None
        if groups is not None:  # augmented views: each held-out original is scored as itself
            layout = SupportLayout(groups, query_index=[[v] for v in originals(groups, support.shape[0])])
            layout.bind(support)
        self.site_: SiteModel = adapt_features(
            self.checkpoint,
            support,
            steps=self.steps,
            target_fpr=self.target_fpr,
            extractor=self.extractor,
            layout=layout,
        )
        return self

    @torch.no_grad()
    def score(self, features: Tensor) -> MethodScores:
        maha = self.site_.mahalanobis(features)
        return MethodScores(
            image_statistic(maha, self.site_.model.dim).cpu().numpy(), self.site_.patch_scores(maha).cpu()
        )

    def threshold(self, target_fpr: float) -> float:
        return self.site_.with_target_fpr(target_fpr).threshold

    def calibration_info(self) -> dict | None:
        site = self.site_
        return {
            "threshold": site.threshold,
            "shift_covariate": site.info.get("shift_covariate"),
            "loo_statistics": site.info.get("loo_statistics"),
            "site_calibration": site.calibration.as_dict(),
            "band": {
                "dim": site.model.dim,
                "nu_n": site.nu_n,
                "kappa_n": site.kappa_n,
                "threshold_sd": site.calibration.threshold_sd(site.target_fpr, site.df),
                "z_review": site.z_review,
            },
        }

    def decisions(self, image_scores: np.ndarray, threshold: float) -> list[str] | None:
        """The site model's decisions at ``threshold``: its review band joins the image's posterior spread
        and the threshold's (``SiteModel.decision_sd``, at the target the method was built with)."""
        if not math.isfinite(threshold):
            return None
        return decide(image_scores, threshold, self.site_.decision_sd(image_scores), self.site_.z_review)[0]


def build_bayes(context: MethodContext) -> BayesMethod:
    return BayesMethod(context.checkpoint("niw"), context.inner_steps, context.target_fpr, context.extractor)


def build_frozen(context: MethodContext) -> BayesMethod:
    return BayesMethod(context.checkpoint("frozen"), 0, context.target_fpr, context.extractor)


register_method(
    "bayes",
    build_bayes,
    checkpoint="niw",
    summary="meta-trained head and NIW prior, Student-t scores, calibrated threshold",
)
register_method(
    "bayes-frozen",
    build_frozen,
    checkpoint="frozen",
    summary="the Bayesian model at its initialisation (no meta-learning)",
)
