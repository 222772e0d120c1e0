"""The federation's messages: what the Coordinator sends to the sites and what they send back, as frozen dataclasses.

Downward:

- ``SiteSettings``: what a site runs (backbone, image side, head width, seeds, hold-out, device and the
  Proto-MAML settings as a ``MetaConfig``), built once from the run's ``FederatedTrainConfig``
  (``SiteSettings.from_config``) and handed to every Factory as it is;
- ``RoundInstruction``: one round's settings (local steps, FedProx mu, the clipping bound, whether
  updates are weighted, DP, fp16, the shared feature standardisation), what a strategy configures and
  every site of the round receives;
- ``SecAggContext``: which secure-aggregation instance a masked reply belongs to and who takes part.

Upward:

- ``SiteDescription``: a site's answer at setup (categories, backbone and fingerprint, feature width,
  parameter layout, where it runs; its number of normal images only without DP);
- ``UpdateReply``: a plain round's update (encoded clipped delta, weight and, without DP, metrics);
- ``MaskedReply``: any masked vector under secure aggregation (an update, a validation or the feature
  statistics), the only thing of it the Coordinator can read being the instance and the site;
- ``ValidationReply`` / ``FeatureReply``: a site's validation vector and feature sums in the clear;
- ``CalibrationReply``: in the clear, one of the two vectors from which the checkpoint's calibration
  rule is chosen (``summaries.calibration_vector`` at stage "calibration", ``summaries.rule_loss_vector``
  at stage "rules");
- ``SharesReply``: a site's encrypted key shares, or the shares it reveals to unmask a sum.

``sent_fields(message)`` names the fields a message carries (those not None): what the privacy tests
check against the table of what leaves a site. No Ray here: the actors move these objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from bayprano.platform.federated.secagg import MaskedUpdate, SiteRoster
from bayprano.platform.meta.protomaml import MetaConfig
from bayprano.platform.model.names import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE


# ------------------------------------------------------------------------------------- downward


@dataclass(frozen=True)
class SiteSettings:
    """What every site of a run runs: one object from the run's config, carried to each site as is."""

    backbone: str = DEFAULT_BACKBONE
    image_size: int = DEFAULT_IMAGE_SIZE
    dim: int = 64
    seed: int = 0
    holdout: int = 4  # train/good images per category kept back for validation
    device: str = "cpu"
    meta: MetaConfig = field(default_factory=MetaConfig)
    gpu_fraction: float = 0.1  # of a GPU per site actor, when the cluster has GPUs and ``device`` is not cpu

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", dataclasses.replace(self.meta, seed=int(self.seed)).validate())

    @classmethod
    def from_config(cls, cfg: Any) -> "SiteSettings":
        """From a ``FederatedTrainConfig`` (or any object with its fields)."""
        return cls(
            backbone=cfg.backbone,
            image_size=cfg.image_size,
            dim=cfg.dim,
            seed=cfg.seed,
            holdout=cfg.holdout,
            device=cfg.device,
            meta=MetaConfig.from_settings(cfg),
        )

    def meta_settings(self) -> dict[str, Any]:
        """The meta-training settings a checkpoint records (``MetaCheckpoint.meta_config``)."""
        m = self.meta
        return {
            "shots": m.shots,
            "inner_steps": m.inner_steps,
            "n_query_normal": m.n_query_normal,
            "n_query_anomalous": m.n_query_anomalous,
            "lr": m.lr,
            "supcon_weight": m.supcon_weight,
            "first_order": m.first_order,
            "calibration_episodes": m.calibration_episodes,
            "inner_positions": m.inner_positions,
        }


@dataclass(frozen=True)
class RoundInstruction:
    """One round's settings, the same for every site of the round."""

    local_steps: int
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    fedprox_mu: float = 0.0
    clip: float | None = None  # each site clips its delta to this L2 norm
    weighted: bool = True  # weight = episodes run (FedAvg); under DP every site weighs 1
    dp: bool = False  # under DP metrics, validation and feature statistics stay at the site
    fp16: bool = False


@dataclass(frozen=True)
class SecAggContext:
    """The secure-aggregation instance a masked reply is for: its id, the receiving site's view of the
    roster (every site's id, its own and its neighbours' public keys), the sites that shared their keys,
    the neighbour count, and the round and attempt it belongs to."""

    instance: str
    roster: SiteRoster
    shared: tuple[str, ...]
    neighbours: int | None
    round: int
    attempt: int


# --------------------------------------------------------------------------------------- upward


@dataclass(frozen=True)
class SiteDescription:
    """What a site runs and where; ``normals`` (its number of normal images) is None under DP."""

    site: str
    categories: tuple[str, ...]
    in_channels: int
    backbone: str
    fingerprint: str
    image_size: int
    layout: str
    node: str | None
    host: str
    normals: int | None = None


@dataclass(frozen=True)
class UpdateMetrics:
    """A site's training metrics of a round (sent only without DP)."""

    loss: float
    delta_norm: float
    clipped_norm: float
    seconds: float


@dataclass(frozen=True)
class UpdateReply:
    """A plain round's update: the encoded (clipped) delta and its weight; episodes and metrics without DP."""

    site: str
    round: int
    attempt: int
    weight: float
    update: bytes
    episodes: int | None = None
    metrics: UpdateMetrics | None = None


@dataclass(frozen=True)
class MaskedReply:
    """A vector masked for a secure-aggregation instance; ``round`` and ``attempt`` for a round's update."""

    site: str
    masked: MaskedUpdate
    round: int | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class ValidationReply:
    """A site's validation vector (``summaries.validation_vector``) in the clear."""

    site: str
    validation: np.ndarray


@dataclass(frozen=True)
class CalibrationReply:
    """A site's calibration-episode moments or its rule losses (``summaries``) in the clear."""

    site: str
    values: np.ndarray


@dataclass(frozen=True)
class FeatureReply:
    """A site's feature sums (``summaries.feature_vector``) in the clear."""

    site: str
    features: np.ndarray


@dataclass(frozen=True)
class SharesReply:
    """A site's shares for an instance: encrypted to its neighbours (share stage), or revealed (unmask stage)."""

    site: str
    instance: str
    shares: Mapping[str, Any]


def sent_fields(message: Any) -> set[str]:
    """The fields a message carries: those that are not None."""
    return {f.name for f in dataclasses.fields(message) if getattr(message, f.name) is not None}
