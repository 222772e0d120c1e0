"""What a user sets for training and evaluation, validated eagerly, from a YAML file and command-line flags.

Each command's settings are one pydantic model. ``load_yaml_config(path, model_cls, overrides)`` reads
the YAML file (optional), lays the flags the user gave over it and validates the result; an unknown key
or a bad value is one ``ConfigError`` line naming where it came from (the file or the flag), the key and
the value. Keys are the flag names with underscores (``inner_steps`` for ``--inner-steps``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bayprano.platform.errors import ConfigError

MIN_IMAGE_SIZE = 32  # the backbone's minimum (bayprano.platform.model.backbone.MIN_IMAGE_SIZE)
MAX_IMAGE_SIZE = 4096


def _split_list(value: Any) -> Any:
    """``"a,b"`` -> ``["a", "b"]``; lists and None pass through."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _check_backbone(name: str) -> str:
    from bayprano.platform.model.backbone import BACKBONES, BUILTIN_BACKBONES

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone (valid: {', '.join(BUILTIN_BACKBONES)}, or a torchvision CNN name)")
    return name


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _MetaTrainingSettings(_Settings):
    """What centralised and federated meta-training share: the model and the episodes."""

    seed: int = Field(0, ge=0)
    image_size: int = Field(256, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    backbone: str = "efficientnet_lite2"
    dim: int = Field(64, ge=2, le=1024)
    lr: float = Field(2e-3, gt=0, le=1)
    supcon_weight: float = Field(0.1, ge=0)
    n_query_normal: int = Field(4, ge=1)
    n_query_anomalous: int = Field(4, ge=1)
    second_order: bool = False
    calibration_episodes: int = Field(20, ge=1)
    device: str = "cpu"

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return _check_backbone(value)


class TrainConfig(_MetaTrainingSettings):
    """``bayprano train``: centralised meta-training on the ``train/good`` images of an MVTec-layout root."""

    data_root: Path
    categories: Optional[list[str]] = None  # default: every category under data_root
    exclude: list[str] = Field(default_factory=list)
    shots: int = Field(ge=1, le=64)
    inner_steps: int = Field(ge=0, le=10)
    episodes: int = Field(ge=1)
    out: Path
    log_every: Optional[int] = Field(None, ge=1)  # default: a tenth of the episodes

    @field_validator("categories", "exclude", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @model_validator(mode="after")
    def _categories_consistent(self) -> "TrainConfig":
        both = sorted(set(self.categories or ()) & set(self.exclude))
        if both:
            raise ValueError(f"category {both[0]!r} is both selected and excluded")
        return self


class FederatedTrainConfig(_MetaTrainingSettings):
    """``bayprano train --shards DIR``: federated meta-training over one Factory actor per shard."""

    shards: Path
    out: Path
    rounds: int = Field(ge=1)
    sites_per_round: float = Field(1.0, gt=0, le=1)  # fraction of the sites sampled each round
    local_steps: int = Field(1, ge=1)  # local Proto-MAML episodes per site and round
    dp_noise: Optional[float] = Field(None, ge=0)  # z: Gaussian noise z * C on the sum of clipped deltas
    dp_clip: Optional[float] = Field(None, gt=0)  # C: each site's delta is clipped to L2 norm C
    target_epsilon: Optional[float] = Field(None, gt=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    secure_agg: bool = False
    fp16: bool = False
    server_opt: str = "fedavg"
    server_lr: Optional[float] = Field(None, gt=0)
    fedprox_mu: float = Field(0.0, ge=0)
    resume: bool = False
    address: Optional[str] = None
    min_sites: Optional[int] = Field(None, ge=1)  # quorum; default: half the sites of a round, rounded up
    round_timeout: float = Field(300.0, gt=0)
    setup_timeout: float = Field(600.0, gt=0)
    holdout: int = Field(4, ge=0)
    shots: int = Field(5, ge=1, le=64)
    inner_steps: int = Field(1, ge=0, le=10)

    @field_validator("server_opt")
    @classmethod
    def _known_server_opt(cls, value: str) -> str:
        if value not in ("fedavg", "fedprox", "fedadam"):
            raise ValueError("must be one of fedavg, fedprox, fedadam")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "FederatedTrainConfig":
        if self.dp_noise is not None and self.dp_clip is None:
            raise ValueError("--dp-noise needs --dp-clip (the noise is z * C)")
        if self.target_epsilon is not None and self.dp_noise is None:
            raise ValueError("--target-epsilon needs --dp-noise and --dp-clip")
        if self.fedprox_mu > 0 and self.server_opt != "fedprox":
            raise ValueError("--fedprox-mu is for --server-opt fedprox")
        if self.resume and not self.out.is_file():
            raise ValueError(f"--resume: there is no checkpoint {self.out} to resume from")
        if not (self.shards / "manifest.json").is_file():
            raise ValueError(f"--shards {self.shards}: no manifest.json (write one with `bayprano data shard`)")
        return self


class EvalConfig(_Settings):
    """``bayprano evaluate``: the leave-one-category-out protocol over methods, shots and support seeds."""

    data_root: Path
    output: Path
    categories: Optional[list[str]] = None
    shots: list[int] = Field(default_factory=lambda: [5], min_length=1)
    seeds: int = Field(3, ge=1)
    methods: Optional[list[str]] = None  # default: every method
    checkpoint: Optional[Path] = None
    meta_train_root: Optional[Path] = None
    inner_steps: int = Field(1, ge=0, le=10)
    target_fpr: float = Field(0.05, gt=0, lt=1)
    episodes: int = Field(200, ge=1)
    image_size: int = Field(256, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    backbone: Optional[str] = None  # default: the checkpoint's backbone, else efficientnet_lite2
    dim: int = Field(64, ge=2, le=1024)
    seed: int = 0
    device: str = "cpu"

    @field_validator("categories", "methods", "shots", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("shots")
    @classmethod
    def _shots_positive(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError("every number of shots must be at least 1")
        return sorted(set(value))

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        from bayprano.platform.evaluate import METHODS

        if value is not None:
            if not value:
                raise ValueError("no method given")
            for m in value:
                if m not in METHODS:
                    raise ValueError(f"unknown method {m!r} (valid: {', '.join(METHODS)})")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _check_backbone(value)

    @model_validator(mode="after")
    def _one_source_of_meta_training(self) -> "EvalConfig":
        if self.checkpoint is not None and self.meta_train_root is not None:
            raise ValueError("give either checkpoint or meta_train_root, not both")
        return self


Settings = TypeVar("Settings", bound=BaseModel)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _describe(error: dict, source_of: Callable[[str], str | None]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    key = loc[0] if loc else ""
    where = source_of(key)
    field = ".".join(loc) if loc else ""
    kind = error.get("type", "")
    value = error.get("input")
    message = error.get("msg", "invalid value")
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    message = message.replace("Input should be", "must be")
    if kind == "extra_forbidden":
        text = f"unknown key {field!r} (value {value!r})"
    elif kind == "missing":
        text = f"{field} is required ({_flag(key)} or '{key}:' in a --config file)"
    elif not loc:  # a check across fields
        text = message
    elif where is not None and where.startswith("--"):
        return f"{where} {value}: {message}"
    else:
        text = f"{field} = {value!r}: {message}"
    return text if where is None else f"{where}: {text}"


def load_yaml_config(
    path: str | os.PathLike | None,
    model_cls: type[Settings],
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """The settings in the YAML file ``path`` (may be None), with ``overrides`` (flag values; None means
    "not given") laid over them, validated; any problem is one ConfigError naming file or flag, key and value."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)

    def source_of(key: str) -> str | None:
        if key in given:
            return _flag(key)
        return str(path) if path is not None else None

    try:
        return model_cls.model_validate(values)
    except ValidationError as exc:
        errors = sorted(exc.errors(include_url=False), key=lambda e: e.get("type") != "extra_forbidden")
        first = _describe(errors[0], source_of)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        if mark is not None and problem:
            detail = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        else:
            detail = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML ({detail})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
