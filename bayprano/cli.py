"""The ``bayprano`` command: data, centralised and federated meta-training, evaluation, adaptation to a
site, scoring (local or over HTTP), the model registry and Serve, Tune sweeps, and the demo.

Every user error (a bad path, a malformed file, an out-of-range option) is reported as one line naming
the file, field or value, with exit status 2; a traceback means a bug in the platform.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bayprano import tune as tune_cli
from bayprano.commands import data as data_commands
from bayprano.commands import model as model_commands
from bayprano.commands import training as training_commands
from bayprano.commands.common import Progress, positive_int
from bayprano.platform.errors import BaypranoError
from bayprano.serve import cli as serve_cli


def cmd_demo(args: argparse.Namespace) -> int:
    from bayprano.demo import run_demo

    run_demo(
        args.out,
        data_root=args.data_root,
        sites=args.sites,
        shots=args.shots,
        dp=args.dp,
        fast=args.fast,
        seed=args.seed,
        progress=Progress("demo"),
        log=lambda m: print(m, flush=True),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayprano", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data_commands.add_commands(sub)
    training_commands.add_commands(sub)
    model_commands.add_commands(sub)

    p = sub.add_parser("demo", help="run the platform end to end on generated data")
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--data-root", help="use this MVTec-layout root instead of generating one")
    p.add_argument("--sites", type=positive_int("--sites"), default=3)
    p.add_argument("--shots", type=positive_int("--shots"), default=5, help="good images per new product")
    p.add_argument("--dp", action="store_true", help="secure aggregation and client-level differential privacy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="smaller images, fewer of them, fewer rounds")
    p.set_defaults(func=cmd_demo)

    serve_cli.add_commands(sub)
    tune_cli.add_tune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BaypranoError as exc:
        print(f"bayprano: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayprano: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
