"""Figures for the notebooks (matplotlib, Agg when there is no display). Each function returns a Figure."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "ipykernel" not in __import__("sys").modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Arc  # noqa: E402

from .experiments import ORDER_LABELS  # noqa: E402

COLORS = {"dissimilar": "#d62728", "similar": "#1f77b4", "random": "#7f7f7f"}
MARKERS = {"dissimilar": "o", "similar": "s", "random": "^"}


def save_figure(fig, out_dir, name: str, formats=("png", "pdf")) -> list[Path]:
    """Write `name.png` and `name.pdf` into `out_dir` (PDF metadata fixed, so reruns give the same bytes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in formats:
        path = out_dir / f"{name}.{ext}"
        kwargs = {"dpi": 150} if ext == "png" else {}
        if ext == "pdf":
            kwargs["metadata"] = {"CreationDate": None, "Producer": "kvshare"}
        if ext == "png":
            kwargs["metadata"] = {"Software": "kvshare"}
        fig.savefig(path, bbox_inches="tight", **kwargs)
        paths.append(path)
    return paths


def distance_heatmaps(matrices: dict, title: str = ""):
    """Layer-to-layer KV distance, one panel per metric (side by side)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.4), constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, (metric, d) in zip(axes, matrices.items()):
        im = ax.imshow(d, cmap="viridis", origin="upper")
        ax.set_title(f"{metric} distance")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, shrink=0.85)
    if title:
        fig.suptitle(title)
    return fig


def _order_curves(ax, summary, k, num_layers, show_se=True):
    for order in ORDER_LABELS:
        rows = sorted((r for r in summary if r["calibration_set"] == k and r["order"] == order),
                      key=lambda r: r["num_shared"])
        if not rows:
            continue
        c = np.array([r["num_shared"] for r in rows])
        y = np.array([r["ppl"] for r in rows])
        label = ORDER_LABELS[order]
        if order == "random":
            lo = np.array([r["ppl_min"] for r in rows])
            hi = np.array([r["ppl_max"] for r in rows])
            ax.fill_between(c, lo, hi, color=COLORS[order], alpha=0.25, lw=0,
                            label=f"random: min–max over {rows[0]['seeds']} seeds")
            ax.errorbar(c, y, yerr=[r["ppl_std"] for r in rows], color=COLORS[order], marker=MARKERS[order],
                        ms=4, capsize=2, label=f"random: mean ± std ({rows[0]['seeds']} seeds)")
        else:
            yerr = [r["ppl_se"] for r in rows] if show_se else None
            ax.errorbar(c, y, yerr=yerr, color=COLORS[order], marker=MARKERS[order], ms=4, capsize=2, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("replaced layers C")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    if num_layers:
        sec = ax.secondary_xaxis("top", functions=(lambda x: 100 * x / num_layers, lambda p: p * num_layers / 100))
        sec.set_xlabel("% of layers replaced")


def ppl_curve(summary, num_layers: int, calibration_set: int = 0, title: str = ""):
    """Perplexity versus replaced layers for each order on one calibration set (error bars: ±1 SE / seed spread)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    _order_curves(ax, summary, calibration_set, num_layers)
    ax.legend(fontsize=8)
    ax.set_title(title or f"perplexity vs replaced layers (calibration set {calibration_set})")
    return fig


def ppl_curves_by_set(summary, num_layers: int, title: str = ""):
    """The same curves on each calibration set, one panel each, shared y axis."""
    sets = sorted({r["calibration_set"] for r in summary})
    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 4.2), sharey=True, constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, sets):
        _order_curves(ax, summary, k, num_layers)
        ax.set_title(f"calibration set {k}")
        if ax is not axes[0]:
            ax.set_ylabel("")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def paired_differences(comparisons, num_layers: int, title: str = ""):
    """Perplexity ratio dissimilar / other per C and calibration set, ±2 paired SE (below 1: dissimilar better)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    sets = sorted({r["calibration_set"] for r in comparisons})
    for ax, versus in zip(axes, ("similar", "random")):
        rows = [r for r in comparisons if r["versus"] == versus]
        for j, k in enumerate(sets):
            rs = sorted((r for r in rows if r["calibration_set"] == k), key=lambda r: (r["num_shared"], r["seed"]))
            if not rs:
                continue
            nseeds = len({r["seed"] for r in rs})
            offs = (j - (len(sets) - 1) / 2) * 0.25
            x = np.array([r["num_shared"] for r in rs], dtype=float) + offs
            if nseeds > 1:
                x = x + (np.array([r["seed"] for r in rs]) - np.mean([r["seed"] for r in rs])) * 0.06
            d = np.array([r["nll_diff"] for r in rs])
            se = np.array([r["nll_diff_se"] for r in rs])
            ax.errorbar(x, np.exp(d), yerr=[np.exp(d) - np.exp(d - 2 * se), np.exp(d + 2 * se) - np.exp(d)], fmt="o",
                        ms=3.5, capsize=2, label=f"calibration set {k}" + (f" ({nseeds} seeds)" if nseeds > 1 else ""))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("replaced layers C")
        ax.set_title(f"dissimilar vs {versus}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("ppl(dissimilar) / ppl(other), ±2 paired SE\n(< 1: dissimilar better)")
    if title:
        fig.suptitle(title)
    return fig


def trace_scatter(rows, threshold: float, title: str = "", rank_key: str = "dissimilarity_rank"):
    """Score of every visited candidate against its dissimilarity rank; accepted filled, threshold dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.4), constrained_layout=True)
    acc = [r for r in rows if r["accepted"]]
    rej = [r for r in rows if not r["accepted"]]
    ax.scatter([r[rank_key] for r in rej], [r["score"] for r in rej], s=18, facecolors="none", edgecolors="#1f77b4",
               label=f"rejected ({len(rej)})")
    ax.scatter([r[rank_key] for r in acc], [r["score"] for r in acc], s=22, color="#d62728", label=f"accepted ({len(acc)})")
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold T = {threshold}")
    ax.set_xlabel("dissimilarity rank of the pair (0 = most dissimilar)")
    ax.set_ylabel("score: cosine similarity of final hidden states")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "search trace")
    return fig


