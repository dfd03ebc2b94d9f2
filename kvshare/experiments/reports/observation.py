"""Notebook 01's figures (distance heatmaps, perplexity curves, paired ratios) and its conclusion, written from
the numbers of `kvshare.experiments.observation`. Each figure function returns a Figure.

Every measured point carries a 95% interval: a fixed order's perplexity over the evaluation windows, the random
order as the mean over seeds with the 95% t-interval over seeds, a paired ratio with its paired interval."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

from ...metrics import HeldOutProtocol
from ..common import ORDER_LABELS, ci95
from ..observation import (
    curve_summary,
    distinct_comparisons,
    find_rows,
    identical_across_sets,
    outcome,
    paired_comparisons,
    random_versus,
)
from .common import COLORS, MARKERS

PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # log axes labelled 20, 50, 100, not 2 x 10^1
# minor ticks of a log axis: label 2x and 5x each decade only (every minor tick would crowd over two decades)
PLAIN_2_5 = FuncFormatter(
    lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
)


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


def _order_curves(ax, summary, k, num_layers):
    """Each order's perplexity against C on calibration set k: fixed orders with 95% error bars, random as its
    mean over seeds inside the band of the 95% t-interval over seeds."""
    for order in ORDER_LABELS:
        rows = sorted(
            (r for r in summary if r["calibration_set"] == k and r["order"] == order), key=lambda r: r["num_shared"]
        )
        if not rows:
            continue
        c = np.array([r["num_shared"] for r in rows])
        y = np.array([r["ppl"] for r in rows])
        lo = np.array([r["ppl_lo"] for r in rows])
        hi = np.array([r["ppl_hi"] for r in rows])
        if order == "random":
            n = max(r["seeds"] for r in rows)
            ax.fill_between(
                c, lo, hi, color=COLORS[order], alpha=0.22, lw=0, label=f"random: 95% t-interval, {n} seeds"
            )
            ax.plot(c, y, color=COLORS[order], marker=MARKERS[order], ms=4, ls="--", label=f"random: mean of {n} seeds")
        else:
            yerr = np.nan_to_num(np.vstack([y - lo, hi - y]))
            ax.errorbar(
                c,
                y,
                yerr=yerr,
                color=COLORS[order],
                marker=MARKERS[order],
                ms=4,
                capsize=2,
                label=f"{ORDER_LABELS[order]} (95% interval)",
            )
    ax.set_yscale("log")  # perplexity grows multiplicatively with C
    ax.yaxis.set_major_formatter(PLAIN)
    ax.yaxis.set_minor_formatter(PLAIN_2_5)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(sorted({r["num_shared"] for r in summary if r["calibration_set"] == k}))
    ax.set_xlabel("replaced layers C")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    if num_layers:
        sec = ax.secondary_xaxis("top", functions=(lambda x: 100 * x / num_layers, lambda p: p * num_layers / 100))
        sec.set_xlabel("% of layers replaced")


def _legend_below(fig, ax, ncols: int = 2):
    """One legend under the axes, outside them: it never covers a point or a label."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def ppl_curve(summary, num_layers: int, calibration_set: int = 0, title: str = ""):
    """Perplexity versus replaced layers for each order on one calibration set (95% intervals)."""
    fig, ax = plt.subplots(figsize=(6.6, 5.2), layout="constrained")
    _order_curves(ax, summary, calibration_set, num_layers)
    _legend_below(fig, ax)
    ax.set_title(title or f"perplexity vs replaced layers (calibration set {calibration_set})", fontsize=10)
    return fig


def ppl_curves_by_set(summary, num_layers: int, title: str = ""):
    """The same curves on each calibration set, one panel each, shared y axis."""
    sets = sorted({r["calibration_set"] for r in summary})
    fig, axes = plt.subplots(1, len(sets), figsize=(4.6 * len(sets), 4.8), sharey=True, layout="constrained")
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, sets):
        _order_curves(ax, summary, k, num_layers)
        ax.set_title(f"calibration set {k}")
        if ax is not axes[0]:
            ax.set_ylabel("")
    _legend_below(fig, axes[0], ncols=4)
    if title:
        fig.suptitle(title)
    return fig


