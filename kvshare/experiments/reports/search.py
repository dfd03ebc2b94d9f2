"""Notebook 02's figures (search traces, acceptance by decile, the strategy as arcs, the threshold sweep) and its
conclusion, written from the numbers of `kvshare.experiments.search`. Each figure function returns a Figure.

Perplexities carry their 95% interval (over evaluation windows); the random-order control is a distribution over
seeds: its mean with the 95% t-interval over seeds, never one seed. Legends sit outside the axes."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Arc

from ...metrics import interval95
from .observation import PLAIN, PLAIN_2_5


def trace_scatter(panels: dict, title: str = "", rank_key: str = "dissimilarity_rank", num_pairs: int | None = None):
    """Score of every visited candidate against its dissimilarity rank, one panel per search.

    `panels` maps a label to (trace rows, threshold): accepted candidates filled, threshold dashed.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.8), sharey=True, constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, (label, (rows, threshold)) in zip(axes, panels.items()):
        acc = [r for r in rows if r["accepted"]]
        rej = [r for r in rows if not r["accepted"]]
        ax.scatter(
            [r[rank_key] for r in rej],
            [r["score"] for r in rej],
            s=14,
            facecolors="none",
            edgecolors="#1f77b4",
            lw=0.8,
            label=f"rejected ({len(rej)})",
        )
        ax.scatter(
            [r[rank_key] for r in acc],
            [r["score"] for r in acc],
            s=26,
            color="#d62728",
            zorder=3,
            label=f"accepted ({len(acc)})",
        )
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold T = {threshold}")
        if num_pairs:
            ax.set_xlim(-num_pairs * 0.02, num_pairs * 1.02)
        ax.set_xlabel("dissimilarity rank (0 = most dissimilar pair)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, frameon=False)
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
            ax.text(
                j, i, f"{r['accepted']}/{r['visited']}" if r["visited"] else "–", ha="center", va="center", fontsize=7
            )
    ax.set_xticks(range(rate.shape[1]), [str(r["decile"]) for r in next(iter(by_source.values()))])
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("dissimilarity-rank decile of the candidate (1 = the most dissimilar tenth of all pairs)")
    fig.colorbar(im, ax=ax, label="acceptance rate", shrink=0.9)
    ax.set_title(title or "acceptance by dissimilarity decile (cells: accepted / visited)")
    return fig


def strategy_arcs(strategy, title: str = ""):
    """Layers on a line; an arc from each replaced layer r back to the source s whose K/V it reads."""
    L = strategy.num_layers
    fig, ax = plt.subplots(figsize=(max(7, L * 0.32), 3.8), layout="constrained")
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
    fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    ax.set_title(title or f"{strategy.num_shared} of {L} layers replaced")
    return fig


def threshold_sweep_plot(rows, title: str = "", random: dict | None = None, full: dict | None = None):
    """Top: candidates that passed / were rejected per threshold (log scale when they span decades). Bottom:
    perplexity of each threshold's strategy with its 95% interval (log scale), beside the random-order control at
    the target C (band: the 95% t-interval over seeds) and the full model."""
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(8.6, 6.6), sharex=True, layout="constrained", gridspec_kw={"height_ratios": [1, 1.3]}
    )
    T = np.array([r["threshold"] for r in rows], dtype=float)
    step = float(np.min(np.diff(np.sort(T)))) if len(T) > 1 else 0.1
    width = min(0.035, 0.35 * step)
    acc = np.array([r["accepted"] for r in rows])
    rej = np.array([r["rejected"] for r in rows])
    ax.bar(T - width / 2, acc, width=width, color="#d62728", label="passed (accepted)")
    ax.bar(T + width / 2, rej, width=width, color="#1f77b4", label="rejected")
    for t, a, r in zip(T, acc, rej):
        ax.annotate(
            f"{a}/{a + r}", (t, max(a, r, 1)), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7
        )
    if max(1, *(acc + rej)) > 30:
        ax.set_yscale("log")
        ax.set_ylim(0.8, max(acc.max(), rej.max()) * 3)
        ax.set_ylabel("candidates visited (log scale)")
    else:
        ax.set_ylim(0, max(acc.max(), rej.max(), 1) * 1.25)
        ax.set_ylabel("candidates visited")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    y = np.array([r["ppl"] for r in rows])
    # rows written without their interval fall back to the one convention (ppl ± Z95 se)
    bounds = [(r["ppl_lo"], r["ppl_hi"]) if "ppl_lo" in r else interval95(r["ppl"], r["ppl_se"]) for r in rows]
    lo = np.array([b[0] for b in bounds], dtype=float)
    hi = np.array([b[1] for b in bounds], dtype=float)
    ax2.errorbar(
        T,
        y,
        yerr=np.nan_to_num(np.vstack([y - lo, hi - y])),
        color="k",
        marker="o",
        capsize=2,
        label="dissimilar order: the strategy of each T (95% interval)",
    )
    for t, r in zip(T, rows):
        ax2.annotate(f"C={r['num_shared']}", (t, r["ppl"]), textcoords="offset points", xytext=(8, 4), fontsize=7)
    if random:
        ax2.axhspan(
            random["ppl_lo"],
            random["ppl_hi"],
            color="#7f7f7f",
            alpha=0.22,
            lw=0,
            label=f"random order at C = {random['num_shared']}, default T: 95% t-interval over {random['n']} seeds",
        )
        ax2.axhline(random["ppl"], color="#7f7f7f", ls="--", lw=1, label=f"random order: mean of {random['n']} seeds")
    if full:
        ax2.axhline(full["ppl"], color="#2ca02c", ls=":", lw=1.2, label="full model (no sharing)")
    ax2.set_yscale("log")  # perplexities of strategies differ by factors
    ax2.yaxis.set_major_formatter(PLAIN)
    ax2.yaxis.set_minor_formatter(PLAIN_2_5)
    ax2.tick_params(axis="y", which="minor", labelsize=7)
    ax2.set_xlabel("threshold T")
    ax2.set_ylabel("held-out perplexity (log scale)")
    ax2.set_xticks(T)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.suptitle(title or f"threshold sweep (target C = {rows[0]['target']})")
    return fig


