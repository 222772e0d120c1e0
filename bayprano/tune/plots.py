"""The plots of a finished sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bayprano.sweep_config import SweepConfig


def _save_figure(fig, path: Path) -> str:
    from bayprano.platform.figures import save_figure

    return str(save_figure(fig, path, dpi=110, tight=False))


def plot_sweep(spec: SweepConfig, trials, rounds, out: Path) -> list[str]:
    """Heatmap of validation AUROC over shots x inner steps, AUROC and adaptation time against inner steps,
    and the metric (with epsilon for DP sweeps) against each other numeric swept setting."""
    from matplotlib.figure import Figure

    files: list[str] = []
    ok = trials[trials["status"] != "error"] if "status" in trials else trials
    if not len(ok) or "val_image_auroc" not in ok:
        return files
    swept = list(spec.search_space)
    if "shots" in swept and "inner_steps" in swept:
        table = ok.groupby(["shots", "inner_steps"])["val_image_auroc"].mean().unstack("inner_steps")
        early = ok[ok["status"] != "completed"].groupby(["shots", "inner_steps"]).size()
        fig = Figure(figsize=(1.2 * len(table.columns) + 2.4, 0.8 * len(table.index) + 1.8))
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(table.values, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
        ax.set_yticks(range(len(table.index)), [str(i) for i in table.index])
        ax.set_xlabel("inner steps S")
        ax.set_ylabel("shots K")
        lo, hi = np.nanmin(table.values), np.nanmax(table.values)
        for i, k in enumerate(table.index):
            for j, s in enumerate(table.columns):
                v = table.values[i, j]
                if np.isfinite(v):
                    mark = "*" if (k, s) in early.index else ""
                    ax.text(
                        j,
                        i,
                        f"{v:.3f}{mark}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if v > (lo + hi) / 2 else "white",
                    )
        fig.colorbar(im, ax=ax, label="validation image AUROC")
        note = " (* stopped early)" if len(early) else ""
        ax.set_title(f"{spec.name}: validation image AUROC ({', '.join(spec.validation_categories)}){note}", fontsize=9)
        fig.tight_layout()
        files.append(_save_figure(fig, out / "heatmap_auroc_shots_inner_steps.png"))
    if "inner_steps" in swept:
        fig = Figure(figsize=(10, 4))
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        groups = ok.groupby("shots") if "shots" in swept else [(spec.fixed.get("shots", 5), ok)]
        for k, g in groups:
            g = g.groupby("inner_steps")[["val_image_auroc", "adapt_seconds"]].mean()
            ax1.plot(g.index, g["val_image_auroc"], marker="o", label=f"K={k}")
            ax2.plot(g.index, g["adapt_seconds"], marker="o", label=f"K={k}")
        ax1.set_xlabel("inner steps S")
        ax1.set_ylabel("validation image AUROC")
        ax2.set_xlabel("inner steps S")
        ax2.set_ylabel("adaptation s (median, no backbone)")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        fig.suptitle(f"{spec.name}: AUROC and adaptation time against inner steps", fontsize=9)
        fig.tight_layout()
        files.append(_save_figure(fig, out / "auroc_adapt_time_vs_inner_steps.png"))
    for name in swept:
        if name in ("shots", "inner_steps") or not np.issubdtype(ok[name].dtype, np.number):
            continue
        g = ok.groupby(name)[[c for c in ("val_image_auroc", "epsilon") if c in ok]].mean()
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(g.index, g["val_image_auroc"], marker="o", color="tab:blue")
        ax.set_xlabel(name)
        ax.set_ylabel("validation image AUROC", color="tab:blue")
        if spec.search_space[name].kind == "loguniform" or (g.index > 0).all() and g.index.max() / g.index.min() > 20:
            ax.set_xscale("log")
        if "epsilon" in g and np.isfinite(g["epsilon"]).any():
            ax2 = ax.twinx()
            ax2.plot(g.index, g["epsilon"].where(np.isfinite(g["epsilon"])), marker="s", color="tab:red")
            ax2.set_ylabel("epsilon", color="tab:red")
        both = "and epsilon " if "epsilon" in g and np.isfinite(g["epsilon"]).any() else ""
        ax.set_title(f"{spec.name}: validation AUROC {both}against {name}", fontsize=9)
        fig.tight_layout()
        files.append(_save_figure(fig, out / f"auroc_vs_{name}.png"))
    return files
