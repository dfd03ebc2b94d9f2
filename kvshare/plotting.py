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
    """Layer-to-layer KV distance, one panel per metric side by side (lower triangle: row r > column s)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 4.4), constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, (metric, d) in zip(axes, matrices.items()):
        d = np.asarray(d, dtype=float)
        shown = np.where(np.tril(np.ones_like(d, dtype=bool), k=-1), d, np.nan)  # symmetric: show each pair once
        im = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", origin="upper")
        ax.set_title(f"{metric} distance")
        ax.set_xlabel("earlier layer s")
        ax.set_ylabel("later layer r")
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
            ax.plot(c, y, color=COLORS[order], marker=MARKERS[order], ms=4,
                    label=f"random: mean of {rows[0]['seeds']} seeds")
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


def trace_scatter(panels: dict, title: str = "", rank_key: str = "dissimilarity_rank", num_pairs: int | None = None):
    """Score of every visited candidate against its dissimilarity rank, one panel per search.

    `panels` maps a label to (trace rows, threshold): accepted candidates filled, threshold dashed.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.2), sharey=True, constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, (label, (rows, threshold)) in zip(axes, panels.items()):
        acc = [r for r in rows if r["accepted"]]
        rej = [r for r in rows if not r["accepted"]]
        ax.scatter([r[rank_key] for r in rej], [r["score"] for r in rej], s=14, facecolors="none",
                   edgecolors="#1f77b4", lw=0.8, label=f"rejected ({len(rej)})")
        ax.scatter([r[rank_key] for r in acc], [r["score"] for r in acc], s=26, color="#d62728", zorder=3,
                   label=f"accepted ({len(acc)})")
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold T = {threshold}")
        if num_pairs:
            ax.set_xlim(-num_pairs * 0.02, num_pairs * 1.02)
        ax.set_xlabel("dissimilarity rank (0 = most dissimilar pair)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("score: cosine similarity of final hidden states")
    if title:
        fig.suptitle(title)
    return fig


def acceptance_deciles(by_source: dict, title: str = ""):
    """Acceptance rate per dissimilarity-rank decile (columns) for each search (rows); cells show accepted/visited."""
    labels = list(by_source)
    rate = np.array([[r["rate"] if r["visited"] else np.nan for r in rows] for rows in by_source.values()])
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(labels) + 1.8), constrained_layout=True)
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(rate), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i, rows in enumerate(by_source.values()):
        for j, r in enumerate(rows):
            ax.text(j, i, f"{r['accepted']}/{r['visited']}" if r["visited"] else "–", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(rate.shape[1]), [str(r["decile"]) for r in next(iter(by_source.values()))])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("dissimilarity-rank decile of the candidate (1 = the most dissimilar tenth of all pairs)")
    fig.colorbar(im, ax=ax, label="acceptance rate", shrink=0.9)
    ax.set_title(title or "acceptance by dissimilarity decile (cells: accepted / visited)")
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
    """Top: candidates that passed / were rejected per threshold. Bottom: perplexity of the resulting strategy."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True,
                                  gridspec_kw={"height_ratios": [1, 1.2]})
    T = np.array([r["threshold"] for r in rows], dtype=float)
    step = float(np.min(np.diff(np.sort(T)))) if len(T) > 1 else 0.1
    width = min(0.035, 0.35 * step)
    acc = np.array([r["accepted"] for r in rows])
    rej = np.array([r["rejected"] for r in rows])
    ax.bar(T - width / 2, acc, width=width, color="#d62728", label="passed (accepted)")
    ax.bar(T + width / 2, rej, width=width, color="#1f77b4", label="rejected")
    for t, a, r in zip(T, acc, rej):
        ax.annotate(f"{a}/{a + r}", (t, max(a, r)), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    if max(1, *(acc + rej)) > 30:
        ax.set_yscale("log")
        ax.set_ylim(0.8, max(acc.max(), rej.max()) * 3)
    else:
        ax.set_ylim(0, max(acc.max(), rej.max(), 1) * 1.25)
    ax.set_ylabel("candidates visited")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    ax2.errorbar(T, [r["ppl"] for r in rows], yerr=[r["ppl_se"] for r in rows], color="k", marker="o", capsize=2,
                 label="perplexity of the strategy (±1 SE)")
    for t, r in zip(T, rows):
        ax2.annotate(f"C={r['num_shared']}", (t, r["ppl"]), textcoords="offset points", xytext=(8, 4), fontsize=7)
    ax2.set_xlabel("threshold T")
    ax2.set_ylabel("held-out perplexity")
    ax2.set_xticks(T)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title or f"threshold sweep (target C = {rows[0]['target']})")
    return fig
