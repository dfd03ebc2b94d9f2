"""Notebook 08's figures (threshold sweep, metric, depth-matched control, calibration sensitivity, search cost) and
its conclusion, written from the numbers of `kvshare.experiments.ablations`. Each figure function returns a Figure;
the conclusion is Markdown built from the results, never typed."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from .. import ablations as ab
from .common import COLORS, MARKERS

ORDER_COLORS = {**COLORS, "best": "#2ca02c"}
ORDER_MARKERS = {**MARKERS, "best": "D"}
METRIC_COLORS = {"euclidean": "#d62728", "cosine": "#1f77b4", "normalized": "#9467bd"}
RULE_COLORS = {"dissimilar": "#d62728", "similar": "#1f77b4", "previous": "#ff7f0e"}


def threshold_figure(verdict: dict, c: int, title: str = ""):
    """Perplexity at C (random: geometric mean over seeds with its 95% interval), layers reached and search seconds
    against T, one line per order."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    for order, o in verdict["per_order"].items():
        pts = o["points"]
        ts = [p["threshold"] for p in pts]
        color, marker = ORDER_COLORS.get(order, "k"), ORDER_MARKERS.get(order, "o")
        ok = [p for p in pts if p["ppl"] is not None]
        if ok:
            y = np.array([p["ppl"] for p in ok])
            lo = np.array([p["ppl_lo"] if p["ppl_lo"] is not None else p["ppl"] for p in ok])
            hi = np.array([p["ppl_hi"] if p["ppl_hi"] is not None else p["ppl"] for p in ok])
            axes[0].errorbar(
                [p["threshold"] for p in ok],
                y,
                yerr=[y - lo, hi - y],
                color=color,
                marker=marker,
                capsize=3,
                label=order,
            )
        axes[1].plot(ts, [p["layers_reached_min"] for p in pts], color=color, marker=marker, label=order)
        axes[2].plot(ts, [p["search_seconds_mean"] for p in pts], color=color, marker=marker, label=order)
    axes[0].axhline(verdict["full_ppl"], color="k", ls=":", lw=1, label="full model")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"held-out perplexity at C = {c}")
    axes[1].axhline(c, color="k", ls=":", lw=1)
    axes[1].set_ylabel(f"layers reached (target {c})")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("search seconds")
    for ax in axes:
        ax.set_xlabel("threshold T")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def metric_figure(rows: list[dict], norms: list[dict], title: str = ""):
    """Per-layer mean-vector norms (K, V); perplexity against C per metric (mean over sets, error bars: the spread
    over sets or one set's standard error); Jaccard of the pairs against Euclidean."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    if norms:
        layers = [n["layer"] for n in norms]
        axes[0].plot(layers, [n["key_norm"] for n in norms], marker="o", label="K")
        axes[0].plot(layers, [n["value_norm"] for n in norms], marker="s", label="V")
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("RMS norm of the mean vectors")
        axes[0].set_title("what the plain Euclidean distance sees", fontsize=10)
        axes[0].legend(fontsize=8)
    for metric in dict.fromkeys(r["metric"] for r in rows):
        cs = sorted({r["C"] for r in rows if r["metric"] == metric})
        mean, err, jac = [], [], []
        for c in cs:
            rs = [r for r in rows if r["metric"] == metric and r["C"] == c]
            logs = [math.log(r["ppl"]) for r in rs]
            mean.append(math.exp(np.mean(logs)))
            err.append(np.std([r["ppl"] for r in rs], ddof=1) if len(rs) > 1 else rs[0]["ppl_se"])
            jac.append(np.mean([r.get("jaccard_vs_euclidean", np.nan) for r in rs]))
        color = METRIC_COLORS.get(metric, "k")
        axes[1].errorbar(cs, mean, yerr=err, marker="o", capsize=3, color=color, label=metric)
        axes[2].plot(cs, jac, marker="o", color=color, label=metric)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("C (layers replaced)")
    axes[1].set_ylabel("held-out perplexity")
    axes[1].legend(fontsize=8)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_xlabel("C (layers replaced)")
    axes[2].set_ylabel("Jaccard of the pairs vs Euclidean (mean over sets)")
    if title:
        fig.suptitle(title)
    return fig


def depth_figure(rows: list[dict], title: str = ""):
    """Grouped bars per C: the dissimilar order's and the similar order's replaced layers, each with the three source
    rules; error bars are the perplexity's standard error."""
    cs = sorted({r["C"] for r in rows})
    fig, axes = plt.subplots(1, len(cs), figsize=(6 * len(cs), 4.4), constrained_layout=True, squeeze=False)
    for ax, c in zip(axes[0], cs):
        at = [r for r in rows if r["C"] == c]
        sets = list(dict.fromkeys(r["layers_of"] for r in at))
        width = 0.8 / len(ab.SOURCE_RULES)
        for k, rule in enumerate(ab.SOURCE_RULES):
            cell = [next((r for r in at if r["layers_of"] == ls and r["rule"] == rule), None) for ls in sets]
            x = np.arange(len(sets)) + (k - 1) * width
            ax.bar(
                x,
                [r["ppl"] if r else np.nan for r in cell],
                width,
                yerr=[r["ppl_se"] if r else 0 for r in cell],
                capsize=3,
                color=RULE_COLORS[rule],
                label=f"source: {rule} rule",
            )
        ax.set_xticks(np.arange(len(sets)))
        ax.set_xticklabels([f"layers of the {s} order" for s in sets])
        ax.set_yscale("log")
        ax.set_ylabel(f"held-out perplexity, C = {c}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def calibration_figure(rows: list[dict], title: str = ""):
    """Per order: perplexity ratio against the reference calibration (paired 95% interval) for every condition,
    labelled with the Jaccard of the pairs."""
    orders = list(dict.fromkeys(r["order"] for r in rows))
    fig, axes = plt.subplots(1, len(orders), figsize=(7 * len(orders), 4.6), constrained_layout=True, squeeze=False)
    for ax, order in zip(axes[0], orders):
        rs = [r for r in rows if r["order"] == order and "vs_reference_ratio" in r]
        labels = [f"{r['factor']}: {r['domain']} {r['texts']}x{r['tokens_used']}" for r in rs]
        y = np.array([r["vs_reference_ratio"] for r in rs])
        lo = np.array([r["vs_reference_ci95"][0] for r in rs])
        hi = np.array([r["vs_reference_ci95"][1] for r in rs])
        x = np.arange(len(rs))
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, color=ORDER_COLORS.get(order, "k"))
        for xi, r in zip(x, rs):
            ax.annotate(
                f"J={r['jaccard_vs_reference']:.2f}",
                (xi, r["vs_reference_ratio"]),
                fontsize=7,
                textcoords="offset points",
                xytext=(4, 4),
            )
        ax.axhline(1, color="k", ls=":", lw=1)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("perplexity / reference calibration's (paired 95% CI)")
        ax.set_title(order, fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def cost_figure(by_c: list[dict], costs: list[dict], cfg, title: str = ""):
    """Search seconds against C per order (apportioned by layer-forwards), and against the number of calibration
    texts and tokens per text (the dissimilar order at the default T)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    for order in dict.fromkeys(r["order"] for r in by_c):
        rs = [r for r in by_c if r["order"] == order]
        axes[0].plot(
            [r["C"] for r in rs],
            [r["seconds"] for r in rs],
            marker=ORDER_MARKERS.get(order, "o"),
            color=ORDER_COLORS.get(order, "k"),
            label=order,
        )
    axes[0].set_xlabel("C (layers replaced)")
    axes[0].set_ylabel("search seconds up to C")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    base = [
        r
        for r in costs
        if r["order"] == "dissimilar"
        and r["threshold"] == cfg.threshold
        and r["metric"] == cfg.metric
        and r["domain"] == "news"
        and r["target"] == cfg.calibration_c
        and r["set_index"] == 0
    ]
    for x, fixed, label in (
        ("texts", ("tokens", cfg.max_tokens), "texts"),
        ("tokens_used", ("texts", cfg.samples), "tokens per text"),
    ):
        rs = sorted((r for r in base if r[fixed[0]] == fixed[1]), key=lambda r: r[x])
        if rs:
            mult = [r[x] * (r["tokens_used"] if x == "texts" else r["texts"]) for r in rs]
            axes[1].plot(mult, [r["search_seconds"] for r in rs], marker="o", label=f"varying {label}")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("calibration tokens (texts x tokens per text)")
    axes[1].set_ylabel(f"search seconds to C = {cfg.calibration_c}")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def conclusion(
    model: str, num_layers: int, cfg, protocol: str, sections: dict, accounting: dict, plan: dict, minutes: float
) -> str:
    """The notebook's conclusion: each section's computed verdict and its supporting lines."""
    lines = [
        f"**Computed from this run** ({model}, {num_layers} layers; calibration {cfg.samples} texts x "
        f"{cfg.max_tokens} tokens unless varied; perplexity on {protocol}).",
        "",
    ]
    titles = {
        "threshold": "1 · Threshold T",
        "metric": "2 · Metric",
        "depth": "3 · Depth-matched control",
        "calibration": "4 · Calibration sensitivity",
        "cost": "5 · Search cost",
    }
    for name, title in titles.items():
        if sections.get(name):
            lines += [f"### {title}", "", *sections[name], ""]
    lines.append(
        f"**Run.** {accounting['distinct_strategies']} distinct strategies scored ({accounting['fresh']} fresh, "
        f"{accounting['from_store']} from the shared store; planned: {plan['expected_distinct_total']} expected, "
        f"{sum(plan['points'].values())} strategy points before de-duplication); notebook time {minutes:.1f} min."
    )
    return "\n".join(lines)


def depth_cost_figure(rows: list[dict], cfg, title: str = ""):
    """Search cost against depth on random-weight models (kvshare.experiments.search_cost): layer-forwards per
    order beside the official cost model's (two full forwards per candidate), and seconds."""
    from ..search_cost import num_shared_for

    depth = [
        r
        for r in rows
        if r["texts"] == cfg.base_texts and r["num_shared"] == num_shared_for(cfg.base_rate, r["layers"])
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    for order in dict.fromkeys(r["order"] for r in depth):
        rs = sorted((r for r in depth if r["order"] == order), key=lambda r: r["layers"])
        style = {"marker": ORDER_MARKERS.get(order, "o"), "color": ORDER_COLORS.get(order, "k")}
        axes[0].plot([r["layers"] for r in rs], [r["layer_forwards"] for r in rs], label=f"kvshare {order}", **style)
        axes[1].plot([r["layers"] for r in rs], [r["seconds"] for r in rs], label=f"kvshare {order}", **style)
        if order != "best":
            axes[0].plot(
                [r["layers"] for r in rs],
                [r["official_layer_forwards"] for r in rs],
                ls="--",
                label=f"official cost model ({order}: 2 full forwards per candidate)",
                **style,
            )
    for ax, ylabel in ((axes[0], "layer-forwards"), (axes[1], "search seconds")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"layers L (random weights, width {cfg.hidden}; C = {cfg.base_rate:g} L, {cfg.base_texts} texts)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