def _sets_label(sets) -> str:
    return ("set " if len(sets) == 1 else "sets ") + ", ".join(str(k) for k in sets)


def paired_differences(comparisons, num_layers: int, title: str = ""):
    """Paired perplexity ratio dissimilar / other per C (log scale; below 1: dissimilar better).

    Left, against similar: every distinct pair of strategies once, with its 95% paired interval, labelled with the
    calibration sets whose searches chose it. Right, against random: each random strategy (dots), each set's mean
    over its seeds with the 95% t-interval over seeds, and the mean over all sets' seeds (black)."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.8), sharey=True, layout="constrained")
    distinct = distinct_comparisons(comparisons)
    sim = [d for d in distinct if d["versus"] == "similar"]
    _similar_pairs(axes[0], sim)
    axes[0].set_title(f"dissimilar vs similar: {len(sim)} distinct pairs of strategies", fontsize=10)
    sets = sorted({r["calibration_set"] for r in comparisons})
    _random_seeds_by_set(axes[1], [d for d in distinct if d["versus"] == "random"], sets)
    _random_over_all_sets(axes[1], comparisons)
    axes[1].set_title("dissimilar vs random (the random order as a distribution)", fontsize=10)
    for ax in axes:
        _ratio_axis(ax, sorted({c["num_shared"] for c in comparisons}))
    axes[0].set_ylabel("ppl(dissimilar) / ppl(other), log scale\n(< 1: dissimilar better)")
    if title:
        fig.suptitle(title)
    return fig


def _similar_pairs(ax, sim: list[dict]):
    """Each distinct dissimilar / similar pair of strategies with its 95% paired interval, side by side at its C,
    coloured by the calibration sets whose searches chose it."""
    colors = plt.get_cmap("tab10")
    groups = list(dict.fromkeys(_sets_label(d["calibration_sets"]) for d in sim))
    for c in sorted({d["num_shared"] for d in sim}):
        at = [d for d in sim if d["num_shared"] == c]
        for j, d in enumerate(at):
            g = _sets_label(d["calibration_sets"])
            x = c + (j - (len(at) - 1) / 2) * 0.3
            lo, hi = d["ppl_ratio_ci95"]
            ax.errorbar(
                [x],
                [d["ppl_ratio"]],
                yerr=[[d["ppl_ratio"] - lo], [hi - d["ppl_ratio"]]],
                fmt="o",
                ms=4,
                capsize=2,
                color=colors(groups.index(g) % 10),
                label=f"chosen on {g}",
            )


def _random_seeds_by_set(ax, rnd: list[dict], sets: list[int]):
    """Per calibration set and C: each random strategy's ratio (dots) and the set's mean over its seeds with the
    95% t-interval over seeds."""
    colors = plt.get_cmap("tab10")
    for j, k in enumerate(sets):
        for c in sorted({d["num_shared"] for d in rnd}):
            rs = [d for d in rnd if d["num_shared"] == c and k in d["calibration_sets"]]
            if not rs:
                continue
            x = c + (j - (len(sets) - 1) / 2) * 0.35 - 0.15
            ax.scatter([x] * len(rs), [d["ppl_ratio"] for d in rs], s=9, color=colors(j % 10), alpha=0.45, lw=0)
            ci = ci95([d["nll_diff"] for d in rs])
            mean = math.exp(ci["mean"])
            err = np.nan_to_num([[mean - math.exp(ci["lo"])], [math.exp(ci["hi"]) - mean]])
            ax.errorbar(
                [x + 0.12],
                [mean],
                yerr=err,
                fmt="o",
                ms=4,
                capsize=2,
                color=colors(j % 10),
                label=f"set {k}: mean of {len(rs)} seeds, 95% t-interval",
            )


def _random_over_all_sets(ax, comparisons):
    """The mean over every set's seeds at each C (black diamonds), beside the per-set means."""
    for row in random_versus(comparisons):
        err = np.nan_to_num([[row["ratio"] - row["ratio_lo"]], [row["ratio_hi"] - row["ratio"]]])
        ax.errorbar(
            [row["num_shared"] + 0.5],
            [row["ratio"]],
            yerr=err,
            fmt="D",
            ms=5,
            capsize=3,
            color="k",
            label="all sets: mean over seeds x sets, 95% t-interval",
        )


