"""Sweep files: loading and checking them against the trainers' settings models, the smoke version, the
categories and the data a sweep runs on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from bayprano.config import FederatedSettings, load_yaml_config
from bayprano.sweep_config import SweepConfig
from bayprano.platform.errors import ConfigError, DataError


FEATURE_SETTINGS = ("backbone", "image_size")  # settings that change the backbone features


STATE_FILE = "state.pt"


FEDERATED_FILE = "federated.pt"


EXPERIMENT = "tune"  # the Ray Tune experiment folder inside the output folder


def load_sweep(path: str | os.PathLike, data_root: str | None = None) -> SweepConfig:
    """The sweep in the YAML file ``path`` (``data_root`` overrides its data root), fully checked."""
    spec = load_yaml_config(path, SweepConfig, {"data_root": data_root})
    check_trial_values(spec, str(path))
    return spec


def check_trial_values(spec: SweepConfig, source: str) -> None:
    """Every grid and choice value and every bound of the search space, with the fixed settings, must be
    a valid training setting; the first bad one is a ConfigError naming the file, field and value."""
    from pydantic import ValidationError

    model = spec.trial_model()
    dims = spec.search_space
    fixed_blame = {k: (f"fixed.{k}", v) for k, v in spec.fixed.items()}

    def check(name: str | None, i: int) -> None:
        values = dict(spec.fixed)
        blame = dict(fixed_blame)
        for other, dim in dims.items():
            j = i if other == name else 0
            values[other] = dim.values[j]
            blame[other] = (f"search_space.{other}.{dim.kind}[{j}]", dim.values[j])
        here = blame[name] if name is not None else next(iter(fixed_blame.values()), ("fixed", None))
        try:
            cfg = model.model_validate(values)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = [str(p) for p in err.get("loc", ())]
            if not loc and issubclass(model, FederatedSettings):  # settings that do not fit: which one
                found = model.model_construct(**values).problem(name=str)
                if found is not None:
                    field, value = blame.get(found[0], here)
                    raise ConfigError(f"{source}: {field} = {value!r}: {found[1]}") from None
            field, value = blame.get(loc[0], here) if loc else here
            msg = err.get("msg", "invalid value").replace("Value error, ", "").replace("Input should be", "must be")
            raise ConfigError(f"{source}: {field} = {value!r}: {msg}") from None
        if isinstance(cfg, FederatedSettings):
            found = cfg.problem(spec.federated.sites, name=str)
            if found is not None:
                field, value = blame.get(found[0], here)
                raise ConfigError(f"{source}: {field} = {value!r}: {found[1]} (federated.sites)")

    check(None, 0)
    for name, dim in dims.items():
        for i in range(len(dim.values)):
            check(name, i)
    for name in FEATURE_SETTINGS:
        feature_dim = spec.search_space.get(name)
        if feature_dim is not None and feature_dim.kind not in ("grid", "choice"):
            raise ConfigError(
                f"{source}: search_space.{name}: the backbone features are computed once per value, "
                f"so give a grid or a choice, not {feature_dim.kind}"
            )
    if (
        spec.trainer == "federated"
        and "epsilon" == spec.metric
        and "dp_noise" not in {**spec.fixed, **spec.search_space}
    ):
        raise ConfigError(
            f"{source}: metric 'epsilon' needs dp_noise in fixed or search_space (without DP, epsilon is infinite)"
        )


def smoke_sweep(spec: SweepConfig) -> SweepConfig:
    """The same sweep shrunk to run in about a minute on 2 cores: the first two values of each grid or
    choice (the cheap end of shots and inner steps), at most 2 samples, 2 rounds of 2 episodes, 70 px
    images (a multiple of DINOv2's 14 px patch), the first categories of each group."""
    space = {}
    for name, dim in spec.search_space.items():
        if dim.kind in ("grid", "choice"):
            values = list(dict.fromkeys(dim.values[:2]))
            space[name] = dim.model_copy(update={dim.kind: values})
        else:
            space[name] = dim
    fixed = dict(spec.fixed)
    fixed.update(image_size=70, calibration_episodes=2, n_query_normal=2, n_query_anomalous=2)
    if spec.trainer == "federated":
        fixed.update(local_steps=1, holdout=2)
    update: dict[str, Any] = dict(
        search_space=space,
        fixed=fixed,
        rounds=2,
        episodes_per_round=2,
        validation_seeds=1,
        test_seeds=1,
        num_samples=min(spec.num_samples, 2),
        scheduler=spec.scheduler.model_copy(update={"grace_period": 1}),
        federated=spec.federated.model_copy(update={"sites": min(spec.federated.sites, 2)}),
        validation_categories=spec.validation_categories[:1],
        test_categories=spec.test_categories[:1],
    )
    if spec.train_categories:
        update["train_categories"] = spec.train_categories[:2]
    if "image_size" in space:
        del space["image_size"]
    return spec.model_copy(update=update)


def _smoke_synth(spec: SweepConfig, categories: list[str]) -> dict[str, Any]:
    shots = max(
        [int(v) for v in spec.search_space["shots"].values]
        if "shots" in spec.search_space
        else [int(spec.fixed.get("shots", 5))]
    )
    return dict(
        categories=categories,
        size=64,
        n_train=shots + 6,
        n_test_good=4,
        n_test_defective=4,
        seed=spec.synth.seed if spec.synth else 0,
    )


def resolve_categories(spec: SweepConfig, root: Path) -> dict[str, list[str]]:
    from bayprano.platform.data.mvtec import list_categories

    available = list_categories(root)
    for group in ("train_categories", "validation_categories", "test_categories"):
        for c in getattr(spec, group) or []:
            if c not in available:
                raise ConfigError(f"{group}: unknown category {c!r} in {root} (available: {', '.join(available)})")
    held = set(spec.validation_categories) | set(spec.test_categories)
    train = list(spec.train_categories or [c for c in available if c not in held])
    if not train:
        raise ConfigError(f"{root}: no category left to meta-train on after the validation and test categories")
    return {"train": train, "validation": list(spec.validation_categories), "test": list(spec.test_categories)}


def prepare_data(spec: SweepConfig, out: Path, smoke: bool, log: Callable[[str], None]) -> tuple[Path, SweepConfig]:
    """The data root the trials read (generated when the sweep says how and it is missing)."""
    from bayprano.platform.data.synth import generate_dataset

    root = Path(spec.data_root)
    if smoke and spec.synth is not None:
        root = out / "smoke-data"
        names = list(dict.fromkeys((spec.train_categories or []) + spec.validation_categories + spec.test_categories))
        if not spec.train_categories:
            cats = spec.synth.categories
            if isinstance(cats, list):
                pool = cats
            else:
                from bayprano.platform.data.synth import CATEGORIES

                pool = list(CATEGORIES[:cats])
            names += [c for c in pool if c not in names][:2]
        if not (root / "synth.json").is_file():
            log(f"generating the smoke data set ({len(names)} categories at 64 px) in {root}")
            generate_dataset(root, **_smoke_synth(spec, names))
        if not spec.train_categories:
            spec = spec.model_copy(
                update={
                    "train_categories": [c for c in names if c not in spec.validation_categories + spec.test_categories]
                }
            )
        return root, spec
    if not root.exists():
        if spec.synth is None:
            raise DataError(
                f"data_root {root}: does not exist (generate it with `bayprano data synth`, or give "
                "the sweep a synth: section)"
            )
        s = spec.synth
        log(f"generating the synthetic set in {root} ({s.size} px)")
        generate_dataset(
            root,
            categories=s.categories,
            seed=s.seed,
            size=s.size,
            n_train=s.train,
            n_test_good=s.test_good,
            n_test_defective=s.test_defective,
        )
    return root, spec