# ------------------------------------------------------------------------------------------------
# the conclusion
# ------------------------------------------------------------------------------------------------
def _interval(lo: float, hi: float, digits: int = 2) -> str:
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def search_conclusion(
    sweep: list[dict],
    deciles_by_source: dict[str, list[dict]],
    main: dict,
    default_T: float,
    control: dict | None = None,
    default: dict | None = None,
    random: dict | None = None,
    scoring: dict | None = None,
) -> str:
    """Markdown for notebook 02: what the threshold and the ranking do, computed from the numbers.

    `control`: the random-order searches' counts (`search.pooled_counts`, or one search's `run_counts`); `random`:
    their perplexities at the target C (`search.random_quality`); `scoring`: the scorer's accounting."""
    lines = [
        f"**Computed from this run.** The default search (T = {default_T}) replaced {main['num_shared']} layers "
        f"after visiting {main['candidates_visited']} candidates in {main['search_seconds']:.1f} s "
        f"({main['layer_forwards']} layer-forwards; re-running the whole model for every candidate and for the "
        f"reference would cost {main['naive_layer_forwards']}, {main['speedup_vs_naive']:.1f}x more).",
        "",
    ]
    if default is None:  # counts of the default search: from the sweep when it holds the default T
        default = next((r for r in sweep if r["threshold"] == default_T), None)
    if default is not None:
        lines.append(_default_threshold_line(default, default_T))
    if control is not None:
        lines.append(_control_line(control))
    if random is not None and random.get("n"):
        lines.append(_random_quality_line(random, default_T))
    lines += ["", "Threshold sweep (same target, dissimilar order; perplexity with its 95% interval):", ""]
    lines += [_sweep_line(r, default_T) for r in sweep]
    reached = [r for r in sweep if r["reached_target"]]
    if reached and default is not None:
        lines += ["", _best_threshold_line(reached)]
    repeats = _identical_strategies(sweep)
    if repeats:
        lines.append(
            "Thresholds whose searches returned the identical strategy (one measurement, not several): "
            + "; ".join("T = " + ", ".join(map(str, ts)) for ts in repeats)
            + "."
        )
    lines.append("")
    for src, rows in deciles_by_source.items():
        seen = [r for r in rows if r["visited"]]
        if not seen:
            continue
        desc = ", ".join(f"{r['decile']}: {r['accepted']}/{r['visited']}" for r in seen)
        lines.append(f"- Accepted/visited by dissimilarity decile, {src}: {desc}.")
    if scoring:
        lines += [
            "",
            f"Scoring ({scoring['protocol_description']}): {scoring['distinct_strategies']} distinct strategies, "
            f"{scoring['fresh']} evaluated in this run ({scoring['fresh_seconds'] / 60:.1f} min), "
            f"{scoring['from_store']} taken from the store `{scoring['store']}` shared with notebooks 01 and 11.",
        ]
    return "\n".join(lines)


