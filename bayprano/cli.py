"""The ``bayprano`` command: data, centralised and federated meta-training, evaluation, adaptation to a
site, scoring (local or over HTTP), the model registry and Serve, Tune sweeps, and the demo.

Every user error (a bad path, a malformed file, an out-of-range option) is reported as one line naming
the file, field or value, with exit status 2; a traceback means a bug in the platform.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bayprano.platform.errors import BaypranoError, ConfigError, DataError
from bayprano.serve import cli as serve_cli
from bayprano import tune as tune_cli


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {value}")
        return value

    return parse


class _Progress:
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


# ---------------------------------------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from bayprano.platform.data.synth import generate_dataset

    start = time.perf_counter()
    meta = generate_dataset(
        args.out,
        categories=args.categories,
        seed=args.seed,
        size=args.size,
        n_train=args.train,
        n_test_good=args.test_good,
        n_test_defective=args.test_defective,
        progress=_Progress("synth"),
    )
    cats = [c["name"] if isinstance(c, dict) else c for c in meta["categories"]]
    print(f"wrote {len(cats)} categories ({', '.join(cats)}) to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from bayprano.platform.data.shards import shard_dataset

    start = time.perf_counter()
    manifest = shard_dataset(
        args.root,
        args.out,
        sites=args.sites,
        mode="iid" if args.iid else "by-category",
        seed=args.seed,
        progress=_Progress("shard"),
    )
    print(_manifest_table(manifest))
    print(
        f"wrote {len(manifest['sites'])} shards ({manifest['total_rows']} rows, {manifest['mode']}) "
        f"to {args.out} in {time.perf_counter() - start:.1f}s"
    )
    return 0


def cmd_data_import_mvtec(args: argparse.Namespace) -> int:
    from bayprano.platform.data.info import summarize_root

    summary = summarize_root(args.root)
    print(summary.table())
    print(f"{args.root}: valid MVTec layout, {len(summary.categories)} categories, {summary.total} images")
    return cmd_data_shard(args)


def cmd_data_import_folder(args: argparse.Namespace) -> int:
    from bayprano.platform.data.folder import import_folder

    result = import_folder(
        args.category,
        args.normal,
        args.out,
        abnormal=args.abnormal,
        masks=args.masks,
        test_fraction=args.test_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    print(f"wrote category {args.category!r} to {Path(args.out) / args.category}: {counts}")
    return 0


def _manifest_table(manifest: dict) -> str:
    from bayprano.platform.data.info import format_table

    rows: list[Iterable[str]] = []
    for site in manifest["sites"]:
        by_split = site.get("rows_by_split", {})
        rows.append(
            (
                site["name"],
                ", ".join(site["categories"]),
                str(by_split.get("train", 0)),
                str(by_split.get("test", 0)),
                str(site["rows"]),
                f"{site.get('image_bytes', 0) / 1e6:.1f} MB",
            )
        )
    return format_table(("site", "categories", "train", "test", "rows", "image bytes"), rows)


def data_summary(path: str | Path):
    """Summary of an MVTec-layout root, a Parquet shard, or a folder of shards with a manifest."""
    from bayprano.platform.data.info import summarize_records, summarize_root
    from bayprano.platform.data.shards import ShardReader, read_manifest

    def records(shard: Path):
        with ShardReader(shard) as reader:
            for m in reader.iter_metadata():
                yield m.category, m.split, m.defect_type, m.height, m.width

    path = Path(path)
    if path.is_file():
        return summarize_records(path, records(path))
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        return summarize_records(path, (r for site in manifest["sites"] for r in records(path / site["file"])))
    return summarize_root(path)


def cmd_data_info(args: argparse.Namespace) -> int:
    summary = data_summary(args.path)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
        return 0
    path = Path(args.path)
    if path.is_dir() and (path / "manifest.json").is_file():
        from bayprano.platform.data.shards import read_manifest

        print(_manifest_table(read_manifest(path)))
        print()
    print(summary.table())
    print(f"{args.path}: {len(summary.categories)} categories, {summary.total} images")
    return 0


# ---------------------------------------------------------------------------------------------- demo


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
        progress=_Progress("demo"),
        log=lambda m: print(m, flush=True),
    )
    return 0


# ------------------------------------------------------------------------------------- model commands


def _log(label: str) -> Callable[[str], None]:
    """A progress printer for messages: one line on stderr each, prefixed with the command."""

    def emit(message: str) -> None:
        print(f"[{label}] {message}", file=sys.stderr, flush=True)

    return emit


def settings_from_args(args: argparse.Namespace, model_cls) -> Any:
    """The command's pydantic settings: its --config file with the flags the user gave laid over it."""
    from bayprano.config import load_yaml_config

    given = {k: getattr(args, k) for k in model_cls.model_fields if getattr(args, k, None) is not None}
    return load_yaml_config(args.config, model_cls, given)


