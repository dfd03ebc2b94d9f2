"""Notebook 01's figures (distance heatmaps, perplexity curves, paired ratios) and its conclusion, written from
the numbers of `kvshare.experiments.observation`. Each figure function returns a Figure."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import numpy as np

from ..common import ORDER_LABELS
from ..observation import curve_summary, find_rows, paired_comparisons
from .common import COLORS, MARKERS


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
        rows = sorted(
            (r for r in summary if r["calibration_set"] == k and r["order"] == order), key=lambda r: r["num_shared"]
        )
        if not rows:
            continue
        c = np.array([r["num_shared"] for r in rows])
        y = np.array([r["ppl"] for r in rows])
        label = ORDER_LABELS[order]
        if order == "random":
            lo = np.array([r["ppl_min"] for r in rows])
            hi = np.array([r["ppl_max"] for r in rows])
            ax.fill_between(
                c, lo, hi, color=COLORS[order], alpha=0.25, lw=0, label=f"random: min–max over {rows[0]['seeds']} seeds"
            )
            ax.plot(
                c,
                y,
                color=COLORS[order],
                marker=MARKERS[order],
                ms=4,
                label=f"random: mean of {rows[0]['seeds']} seeds",
            )
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
            ax.errorbar(
                x,
                np.exp(d),
                yerr=[np.exp(d) - np.exp(d - 2 * se), np.exp(d + 2 * se) - np.exp(d)],
                fmt="o",
                ms=3.5,
                capsize=2,
                label=f"calibration set {k}" + (f" ({nseeds} seeds)" if nseeds > 1 else ""),
            )
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


# ------------------------------------------------------------------------------------------------
# the conclusion
# ------------------------------------------------------------------------------------------------
def observation_conclusion(
    rows: list[dict], num_layers_: int, model: str, z_crit: float = 2.0, runs: list | None = None
) -> str:
    """The markdown conclusion of notebook 01, written from the numbers (and the searches' traces, if given)."""
    comps = paired_comparisons(rows)
    sets = sorted({r["calibration_set"] for r in rows})
    cs = sorted({c["num_shared"] for c in comps})
    main = sets[0]
    lines = [
        f"**Computed from this run** ({model}, {num_layers_} layers, {len(sets)} disjoint calibration sets, "
        f"perplexity on the same {rows[0]['tokens']} held-out tokens for every strategy; differences are paired "
        f'per evaluation window, "clear" means |difference| > {z_crit:g} paired standard errors).',
        "",
    ]

    def verdict(c_list, k):
        wins = []
        for c in c_list:
            vs = find_rows(comps, calibration_set=k, num_shared=c, versus="similar")
            if vs:
                wins.append(vs[0])
        return wins

    # headline table on the first calibration set
    lines.append(
        "| C (layers replaced) | KV kept | dissimilar | similar | random (mean ± std) | dissimilar vs similar |"
    )
    lines.append("|---|---|---|---|---|---|")
    summary = curve_summary(rows)
    for c in cs:
        d = find_rows(summary, calibration_set=main, order="dissimilar", num_shared=c)
        s = find_rows(summary, calibration_set=main, order="similar", num_shared=c)
        rnd = find_rows(summary, calibration_set=main, order="random", num_shared=c)
        vs = find_rows(comps, calibration_set=main, num_shared=c, versus="similar")
        cell = lambda x: f"{x[0]['ppl']:.2f}" if x else "n/a"
        rcell = f"{rnd[0]['ppl']:.2f} ± {rnd[0]['ppl_std']:.2f}" if rnd else "n/a"
        vcell = f"{(vs[0]['ppl_ratio'] - 1) * 100:+.1f}% ({vs[0]['z']:+.1f} SE)" if vs else "n/a"
        lines.append(
            f"| {c} ({c / num_layers_:.0%}) | {(num_layers_ - c) / num_layers_:.0%} | {cell(d)} | {cell(s)} | "
            f"{rcell} | {vcell} |"
        )
    lines.append("")
    lines.append(
        f"Table: calibration set {main}. Last column: perplexity of dissimilar relative to similar "
        "(negative = dissimilar better) and the paired z-score."
    )
    lines.append("")

    # winner per C, over all sets
    dis_better = dis_worse = ties = 0
    per_c = []
    for c in cs:
        vs = [v for k in sets for v in verdict([c], k)]
        b = sum(v["z"] < -z_crit for v in vs)
        w = sum(v["z"] > z_crit for v in vs)
        dis_better += b
        dis_worse += w
        ties += len(vs) - b - w
        ratios = [v["ppl_ratio"] for v in vs]
        gm = math.exp(np.mean(np.log(ratios))) if ratios else float("nan")
        if b == len(vs):
            who = "dissimilar wins on every set"
        elif w == len(vs):
            who = "similar wins on every set"
        elif b > 0 and w == 0:
            who = f"dissimilar wins on {b} of {len(vs)} sets, the rest too close to call"
        elif w > 0 and b == 0:
            who = f"similar wins on {w} of {len(vs)} sets, the rest too close to call"
        elif b == 0 and w == 0:
            who = "too close to call on every set"
        else:
            who = f"mixed: dissimilar wins on {b}, similar on {w} of {len(vs)} sets"
        per_c.append(
            f"- C = {c} ({c / num_layers_:.0%} of layers): {who}; dissimilar/similar perplexity ratio "
            f"{gm:.3f} (geometric mean over sets; per set {', '.join(f'{r:.3f}' for r in ratios)})."
        )
    total = dis_better + dis_worse + ties
    if total == 0:
        claim = "There is no shared C > 0 to compare: nothing can be concluded."
    elif dis_better == total:
        claim = (
            f"**The paper's claim holds on {model}:** sharing the most *dissimilar* layers' KV cache gives lower "
            f"perplexity than sharing the most *similar* ones at every compression level and on every calibration "
            f"set ({total} of {total} comparisons clear)."
        )
    elif dis_worse == total:
        claim = (
            f"**The paper's claim does not hold on {model}:** sharing the most *similar* layers gives lower "
            f"perplexity than the dissimilar (KVSharer) order in all {total} comparisons."
        )
    elif dis_better > dis_worse:
        claim = (
            f"**The paper's claim mostly holds on {model}:** dissimilar beats similar clearly in {dis_better} of "
            f"{total} (set, C) comparisons, similar wins clearly in {dis_worse}, and {ties} are too close to call."
        )
    elif dis_worse > dis_better:
        claim = (
            f"**The paper's claim does not hold on {model}:** similar beats dissimilar clearly in {dis_worse} of "
            f"{total} (set, C) comparisons, dissimilar wins clearly in {dis_better}, and {ties} are too close to call."
        )
    else:
        claim = (
            f"**No clear winner on {model}:** dissimilar wins clearly in {dis_better} of {total} (set, C) "
            f"comparisons, similar in {dis_worse}, {ties} too close to call."
        )
    lines.insert(2, claim)
    lines.insert(3, "")
    lines.extend(["Which order wins at which compression (all calibration sets):", ""] + per_c + [""])

    # random as a reference
    rnd = [v for v in comps if v["versus"] == "random"]
    if rnd:
        better = sum(v["z"] < -z_crit for v in rnd)
        worse = sum(v["z"] > z_crit for v in rnd)
        lines.append(
            f"Against the random order (each seed a separate greedy search): dissimilar is clearly better in "
            f"{better}, clearly worse in {worse} and too close to call in {len(rnd) - better - worse} of "
            f"{len(rnd)} (set, C, seed) comparisons."
        )
        lines.append("")
    # stability of the ordering across calibration sets
    stable = []
    for c in cs:
        signs = {np.sign(v["nll_diff"]) for k in sets for v in verdict([c], k)}
        stable.append(len(signs) == 1)
    lines.append(
        f"Stability: the sign of (dissimilar − similar) is the same on all {len(sets)} calibration sets at "
        f"{sum(stable)} of {len(cs)} compression levels"
        + ("." if all(stable) else f" (it flips at C = {', '.join(str(c) for c, s in zip(cs, stable) if not s)}).")
    )
    if len(sets) > 1:
        same = []
        for order in ORDER_LABELS:
            keys = sorted({(r["seed"], r["num_shared"]) for r in rows if r["order"] == order and r["num_shared"] > 0})
            n_same = sum(
                len(
                    {
                        json.dumps(r["mapping"], sort_keys=True)
                        for r in find_rows(rows, order=order, seed=sd, num_shared=c)
                    }
                )
                == 1
                for sd, c in keys
            )
            if keys:
                same.append(f"{order} {n_same} of {len(keys)}")
        lines.append(
            f"The searches on the {len(sets)} calibration sets chose the *identical* strategy at "
            f"{', '.join(same)} (seed, C) points, so their curves coincide there."
        )
    if runs:
        visited = sum(len(r.trace) for r in runs)
        rejected = sum(not t["accepted"] for r in runs for t in r.trace)
        lines.append(
            f"The threshold rejected {rejected} of the {visited} candidates the {len(runs)} searches visited"
            + (
                ": the candidate order alone decided every strategy (so a random order with a given seed "
                "picks the same layers whatever the calibration set)."
                if rejected == 0
                else "."
            )
        )
    return "\n".join(lines)
