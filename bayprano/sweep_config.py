"""What a user sets for a Ray Tune sweep (``bayprano tune``), validated eagerly: the searched dimensions,
the scheduler, the resources of a trial, the synthetic data to generate, and the training settings that
trials fix or search over (``sweep_parameters``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field, field_validator, model_validator

from bayprano.config import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    CentralTrainingSettings,
    FederatedSettings,
    FederatedTrainConfig,
    StrictSettings,
    TrainConfig,
    split_list,
)

SWEEP_TRAINERS = ("central", "federated")
# What a trial reports once per meta-round, by kind of trial; a sweep's metric must be one of these.
SWEEP_METRICS = {
    "central": ("val_image_auroc", "adapt_seconds", "loss"),
    "federated": ("val_image_auroc", "adapt_seconds", "loss", "epsilon", "site_val_auroc"),
}
# A trial's settings (what a sweep may fix or search over), and the whole training command's settings,
# which add what the sweep sets itself for every trial (data, categories, length, output).
TRIAL_SETTINGS: dict[str, type[BaseModel]] = {"central": CentralTrainingSettings, "federated": FederatedSettings}
TRAINING_CONFIGS: dict[str, type[BaseModel]] = {"central": TrainConfig, "federated": FederatedTrainConfig}


def sweep_parameters(trainer: str) -> list[str]:
    """The training settings a sweep of ``trainer`` trials may fix or search over."""
    return sorted(TRIAL_SETTINGS[trainer].model_fields)


def sweep_owned(trainer: str) -> list[str]:
    """The training settings a sweep sets itself for every trial, so never fixes or searches over."""
    return sorted(set(TRAINING_CONFIGS[trainer].model_fields) - set(TRIAL_SETTINGS[trainer].model_fields))


class SearchDimension(StrictSettings):
    """One searched setting: exactly one of ``grid`` (every value), ``choice`` (one value per sample),
    ``uniform`` or ``loguniform`` ([low, high])."""

    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):  # `shots: [1, 2, 4]` is a grid
            return {"grid": value}
        return value

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        """The values to check: every grid or choice value, or the two bounds."""
        return list(getattr(self, self.kind))

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDimension":
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform"
                + (f" (got {', '.join(given)})" if given else "")
            )
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"empty {kind}: give at least one value")
        if kind in ("uniform", "loguniform"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind} [{low:g}, {high:g}]: the low bound must be below the high bound")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform [{low:g}, {high:g}]: bounds must be positive")
        return self


class SweepScheduler(StrictSettings):
    """Trial scheduler: ``asha`` stops poor trials early at rungs of meta-rounds, ``none`` runs all to the end."""

    kind: str = "none"
    grace_period: int = Field(1, ge=1)  # meta-rounds every trial runs before it can be stopped
    reduction_factor: float = Field(3.0, gt=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ("asha", "none"):
            raise ValueError("must be asha or none")
        return value


class TrialResources(StrictSettings):
    """What each trial asks of Ray: fractions are fine (``cpu: 0.5``); a federated trial's Factory actors
    ask for ``factory_cpu`` each on top."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)
    factory_cpu: float = Field(0.05, gt=0)


class SynthSpec(StrictSettings):
    """How to generate the synthetic set at ``data_root`` when it does not exist (``bayprano data synth``)."""

    categories: int | list[str] = 8
    size: int = Field(256, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    train: int = Field(60, ge=1)
    test_good: int = Field(40, ge=1)
    test_defective: int = Field(40, ge=1)
    seed: int = Field(0, ge=0)


class FederatedSweepSettings(StrictSettings):
    """Federated trials: the training categories are sharded into ``sites`` private shards once."""

    sites: int = Field(3, ge=1)
    iid: bool = False


class SweepConfig(StrictSettings):
    """``bayprano tune SWEEP.yaml``: a Ray Tune sweep of meta-training settings.

    Trials meta-train on ``train_categories`` (default: every category that is neither validation nor
    test), report after each of ``rounds`` meta-rounds the image AUROC of adapting to the
    ``validation_categories`` (support from their train/good, scored on their test split), and the
    best trial's model is evaluated once on the held-out ``test_categories``.
    """

    name: str = Field(min_length=1)
    data_root: Path
    synth: Optional[SynthSpec] = None
    train_categories: Optional[list[str]] = None
    validation_categories: list[str] = Field(min_length=1)
    test_categories: list[str] = Field(default_factory=list)
    trainer: str = "central"
    federated: FederatedSweepSettings = Field(default_factory=FederatedSweepSettings)
    metric: str = "val_image_auroc"
    mode: str = "max"
    scheduler: SweepScheduler = Field(default_factory=SweepScheduler)
    num_samples: int = Field(1, ge=1)  # samples of the non-grid dimensions (each over the whole grid)
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    resources_per_trial: TrialResources = Field(default_factory=TrialResources)
    rounds: int = Field(ge=1)  # meta-rounds per trial; one report (and checkpoint) each
    episodes_per_round: int = Field(10, ge=1)  # central trials: meta-training episodes per round
    validation_seeds: int = Field(2, ge=1)  # support sets drawn per validation category
    test_seeds: int = Field(3, ge=1)
    fixed: dict[str, Any] = Field(default_factory=dict)  # training settings shared by every trial
    search_space: dict[str, SearchDimension]

    @field_validator("train_categories", "validation_categories", "test_categories", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("search_space")
    @classmethod
    def _something_to_search(cls, value: dict) -> dict:
        if not value:
            raise ValueError("empty search space: give at least one setting to search over")
        return value

    @field_validator("trainer")
    @classmethod
    def _known_trainer(cls, value: str) -> str:
        if value not in SWEEP_TRAINERS:
            raise ValueError(f"must be one of {', '.join(SWEEP_TRAINERS)}")
        return value

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in ("max", "min"):
            raise ValueError("must be max or min")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SweepConfig":
        reported = SWEEP_METRICS[self.trainer]
        if self.metric not in reported:
            raise ValueError(
                f"metric {self.metric!r}: {self.trainer} trials do not report it (they report {', '.join(reported)})"
            )
        valid = sweep_parameters(self.trainer)
        for section, names in (("search_space", self.search_space), ("fixed", self.fixed)):
            for name in names:
                if name not in valid:
                    owned = name in sweep_owned(self.trainer)
                    why = "is set by the sweep itself" if owned else "is not a training setting"
                    raise ValueError(
                        f"{section}.{name}: unknown parameter {name!r} for {self.trainer} trials, it "
                        f"{why} (tunable: {', '.join(valid)})"
                    )
        both = sorted(set(self.search_space) & set(self.fixed))
        if both:
            raise ValueError(f"{both[0]!r} is both in fixed and in search_space")
        groups = {
            "train_categories": self.train_categories or [],
            "validation_categories": self.validation_categories,
            "test_categories": self.test_categories,
        }
        seen: dict[str, str] = {}
        for group, members in groups.items():
            for c in members:
                if c in seen and seen[c] != group:
                    raise ValueError(f"category {c!r} is in both {seen[c]} and {group}")
                seen[c] = group
        if self.scheduler.kind == "asha" and self.scheduler.grace_period > self.rounds:
            raise ValueError(
                f"scheduler.grace_period {self.scheduler.grace_period} is more than the {self.rounds} rounds of a trial"
            )
        return self

    def trial_model(self) -> type[BaseModel]:
        """The settings of one trial: no data, no output, no length."""
        return TRIAL_SETTINGS[self.trainer]

    def training_model(self) -> type[BaseModel]:
        """The settings of the training command a trial's settings become (``best_config.yaml``)."""
        return TRAINING_CONFIGS[self.trainer]
