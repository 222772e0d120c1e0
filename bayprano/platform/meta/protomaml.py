"""Proto-MAML with Bayesian prototypes, in one import: tasks, inner loop, losses, outer loop, calibration.

The parts live by concept in ``tasks`` (task banks, episodes, feature standardisation), ``inner``
(``clone`` / ``adapt``, ``adapt_head``), ``losses``, ``outer`` (``MetaConfig``, ``episode_loss``,
``meta_train``) and ``calibration``; this module gathers their public names.
"""

from bayprano.platform.meta.calibration import calibrate, calibrate_normality, normal_log_statistics
from bayprano.platform.meta.inner import AdaptedHead, TaskHead, adapt_head, clone, support_loo_score
from bayprano.platform.meta.losses import balanced_bce, supervised_contrastive
from bayprano.platform.meta.outer import MetaConfig, episode_loss, meta_train
from bayprano.platform.meta.tasks import (
    FeatureEpisode,
    TaskBank,
    build_task_bank,
    feature_statistics,
    feature_sums,
    sample_episode,
    statistics_from_sums,
)

__all__ = [
    "AdaptedHead",
    "FeatureEpisode",
    "MetaConfig",
    "TaskBank",
    "TaskHead",
    "adapt_head",
    "balanced_bce",
    "build_task_bank",
    "calibrate",
    "calibrate_normality",
    "clone",
    "episode_loss",
    "feature_statistics",
    "feature_sums",
    "meta_train",
    "normal_log_statistics",
    "sample_episode",
    "statistics_from_sums",
    "supervised_contrastive",
    "support_loo_score",
]