_FEDERATED_FLAGS = (
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


def _site_paths(text: str) -> dict[str, str]:
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


def _federated_config_file(path: str | None) -> bool:
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
    from bayprano.actors.coordinator import train_federated

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

    if args.shards is not None or args.sites is not None or _federated_config_file(args.config):
        return cmd_train_federated(args)
    given = [name for name in _FEDERATED_FLAGS if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} is for federated training: give --shards DIR")
    cfg = settings_from_args(args, TrainConfig)
    from bayprano.platform.train import train_centralised

    start = time.perf_counter()
    ckpt = train_centralised(cfg, progress=_log("train"))
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
    from bayprano.platform.evaluate import METHODS, markdown_table, run_evaluation
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.backbone import DEFAULT_BACKBONE

    if cfg.output.is_dir():
        raise ConfigError(f"--output {cfg.output}: is a folder; name the JSON file to write")
    log = _log("evaluate")
    methods = list(cfg.methods or METHODS)
    categories = cfg.categories
    ckpt = load_checkpoint(cfg.checkpoint) if cfg.checkpoint is not None else None
    image_size = cfg.image_size
    if ckpt is not None:
        if "image_size" in cfg.model_fields_set and cfg.image_size != ckpt.image_size:
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
    )
    print(markdown_table(result))
    pictures = sum(len(v) for v in result["pictures"].values())
    print(
        f"wrote {cfg.output} ({len(result['records'])} records, {result['protocol']}) and {pictures} pictures "
        f"beside it in {time.perf_counter() - start:.1f}s"
    )
    return 0


def _read_image(path: str | Path):
    """An RGB uint8 image from a file, refused (naming the file) when unreadable or too small to score."""
    from bayprano.platform.data.imageio import load_image
    from bayprano.platform.model.backbone import MIN_IMAGE_SIZE

    image = load_image(path)
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIZE:
        raise DataError(f"{path}: image is {w}x{h} px, smaller than {MIN_IMAGE_SIZE} px on a side")
    return image


def support_files(spec: str) -> list[Path]:
    """The support images named by a folder (every image file in it), a glob pattern or one file, sorted."""
    from bayprano.platform.data.imageio import is_image_file

    path = Path(spec)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p)]
    elif any(ch in spec for ch in "*?["):
        files = [Path(p) for p in glob.glob(spec) if Path(p).is_file()]
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{spec}: support folder or image does not exist")
    if not files:
        raise DataError(f"{spec}: no image files (.png, .jpg, .jpeg, .bmp) found")
    return sorted(files, key=str)


