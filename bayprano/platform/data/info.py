"""What a dataset root or a Parquet shard holds: counts per category, split and defect type, image sizes."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from bayprano.platform.data.imageio import image_size
from bayprano.platform.data.mvtec import GOOD, scan_root


@dataclass
class DatasetSummary:
    """Counts keyed by (category, split, defect_type), and image sizes (height, width) per category."""

    source: str
    counts: Counter = field(default_factory=Counter)
    sizes: dict = field(default_factory=lambda: defaultdict(Counter))

    def add(self, category: str, split: str, defect_type: str, height: int, width: int) -> None:
        self.counts[(category, split, defect_type)] += 1
        self.sizes[category][(int(height), int(width))] += 1

    @property
    def categories(self) -> list[str]:
        return sorted({c for c, _, _ in self.counts})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        out: dict = {"source": self.source, "total": self.total, "categories": {}}
        for cat in self.categories:
            rows = {f"{s}/{d}": n for (c, s, d), n in sorted(self.counts.items()) if c == cat}
            sizes = {f"{w}x{h}": n for (h, w), n in sorted(self.sizes[cat].items())}
            out["categories"][cat] = {"counts": rows, "sizes": sizes}
        return out

    def table(self) -> str:
        header = ("category", "train/good", "test/good", "test/defect", "defect types", "image sizes")
        rows = []
        for cat in self.categories:
            mine = {(s, d): n for (c, s, d), n in self.counts.items() if c == cat}
            defects = sorted({d for (s, d) in mine if d != GOOD})
            rows.append(
                (
                    cat,
                    str(mine.get(("train", GOOD), 0)),
                    str(mine.get(("test", GOOD), 0)),
                    str(sum(n for (s, d), n in mine.items() if d != GOOD)),
                    ", ".join(f"{d} {sum(n for (s, dd), n in mine.items() if dd == d)}" for d in defects) or "-",
                    ", ".join(
                        f"{w}x{h}" + (f" ({n})" if len(self.sizes[cat]) > 1 else "")
                        for (h, w), n in sorted(self.sizes[cat].items())
                    ),
                )
            )
        total = ("total", *(str(sum(int(r[i]) for r in rows)) for i in (1, 2, 3)), "", "")
        return format_table(header, rows + [total])


def format_table(header: Iterable[str], rows: list[Iterable[str]]) -> str:
    """A Markdown table with padded columns, readable in a terminal and in a README."""
    head = list(header)
    body = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def summarize_root(root: str | os.PathLike, categories=None) -> DatasetSummary:
    summary = DatasetSummary(str(root))
    for s in scan_root(root, categories):
        h, w = image_size(s.path)
        summary.add(s.category, s.split, s.defect_type, h, w)
    return summary


def summarize_records(source: str | Path, records: Iterable[tuple[str, str, str, int, int]]) -> DatasetSummary:
    """Summary of (category, split, defect_type, height, width) records, e.g. a shard's metadata."""
    summary = DatasetSummary(str(source))
    for rec in records:
        summary.add(*rec)
    return summary
