"""The evaluation's tables: means per method and K over categories and seeds, the image statistic
ablation, and both as printed by ``bayprano evaluate``."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from bayprano.platform.data.info import format_table
from bayprano.platform.evaluation_runs import OWN_STATISTIC, variant
from bayprano.platform.methods.postprocess import STATISTICS


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


DECISION_SHARES = {  # summary key: (image group, decision) of a record's ``decision_rates``
    "decided_fpr": ("normal_images", "anomalous"),
    "review_normal": ("normal_images", "review"),
    "review_defective": ("defective_images", "review"),
}


def _decision_share(record: dict, key: str) -> float | None:
    group, decision = DECISION_SHARES[key]
    return ((record.get("decision_rates") or {}).get(group) or {}).get(decision)


def summarize(records: list[dict]) -> dict:
    """Means per (method with its support augmentation, shots) over categories and seeds; ``decided_fpr``
    is the share of normal images decided anomalous (not sent to review), ``review_normal`` and
    ``review_defective`` the shares sent to review."""
    out: dict = {}
    for r in records:
        out.setdefault(variant(r), {}).setdefault(str(r["shots"]), []).append(r)
    return {
        m: {
            k: {
                key: _mean(x[key] for x in rows)
                for key in (
                    "image_auroc",
                    "pixel_auroc",
                    "aupro",
                    "f1",
                    "measured_fpr",
                    "adapt_seconds",
                    "score_images_per_second",
                )
            }
            | {key: _mean(_decision_share(x, key) for x in rows) for key in DECISION_SHARES}
            | {"n": len(rows)}
            for k, rows in by_k.items()
        }
        for m, by_k in out.items()
    }


def ablation(records: list[dict]) -> dict:
    """{method: {K: {statistic: mean test image AUROC}}} over categories and seeds, for every menu entry and
    the method's own statistic (``own``), with how often each entry was chosen (``chosen``)."""
    out: dict = {}
    for r in records:
        out.setdefault(variant(r), {}).setdefault(str(r["shots"]), []).append(r)
    table: dict[str, dict] = {}
    for m, by_k in out.items():
        table[m] = {}
        for k, rows in by_k.items():
            entry = {name: _mean((x.get("statistic_aurocs") or {}).get(name) for x in rows) for name in STATISTICS}
            entry["own"] = _mean(x.get("own_image_auroc") for x in rows)
            chosen: dict[str, int] = {}
            for x in rows:
                chosen[x.get("statistic") or OWN_STATISTIC] = chosen.get(x.get("statistic") or OWN_STATISTIC, 0) + 1
            table[m][k] = entry | {"chosen": chosen}
    return table


def ablation_table(result: dict) -> str:
    """Each method with each image statistic, from the same run (mean test image AUROC)."""
    rows: list[Iterable[str]] = []
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for method, by_k in (result.get("ablation") or ablation(result["records"])).items():
        for k, s in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            chosen = ", ".join(f"{n} x{c}" for n, c in sorted(s["chosen"].items()))
            rows.append((method, str(k), *(fmt(s[n]) for n in STATISTICS), fmt(s["own"]), chosen))
    return format_table(("method", "K", *STATISTICS, "own", "chosen on meta-validation"), rows)


def markdown_table(result: dict) -> str:
    """The summary table (image AUROC at each method's chosen statistic), then the statistic ablation."""
    rows: list[Iterable[str]] = []
    for method, by_k in result["summary"].items():
        for k, s in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append(
                (
                    method,
                    str(k),
                    fmt(s["image_auroc"]),
                    fmt(s["pixel_auroc"]),
                    fmt(s["aupro"]),
                    fmt(s["f1"]),
                    fmt(s["measured_fpr"]),
                    fmt(s.get("decided_fpr")),
                    fmt(s.get("review_normal")),
                    fmt(s.get("review_defective")),
                    f"{s['adapt_seconds']:.2f}",
                    f"{s['score_images_per_second']:.1f}",
                )
            )
    summary = format_table(
        (
            "method",
            "K",
            "image AUROC",
            "pixel AUROC",
            "AUPRO@0.3",
            "F1",
            "FPR",
            "FPR decided",
            "review (good)",
            "review (defect)",
            "adapt s",
            "images/s",
        ),
        rows,
    )
    return f"{summary}\n\nImage statistic ablation (image AUROC):\n\n{ablation_table(result)}"
