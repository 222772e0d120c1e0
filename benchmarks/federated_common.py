"""What the federated benchmarks share: synthetic data made once per work folder, a local Ray sized for
the run, the settings of a small pooled run, the held-out evaluation of a checkpoint and the record of
the settings a result was measured with."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from bayprano.platform.model.names import LITE2_BACKBONE


def synthesize(
    root: Path,
    categories: Sequence[str],
    *,
    seed: int,
    size: int,
    n_train: int,
    n_test_good: int,
    n_test_defective: int,
    reuse: bool = True,
) -> None:
    """A synthetic set at ``root`` (one worker); with ``reuse``, one already there is kept."""
    from bayprano.platform.data.synth import generate_dataset

    if reuse and (root / "synth.json").is_file():
        return
    generate_dataset(
        root,
        categories=list(categories),
        seed=seed,
        size=size,
        n_train=n_train,
        n_test_good=n_test_good,
        n_test_defective=n_test_defective,
        workers=1,
    )


def init_ray(num_cpus: int) -> None:
    """A local Ray with ``num_cpus`` CPUs, no dashboard, one thread per worker process."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
    )


def pooled_settings(image_size: int, shots: int) -> dict[str, Any]:
    """The ``FederatedTrainConfig`` settings of a small pooled run: EfficientNet-Lite2 (the cheapest real
    backbone at small sides), float16 on the wire, two query images
    of each kind, two calibration episodes, no validation holdout and timeouts no run reaches."""
    return dict(
        fp16=True,
        backbone=LITE2_BACKBONE,
        image_size=image_size,
        shots=shots,
        n_query_normal=2,
        n_query_anomalous=2,
        calibration_episodes=2,
        holdout=0,
        round_timeout=3600.0,
        setup_timeout=3600.0,
    )


def evaluate_bayes(
    root: Path, checkpoint: Path, out: Path, categories: Sequence[str], shots: int, seeds: int
) -> dict[str, Any]:
    """``run_evaluation`` of method ``bayes`` with ``checkpoint`` on ``categories`` at K = ``shots``."""
    from bayprano.platform.evaluate import run_evaluation

    return run_evaluation(
        root,
        out,
        categories=list(categories),
        shots=[shots],
        seeds=seeds,
        methods=["bayes"],
        checkpoint=checkpoint,
        progress=lambda m: None,
    )


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
