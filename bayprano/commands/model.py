"""The site model commands: ``bayprano adapt`` (a meta-checkpoint to a site's few good images), ``bayprano
score`` (local or over HTTP) and ``bayprano export`` (ONNX or OpenVINO)."""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from bayprano.commands.common import positive_int
from bayprano.platform.errors import ConfigError, DataError
from bayprano.serve import cli as serve_cli


def read_image(path: str | Path):
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
    images = [read_image(p) for p in files]
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``bayprano adapt``, ``score`` and ``export`` to the command's sub-parsers."""
    p = sub.add_parser("adapt", help="adapt a meta-checkpoint to a site's few good images")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="meta-checkpoint written by `bayprano train`")
    p.add_argument("--support", required=True, metavar="DIR_OR_GLOB", help="folder of good images, or a glob")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="site model folder to write")
    p.add_argument("--steps", type=int, metavar="S", help="inner-loop steps, 0..10 (default: the checkpoint's)")
    p.add_argument("--shots", type=positive_int("--shots"), metavar="K", help="use the first K images (sorted)")
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
