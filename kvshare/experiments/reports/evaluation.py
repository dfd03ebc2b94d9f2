"""Notebook 03's figure (% of the full model's score kept and perplexity versus the fraction of layers shared) and
its verdict on the paper's claim, computed from the numbers of `kvshare.experiments.evaluation`."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ..evaluation import THRESHOLD_PCT, layers_text, mean_or_nan, verdict
from .common import COLORS, MARKERS

VERDICT_WORDS = {
    "holds": "the claim holds: the whole interval is above {t:g}%",
    "fails": "the claim fails: the whole interval is below {t:g}%",
    "undecided": "undecided: the interval contains {t:g}%",
}


def conclusion(summary, rate: float = 0.25, threshold_pct: float = THRESHOLD_PCT) -> dict:
    """Does "over 90% of the full model's performance kept at 25%" hold, per search order? 25% is the requested
    rate; the cells are at the layers it maps to (8/30 = 26.7% on 30 layers). The verdict reads the paired
    bootstrap 95% interval of "% of full kept": holds (lower bound above the threshold), fails (upper bound
    below), undecided otherwise; `holds` is True, False or None accordingly. Random is the mean over its seeds."""
    per_order = {}
    for s in summary:
        if abs(s["rate"] - rate) < 1e-9 and s["num_shared"] > 0:
            v = verdict(s["kept_lo"], s["kept_hi"], threshold_pct)
            per_order[s["order"]] = {
                "num_shared": s["num_shared"],
                "num_layers": s.get("num_layers"),
                "layers": s.get("layers"),
                "seeds": s.get("seeds"),
                "kept_pct": s["kept_pct"],
                "kept_lo": s["kept_lo"],
                "kept_hi": s["kept_hi"],
                "above_chance_kept_pct": s["above_chance_kept_pct"],
                "above_chance_lo": s.get("above_chance_lo"),
                "above_chance_hi": s.get("above_chance_hi"),
                "verdict": v,
                "holds": {"holds": True, "fails": False}.get(v),
                "drop": s["drop"],
                "drop_lo": s.get("drop_lo"),
                "drop_hi": s.get("drop_hi"),
                "drop_stderr": s["drop_stderr"],
                "per_seed": s.get("per_seed"),
            }
    lines = []
    for order, v in per_order.items():
        at = (
            f"{layers_text(v['num_shared'], v['num_layers'])} of the layers"
            if v["num_layers"]
            else f"{v['num_shared']} layers"
        )
        seeds = v["seeds"] or []
        who = (
            f"{order} (mean of {len(seeds)} independent orders, seeds {min(seeds)}–{max(seeds)})"
            if len(seeds) > 1
            else order
        )
        margin = (
            ""
            if v["above_chance_kept_pct"] is None
            else f"; of the margin above chance it keeps {v['above_chance_kept_pct']:.1f}% "
            f"[{v['above_chance_lo']:.1f}, {v['above_chance_hi']:.1f}]"
        )
        spread = ""
        if v["per_seed"]:
            kept = [p["kept_pct"] for p in v["per_seed"]]
            spread = f"; single seeds keep {min(kept):.1f}–{max(kept):.1f}%"
        lines.append(
            f"{who}: {v['kept_pct']:.1f}% [{v['kept_lo']:.1f}, {v['kept_hi']:.1f}] of the full model's average "
            f"score kept with {at} sharing KV ({VERDICT_WORDS[v['verdict']].format(t=threshold_pct)})"
            f"{margin}; the average drops by {v['drop']:.3f} [{v['drop_lo']:.3f}, {v['drop_hi']:.3f}]{spread}"
        )
    return {
        "rate": rate,
        "threshold_pct": threshold_pct,
        "interval": "paired bootstrap 95% (examples resampled within each task; random: seeds resampled too)",
        "orders": per_order,
        "text": "\n".join(lines),
    }


def _yerr(points, key, lo, hi):
    # a percentile bootstrap interval need not contain its point estimate; matplotlib refuses negative lengths
    return [[max(0.0, p[key] - p[lo]) for p in points], [max(0.0, p[hi] - p[key]) for p in points]]


def plot_compression(summary, rows=None, title: str = "", threshold_pct: float = THRESHOLD_PCT):
    """% of the full model's average kept (left, paired bootstrap 95% intervals, with the threshold and chance)
        and held-out perplexity (right, 95% intervals) versus the exact fraction of layers sharing KV; one line per
        fixed search order, random as the mean of its seeds (orders dodged sideways by a few tenths of a point so that
    their bars do not overlap). One legend below both panels, over no data."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.4))
    orders = list(dict.fromkeys(s["order"] for s in summary))
    for i, order in enumerate(orders):
        pts = sorted((s for s in summary if s["order"] == order), key=lambda s: s["num_shared"])
        dodge = 0.4 * (i - (len(orders) - 1) / 2)  # orders side by side at the same fraction, bars apart
        x = [(100 * s["num_shared"] / s["num_layers"] if s.get("num_layers") else 100 * s["rate"]) + dodge for s in pts]
        seeds = max(len(s.get("seeds") or [None]) for s in pts)
        label = order if seeds <= 1 else f"{order} (mean of {seeds} seeds)"
        style = {"color": COLORS.get(order), "marker": MARKERS.get(order, "o"), "label": label, "capsize": 3}
        ax.errorbar(x, [s["kept_pct"] for s in pts], yerr=_yerr(pts, "kept_pct", "kept_lo", "kept_hi"), **style)
        if all(s.get("ppl") is not None and s.get("ppl_lo") is not None for s in pts):
            style["label"] = None  # one legend for both panels
            bx.errorbar(x, [s["ppl"] for s in pts], yerr=_yerr(pts, "ppl", "ppl_lo", "ppl_hi"), **style)
    ax.axhline(100, color="gray", lw=0.8)
    ax.axhline(threshold_pct, color="gray", lw=0.8, ls="--", label=f"{threshold_pct:g}% of full (the claim)")
    full = [s for s in summary if s["num_shared"] == 0]
    if rows and full:
        chance = [
            r["chance"]
            for r in rows
            if r.get("primary")
            and r["num_shared"] == 0
            and r["order"] == full[0]["order"]
            and r.get("chance") is not None
            and r.get("higher_is_better", True)
        ]
        if chance:
            level = 100 * mean_or_nan(chance) / full[0]["average"]
            ax.axhline(level, color="red", lw=0.8, ls=":", label="chance")
    ax.set(
        xlabel="layers sharing KV (% of all layers, exact fraction)",
        ylabel="% of the full model's average kept",
        title="Benchmark average kept (95% paired bootstrap)",
    )
    bx.set(
        xlabel="layers sharing KV (% of all layers, exact fraction)",
        ylabel="perplexity (log scale)",
        title="Perplexity on held-out BBC text (95% intervals)",
        yscale="log",
    )
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