def _ratio_axis(ax, cs: list[int]):
    """A ratio's log axis around 1 (2x and 1/2x equally far from it), and one legend entry per label below it."""
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.yaxis.set_minor_formatter(PLAIN_2_5)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(cs)
    ax.set_xlabel("replaced layers C")
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        ax.legend(
            unique.values(),
            unique.keys(),
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncols=2,
            frameon=False,
        )


# ------------------------------------------------------------------------------------------------
# the conclusion
# ------------------------------------------------------------------------------------------------
def _protocol_text(rows: list[dict]) -> str:
    proto = rows[0].get("protocol")
    if proto:
        return HeldOutProtocol(**proto).describe()
    return f"the same {rows[0]['tokens']} held-out tokens"


def _ratio(d: dict) -> str:
    lo, hi = d["ppl_ratio_ci95"]
    return f"{d['ppl_ratio']:.3f} [{lo:.3f}, {hi:.3f}]"


def _ci(x: dict, lo: str = "ppl_lo", hi: str = "ppl_hi") -> str:
    return f"{x['ppl']:.2f} [{x[lo]:.2f}, {x[hi]:.2f}]"


def observation_conclusion(
    rows: list[dict], num_layers_: int, model: str, runs: list | None = None, scoring: dict | None = None
) -> str:
    """The markdown conclusion of notebook 01, written from the numbers (and the searches' traces and the scorer's
    accounting, if given). Every count is of distinct comparisons: when the searches on several calibration sets
    chose the same two strategies, that is one measurement, said once."""
    comps = paired_comparisons(rows)
    sim = [d for d in distinct_comparisons(comps) if d["versus"] == "similar"]
    sets = sorted({r["calibration_set"] for r in rows})
    cs = sorted({c["num_shared"] for c in comps})
    summary = curve_summary(rows)
    seeds_per_set = max((s["seeds"] for s in summary if s["order"] == "random" and s["num_shared"] > 0), default=0)
    random_cs = sorted({r["num_shared"] for r in rows if r["order"] == "random" and r["num_shared"] > 0})
    lines = [
        f"**Computed from this run** ({model}, {num_layers_} layers, {len(sets)} disjoint calibration sets; every "
        f"strategy scored on {_protocol_text(rows)}; intervals are 95%; a comparison is *clear* when the 95% "
        "interval of its paired perplexity ratio excludes 1).",
        "",
        _similar_claim(sim, comps, model),
        "",
    ]
    lines += _headline_table(summary, comps, sets[0], cs, num_layers_, seeds_per_set, random_cs)
    lines += _similar_per_c(sim, cs, num_layers_)
    if random_versus(comps):
        lines += _random_section(comps, cs, random_cs, seeds_per_set, len(sets), scoring)
    if len(sets) > 1:
        lines.append(_identical_choices_line(rows, cs, len(sets)))
    if runs:
        lines += _search_lines(runs)
    if scoring:
        lines.append(
            f"Scoring: {scoring['distinct_strategies']} distinct strategies, {scoring['fresh']} evaluated in this run "
            f"({scoring['fresh_seconds'] / 60:.1f} min), {scoring['from_store']} taken from the store "
            f"`{scoring['store']}` shared with the other notebooks of this model (the same protocol: computed once)."
        )
    return "\n".join(lines)


