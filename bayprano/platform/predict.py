"""Batch prediction over files, folders and globs: a table, JSON lines, overlays and a one-page summary.

``predict(inputs, score, ...)`` walks the inputs (a folder recursively, a glob, a file), reads each image,
scores them a batch at a time with ``score(images) -> results`` (a local site model, an exported model or
a server) and, with ``output``, writes:

- ``predictions.csv`` and ``predictions.jsonl``: one row per input file (path, score, p-value,
  threshold, decision, uncertainty, model version, overlay, error); unreadable files are rows too,
  with their reason, so the table is complete;
- ``overlays/``: the heatmap overlay of every image decided ``anomalous`` or ``review``;
- ``summary.html``: counts per decision, the score histogram against the threshold, the most anomalous
  images, the files that could not be scored; self-contained (pictures inlined).

A file that cannot be read or scored is reported and skipped; it never stops the run.
"""

from __future__ import annotations

import base64
import csv
import glob
import html
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bayprano.platform.data.imageio import encode_png, is_image_file, load_image, save_png
from bayprano.platform.errors import DataError
from bayprano.platform.fileio import atomic_write_text

COLUMNS = ("path", "score", "p_value", "threshold", "decision", "uncertainty", "model_version", "overlay", "error")
DECISIONS_WITH_OVERLAY = ("anomalous", "review")
MIN_SIDE = 32


@dataclass
class Prediction:
    """One input file's row: its result, or the reason it has none."""

    path: str
    score: float | None = None
    p_value: float | None = None
    threshold: float | None = None
    decision: str | None = None
    uncertainty: float | None = None
    model_version: str | None = None
    overlay: str | None = None
    error: str | None = None


@dataclass
class PredictionRun:
    rows: list[Prediction] = field(default_factory=list)
    output: Path | None = None

    @property
    def failed(self) -> list[Prediction]:
        return [r for r in self.rows if r.error is not None]

    def counts(self) -> dict[str, int]:
        counts = Counter(r.decision for r in self.rows if r.error is None)
        return {d: counts.get(d, 0) for d in ("normal", "anomalous", "review")} | {"failed": len(self.failed)}


def expand_inputs(specs: Sequence[str]) -> tuple[list[Path], list[Prediction]]:
    """The image files named by ``specs`` (sorted, without repeats), and a row for each spec or file that
    names no image (a missing path, a glob that matches nothing, a folder entry that is not an image)."""
    files: list[Path] = []
    problems: list[Prediction] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                problems.append(Prediction(str(path), error="folder holds no files"))
            for p in found:
                if is_image_file(p):
                    files.append(p)
                else:
                    problems.append(Prediction(str(p), error=f"not an image file ({p.suffix or 'no suffix'})"))
        elif any(ch in spec for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matched:
                problems.append(Prediction(spec, error="pattern matches no file"))
            files += matched
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Prediction(spec, error="no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, problems


def _read(path: Path) -> np.ndarray:
    image = load_image(path)
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"{path}: image is {w}x{h} px, smaller than {MIN_SIDE} px on a side")
    return image


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def overlay_names(paths: Sequence[Path]) -> list[str]:
    """A distinct file name per image: its stem, or parent_stem when stems repeat, numbered if still not distinct."""
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):
        stems = [f"{p.parent.name}_{p.stem}" for p in paths]
    names, seen = [], set()
    for stem in stems:
        name, n = stem, 1
        while name in seen:
            name, n = f"{stem}-{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def predict(
    inputs: Sequence[str],
    score: Callable[[list[np.ndarray]], Sequence[Any]],
    *,
    output: str | os.PathLike | None = None,
    overlay: Callable[[np.ndarray, Any], np.ndarray] | None = None,
    model_version: str | None = None,
    batch_size: int = 16,
    progress: Callable[[Iterable], Iterable] | None = None,
    emit: Callable[[Prediction], None] | None = None,
) -> PredictionRun:
    """Score every image named by ``inputs``; see the module docstring for what is written to ``output``.

    ``score`` returns one result per image with ``score``, ``p_value``, ``threshold``, ``decision`` and
    ``uncertainty`` attributes; ``overlay(image, result)`` draws the overlay of one (with ``output``);
    ``emit`` is called with each row as soon as it is known (for JSON lines on stdout).
    """
    files, problems = expand_inputs(inputs)
    out = Path(output) if output is not None else None
    if out is not None:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    names = dict(zip(files, overlay_names(files)))
    run = PredictionRun(output=out)
    for row in problems:
        run.rows.append(row)
        if emit:
            emit(row)
    batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    kept: list[tuple[Prediction, bytes]] = []
    for batch in progress(batches) if progress else batches:
        images, readable = [], []
        for path in batch:
            try:
                images.append(_read(path))
                readable.append(path)
            except DataError as exc:
                row = Prediction(str(path), error=str(exc).replace(f"{path}: ", "", 1))
                run.rows.append(row)
                if emit:
                    emit(row)
        results = _score_each(score, images, readable, run, emit)
        for path, image, result in results:
            if getattr(result, "error", None):
                row = Prediction(str(path), error=str(result.error))
                run.rows.append(row)
                if emit:
                    emit(row)
                continue
            row = Prediction(
                str(path),
                _finite(result.score),
                _finite(result.p_value),
                _finite(result.threshold),
                result.decision,
                _finite(result.uncertainty),
                model_version,
            )
            if out is not None and overlay is not None and result.decision in DECISIONS_WITH_OVERLAY:
                picture = out / "overlays" / f"{names[path]}.png"
                save_png(picture, overlay(image, result))
                row.overlay = str(picture.relative_to(out))
            if out is not None and row.score is not None:
                kept.append((row, _thumbnail(image)))
            run.rows.append(row)
            if emit:
                emit(row)
    if out is not None:
        write_table(run.rows, out)
        write_summary(run, out, kept)
    return run


