"""The serving commands: ``bayprano registry ...`` for operators, ``bayprano serve``, and the HTTP client
behind ``bayprano score --url``.

Ray, Serve and FastAPI are imported only when ``bayprano serve`` runs, so the rest of the command line
starts as fast as before.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable

from bayprano.platform.errors import ConfigError, DataError

TOKEN_ENV = "BAYPRANO_TOKEN"
REGISTRY_ENV = "BAYPRANO_REGISTRY"


# --------------------------------------------------------------------------------------------- registry


def _registry(args: argparse.Namespace):
    from bayprano.serve.registry import Registry

    if not args.registry:
        raise ConfigError(f"--registry DIR is required (or set ${REGISTRY_ENV})")
    return Registry(args.registry)


def cmd_registry_init(args: argparse.Namespace) -> int:
    from bayprano.serve.registry import Registry

    if not args.registry:
        raise ConfigError(f"--registry DIR is required (or set ${REGISTRY_ENV})")
    registry, token = Registry.init(args.registry, checkpoint=args.checkpoint)
    print(f"created registry {registry.root}")
    if args.checkpoint:
        print(f"  meta-checkpoint {args.checkpoint} (sha256 {registry.meta['checkpoint']['sha256'][:12]})")
    print(f"  admin token (shown once, stored hashed): {token}")
    return 0


def cmd_registry_set_checkpoint(args: argparse.Namespace) -> int:
    sha = _registry(args).set_checkpoint(args.checkpoint)
    print(f"/adapt now starts from {args.checkpoint} (sha256 {sha[:12]})")
    return 0


def cmd_registry_add_site(args: argparse.Namespace) -> int:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    token = _registry(args).add_site(args.site, scopes=scopes)
    print(f"added site {args.site!r} (token scopes: {', '.join(scopes)})")
    print(f"  token (shown once, stored hashed): {token}")
    return 0


def cmd_registry_publish(args: argparse.Namespace) -> int:
    registry = _registry(args)
    metrics = {}
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"--metrics {args.metrics}: not a readable JSON file ({exc})") from None
        if not isinstance(metrics, dict):
            raise DataError(f"--metrics {args.metrics}: expected a JSON object")
    info = registry.publish(
        args.site, args.model, metrics=metrics, source=str(args.model), make_current=not args.no_activate
    )
    live = "" if args.no_activate else " (now current)"
    print(
        f"published {args.model} as {args.site} {info.version}{live}: threshold {info.record['threshold']:.3f} "
        f"for target FPR {info.record['target_fpr']:g}, {info.record['support_size']} support image(s)"
    )
    return 0


def cmd_registry_list(args: argparse.Namespace) -> int:
    from bayprano.platform.data.info import format_table

    registry = _registry(args)
    sites = [registry.describe(s) for s in registry.sites()]
    if args.json:
        print(
            json.dumps(
                {"root": str(registry.root), "checkpoint": registry.meta.get("checkpoint"), "sites": sites}, indent=2
            )
        )
        return 0
    ckpt = registry.meta.get("checkpoint")
    print(
        f"registry {registry.root}; meta-checkpoint: "
        f"{ckpt['source'] + ' (sha256 ' + ckpt['sha256'][:12] + ')' if ckpt else 'none'}"
    )
    rows: list[Iterable[str]] = []
    for s in sites:
        for v in s["versions"] or [{"version": "-"}]:
            rows.append(
                (
                    s["site"],
                    v["version"] + (" *" if v.get("current") else ""),
                    v.get("published") or "-",
                    v.get("support_size") or "-",
                    f"{v['threshold']:.3f}" if v.get("threshold") is not None else "-",
                    v.get("target_fpr") or "-",
                    (v.get("checkpoint_sha256") or "-")[:12],
                )
            )
    print(
        format_table(
            ("site", "version (* current)", "published", "support", "threshold", "target FPR", "checkpoint"), rows
        )
    )
    return 0


def cmd_registry_move_current(args: argparse.Namespace) -> int:
    """``promote SITE [VERSION]`` (default: the newest) and ``rollback SITE [--to VERSION]`` (default: the one
    before the current one): move the site's ``current`` pointer and say from where to where."""
    registry = _registry(args)
    before = registry.current(args.site)
    move = registry.promote if args.registry_command == "promote" else registry.rollback
    now = move(args.site, args.version)
    print(f"site {args.site!r}: current version {before} -> {now}")
    return 0