def _headline_table(
    summary: list[dict],
    comps: list[dict],
    main: int,
    cs: list[int],
    num_layers: int,
    seeds_per_set: int,
    random_cs: list[int],
) -> list[str]:
    """Each order's perplexity at each C on calibration set `main`, with the paired dissimilar / similar ratio."""
    lines = [
        "| C (layers replaced) | KV kept | dissimilar | similar | "
        f"random (mean of {seeds_per_set} seeds) | dissimilar / similar (paired) |",
        "|---|---|---|---|---|---|",
    ]
    for c in cs:
        d = find_rows(summary, calibration_set=main, order="dissimilar", num_shared=c)
        s = find_rows(summary, calibration_set=main, order="similar", num_shared=c)
        rnd = find_rows(summary, calibration_set=main, order="random", num_shared=c)
        vs = find_rows(comps, calibration_set=main, num_shared=c, versus="similar")
        cell = lambda x: _ci(x[0]) if x else "n/a"
        vcell = f"{_ratio(vs[0])}, z {vs[0]['z']:+.1f}" if vs else "n/a"
        lines.append(
            f"| {c} ({c / num_layers:.0%}) | {(num_layers - c) / num_layers:.0%} | {cell(d)} | {cell(s)} | "
            f"{cell(rnd)} | {vcell} |"
        )
    lines += [
        "",
        f"Table: calibration set {main}, perplexity [95% interval]. Fixed orders: the interval over the evaluation "
        "windows. Random: exp of the mean NLL over the seeds (their geometric mean), with the 95% t-interval over "
        f"seeds; scored at C = {', '.join(map(str, random_cs)) or 'none'} only (n/a elsewhere). Last column: "
        "perplexity ratio dissimilar / similar with its paired 95% interval (< 1: dissimilar better) and z.",
        "",
    ]
    return lines


def _similar_claim(sim: list[dict], comps: list[dict], model: str) -> str:
    """The paper's claim, dissimilar against similar, counted over distinct pairs of strategies."""
    points = len({(c["calibration_set"], c["num_shared"]) for c in comps if c["versus"] == "similar"})
    better = sum(outcome(d) == "better" for d in sim)
    worse = sum(outcome(d) == "worse" for d in sim)
    unclear = len(sim) - better - worse
    n = len(sim)
    counted = (
        f"the {points} (set, C) points make {n} distinct pairs of strategies: where the searches on several sets "
        "chose the same two strategies, that is one comparison, counted once"
    )
    if n == 0:
        return "There is no shared C > 0 to compare: nothing can be concluded."
    if better == n:
        return (
            f"**The paper's claim holds on {model}:** sharing the most *dissimilar* layers' KV cache gives clearly "
            f"lower perplexity than sharing the most *similar* ones in all {n} distinct comparisons ({counted})."
        )
    if worse == n:
        return (
            f"**The paper's claim does not hold on {model}:** sharing the most *similar* layers gives clearly lower "
            f"perplexity than the dissimilar (KVSharer) order in all {n} distinct comparisons ({counted})."
        )
    if better > worse:
        return (
            f"**The paper's claim mostly holds on {model}:** dissimilar is clearly lower in {better} of {n} distinct "
            f"comparisons, similar in {worse}, {unclear} unclear ({counted})."
        )
    if worse > better:
        return (
            f"**The paper's claim does not hold on {model}:** similar is clearly lower in {worse} of {n} distinct "
            f"comparisons, dissimilar in {better}, {unclear} unclear ({counted})."
        )
    return (
        f"**No clear winner on {model}:** dissimilar is clearly lower in {better} of {n} distinct comparisons, "
        f"similar in {worse}, {unclear} unclear ({counted})."
    )


def _similar_per_c(sim: list[dict], cs: list[int], num_layers: int) -> list[str]:
    """Dissimilar / similar at each C, one entry per distinct pair of strategies with the sets that chose it."""
    word = {"better": "dissimilar clearly lower", "worse": "similar clearly lower", "unclear": "unclear"}
    lines = ["Dissimilar / similar at each C, per distinct pair of strategies [95% paired interval]:", ""]
    for c in cs:
        at = [d for d in sim if d["num_shared"] == c]
        if not at:
            continue
        parts = "; ".join(f"{_ratio(d)} ({_sets_label(d['calibration_sets'])}, {word[outcome(d)]})" for d in at)
        lines.append(
            f"- C = {c} ({c / num_layers:.0%} of layers): {len(at)} distinct pair{'s' if len(at) > 1 else ''}: "
            f"dissimilar / similar {parts}."
        )
    lines.append("")
    return lines


