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
from pydantic_core import ErrorDetails

from bayprano.platform.errors import ConfigError
from bayprano.platform.model.names import DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE, default_image_size

MIN_IMAGE_SIZE = 32  # the backbone's minimum (bayprano.platform.model.backbone.MIN_IMAGE_SIZE)
MAX_IMAGE_SIZE = 4096


def split_list(value: Any) -> Any:
    """``"a,b"`` -> ``["a", "b"]``; lists and None pass through."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _check_backbone(name: str) -> str:
    from bayprano.platform.model.backbone import BACKBONES, BUILTIN_BACKBONES

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone (valid: {', '.join(BUILTIN_BACKBONES)}, or a torchvision CNN name)")
    return name


def _check_side(backbone: Optional[str], image_size: int) -> None:
    """Image sides that the backbone's patch grid needs (DINOv2's 14 px patches)."""
    from bayprano.platform.model.backbone import DINOV2_BACKBONE, nearest_multiple

    if backbone == DINOV2_BACKBONE and image_size % 14:
        raise ValueError(
            f"image_size {image_size} is not a multiple of 14, which backbone {DINOV2_BACKBONE} needs; "
            f"use {nearest_multiple(image_size, 14)}"
        )


class StrictSettings(BaseModel):
    """A settings model that refuses unknown keys and cannot be changed once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MetaTrainingSettings(StrictSettings):
    """What centralised and federated meta-training share: the model and the episodes."""

    seed: int = Field(0, ge=0)
    image_size: int = Field(DEFAULT_IMAGE_SIZE, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)  # default: the backbone's side
    backbone: str = DEFAULT_BACKBONE
    dim: int = Field(64, ge=2, le=1024)
    lr: float = Field(2e-3, gt=0, le=1)
    inner_lr: float = Field(0.05, gt=0, le=10)  # initial inner-loop step size (then meta-learned)
    supcon_weight: float = Field(0.1, ge=0)
    n_query_normal: int = Field(4, ge=1)
    n_query_anomalous: int = Field(4, ge=1)
    second_order: bool = False
    calibration_episodes: int = Field(20, ge=1)
    device: str = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _backbone_side(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("image_size") is None:
            data = {k: v for k, v in data.items() if k != "image_size"}
            if isinstance(data.get("backbone"), str):
                data["image_size"] = default_image_size(data["backbone"])
        return data

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return _check_backbone(value)

    @model_validator(mode="after")
    def _side_fits_backbone(self) -> "MetaTrainingSettings":
        _check_side(self.backbone, self.image_size)
        return self


class CentralTrainingSettings(MetaTrainingSettings):
    """The settings of centralised meta-training, without the data, the length and the output: what a
    sweep's trial may fix or search over."""

    shots: int = Field(ge=1, le=64)
    inner_steps: int = Field(ge=0, le=10)


class TrainConfig(CentralTrainingSettings):
    """``bayprano train``: centralised meta-training on the ``train/good`` images of an MVTec-layout root."""

    data_root: Path
    categories: Optional[list[str]] = None  # default: every category under data_root
    exclude: list[str] = Field(default_factory=list)
    episodes: int = Field(ge=1)
    out: Path
    log_every: Optional[int] = Field(None, ge=1)  # default: a tenth of the episodes

    @field_validator("categories", "exclude", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return split_list(value)

    @model_validator(mode="after")
    def _categories_consistent(self) -> "TrainConfig":
        both = sorted(set(self.categories or ()) & set(self.exclude))
        if both:
            raise ValueError(f"category {both[0]!r} is both selected and excluded")
        return self


def round_size(sites_per_round: float, sites: int) -> int:
    """Sites per round out of ``sites``: ``sites_per_round`` is a whole number of sites (> 1) or a fraction."""
    if sites_per_round > 1:
        return min(sites, int(sites_per_round))
    return max(1, min(sites, round(sites_per_round * sites)))


def flag(key: str) -> str:
    """The command-line flag of a settings key: ``dp_noise`` -> ``--dp-noise``."""
    return "--" + key.replace("_", "-")


class FederatedSettings(MetaTrainingSettings):
    """The settings of federated meta-training, without the sites, the length and the output: what a
    sweep's trial may fix or search over. ``problem(sites)`` is the one check of how they fit together."""

    sites_per_round: float = Field(1.0, gt=0)  # a fraction (<= 1) of the sites, or a whole number of sites
    local_steps: int = Field(1, ge=1)  # local Proto-MAML episodes per site and round
    dp_noise: Optional[float] = Field(None, ge=0)  # z: Gaussian noise z * C on the sum of clipped deltas
    dp_clip: Optional[float] = Field(None, gt=0)  # C: each site's delta is clipped to L2 norm C
    target_epsilon: Optional[float] = Field(None, gt=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    secure_agg: bool = False
    secagg_threshold: Optional[int] = Field(None, ge=1)  # shares that recover a site's mask secrets; default a majority
    secagg_neighbours: Optional[int] = Field(None, ge=1)  # each site's peers (SecAgg+); default all the round's sites
    fp16: bool = False
    server_opt: str = "fedavg"
    server_lr: Optional[float] = Field(None, gt=0)
    fedprox_mu: float = Field(0.0, ge=0)
    min_sites: Optional[int] = Field(None, ge=1)  # quorum; default: half the sites of a round, rounded up
    round_timeout: float = Field(300.0, gt=0)
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
    def _settings_consistent(self) -> "FederatedSettings":
        found = self.problem()
        if found is not None:
            raise ValueError(found[1])
        return self

    def problem(self, sites: Optional[int] = None, name: Callable[[str], str] = flag) -> Optional[tuple[str, str]]:
        """The first setting that does not fit the others (and, given ``sites``, that number of sites), as
        ``(key, message)``; the message spells each key with ``name`` (a flag by default). None when all fit."""
        if self.dp_noise is not None and self.dp_clip is None:
            return "dp_noise", f"{name('dp_noise')} needs {name('dp_clip')} (the noise is z * C)"
        if self.target_epsilon is not None and self.dp_noise is None:
            return "target_epsilon", f"{name('target_epsilon')} needs {name('dp_noise')} and {name('dp_clip')}"
        if self.fedprox_mu > 0 and self.server_opt != "fedprox":
            return "fedprox_mu", f"{name('fedprox_mu')} is for {name('server_opt')} fedprox"
        f = self.sites_per_round
        if f > 1 and f != int(f):
            return "sites_per_round", (
                f"{name('sites_per_round')} {f:g}: give a fraction of the sites (at most 1) or a whole number of sites"
            )
        if not self.secure_agg:
            for key in ("secagg_threshold", "secagg_neighbours"):
                if getattr(self, key) is not None:
                    return key, f"{name(key)} is for {name('secure_agg')}"
        if sites is None:
            return None
        if f > sites:
            return "sites_per_round", f"{name('sites_per_round')} {f:g}: more than the {sites} site(s) there are"
        k = round_size(f, sites)
        if self.min_sites is not None and self.min_sites > k:
            return "min_sites", f"{name('min_sites')} {self.min_sites}: more than the {k} site(s) sampled each round"
        if self.secure_agg:
            from bayprano.platform.federated.secagg import check_settings

            try:
                check_settings(k, self.secagg_threshold, self.secagg_neighbours)
            except ConfigError as exc:
                return "secure_agg", f"{exc} ({name('sites_per_round')} {f:g} of {sites} sites gives {k})"
        return None


class FederatedTrainConfig(FederatedSettings):
    """``bayprano train --shards DIR`` (or ``sites:`` in YAML): federated meta-training, one Factory per site.

    The sites come from a shard folder's manifest (``shards``) or are listed by name with the path of
    each one's shard on its own node (``sites: {site-000: /data/plant-a/shard.parquet, ...}``; a path
    is checked by the site itself, on its node, before the first round).
    """

    shards: Optional[Path] = None
    sites: Optional[dict[str, str]] = None  # site name -> shard path on that site's node
    out: Path
    rounds: int = Field(ge=1)
    pool_size: Optional[int] = Field(None, ge=1)  # pooled mode: the virtual sites share this many actors
    resume: bool = False
    address: Optional[str] = None
    setup_timeout: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _sites_consistent(self) -> "FederatedTrainConfig":
        if self.resume and not self.out.is_file():
            raise ValueError(f"--resume: there is no checkpoint {self.out} to resume from")
        if (self.shards is None) == (self.sites is None):
            raise ValueError(
                "give the sites either as --shards DIR (a manifest) or as `sites:` (name: shard path), one of the two"
            )
        if self.shards is not None and not (self.shards / "manifest.json").is_file():
            raise ValueError(f"--shards {self.shards}: no manifest.json (write one with `bayprano data shard`)")
        if self.sites is not None:
            if not self.sites:
                raise ValueError("sites: empty; list each site as `name: shard path on its node`")
            for name, path in self.sites.items():
                if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
                    raise ValueError(f"sites: site name {name!r} may hold only letters, digits, '-', '_' and '.'")
                if not str(path).strip():
                    raise ValueError(f"sites: {name}: empty shard path")
        found = self.problem(len(self.site_paths()))
        if found is not None:
            raise ValueError(found[1])
        return self

    def site_paths(self) -> dict[str, str]:
        """``{site: shard path}``: from ``sites``, or from the manifest of ``shards`` (its files, in that folder)."""
        if self.sites is not None:
            return {name: str(path) for name, path in sorted(self.sites.items())}
        from bayprano.platform.data.shards import read_manifest

        assert self.shards is not None, "validated: either sites or shards is given"
        manifest = read_manifest(self.shards)
        return {s["name"]: str(self.shards / s["file"]) for s in manifest["sites"]}

    @property
    def round_size(self) -> int:
        """Sites sampled each round."""
        return round_size(self.sites_per_round, len(self.site_paths()))


class EvalConfig(StrictSettings):
    """``bayprano evaluate``: the leave-one-category-out protocol over methods, shots and support seeds."""

    data_root: Path
    output: Path
    categories: Optional[list[str]] = None
    shots: list[int] = Field(default_factory=lambda: [5], min_length=1)
    seeds: int = Field(3, ge=1)
    methods: Optional[list[str]] = None  # default: every method
    augment: list[str] = Field(default_factory=lambda: ["none"], min_length=1)  # support augmentations
    checkpoint: Optional[Path] = None
    meta_train_root: Optional[Path] = None
    inner_steps: int = Field(1, ge=0, le=10)
    target_fpr: float = Field(0.05, gt=0, lt=1)
    episodes: int = Field(200, ge=1)
    image_size: Optional[int] = Field(
        None, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE
    )  # default: the checkpoint's, else the backbone's side
    backbone: Optional[str] = None  # default: the checkpoint's backbone, else DEFAULT_BACKBONE
    dim: int = Field(64, ge=2, le=1024)
    seed: int = 0
    device: str = "cpu"

    @field_validator("categories", "methods", "shots", "augment", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, value: list[str]) -> list[str]:
        from bayprano.platform.data.augment import check_augmentation

        try:
            return [check_augmentation(mode) for mode in dict.fromkeys(value)]
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

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
        if self.image_size is not None:
            backbone = self.backbone or (DEFAULT_BACKBONE if self.checkpoint is None else None)
            _check_side(backbone, self.image_size)
        return self


class ServeConfig(StrictSettings):
    """``bayprano serve``: the Ray Serve application over a model registry (``configs/serve.yaml``)."""

    registry: Path
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "bayprano"
    route_prefix: str = "/"
    address: Optional[str] = None  # Ray cluster to join; default: a local Ray
    # model deployment: one replica holds up to max_models_per_replica site models (LRU) and one backbone
    num_replicas: int = Field(1, ge=1)
    min_replicas: Optional[int] = Field(None, ge=0)  # giving min/max replicas turns autoscaling on
    max_replicas: Optional[int] = Field(None, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    device: str = "cpu"
    max_models_per_replica: int = Field(4, ge=1)
    batching: bool = True
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # HTTP ingress
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, gt=0)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=32 * 32)
    site_storage: Optional[Path] = None  # /adapt may name folders under <site_storage>/<site>/
    request_timeout_s: float = Field(120.0, gt=0)
    # hostile input and load: what one request, one token and the whole gateway may hold
    max_request_pixels: int = Field(2 * 4096 * 4096, ge=32 * 32)  # decoded pixels of one request, all images
    max_inflight_pixels: int = Field(4 * 4096 * 4096, ge=32 * 32)  # decoded pixels held by the gateway at once
    max_inflight_bytes: int = Field(128 * 1024 * 1024, ge=1024)  # request bodies held by the gateway at once
    max_concurrent_decodes: int = Field(2, ge=1)  # the gateway's decode pool
    decode_timeout_s: float = Field(10.0, gt=0)  # decoding one request's images, waiting for the pool included
    max_jpeg_scans: int = Field(100, ge=1)  # progressive JPEGs have about 10
    rate_limit_per_s: float = Field(20.0, gt=0)  # requests per second per token (token bucket) ...
    rate_burst: int = Field(40, ge=1)  # ... of this size
    max_concurrent_per_token: int = Field(8, ge=1)
    max_versions_per_site: int = Field(20, ge=2)  # older versions are deleted at publish (never the live one)
    max_review_items_per_site: int = Field(1000, ge=1)  # oldest labelled items are trimmed first
    review_image_side: int = Field(512, ge=32)  # review images are stored downscaled to this longest side
    docs: bool = False  # /docs and /openapi.json (Swagger UI loads its assets from a CDN)

    @model_validator(mode="after")
    def _replicas_consistent(self) -> "ServeConfig":
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.max_replicas < max(self.min_replicas, 1)
        ):
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix {self.route_prefix!r} must start with '/'")
        if not self.max_image_pixels <= self.max_request_pixels <= self.max_inflight_pixels:
            raise ValueError(
                f"pixel limits must grow: max_image_pixels {self.max_image_pixels} <= max_request_pixels "
                f"{self.max_request_pixels} <= max_inflight_pixels {self.max_inflight_pixels}"
            )
        if self.max_request_bytes > self.max_inflight_bytes:
            raise ValueError(
                f"max_request_bytes {self.max_request_bytes} is above max_inflight_bytes {self.max_inflight_bytes}"
            )
        return self

    @property
    def gateway_memory_budget(self) -> int:
        """Bytes the gateway may hold for requests above its idle size: bodies, decoded RGB images (and
        the copy handed to the model replica), and Pillow's 4-byte buffers of the images being decoded."""
        return (
            self.max_inflight_bytes
            + 2 * 3 * self.max_inflight_pixels
            + 4 * self.max_concurrent_decodes * self.max_image_pixels
        )

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


Settings = TypeVar("Settings", bound=BaseModel)


def _describe(error: ErrorDetails, source_of: Callable[[str], str | None]) -> str:
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
        text = f"{field} is required ({flag(key)} or '{key}:' in a --config file)"
    elif not loc:  # a check across fields
        text = message
    elif where is not None and where.startswith("--"):
        return f"{where} {value}: {message}"
    else:
        text = f"{field} = {value!r}: {message}"
    return text if where is None else f"{where}: {text}"


def load_yaml_config(
    path: str | os.PathLike | None, model_cls: type[Settings], overrides: Mapping[str, Any] | None = None
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
            return flag(key)
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