def cmd_registry_rotate_token(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.admin:
        token = registry.rotate_admin_token()
        print(f"new admin token (shown once; the old one no longer works): {token}")
    else:
        if not args.site:
            raise ConfigError("name the site whose token to rotate, or give --admin")
        token = registry.rotate_token(args.site)
        print(f"new token for site {args.site!r} (shown once; the old one no longer works): {token}")
    return 0


# ------------------------------------------------------------------------------------------------ serve


_SERVE_FLAGS = (
    "host",
    "port",
    "address",
    "num_replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "max_models_per_replica",
    "max_batch_size",
    "batch_wait_timeout_s",
    "num_cpus",
    "device",
)


def cmd_serve(args: argparse.Namespace) -> int:
    from bayprano.config import ServeConfig, load_yaml_config

    overrides = {k: getattr(args, k) for k in _SERVE_FLAGS}
    if args.registry:
        overrides["registry"] = str(Path(args.registry).resolve())
    if args.no_batching:
        overrides["batching"] = False
    cfg = load_yaml_config(args.config, ServeConfig, overrides)
    if not cfg.registry.is_absolute():
        cfg = cfg.model_copy(update={"registry": cfg.registry.resolve()})
    from bayprano.serve.registry import Registry

    Registry(cfg.registry)

    import ray
    from ray import serve

    from bayprano.serve.app import application

    own_ray = not ray.is_initialized() and cfg.address is None
    if not ray.is_initialized():
        # "local": a new Ray of our own, never one that happens to run on this machine already
        ray.init(address=cfg.address or "local", include_dashboard=False, configure_logging=False, log_to_driver=False)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(application(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        scaling = (
            f"autoscaling {cfg.min_replicas}-{cfg.max_replicas} replicas at {cfg.target_ongoing_requests:g} "
            "ongoing requests"
            if cfg.autoscaling
            else f"{cfg.num_replicas} model replica(s)"
        )
        print(
            f"serving registry {cfg.registry} at {url} ({scaling}, up to {cfg.max_models_per_replica} site models "
            f"per replica, batching {'up to ' + str(cfg.max_batch_size) if cfg.batching else 'off'}); "
            f"{'API docs at ' + url + '/docs; ' if cfg.docs else ''}Ctrl-C stops",
            flush=True,
        )
        endpoints = [
            f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")
        ]
        if endpoints:
            print(f"metrics for Prometheus at {', '.join(endpoints)}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            if own_ray:
                serve.shutdown()
            else:
                serve.delete(cfg.app_name)
        finally:
            if own_ray:
                ray.shutdown()
    return 0


# ----------------------------------------------------------------------------------------------- client


def post_json(url: str, token: str, payload: dict, timeout: float) -> dict:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            err = json.loads(body)
            detail = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            detail = body[:200].decode("utf-8", "replace")
        raise DataError(f"{url}: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{url}: cannot reach the server ({reason})") from None


def client_endpoint(args: argparse.Namespace) -> tuple[str, str]:
    """The score endpoint and token of ``bayprano score --url URL --site S [--token T]``, checked."""
    if not args.site:
        raise ConfigError("--url needs --site (the site whose model scores the images)")
    if args.model:
        raise ConfigError("give either --model (score locally) or --url (score on a server), not both")
    if args.target_fpr is not None:
        raise ConfigError("--target-fpr is a local setting; the server scores at the site's published threshold")
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"--url needs the site's token: --token T or ${TOKEN_ENV}")
    parsed = urllib.parse.urlparse(args.url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"--url {args.url!r} is not an http(s) URL")
    return f"{args.url.rstrip('/')}/v1/sites/{urllib.parse.quote(args.site)}/score", token


# ------------------------------------------------------------------------------------------------ parser


def add_score_client_arguments(p: argparse.ArgumentParser) -> None:
    client = p.add_argument_group("score on a server (instead of --model)")
    client.add_argument("--url", metavar="URL", help="a `bayprano serve` endpoint, e.g. http://127.0.0.1:8000")
    client.add_argument("--site", metavar="SITE", help="the site whose live model scores the images")
    client.add_argument("--token", metavar="T", help=f"the site's token (default: ${TOKEN_ENV})")
    client.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request (default 120)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``registry`` and ``serve`` to the ``bayprano`` command's subparsers."""

    def registry_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--registry",
            metavar="DIR",
            default=os.environ.get(REGISTRY_ENV),
            help=f"registry root folder (default: ${REGISTRY_ENV})",
        )

    reg = sub.add_parser("registry", help="manage the served models: sites, versions, tokens")
    rsub = reg.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")

    p = rsub.add_parser("init", help="create a registry; prints the admin token once")
    registry_arg(p)
    p.add_argument("--checkpoint", metavar="CKPT", help="the meta-checkpoint that /adapt starts from")
    p.set_defaults(func=cmd_registry_init)

    p = rsub.add_parser("set-checkpoint", help="set the meta-checkpoint that /adapt starts from")
    registry_arg(p)
    p.add_argument("checkpoint", metavar="CKPT")
    p.set_defaults(func=cmd_registry_set_checkpoint)

    p = rsub.add_parser("add-site", help="register a site; prints its token once")
    registry_arg(p)
    p.add_argument("site")
    p.add_argument(
        "--scopes",
        default="score,review",
        metavar="LIST",
        help="what the token may do, of score, review, adapt (default: score,review)",
    )
    p.set_defaults(func=cmd_registry_add_site)

    p = rsub.add_parser("publish", help="publish a site model folder (from `bayprano adapt`) as the next version")
    registry_arg(p)
    p.add_argument("site")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--metrics", metavar="FILE.json", help="metrics to record with the version (a JSON object)")
    p.add_argument("--no-activate", action="store_true", help="publish without making it the current version")
    p.set_defaults(func=cmd_registry_publish)

    p = rsub.add_parser("list", help="sites, versions, thresholds")
    registry_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_registry_list)

    p = rsub.add_parser("promote", help="make a candidate version (from /adapt) current (default: the newest)")
    registry_arg(p)
    p.add_argument("site")
    p.add_argument("version", nargs="?", metavar="vNNNN")
    p.set_defaults(func=cmd_registry_move_current)

    p = rsub.add_parser("rollback", help="make an earlier version current (default: the one before)")
    registry_arg(p)
    p.add_argument("site")
    p.add_argument("--to", dest="version", metavar="vNNNN")
    p.set_defaults(func=cmd_registry_move_current)

    p = rsub.add_parser("rotate-token", help="give a site (or the admin) a new token; prints it once")
    registry_arg(p)
    p.add_argument("site", nargs="?")
    p.add_argument("--admin", action="store_true", help="rotate the admin token instead")
    p.set_defaults(func=cmd_registry_rotate_token)

    p = sub.add_parser("serve", help="serve the registry's site models over HTTP with Ray Serve")
    registry_arg(p)
    p.add_argument("--config", metavar="FILE.yaml", help="serve settings (see configs/serve.yaml); flags override it")
    p.add_argument("--address", metavar="ADDR", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--host", metavar="HOST")
    p.add_argument("--port", metavar="PORT")
    p.add_argument("--num-replicas", metavar="N", help="model replicas (without autoscaling)")
    p.add_argument("--min-replicas", metavar="N", help="autoscaling: fewest model replicas")
    p.add_argument("--max-replicas", metavar="N", help="autoscaling: most model replicas")
    p.add_argument("--target-ongoing-requests", metavar="R", help="autoscaling target per replica")
    p.add_argument("--max-models-per-replica", metavar="N", help="site models held per replica (LRU)")
    p.add_argument("--max-batch-size", metavar="N", help="requests batched together per model")
    p.add_argument("--batch-wait-timeout-s", metavar="S", help="how long a batch waits to fill")
    p.add_argument("--no-batching", action="store_true", help="score each request on its own")
    p.add_argument("--num-cpus", metavar="C", help="CPUs per model replica (fractions allowed)")
    p.add_argument("--device", metavar="DEV", help="backbone device: cpu (default), cuda")
    p.set_defaults(func=cmd_serve)
