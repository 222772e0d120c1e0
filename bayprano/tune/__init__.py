"""Ray Tune sweeps of meta-training settings (shots, inner steps, step sizes, DP noise): ``bayprano tune``.

A sweep is a YAML file validated as ``bayprano.sweep_config.SweepConfig``. Before any trial starts, the
runner checks every searched and fixed value against the trainer's own settings model, resolves the
train, validation and test categories of the data root (generating the synthetic set when the sweep
says how and it is missing), and turns the backbone features of the training and validation images
into a cache on disk, once per feature-changing setting (image size, backbone), which the trials share.

Each trial meta-trains with its settings in rounds (``episodes_per_round`` Proto-MAML episodes, or one
federated round over Factory actors) and after each round reports, with a checkpoint, the image
AUROC of adapting to the validation categories (K images of their ``train/good``, scored on their
``test`` split, ``validation_seeds`` support draws each), the adaptation time (inner loop, posterior
and calibration on cached features, without the backbone) and, for federated trials, epsilon. So ASHA
can stop a trial at a round, and ``--resume`` continues an interrupted sweep from its checkpoints.

At the end the best trial (by the sweep's metric at its last report, among the trials that ran every
round) is calibrated and evaluated once on the held-out test categories. The output folder holds
``trials.parquet``/``.csv`` (one row per trial), ``rounds.parquet``/``.csv`` (one row per report),
``best_config.yaml`` (accepted by ``bayprano train --config`` as is), ``best_checkpoint.pt``, the test
evaluation, ``summary.json`` and the plots.

Modules: ``spec`` (sweep files, checks, smoke version, data), ``features`` (the shared feature cache),
``trainables`` (the Ray Tune trainable), ``run`` (running a sweep, the ``bayprano tune`` command),
``results`` (tables, the best trial, its checkpoint and evaluation) and ``plots``.
"""

from bayprano.tune.results import finish_sweep, pick_best, trial_tables
from bayprano.tune.run import add_tune_parser, cmd_tune, run_sweep, trial_count
from bayprano.tune.spec import check_trial_values, load_sweep, prepare_data, resolve_categories, smoke_sweep
from bayprano.tune.trainables import sweep_trial, validate

__all__ = [
    "add_tune_parser",
    "check_trial_values",
    "cmd_tune",
    "finish_sweep",
    "load_sweep",
    "pick_best",
    "prepare_data",
    "resolve_categories",
    "run_sweep",
    "smoke_sweep",
    "sweep_trial",
    "trial_count",
    "trial_tables",
    "validate",
]