def _random_section(
    comps: list[dict], cs: list[int], random_cs: list[int], seeds_per_set: int, num_sets: int, scoring: dict | None
) -> list[str]:
    """Dissimilar against the random order as a distribution over seeds, and why the seeds cover only some C."""
    lines = [
        f"Against the random order ({seeds_per_set} seeds per calibration set, each set's seeds drawn "
        "independently: the mean over every set's seeds of the paired log ratio, with its 95% t-interval over "
        "those random strategies; below 1: dissimilar better):",
        "",
    ]
    for r in random_versus(comps):
        lines.append(
            f"- C = {r['num_shared']}: dissimilar / random {r['ratio']:.3f} [{r['ratio_lo']:.3f}, "
            f"{r['ratio_hi']:.3f}] over {r['strategies']} distinct random strategies; dissimilar clearly lower "
            f"than {r['better']}, clearly higher than {r['worse']}, unclear against {r['unclear']} of them."
        )
    lines.append("")
    if random_cs != cs:
        why = " to keep the run short"
        if scoring and scoring.get("seconds_per_strategy"):
            all_c = seeds_per_set * num_sets * len(cs)
            why = (
                f" each strategy costs ~{scoring['seconds_per_strategy']:.0f} s to score here, and "
                f"{seeds_per_set} seeds x {num_sets} sets at all {len(cs)} C values would be {all_c} strategies "
                f"(~{all_c * scoring['seconds_per_strategy'] / 60:.0f} min)"
            )
        lines += [
            f"The random seeds are scored at C = {', '.join(map(str, random_cs))} only (as in notebook 11, whose "
            f"seeds they are):{why}.",
            "",
        ]
    return lines


def _identical_choices_line(rows: list[dict], cs: list[int], num_sets: int) -> str:
    """One strategy chosen on every calibration set is one measurement repeated, not evidence of robustness."""
    same = {o: identical_across_sets(rows, o) for o in ("dissimilar", "similar")}
    said = [
        f"the {o} searches at C = {', '.join(map(str, cs_))}" + (" (every C)" if cs_ == cs else "")
        for o, cs_ in same.items()
        if cs_
    ]
    if not said:
        return f"No order chose the same strategy on all {num_sets} calibration sets at any C."
    return (
        f"Identical choices: {' and '.join(said)} chose one and the same strategy on all {num_sets} "
        "calibration sets. There the sets repeat one measurement: it is counted once above and is no "
        "evidence that the result holds across calibration data."
    )


def _search_lines(runs: list) -> list[str]:
    """What the threshold rejected over the searches' traces, and which searches stopped short of their target."""
    visited = sum(len(r.trace) for r in runs)
    rejected = sum(not t["accepted"] for r in runs for t in r.trace)
    lines = [
        f"The threshold rejected {rejected} of the {visited} candidates the {len(runs)} searches visited"
        + (
            ": the candidate order alone decided every strategy, which is why searches of one order on "
            "different calibration sets can choose the same strategy."
            if rejected == 0
            else "."
        )
    ]
    short = [r for r in runs if r.strategy.num_shared < r.strategy.metadata.get("target_num_shared", 0)]
    if short:
        reached = sorted({r.strategy.num_shared for r in short})
        targets = sorted({r.strategy.metadata["target_num_shared"] for r in short})
        lines.append(
            f"{len(short)} of the {len(runs)} searches ran out of candidates above the threshold before their "
            f"target C = {'/'.join(map(str, targets))}: they stopped at C = {'/'.join(map(str, reached))}, so "
            "their curves end there and the larger C points are missing."
        )
    return lines