def _score_each(score, images, paths, run, emit):
    """Score a batch; if the batch fails, score its images one at a time so one bad image fails alone."""
    if not images:
        return []
    try:
        return list(zip(paths, images, score(images)))
    except Exception:  # noqa: BLE001 -- retried image by image below, where the error is reported per file
        if len(images) == 1:
            raise
    results = []
    for path, image in zip(paths, images):
        try:
            results.append((path, image, score([image])[0]))
        except Exception as exc:  # noqa: BLE001 -- one image's failure is its row, not the run's
            row = Prediction(str(path), error=f"scoring failed ({type(exc).__name__}: {exc})")
            run.rows.append(row)
            if emit:
                emit(row)
    return results


def _thumbnail(image: np.ndarray, side: int = 160) -> bytes:
    from PIL import Image

    picture = Image.fromarray(image)
    picture.thumbnail((side * 4, side))
    return encode_png(np.asarray(picture.convert("RGB")))


def write_table(rows: Sequence[Prediction], out: Path) -> None:
    """``predictions.csv`` and ``predictions.jsonl``, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    atomic_write_text(out / "predictions.csv", buffer.getvalue())
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in rows))


def _histogram_png(rows: Sequence[Prediction]) -> bytes | None:
    scored = [r for r in rows if r.score is not None]
    if not scored:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    scores = np.array([r.score for r in scored], dtype=float)
    decisions = np.array([r.decision for r in scored])
    bins: int | list[float] = (
        np.linspace(scores.min(), scores.max(), 30).tolist() if scores.max() > scores.min() else 10
    )
    for decision, colour in (("normal", "tab:blue"), ("review", "tab:orange"), ("anomalous", "tab:red")):
        values = scores[decisions == decision]
        if len(values):
            ax.hist(values, bins=bins, color=colour, alpha=0.7, label=f"{decision} ({len(values)})")
    thresholds = sorted({r.threshold for r in scored if r.threshold is not None})
    for t in thresholds[:1]:
        ax.axvline(t, color="black", linestyle="--", label=f"threshold {t:.3g}")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def write_summary(run: PredictionRun, out: Path, thumbnails: Sequence[tuple[Prediction, bytes]], top: int = 12) -> None:
    """``summary.html``: one self-contained page a person can open from the output folder."""
    counts = run.counts()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>bayprano predictions</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;text-align:left}"
        ".grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}</style></head><body>",
        "<h1>Predictions</h1>",
        "<table><tr>"
        + "".join(f"<th>{html.escape(k)}</th>" for k in counts)
        + "</tr><tr>"
        + "".join(f"<td>{v}</td>" for v in counts.values())
        + "</tr></table>",
    ]
    histogram = _histogram_png(run.rows)
    if histogram:
        parts.append("<h2>Scores against the threshold</h2>" + _img(histogram, "score histogram"))
    ranked = sorted(thumbnails, key=lambda item: -(item[0].score or 0.0))[:top]
    if ranked:
        parts.append("<h2>Most anomalous images</h2><div class='grid'>")
        for row, data in ranked:
            caption = f"{Path(row.path).name}: {row.decision}, score {row.score:.3g}"
            if row.overlay:
                with open(out / row.overlay, "rb") as f:
                    data = f.read()
            parts.append(f"<figure>{_img(data, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
        parts.append("</div>")
    if run.failed:
        parts.append("<h2>Not scored</h2><table><tr><th>file</th><th>reason</th></tr>")
        parts += [f"<tr><td>{html.escape(r.path)}</td><td>{html.escape(r.error or '')}</td></tr>" for r in run.failed]
        parts.append("</table>")
    parts.append("</body></html>")
    atomic_write_text(out / "summary.html", "\n".join(parts))
