"""Notebook 03's figure (score and perplexity versus compression rate) and its verdict on the paper's claim,
computed from the numbers of `kvshare.experiments.evaluation`."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..evaluation import mean_or_nan
from .common import COLORS, MARKERS


def conclusion(summary, rate: float = 0.25, threshold_pct: float = 90.0) -> dict:
    """Does "over 90% of the full model's performance kept at 25%" hold, per search order?"""
    per_order = {}
    for s in summary:
        if abs(s["rate"] - rate) < 1e-9:
            per_order[s["order"]] = {
                "kept_pct": s["kept_pct"],
                "above_chance_kept_pct": s["above_chance_kept_pct"],
                "holds": s["kept_pct"] > threshold_pct,
                "drop": s["drop"],
                "drop_stderr": s["drop_stderr"],
            }
    lines = []
    for order, v in per_order.items():
        margin = (
            ""
            if v["above_chance_kept_pct"] is None
            else f"; of the margin above chance it keeps {v['above_chance_kept_pct']:.1f}%"
        )
        verdict = "the claim holds" if v["holds"] else "the claim does not hold"
        lines.append(
            f"{order}: {v['kept_pct']:.1f}% of the full model's average score kept at {rate:.1%} "
            f"compression ({verdict}: > {threshold_pct:g}% needed){margin}; the average drops by "
            f"{v['drop']:.3f} ± {v['drop_stderr']:.3f} (paired stderr)"
        )
    return {"rate": rate, "threshold_pct": threshold_pct, "orders": per_order, "text": "\n".join(lines)}


def plot_compression(summary, rows=None, title: str = ""):
    """Score versus compression rate, one line per search order: the average of the primary scores
    (left, with the full model's level, 90% of it and chance) and held-out perplexity (right)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    orders = list(dict.fromkeys(s["order"] for s in summary))
    full = next((s for s in summary if s["num_shared"] == 0), None)
    for order in orders:
        pts = sorted((s for s in summary if s["order"] == order), key=lambda s: s["rate"])
        x = [100 * s["rate"] for s in pts]
        style = {"color": COLORS.get(order), "marker": MARKERS.get(order, "o"), "label": order}
        ax.errorbar(x, [s["average"] for s in pts], yerr=[s["drop_stderr"] for s in pts], capsize=3, **style)
        if all(s["ppl"] is not None for s in pts):
            bx.plot(x, [s["ppl"] for s in pts], **style)
    if full is not None:
        ax.axhline(full["average"], color="gray", lw=0.8)
        ax.axhline(0.9 * full["average"], color="gray", lw=0.8, ls="--", label="90% of full")
    if rows:
        chance = [
            r["chance"]
            for r in rows
            if r.get("primary")
            and r["num_shared"] == 0
            and r.get("chance") is not None
            and r.get("higher_is_better", True)
        ]
        if chance:
            ax.axhline(mean_or_nan(chance), color="red", lw=0.8, ls=":", label="chance")
    ax.set(
        xlabel="compression rate (% of layers sharing KV)",
        ylabel="average score (primary metrics)",
        title="Benchmark average (error bars: paired stderr of the drop)",
    )
    bx.set(
        xlabel="compression rate (% of layers sharing KV)",
        ylabel="perplexity (log scale)",
        title="Perplexity on held-out BBC text",
        yscale="log",
    )
    ax.legend(fontsize=8)
    if bx.lines:
        bx.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
