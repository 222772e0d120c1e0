"""What every sub-command of ``bayprano`` shares: argument parsers for counts, progress and message lines on
stderr, and the pydantic settings built from a --config file with the flags laid over it."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable


def positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value

    return parse


class Progress:
    """Progress lines on stderr: how far, what is being done, how long it has taken; at most one a second."""

    def __init__(self, label: str, every: float = 1.0):
        self.label = label
        self.every = every
        self.start = self.last = time.perf_counter()

    def __call__(self, *args) -> None:
        item, (done, total) = (args[0], args[1:]) if len(args) == 3 else ("", args)
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        print(
            f"[{self.label}] {done}/{total} {item} ({now - self.start:.1f}s)".replace("  ", " "),
            file=sys.stderr,
            flush=True,
        )


def message_log(label: str) -> Callable[[str], None]:
    """A progress printer for messages: one line on stderr each, prefixed with the command."""

    def emit(message: str) -> None:
        print(f"[{label}] {message}", file=sys.stderr, flush=True)

    return emit


def settings_from_args(args: argparse.Namespace, model_cls) -> Any:
    """The command's pydantic settings: its --config file with the flags the user gave laid over it."""
    from bayprano.config import load_yaml_config

    given = {k: getattr(args, k) for k in model_cls.model_fields if getattr(args, k, None) is not None}
    return load_yaml_config(args.config, model_cls, given)
