"""Every figure (matplotlib), each returned as a ``Figure``: the notebooks' (saved into ``run_dir/figures/`` by
:func:`save_figure`) and the reports'. Nothing here needs a display: headless, matplotlib renders with Agg."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import PercentFormatter

from ..runtime.io import save_png

OUTCOME_COLUMNS = (("wins", "#4C72B0", "win"), ("ties", "#C8C8C8", "tie"), ("losses", "#DD8452", "loss"))
METHOD_COLORS = {"miwv": "#C44E52", "ifd": "#4C72B0", "low-miwv": "#8172B2", "random": "#8C8C8C", "length": "#55A868"}
Panels = Mapping[str, tuple[Sequence[str], Sequence[Mapping | None]]]  # title -> (row labels, table rows or None)


def save_figure(fig, run_dir: str | Path, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``run_dir/figures/<name>.png``."""
    return save_png(fig, Path(run_dir) / "figures" / (name if name.endswith(".png") else f"{name}.png"), dpi)


def outcome_figure(panels: Panels, across: bool = False, title: str | None = None):
    """The paper's Figure 2: a stacked win/tie/loss bar per table row (shares of its n prompts), one panel per
    title. Side by side (``across``) the panels share their rows; stacked, each is as tall as its rows."""
    fig, axes = _panels(panels, across)
    for ax, (name, (labels, rows)) in zip(axes.flat, panels.items()):
        left = np.zeros(len(rows))
        for column, color, label in OUTCOME_COLUMNS:
            share = np.array([int(r[column]) / int(r["n"]) if r and int(r["n"]) else 0.0 for r in rows])
            ax.barh(range(len(rows)), share, left=left, color=color, label=label)
            for y in np.flatnonzero(share >= 0.08):
                ax.text(left[y] + share[y] / 2, y, f"{share[y]:.0%}", ha="center", va="center", fontsize=8)
            left += share
        ax.set_xlim(0, 1)
        ax.set_yticks(range(len(rows)), list(labels), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10 if across else 9)
        if not across:
            ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    loc, anchor = ("lower left", (0, 1.08)) if across else ("lower center", (0.5, 1.15))
    axes[0, 0].legend(loc=loc, bbox_to_anchor=anchor, ncol=3, frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _panels(panels: Panels, across: bool = True):
    """One axis per panel: side by side sharing their rows, or stacked, each as tall as its rows."""
    heights = [len(labels) for labels, _ in panels.values()]
    if across:
        return plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.32 * heights[0] + 1.6), sharey=True,
                            squeeze=False)
    return plt.subplots(len(panels), 1, figsize=(8, 0.45 * sum(heights) + 1.3 * len(panels)), squeeze=False,
                        gridspec_kw={"height_ratios": heights})


def winning_scores(panels: Panels, methods: Sequence[str]):
    """Each subset model's winning score against the full-pool model with its interval, one panel per title (a
    judge), one row per label (a model) coloured by its selection method."""
    fig, axes = _panels(panels)
    for ax, (name, (labels, rows)) in zip(axes[0], panels.items()):
        for y, (r, method) in enumerate(zip(rows, methods)):
            if r is not None:
                ws, lo, hi = float(r["winning_score"]), float(r["ci_low"]), float(r["ci_high"])
                ax.errorbar(ws, y, xerr=[[ws - lo], [hi - ws]], fmt="o", color=METHOD_COLORS.get(method, "black"),
                            capsize=3, markersize=5)
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("winning score vs full pool")
        ax.set_yticks(range(len(labels)), list(labels), fontsize=8)
        ax.invert_yaxis()
    fig.suptitle("Subset models against the full-pool model (1 = as good; > 1 better)", fontsize=11)
    fig.tight_layout()
    return fig