def cmd_adapt(args: argparse.Namespace) -> int:
    from bayprano.platform.meta.checkpoint import load_checkpoint
    from bayprano.platform.model.site import adapt

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "meta.json").is_file())):
        raise ConfigError(f"--out {out}: exists and is not a site model folder; refusing to replace it")
    ckpt = load_checkpoint(args.checkpoint)
    files = support_files(args.support)
    if args.shots is not None:
        if args.shots > len(files):
            raise ConfigError(f"--shots {args.shots} but only {len(files)} good images in {args.support}")
        files = files[: args.shots]
    images = [_read_image(p) for p in files]
    roi = None
    if args.roi is not None:
        from bayprano.platform.model.tiling import RegionOfInterest

        roi = RegionOfInterest.parse(args.roi)
    site = adapt(
        ckpt,
        images,
        steps=args.steps,
        target_fpr=args.target_fpr,
        scoring=args.scoring,
        tile_overlap=args.tile_overlap,
        roi=roi,
        augment=args.augment,
    )
    site.save(out)
    loo = site.info.get("loo_statistics") or []
    print(f"wrote site model {out}")
    print(
        f"  version    model sha256 {site.info['model_sha256'][:12]}, from checkpoint {ckpt.sha256[:12]} "
        f"({args.checkpoint}), backbone {ckpt.backbone_fingerprint}, {site.image_size} px"
    )
    print(
        f"  support    {len(images)} good image(s) from {args.support}, {site.info['inner_steps']} inner step(s), "
        f"augmentation {args.augment} ({site.info['support_views']} view(s))"
    )
    print(
        f"  scoring    {site.scoring}"
        + (
            f" (tile {site.image_size} px, overlap {site.tile_overlap:g})"
            if site.scoring == "tile"
            else f" (resized to {site.image_size} px)"
        )
        + ("" if roi is None else f", region of interest {roi.describe()}")
    )
    print(
        f"  threshold  {site.threshold:.3f} for target FPR {site.target_fpr:g} ({site.calibration.describe()}; "
        f"leave-one-out statistics "
        f"{', '.join(f'{s:.2f}' for s in loo) if loo else 'none: one shot'})"
    )
    print(f"  adapted in {site.info['adapt_seconds']:.2f}s")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from bayprano.score_command import run_score

    return run_score(args)


