"""One progress line per finished trial of a sweep, through a Ray Tune ``Callback`` (public API only).

Tune keeps a run's callbacks with the experiment and uses those again when ``Tuner.restore`` resumes
it; no public way replaces them. So ``TrialLines`` holds nothing that belongs to one process: it counts
the finished trials from the trial list every hook receives (a resumed sweep's earlier trials arrive
finished), and writes its lines to the logger ``PROGRESS_LOGGER``, to which ``forward_progress``
connects the current run's ``log``, first run or resumed.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ray.tune import Callback

from bayprano.tune.results import fmt

PROGRESS_LOGGER = "bayprano.tune.progress"
FINISHED = ("TERMINATED", "ERROR")


class TrialLines(Callback):
    """One line per finished trial: its settings, its last metrics, how many rounds it ran."""

    def __init__(self, total: int, rounds: int, metric: str):
        self.total, self.rounds, self.metric = total, rounds, metric
        self.finished: set[str] = set()
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())

    def _line(self, trials: list, trial: Any, what: str) -> None:
        self.finished |= {t.trial_id for t in trials if t.status in FINISHED}
        self.finished.add(trial.trial_id)
        params = " ".join(f"{k}={fmt(v)}" for k, v in sorted(trial.config.items()))
        r = trial.last_result or {}
        ran = int(r.get("training_iteration", 0))
        early = " (stopped early by ASHA)" if what == "done" and ran < self.rounds else ""
        values = ", ".join(
            f"{k} {fmt(r[k])}"
            for k in dict.fromkeys([self.metric, "val_image_auroc", "adapt_seconds", "epsilon"])
            if k in r
        )
        secs = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
        logging.getLogger(PROGRESS_LOGGER).info(
            f"trial {len(self.finished)}/{self.total} {what}: {params}: {values or 'no report'} after "
            f"{ran}/{self.rounds} round(s){early} ({secs:.0f}s)"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, trial, "FAILED")


class _Forward(logging.Handler):
    def __init__(self, log: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(record.getMessage())


@contextmanager
def forward_progress(log: Callable[[str], None]) -> Iterator[None]:
    """While inside, the progress lines go to ``log`` (and nowhere else)."""
    logger = logging.getLogger(PROGRESS_LOGGER)
    handler = _Forward(log)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