def loss_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], thick: Sequence[str] = ()):
    """Training loss against the optimizer step (log scale), one line per model; the ``thick`` ones stand out."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name, linewidth=2.0 if name in thick else 0.9)
    ax.set(xlabel="optimizer step", ylabel="training loss (response tokens)", xscale="log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def length_histograms(lengths: Mapping[str, Sequence[int]], tokenizer_name: str = ""):
    """One histogram per part (instruction, input, response) of token counts."""
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.4))
    for ax, (name, values) in zip(np.atleast_1d(axes), lengths.items()):
        values = np.asarray(values)
        shown = values[values > 0] if name == "input" else values
        if shown.size:
            ax.hist(shown, bins=min(40, max(5, int(np.sqrt(shown.size)) * 2)), color="tab:blue", alpha=0.8)
            median = np.median(shown)
            ax.axvline(median, color="black", linestyle="--", linewidth=1, label=f"median {median:.0f}")
            ax.legend(fontsize=8)
        note = f" ({shown.size} of {values.size} rows have one)" if name == "input" else ""
        ax.set_title(f"{name}{note}", fontsize=10)
        ax.set(xlabel="tokens" + (f" ({tokenizer_name})" if tokenizer_name else ""), ylabel="rows")
    fig.suptitle("Token lengths")
    fig.tight_layout()
    return fig


def loss_histograms(scores: Sequence[Mapping]):
    """Zero-shot loss, one-shot loss and MIWV of every sample."""
    parts = [("zero_shot_loss", "zero-shot loss  L(y_i | x_i)"), ("one_shot_loss", "one-shot loss  L(y_i | C_k, x_i)"),
             ("miwv", "MIWV = one-shot − zero-shot")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (field, title) in zip(axes, parts):
        values = np.array([s.get(field) for s in scores], dtype=np.float64)
        values = values[np.isfinite(values)]
        bins = min(50, max(8, int(np.sqrt(values.size)) * 2)) if values.size else 10
        ax.hist(values, bins=bins, color="tab:red" if field == "miwv" else "tab:blue", alpha=0.8)
        if field == "miwv":
            ax.axvline(0, color="black", linewidth=1)
        if values.size:
            median = np.median(values)
            ax.axvline(median, color="grey", linestyle="--", linewidth=1, label=f"median {median:+.3f}")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="nats per response token" if field != "miwv" else "difference (nats per token)", ylabel="samples")
    fig.tight_layout()
    return fig


def miwv_vs_ifd(scores: Sequence[Mapping], rho: float | None = None):
    """Scatter of MIWV against IFD (one point per sample)."""
    ifd, miwv = (np.array([s.get(field) for s in scores], dtype=np.float64) for field in ("ifd", "miwv"))
    both = np.isfinite(ifd) & np.isfinite(miwv)
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.scatter(ifd[both], miwv[both], s=12, alpha=0.6)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axvline(1, color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="IFD = L(y|x) / L(y)", ylabel="MIWV = L(y|C_k,x) − L(y|x)",
           title="MIWV vs IFD" + (f" (Spearman ρ = {rho:.2f})" if rho is not None and np.isfinite(rho) else ""))
    fig.tight_layout()
    return fig


def jaccard_heatmaps(matrices: Mapping[str, tuple[Sequence[str], np.ndarray]]):
    """One heatmap per panel title: ``{"5%": (labels, matrix), ...}``."""
    n = max(1, len(matrices))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.6, 3.9), squeeze=False, layout="constrained")
    image = None
    for col, (ax, (title, (labels, matrix))) in enumerate(zip(axes[0], matrices.items())):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels if col == 0 else [""] * len(labels), fontsize=8)
        for i, j in np.ndindex(len(labels), len(labels)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 0.6 else "black")
        ax.set_title(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Jaccard overlap")
    fig.suptitle("Overlap between selections")
    return fig


def selected_lengths(groups: Mapping[str, Sequence[int]], title: str = ""):
    """Box plot of response tokens per selection (and the whole pool)."""
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 2.5, 3.8))
    ax.boxplot([np.asarray(v) for v in groups.values()], showfliers=True)
    ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=20)
    ax.set(ylabel="response tokens", title=title or "Response length of the selected samples")
    fig.tight_layout()
    return fig


def source_shares(shares: Mapping[str, Mapping[str, float]], title: str = ""):
    """Stacked bars: the share of each source file within each selection."""
    groups = list(shares)
    sources = sorted({s for v in shares.values() for s in v})
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 3.5, 3.6))
    bottom = np.zeros(len(groups))
    for source in sources:
        values = np.array([shares[g].get(source, 0.0) for g in groups])
        ax.bar(groups, values, bottom=bottom, label=source)
        bottom += values
    ax.set(ylim=(0, 1), ylabel="share of the selection", title=title or "Where the selected samples come from")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig
