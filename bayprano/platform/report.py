"""The demo's report: figures (PNG), ``report.md``, a self-contained ``report.html`` and ``results.json``.

The figures are drawn from what the pipeline measured: federated training per round, the bytes each
site sent against the bytes of its images, each site's calibration (measured false-positive rate
against the target), the uncertainty of every decision, the most and least anomalous test images of
each site with their anomaly maps, and the ROC curves of every method. ``write_report`` lays them out
with the tables: Markdown beside the PNG files, and HTML with every image embedded, so that the one
file can be mailed or opened anywhere. Matplotlib is used through its object API only (the global
backend is untouched); every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from bayprano.platform.figures import new_figure, save_figure
from bayprano.platform.fileio import atomic_write_json, atomic_write_text, jsonable

DECISION_COLOURS = {"normal": "#2e7d32", "anomalous": "#c62828", "review": "#f9a825"}


def _figure(width: float, height: float):
    return new_figure(width, height)


def _save(fig, path: str | Path) -> Path:
    return save_figure(fig, path)


def plot_training(history: Sequence[Mapping], path: str | Path) -> Path:
    """Loss and validation image AUROC per federated round; epsilon spent, when there is one."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(6.5, 3.4)
    rounds = [int(r["round"]) for r in history]
    ax = fig.add_subplot(1, 2, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(rounds, [r["loss"] for r in history], marker="o", color="#1565c0")
    ax.set_xlabel("round")
    ax.set_ylabel("mean local meta-loss")
    ax.set_title("federated training")
    ax = fig.add_subplot(1, 2, 2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    auroc = [np.nan if r.get("val_auroc") is None else r["val_auroc"] for r in history]
    ax.plot(rounds, auroc, marker="o", color="#2e7d32", label="validation image AUROC")
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("round")
    ax.set_ylabel("image AUROC (inside the sites)")
    eps = [r.get("epsilon") for r in history]
    if any(e is not None for e in eps):
        twin = ax.twinx()
        twin.plot(rounds, [np.nan if e is None else e for e in eps], marker="s", color="#c62828", label="epsilon")
        twin.set_ylabel("epsilon spent", color="#c62828")
    ax.set_title("validation and privacy")
    return _save(fig, path)


def plot_bytes(site_bytes: Mapping[str, Mapping], path: str | Path) -> Path:
    """Per site: bytes sent and received over the whole training against the bytes of its images (log)."""
    sites = sorted(site_bytes)
    fig = _figure(7.5, 1.2 + 0.7 * len(sites))
    ax = fig.add_subplot()
    y = np.arange(len(sites))
    bars = (
        ("images (never sent)", "shard_bytes", "#9e9e9e"),
        ("sent", "sent", "#1565c0"),
        ("received", "received", "#90caf9"),
    )
    smallest = min(max(float(site_bytes[s].get(key) or 0), 1.0) for s in sites for _, key, _ in bars)
    base = 10 ** np.floor(np.log10(smallest) - 0.5)
    for j, (label, key, colour) in enumerate(bars):
        values = [max(float(site_bytes[s].get(key) or 0), 1.0) for s in sites]
        ax.barh(y + (j - 1) * 0.27, [v - base for v in values], left=base, height=0.25, color=colour, label=label)
    ax.set_xscale("log")
    ax.set_xlim(left=base)
    ax.set_yticks(y, sites)
    ax.set_xlabel("bytes over the whole training (log scale)")
    ax.set_title("what left each factory")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_calibration(points: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """Measured false-positive rate on held-out normals against the target, one line per site."""
    fig = _figure(4.2, 4.2)
    ax = fig.add_subplot()
    top = max([0.25] + [max(t, m) for pts in points.values() for t, m in pts])
    ax.plot([0, top], [0, top], color="0.6", linestyle="--", linewidth=1, label="measured = target")
    for site, pts in sorted(points.items()):
        pts = sorted(pts)
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o", label=site)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("target false-positive rate")
    ax.set_ylabel("measured on held-out normals")
    ax.set_title("calibration")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_uncertainty(uncertainty: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Histogram of the uncertainty of every scored image, stacked by decision."""
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot()
    names = [d for d in DECISION_COLOURS if len(uncertainty.get(d, ()))]
    ax.hist(
        [np.asarray(uncertainty[d], dtype=float) for d in names],
        bins=np.linspace(0, 1, 21),
        stacked=True,
        color=[DECISION_COLOURS[d] for d in names],
        label=[f"{d} ({len(uncertainty[d])})" for d in names],
    )
    ax.set_xlabel("uncertainty (1 = a coin flip)")
    ax.set_ylabel("test images")
    ax.set_title("uncertainty of the decisions")
    if names:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_extremes(
    title: str,
    images: np.ndarray,
    maps: np.ndarray,
    scores: np.ndarray,
    captions: Sequence[str],
    path: str | Path,
    n: int = 4,
    masks: np.ndarray | None = None,
) -> Path:
    """Heatmap overlays of the ``n`` most and the ``n`` least anomalous images (two rows)."""
    order = np.argsort(-np.asarray(scores))
    rows = (("most anomalous", order[:n]), ("least anomalous", order[::-1][:n]))
    fig = _figure(2.1 * n, 4.8)
    lo, hi = np.percentile(maps, 1), np.percentile(maps, 99.9)
    for r, (label, idx) in enumerate(rows):
        for j, i in enumerate(idx):
            ax = fig.add_subplot(2, n, r * n + j + 1)
            ax.imshow(images[i])
            ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
            if masks is not None and masks[i].any():
                ax.contour(masks[i], levels=[0.5], colors="white", linewidths=0.8)
            ax.set_title(f"{label if j == 0 else ''}\n{captions[i]}", fontsize=7)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------ tables


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _tables(results: Mapping) -> list[tuple[str, list[str], list[list[str]]]]:
    sections = []
    sites = results.get("sites", [])
    sections.append(
        (
            "Per site: the adapted model on its new product",
            [
                "site",
                "new product",
                "K",
                "image AUROC",
                "target FPR",
                "measured FPR",
                "normal",
                "anomalous",
                "review",
                "adapt s",
            ],
            [
                [
                    s["site"],
                    s["new_product"],
                    str(s["shots"]),
                    _fmt(s["image_auroc"]),
                    _fmt(s["target_fpr"], 2),
                    _fmt(s["measured_fpr"]),
                    str(s["decisions"]["normal"]),
                    str(s["decisions"]["anomalous"]),
                    str(s["decisions"]["review"]),
                    _fmt(s["adapt_seconds"], 2),
                ]
                for s in sites
            ],
        )
    )
    records = results.get("methods", [])
    if records:
        sections.append(
            (
                "Every method on the new products (same backbone, same support images)",
                ["site", "new product", "method", "image AUROC", "pixel AUROC", "AUPRO@0.3", "F1", "measured FPR"],
                [
                    [
                        r.get("site", "-"),
                        r["category"],
                        r["method"],
                        _fmt(r["image_auroc"]),
                        _fmt(r["pixel_auroc"]),
                        _fmt(r["aupro"]),
                        _fmt(r["f1"]),
                        _fmt(r["measured_fpr"]),
                    ]
                    for r in records
                ],
            )
        )
    fed = results.get("federated", {})
    if fed:
        site_bytes = fed.get("site_bytes", {})
        sections.append(
            (
                "Federated training",
                ["rounds", "epsilon", "stop", "bytes moved", "bytes of images"],
                [
                    [
                        str(fed.get("rounds")),
                        _fmt(fed.get("epsilon"), 2),
                        fed.get("stop_reason") or "all rounds",
                        f"{fed.get('bytes', 0) / 1e6:.2f} MB",
                        f"{fed.get('shard_bytes', 0) / 1e6:.1f} MB",
                    ]
                ],
            )
        )
        if site_bytes:
            sections.append(
                (
                    "Communication per site",
                    ["site", "sent", "received", "its images", "sent / images"],
                    [
                        [
                            s,
                            f"{b['sent'] / 1e3:.1f} kB",
                            f"{b['received'] / 1e3:.1f} kB",
                            f"{(b.get('shard_bytes') or 0) / 1e6:.2f} MB",
                            "-" if b.get("sent_fraction") is None else f"{100 * b['sent_fraction']:.2f}%",
                        ]
                        for s, b in sorted(site_bytes.items())
                    ],
                )
            )
    http = results.get("http", [])
    if http:
        sections.append(
            (
                "Scored over HTTP",
                [
                    "site",
                    "model version",
                    "images",
                    "normal",
                    "anomalous",
                    "review",
                    "same as in-process",
                    "latency p50 ms",
                ],
                [
                    [
                        h["site"],
                        str(h["model_version"]),
                        str(h["images"]),
                        str(h["decisions"].get("normal", 0)),
                        str(h["decisions"].get("anomalous", 0)),
                        str(h["decisions"].get("review", 0)),
                        "yes" if h["matches_in_process"] else "NO",
                        _fmt(h["latency_ms_p50"], 1),
                    ]
                    for h in http
                ],
            )
        )
    stages = results.get("stages_seconds", {})
    if stages:
        sections.append(
            (
                "Timings",
                ["stage", "seconds"],
                [[k, f"{v:.1f}"] for k, v in stages.items()] + [["total", f"{sum(stages.values()):.1f}"]],
            )
        )
    return sections


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#212121}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}"""


def write_report(report_dir: str | Path, results: Mapping) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``report.html`` in ``report_dir``.

    ``results["figures"]`` lists ``(caption, file name)`` pairs of PNG files already in ``report_dir``; a
    missing one is an error (a report with a hole in it is worse than none).
    """
    report_dir = Path(report_dir)
    figures = [(caption, report_dir / name) for caption, name in results.get("figures", [])]
    for _, path in figures:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: figure missing from the report folder")
    title = results.get("title", "bayprano demo report")
    intro = results.get("intro", "")
    sections = _tables(results)

    md = [f"# {title}", ""] + ([intro, ""] if intro else [])
    for heading, header, rows in sections:
        md += [f"## {heading}", "", _markdown_table(header, rows), ""]
    md += ["## Figures", ""]
    for caption, path in figures:
        md += [f"![{caption}]({path.name})", f"*{caption}*", ""]
    body = [f"<h1>{html.escape(title)}</h1>"] + ([f"<p>{html.escape(intro)}</p>"] if intro else [])
    for heading, header, rows in sections:
        body += [f"<h2>{html.escape(heading)}</h2>", _html_table(header, rows)]
    body.append("<h2>Figures</h2>")
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
    serialisable = jsonable(results)
    return {
        "results": atomic_write_json(report_dir / "results.json", serialisable),
        "markdown": atomic_write_text(report_dir / "report.md", "\n".join(md) + "\n"),
        "html": atomic_write_text(report_dir / "report.html", page),
    }