def cmd_export(args: argparse.Namespace) -> int:
    from bayprano.platform.export import export_site_model

    path = export_site_model(args.model, args.format, args.out)
    print(f"wrote {path} and {path.parent / 'model.json'} ({args.format}, from {args.model})")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayprano", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="generate, import, shard and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    p = dsub.add_parser("synth", help="generate the synthetic industrial dataset (MVTec layout)")
    p.add_argument("--out", required=True, help="output root")
    p.add_argument("--categories", type=_positive_int("--categories"), default=6, help="number of categories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--train", type=_positive_int("--train"), default=60, help="train/good images per category")
    p.add_argument("--test-good", type=_positive_int("--test-good"), default=40)
    p.add_argument("--test-defective", type=_positive_int("--test-defective"), default=40)
    p.set_defaults(func=cmd_data_synth)

    def shard_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", required=True, help="MVTec-layout dataset root")
        p.add_argument("--out", required=True, help="output folder for site-NNN.parquet and manifest.json")
        p.add_argument("--sites", type=int, required=True, help="number of factories")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--by-category", action="store_true", help="each site owns whole categories (default)")
        mode.add_argument("--iid", action="store_true", help="spread every category over all sites")
        p.add_argument("--seed", type=int, default=0)

    p = dsub.add_parser("shard", help="partition an MVTec-layout dataset into per-site Parquet shards")
    shard_args(p)
    p.set_defaults(func=cmd_data_shard)

    p = dsub.add_parser("import-mvtec", help="validate an MVTec AD download and shard it")
    shard_args(p)
    p.set_defaults(func=cmd_data_import_mvtec)

    p = dsub.add_parser("import-folder", help="lay loose images out as one MVTec-layout category")
    p.add_argument("--category", required=True)
    p.add_argument("--normal", required=True, help="folder of good images")
    p.add_argument("--abnormal", help="folder of defective images (flat, or one sub-folder per defect type)")
    p.add_argument("--masks", help="folder of masks named <stem>.png or <stem>_mask.png")
    p.add_argument("--out", required=True, help="dataset root to write the category into")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of normals held back for testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing category of that name")
    p.set_defaults(func=cmd_data_import_folder)

    p = dsub.add_parser("info", help="what a dataset root, a shard or a shard folder holds")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_data_info)

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
    p.add_argument("--image-size", metavar="PX", help="image side the backbone sees (default 256)")
    p.add_argument("--backbone", metavar="NAME", help="efficientnet_lite2 (default), random, or a torchvision CNN")
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
        type=_site_paths,
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
    p.add_argument("--methods", metavar="M,N", help="bayes, bayes-frozen, patchcore, padim, protomaml (default: all)")
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
    p.add_argument("--image-size", metavar="PX", help="image side (default 256; with --checkpoint, its size)")
    p.add_argument("--backbone", metavar="NAME", help="default: the checkpoint's, else efficientnet_lite2")
    p.add_argument("--dim", metavar="D", help="embedding dimension when meta-training here (default 64)")
    p.add_argument("--seed", metavar="S", help="random seed (default 0)")
    p.add_argument("--device", metavar="DEV", help="backbone device: cpu (default), cuda, cuda:N, auto")
    p.add_argument("--output", metavar="OUT.json", help="results file; pictures are written beside it")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("adapt", help="adapt a meta-checkpoint to a site's few good images")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="meta-checkpoint written by `bayprano train`")
    p.add_argument("--support", required=True, metavar="DIR_OR_GLOB", help="folder of good images, or a glob")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="site model folder to write")
    p.add_argument("--steps", type=int, metavar="S", help="inner-loop steps, 0..10 (default: the checkpoint's)")
    p.add_argument("--shots", type=_positive_int("--shots"), metavar="K", help="use the first K images (sorted)")
    p.add_argument(
        "--target-fpr",
        type=float,
        default=0.05,
        metavar="A",
        help="target false-positive rate of the threshold (default 0.05)",
    )
    p.add_argument(
        "--scoring",
        choices=("resize", "tile"),
        default="resize",
        help="resize: each image resized to the model's side (default); tile: images larger than one "
        "tile scored as overlapping tiles, map and statistic at the image's own size",
    )
    p.add_argument(
        "--tile-overlap",
        type=float,
        default=0.25,
        metavar="F",
        help="fraction of a tile that neighbouring tiles share, in [0, 1) (default 0.25)",
    )
    p.add_argument(
        "--roi",
        metavar="X0,Y0,X1,Y1|MASK",
        help="region of interest: a pixel rectangle (x1, y1 "
        "exclusive) or a mask image at the images' size (non-zero = inside); the map is zero and the "
        "statistic ignores the patches outside it",
    )
    p.add_argument(
        "--augment",
        choices=("none", "flips", "dihedral", "shifts"),
        default="none",
        help="support augmentation before the fit and the calibration (default none)",
    )
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("score", help="score images with an adapted site model: one JSON line per image")
    p.add_argument(
        "--model",
        metavar="MODEL",
        help="site model folder written by `bayprano adapt`, or an "
        "exported model.onnx / model.xml written by `bayprano export`",
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (PNG, JPEG, BMP; any size), folders (walked recursively) or glob patterns",
    )
    p.add_argument("--target-fpr", type=float, metavar="A", help="target false-positive rate (default: the model's)")
    p.add_argument("--maps", metavar="DIR", help="write a heatmap overlay PNG per image here")
    p.add_argument(
        "--output",
        metavar="DIR",
        help="write predictions.csv, predictions.jsonl, overlays of the "
        "anomalous and review images, and summary.html here",
    )
    serve_cli.add_score_client_arguments(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("export", help="export a site model to one ONNX graph or OpenVINO IR (image -> map, statistic)")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="site model folder written by `bayprano adapt`")
    p.add_argument("--format", required=True, choices=("onnx", "openvino"))
    p.add_argument("--out", required=True, metavar="DIR", help="folder for model.onnx (model.xml/.bin) and model.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="run the platform end to end on generated data")
    p.add_argument("--out", default="demo-output", help="output folder")
    p.add_argument("--data-root", help="use this MVTec-layout root instead of generating one")
    p.add_argument("--sites", type=_positive_int("--sites"), default=3)
    p.add_argument("--shots", type=_positive_int("--shots"), default=5, help="good images per new product")
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
