"""The ``bayprano train`` command (centralised, or federated with --shards or --sites) and ``bayprano
evaluate`` (the leave-one-category-out harness over every method)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bayprano.commands.common import message_log, settings_from_args
from bayprano.platform.errors import ConfigError
from bayprano.platform.model.names import DEFAULT_BACKBONE


FEDERATED_FLAGS = (
    "sites_per_round",
    "rounds",
    "local_steps",
    "dp_noise",
    "dp_clip",
    "target_epsilon",
    "dp_delta",
    "secure_agg",
    "fp16",
    "server_opt",
    "server_lr",
    "fedprox_mu",
    "resume",
    "address",
    "min_sites",
    "round_timeout",
    "pool_size",
    "secagg_threshold",
    "secagg_neighbours",
)


def site_paths(text: str) -> dict[str, str]:
    """``--sites plant-a=/data/a.parquet,plant-b=/data/b.parquet`` -> {name: shard path}."""
    sites: dict[str, str] = {}
    for item in text.split(","):
        name, sep, path = item.strip().partition("=")
        if not sep or not name.strip() or not path.strip():
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not NAME=PATH (e.g. plant-a=/data/a.parquet)")
        if name.strip() in sites:
            raise argparse.ArgumentTypeError(f"site {name.strip()!r} is given twice")
        sites[name.strip()] = path.strip()
    return sites


def federated_config_file(path: str | None) -> bool:
    """Whether the --config file describes federated training (it names ``shards`` or ``sites``)."""
    if path is None or not Path(path).is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return False  # load_yaml_config reports it
    return isinstance(data, dict) and ("shards" in data or "sites" in data)


def cmd_train_federated(args: argparse.Namespace) -> int:
    from bayprano.config import FederatedTrainConfig

    if args.data_root is not None:
        raise ConfigError("give --data-root (centralised) or --shards (federated), not both")
    for name in ("categories", "exclude", "episodes"):
        if getattr(args, name) is not None:
            raise ConfigError(
                f"--{name.replace('_', '-')} is for centralised training; with --shards each site "
                "trains on all of its categories for --rounds x --local-steps episodes"
            )
    cfg = settings_from_args(args, FederatedTrainConfig)
    from bayprano.actors.coordinator_actor import train_federated

    summary = train_federated(cfg)
    if summary["stop_reason"]:
        print(f"bayprano: {summary['stop_reason']}", file=sys.stderr)
    eps = "" if summary["epsilon"] is None else f", epsilon {summary['epsilon']:.3f} at delta {cfg.dp_delta:g}"
    for site, b in summary["site_bytes"].items():
        share = "" if b["sent_fraction"] is None else f" = {100 * b['sent_fraction']:.2f}%"
        print(
            f"  {site}: sent {b['sent']} bytes{share} of its {b['shard_bytes']} image bytes, "
            f"received {b['received']} bytes"
        )
    print(
        f"wrote checkpoint {cfg.out}: {summary['rounds']} federated round(s) of {cfg.rounds}{eps}, "
        f"{summary['bytes']} bytes moved (the shards hold {summary['shard_bytes']} image bytes), "
        f"in {summary['seconds']:.1f}s"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bayprano.config import TrainConfig

    if args.shards is not None or args.sites is not None or federated_config_file(args.config):
        return cmd_train_federated(args)
    given = [name for name in FEDERATED_FLAGS if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} is for federated training: give --shards DIR")
    cfg = settings_from_args(args, TrainConfig)
    from bayprano.platform.train import train_centralised

    start = time.perf_counter()
    ckpt = train_centralised(cfg, progress=message_log("train"))
    print(
        f"wrote checkpoint {cfg.out} (sha256 {ckpt.sha256[:12]}): meta-trained on {len(ckpt.categories)} "
        f"categories ({', '.join(ckpt.categories)}), {cfg.episodes} episodes, K={cfg.shots}, S={cfg.inner_steps}, "
        f"{'second' if cfg.second_order else 'first'}-order, backbone {ckpt.backbone_fingerprint}, "
        f"{ckpt.image_size} px, effective patch count {ckpt.calibration.effective_patches:.1f}, "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bayprano.config import EvalConfig

    cfg = settings_from_args(args, EvalConfig)
    from bayprano.platform.data.mvtec import list_categories
    from bayprano.platform.evaluate import METHODS, run_evaluation
    from bayprano.platform.evaluation_report import markdown_table
    from bayprano.platform.meta.checkpoint import load_checkpoint

    if cfg.output.is_dir():
        raise ConfigError(f"--output {cfg.output}: is a folder; name the JSON file to write")
    log = message_log("evaluate")
    methods = list(cfg.methods or METHODS)
    categories = cfg.categories
    ckpt = load_checkpoint(cfg.checkpoint) if cfg.checkpoint is not None else None
    image_size = cfg.image_size
    if ckpt is not None:
        if cfg.image_size is not None and cfg.image_size != ckpt.image_size:
            raise ConfigError(
                f"--image-size {cfg.image_size}: the checkpoint {cfg.checkpoint} was meta-trained at "
                f"{ckpt.image_size} px"
            )
        image_size = ckpt.image_size
        if "bayes" in methods:
            if categories is None:
                categories = [c for c in list_categories(cfg.data_root) if c not in ckpt.categories]
                if not categories:
                    raise ConfigError(
                        f"{cfg.checkpoint}: meta-trained on every category of {cfg.data_root}; "
                        "none is left to evaluate without leakage"
                    )
                log(f"evaluating the categories the checkpoint never saw: {', '.join(categories)}")
            seen = [c for c in categories if c in ckpt.categories]
            if seen:
                raise ConfigError(
                    f"{cfg.checkpoint}: meta-trained on category {seen[0]!r}; evaluating it there would leak"
                )
    backbone = cfg.backbone or (ckpt.backbone if ckpt is not None else DEFAULT_BACKBONE)
    start = time.perf_counter()
    result = run_evaluation(
        cfg.data_root,
        cfg.output,
        categories=categories,
        shots=cfg.shots,
        seeds=cfg.seeds,
        methods=methods,
        checkpoint=cfg.checkpoint,
        meta_train_root=cfg.meta_train_root,
        inner_steps=cfg.inner_steps,
        target_fpr=cfg.target_fpr,
        episodes=cfg.episodes,
        image_size=image_size,
        backbone=backbone,
        dim=cfg.dim,
        device=cfg.device,
        seed=cfg.seed,
        progress=log,
        augments=cfg.augment,
    )
    print(markdown_table(result))
    pictures = sum(len(v) for v in result["pictures"].values())
    print(
        f"wrote {cfg.output} ({len(result['records'])} records, {result['protocol']}) and {pictures} pictures "
        f"beside it in {time.perf_counter() - start:.1f}s"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``bayprano train`` and ``bayprano evaluate`` to the command's sub-parsers."""
    p = sub.add_parser("train", help="meta-train the model on the train/good images of an MVTec-layout root")
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; flags given here override it")
    p.add_argument("--data-root", metavar="DIR", help="MVTec-layout root (only train/good is read)")
    p.add_argument("--categories", metavar="A,B", help="categories to train on (default: all)")
    p.add_argument("--exclude", metavar="C,D", help="categories to leave out (held out for evaluation)")
    p.add_argument("--shots", metavar="K", help="support images per episode")
    p.add_argument("--inner-steps", metavar="S", help="inner-loop steps, 0..10")
    p.add_argument("--episodes", metavar="N", help="meta-training episodes")
    p.add_argument("--out", metavar="CKPT", help="checkpoint file to write")
    p.add_argument("--seed", metavar="S", help="random seed (default 0)")
    p.add_argument(
        "--image-size",
        metavar="PX",
        help="image side the backbone sees (default: 252 for dinov2_vits14, 256 for a CNN)",
    )
    p.add_argument(
        "--backbone",
        metavar="NAME",
        help=f"{DEFAULT_BACKBONE} (default), efficientnet_lite2, random, or a torchvision CNN",
    )
    p.add_argument("--dim", metavar="D", help="embedding dimension of the head (default 64)")
    p.add_argument("--lr", metavar="LR", help="outer learning rate (default 0.002)")
    p.add_argument(
        "--inner-lr", metavar="LR", help="initial inner-loop step size, meta-learned from there (default 0.05)"
    )
    p.add_argument("--supcon-weight", metavar="W", help="weight of the supervised contrastive loss (default 0.1)")
    p.add_argument("--n-query-normal", metavar="N", help="normal query images per episode (default 4)")
    p.add_argument("--n-query-anomalous", metavar="N", help="synthetic anomalous query images per episode (default 4)")
    p.add_argument("--second-order", action="store_true", default=None, help="differentiate through the inner loop")
    p.add_argument("--calibration-episodes", metavar="N", help="episodes to calibrate on (default 20)")
    p.add_argument("--device", metavar="DEV", help="backbone device: cpu (default), cuda, cuda:N, auto")
    fed = p.add_argument_group("federated training (with --shards)")
    fed.add_argument("--shards", metavar="DIR", help="shard folder (manifest.json): one Factory actor per site")
    fed.add_argument(
        "--sites",
        metavar="NAME=PATH,...",
        type=site_paths,
        help="or the sites by name, each with the path of its shard on its own node",
    )
    fed.add_argument("--sites-per-round", metavar="F", help="fraction of the sites sampled each round (default 1)")
    fed.add_argument("--rounds", metavar="R", help="federated rounds")
    fed.add_argument("--local-steps", metavar="E", help="local meta-training episodes per site and round (default 1)")
    fed.add_argument("--dp-noise", metavar="Z", help="client-level DP: Gaussian noise multiplier z")
    fed.add_argument("--dp-clip", metavar="C", help="client-level DP: clip each site's delta to L2 norm C")
    fed.add_argument("--target-epsilon", metavar="EPS", help="stop before a round that would spend more epsilon")
    fed.add_argument("--dp-delta", metavar="D", help="DP delta (default 1e-5)")
    fed.add_argument(
        "--secure-agg",
        action="store_true",
        default=None,
        help="secure aggregation (double masking, dropout-robust): the server only learns sums",
    )
    fed.add_argument(
        "--secagg-threshold",
        metavar="T",
        help="secure aggregation: shares that recover a site's mask secrets (default: a majority of its neighbours)",
    )
    fed.add_argument(
        "--secagg-neighbours",
        metavar="K",
        help="secure aggregation: peers of each site, SecAgg+ (default: every other site of the round)",
    )
    fed.add_argument("--fp16", action="store_true", default=None, help="send the global model as float16")
    fed.add_argument("--server-opt", metavar="NAME", help="fedavg (default), fedprox or fedadam")
    fed.add_argument("--server-lr", metavar="LR", help="server step size (default 1 for fedavg/fedprox, 0.01 fedadam)")
    fed.add_argument(
        "--min-sites",
        metavar="N",
        help="quorum: fewest sites a round may complete with (default: half the round's sites, rounded up)",
    )
    fed.add_argument("--round-timeout", metavar="S", help="seconds a round waits for its sites (default 300)")
    fed.add_argument("--pool-size", metavar="N", help="pooled mode: simulate every site over N shared actors")
    fed.add_argument("--fedprox-mu", metavar="MU", help="FedProx proximal weight (with --server-opt fedprox)")
    fed.add_argument("--resume", action="store_true", default=None, help="continue from --out's last round")
    fed.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: a local Ray)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="leave-one-category-out evaluation of every method, written as JSON")
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; flags given here override it")
    p.add_argument("--data-root", metavar="DIR", help="MVTec-layout root")
    p.add_argument(
        "--categories",
        metavar="A,B",
        help="categories to evaluate (default: all; with --checkpoint, those it was not meta-trained on)",
    )
    p.add_argument("--shots", metavar="K[,K2]", help="support sizes (default 5)")
    p.add_argument("--seeds", metavar="N", help="support sets drawn per category and K (default 3)")
    p.add_argument(
        "--methods",
        metavar="M,N",
        help="bayes, bayes-frozen, protomaml, patchcore, padim, anomalydino (default: every registered method)",
    )
    p.add_argument(
        "--augment",
        metavar="A[,B]",
        help="support augmentations, each a row per method: none (default), flips, dihedral, shifts",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="CKPT", help="meta-checkpoint for the bayes method")
    source.add_argument(
        "--meta-train-root",
        metavar="DIR",
        help="meta-train on this root instead of the other categories of --data-root",
    )
    p.add_argument("--inner-steps", metavar="S", help="inner-loop steps, 0..10 (default 1)")
    p.add_argument("--target-fpr", metavar="A", help="target false-positive rate of the threshold (default 0.05)")
    p.add_argument("--episodes", metavar="N", help="meta-training episodes when there is no checkpoint (default 200)")
    p.add_argument(
        "--image-size",
        metavar="PX",
        help="image side (default: the checkpoint's, else 252 for dinov2_vits14, 256 for a CNN)",
    )
    p.add_argument("--backbone", metavar="NAME", help=f"default: the checkpoint's, else {DEFAULT_BACKBONE}")
    p.add_argument("--dim", metavar="D", help="embedding dimension when meta-training here (default 64)")
    p.add_argument("--seed", metavar="S", help="random seed (default 0)")
    p.add_argument("--device", metavar="DEV", help="backbone device: cpu (default), cuda, cuda:N, auto")
    p.add_argument("--output", metavar="OUT.json", help="results file; pictures are written beside it")
    p.set_defaults(func=cmd_evaluate)