def acceptance_deciles(by_source: dict, title: str = ""):
    """Acceptance rate per decile of dissimilarity rank, one bar group per search (visited counts on top)."""
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    n = len(by_source)
    width = 0.8 / max(1, n)
    for i, (label, rows) in enumerate(by_source.items()):
        x = np.array([r["decile"] for r in rows]) + (i - (n - 1) / 2) * width
        rate = np.array([r["rate"] if r["visited"] else 0.0 for r in rows])
        bars = ax.bar(x, rate, width=width, label=label)
        for b, r in zip(bars, rows):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, str(r["visited"]) if r["visited"] else "–",
                    ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(1, 11))
    ax.set_xlabel("dissimilarity-rank decile of the candidate (1 = most dissimilar pairs)")
    ax.set_ylabel("acceptance rate of visited candidates")
    ax.set_ylim(0, 1.12)
    ax.legend(fontsize=8)
    ax.set_title(title or "acceptance by dissimilarity decile (numbers: candidates visited)")
    return fig


def strategy_arcs(strategy, title: str = ""):
    """Layers on a line; an arc from each replaced layer r back to the source s whose K/V it reads."""
    L = strategy.num_layers
    fig, ax = plt.subplots(figsize=(max(7, L * 0.32), 3.4), constrained_layout=True)
    replaced = set(strategy.mapping)
    sources = set(strategy.mapping.values())
    for i in range(L):
        color = "#d62728" if i in replaced else ("#2ca02c" if i in sources else "#bbbbbb")
        ax.plot(i, 0, "o", color=color, ms=9, zorder=3)
        ax.text(i, -0.12 * (L / 10), str(i), ha="center", va="top", fontsize=7)
    top = 1.0
    for r, s in strategy.mapping.items():
        w = r - s
        ax.add_patch(Arc(((r + s) / 2, 0), w, w * 0.9, theta1=0, theta2=180, color="#d62728", lw=1.2, alpha=0.8))
        top = max(top, w * 0.45)
    ax.plot([], [], "o", color="#d62728", label="replaced (reads an earlier layer's K/V)")
    ax.plot([], [], "o", color="#2ca02c", label="source (its K/V is shared)")
    ax.plot([], [], "o", color="#bbbbbb", label="own K/V only")
    ax.set_xlim(-1, L)
    ax.set_ylim(-0.25 * (L / 10) - 0.3, top * 1.1 + 0.5)
    ax.axis("off")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    ax.set_title(title or f"{strategy.num_shared} of {L} layers replaced")
    return fig


def threshold_sweep_plot(rows, title: str = ""):
    """Pairs that pass (bars) and perplexity of the resulting strategy (line) versus the threshold."""
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    T = np.array([r["threshold"] for r in rows])
    width = 0.035 if len(T) < 2 else 0.35 * float(np.min(np.diff(sorted(T))))
    ax.bar(T - width / 2, [r["accepted"] for r in rows], width=width, color="#d62728", alpha=0.8, label="passed (accepted)")
    ax.bar(T + width / 2, [r["rejected"] for r in rows], width=width, color="#1f77b4", alpha=0.6, label="rejected")
    ax.set_xlabel("threshold T")
    ax.set_ylabel("candidates visited by the search")
    ax.set_yscale("symlog", linthresh=10)
    ax2 = ax.twinx()
    ax2.errorbar(T, [r["ppl"] for r in rows], yerr=[r["ppl_se"] for r in rows], color="k", marker="o", capsize=2,
                 label="perplexity of the strategy")
    for t, r in zip(T, rows):
        ax2.annotate(f"C={r['num_shared']}", (t, r["ppl"]), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax2.set_ylabel("held-out perplexity")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.set_title(title or f"threshold sweep (target C = {rows[0]['target']})")
    return fig