def _default_threshold_line(default: dict, default_T: float) -> str:
    """Whether the threshold or the ranking alone chose the default search's strategy."""
    if default["rejected"] == 0:
        return (
            f"At the default T = {default_T} the threshold rejected nothing: the first "
            f"{default['accepted']} candidates in dissimilarity order all passed, so the *ranking* alone "
            "chose the strategy."
        )
    return (
        f"At the default T = {default_T} the threshold rejected {default['rejected']} of "
        f"{default['visited']} visited candidates, so both the ranking and the threshold shaped the strategy."
    )


def _control_line(control: dict) -> str:
    """How many candidates the random-order control searches passed at the same threshold."""
    n = control.get("searches", 1)
    who = f"The random-order controls ({n} seeds, one search each)" if n > 1 else "The random-order control"
    rate = ""
    if n > 1 and control["rejected"] and not math.isnan(control.get("pass_rate_lo", math.nan)):
        rate = (
            f"; pass rate {control['pass_rate_mean']:.0%} on average over seeds, 95% t-interval "
            f"{_interval(100 * control['pass_rate_lo'], 100 * control['pass_rate_hi'], 0)}%"
        )
    return (
        f"{who} at the same T passed {control['accepted']} of {control['visited']} candidates "
        f"{'they' if n > 1 else 'it'} visited{rate}"
        + (" (nothing rejected either)." if control["rejected"] == 0 else ".")
    )


def _random_quality_line(random: dict, default_T: float) -> str:
    """The random order's perplexity at the target C over its seeds, and the default strategy's against it."""
    text = (
        f"Quality of the random order at C = {random['num_shared']} (T = {default_T}, {random['n']} seeds): "
        f"held-out perplexity {random['ppl']:.2f} {_interval(random['ppl_lo'], random['ppl_hi'])} (exp of the "
        "mean NLL over seeds, 95% t-interval over seeds)"
    )
    if "reference_vs_random" in random:
        text += (
            f"; the default (dissimilar) strategy: {random['reference_ppl']:.2f}, "
            f"{random['reference_vs_random']:.3f}x the random order's "
            f"{_interval(random['reference_vs_random_lo'], random['reference_vs_random_hi'], 3)} (mean over "
            f"seeds of the paired ratio), clearly lower than {random['reference_better']} and clearly higher "
            f"than {random['reference_worse']} of the {random['n']} random strategies"
        )
    return text + "."


def _sweep_line(r: dict, default_T: float) -> str:
    """One threshold of the sweep: how many candidates passed, whether it reached the target, its perplexity and
    (when it differs) its paired change against the default threshold."""
    short = "" if r["reached_target"] else f" (the candidates ran out: only {r['num_shared']} of {r['target']} layers)"
    vs = ""
    if "ppl_ratio_vs_default" in r and r["threshold"] != default_T and not math.isnan(r["z_vs_default"]):
        ci = r.get("ppl_ratio_vs_default_ci95")
        vs = (
            f", {(r['ppl_ratio_vs_default'] - 1) * 100:+.1f}% against the default T"
            + (f" (95% {_interval((ci[0] - 1) * 100, (ci[1] - 1) * 100, 1)}%" if ci else " (")
            + f", z {r['z_vs_default']:+.1f})"
        )
    ppl = f"{r['ppl']:.2f}" + (f" {_interval(r['ppl_lo'], r['ppl_hi'])}" if "ppl_lo" in r else "")
    return (
        f"- T = {r['threshold']}: {r['accepted']} of {r['visited']} visited candidates passed "
        f"({r['pass_rate']:.0%}){short}; perplexity {ppl}{vs}."
    )


def _best_threshold_line(reached: list[dict]) -> str:
    """Among the thresholds that reached the target C: the one(s) of lowest perplexity, and the strictest."""
    best = min(reached, key=lambda r: r["ppl"])
    strictest = max(r["threshold"] for r in reached)
    same = [r["threshold"] for r in reached if r.get("mapping_key") and r.get("mapping_key") == best.get("mapping_key")]
    return (
        "Of the thresholds whose search reached the target C, T = "
        + (", ".join(map(str, same)) if len(same) > 1 else str(best["threshold"]))
        + f" gave the lowest perplexity ({best['ppl']:.2f}"
        + (", one and the same strategy" if len(same) > 1 else "")
        + f"); the strictest one that still reached it was T = {strictest}."
    )


def _identical_strategies(sweep: list[dict]) -> list[list[float]]:
    """The groups of thresholds whose searches returned one and the same strategy."""
    identical = {}
    for r in sweep:
        if r.get("mapping_key"):
            identical.setdefault(r["mapping_key"], []).append(r["threshold"])
    return [ts for ts in identical.values() if len(ts) > 1]
