"""Notebook 05's report: the comparison and overhead tables in Markdown, the Pareto figure and the conclusion
(whether the gains of sharing and eviction add up), from the rows of `kvshare.experiments.intra_layer`."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from ... import methods
from ...metrics import clear_sign, clearly_lower, z_score
from ...strategy import Strategy
from ..intra_layer import METHOD_LABELS, budget_methods, pareto_front


def accuracy_line(rows: list[dict], full: dict) -> str | None:
    """Markdown bullet: which configurations lose multiple-choice accuracy against the full model (paired); None
    without accuracy columns (no multiple-choice task in the settings)."""
    scored = [r for r in rows if r.get("mc_acc") is not None and r.get("mc_acc_diff") == r.get("mc_acc_diff")]
    if not scored:
        return None
    hurt = [r for r in scored if r["mc_acc_diff_se"] and clearly_lower(z_score(r["mc_acc_diff"], r["mc_acc_diff_se"]))]
    worst = min(scored, key=lambda r: r["mc_acc_diff"])
    return (
        f"- **Multiple-choice accuracy** (full model {full['mc_acc']:.3f}): "
        + (
            f"{len(hurt)} of {len(scored) - 1} configurations lose significantly (paired 95% interval below 0): "
            + ", ".join(f"{r['label']} ({r['mc_acc_diff']:+.3f})" for r in hurt)
            if hurt
            else "no configuration loses significantly (none has its paired 95% interval below 0)"
        )
        + f"; the largest drop is {worst['mc_acc_diff']:+.3f} ({worst['label']})."
    )


def conclusion(
    rows: list[dict],
    adds: list[dict],
    front: list[str],
    model: str,
    strategy: Strategy | None = None,
) -> str:
    """Markdown: whether the gains add up, computed from the table."""
    full = next(r for r in rows if r["label"] == "full")
    share = next(r for r in rows if r["label"] == "sharing")
    lines = [
        f"**{model}**: sharing {share['num_shared']} layers keeps {share['kv_ratio']:.1%} of the K/V bytes at "
        f"perplexity {share['ppl']:.2f} (full model {full['ppl']:.2f}, decoded tokens).",
        "",
    ]
    lines += _memory_lines(rows, adds, strategy)
    lines += _quality_lines(adds)
    accuracy = accuracy_line(rows, full)
    if accuracy:
        lines.append(accuracy)
    combos = [lbl for lbl in front if "+ sharing" in lbl]
    lines.append(
        f"- Pareto front (K/V bytes vs perplexity): {', '.join(front)}. "
        + (f"{len(combos)} combined configuration(s) on it." if combos else "No combined configuration is on it.")
    )
    lines += _peak_lines(rows, full)
    speed = sorted(rows, key=lambda r: -r["decode_tps_ratio"])
    lines.append(
        f"- Decode speed against the full model ranges from {speed[-1]['decode_tps_ratio']:.2f}× "
        f"({speed[-1]['label']}) to {speed[0]['decode_tps_ratio']:.2f}× ({speed[0]['label']})."
    )
    return "\n".join(lines)


def _memory_lines(rows: list[dict], adds: list[dict], strategy: Strategy | None) -> list[str]:
    """Whether every cache held the predicted bytes, where the savings multiply, and why they do not elsewhere."""
    exact = all(r["kv_bytes"] == r["kv_bytes_predicted"] for r in rows if r.get("kv_bytes_predicted") is not None)
    multiply = [a for a in adds if abs(a["kv_ratio_combined"] - a["kv_ratio_product"]) <= 0.005]
    text = (
        "- **Memory**: every cache held exactly the bytes sharing and the policy predict together"
        if exact
        else "- **Memory**: some caches did NOT hold the predicted bytes"
    )
    if multiply:
        text += "; the savings multiply for " + ", ".join(
            f"{METHOD_LABELS[a['policy']]} {a['budget']} "
            f"({a['kv_ratio_combined']:.3f} = {a['kv_ratio_policy']:.3f} × "
            f"{a['kv_ratio_sharing']:.3f})"
            for a in multiply
        )
    lines = [text + "."]
    for a in adds:
        if a in multiply:
            continue
        lines.append(
            f"  - {METHOD_LABELS[a['policy']]} {a['budget']}: combined {a['kv_ratio_combined']:.3f} vs product "
            f"{a['kv_ratio_product']:.3f} (sharing removes {1 - a['kv_ratio_combined'] / a['kv_ratio_policy']:.1%} "
            f"of the policy's bytes instead of {1 - a['kv_ratio_sharing']:.1%}){_why_not_product(a, strategy)}."
        )
    return lines


def _why_not_product(a: dict, strategy: Strategy | None) -> str:
    """Why a budget method's bytes do not multiply with sharing's: its replaced layers keep another share of it."""
    if strategy is None or a["policy"] not in budget_methods():
        return ""
    method = methods.make(a["policy"], budget=a["budget"])
    n = strategy.num_layers
    replaced = [method.layer_budget(i, n) for i in strategy.mapping]
    if not replaced:
        return ""
    return (
        f": the replaced layers ({', '.join(map(str, strategy.mapping))}) keep "
        f"{sum(replaced) / len(replaced):.1f} tokens on average under it, against {a['budget']} over all "
        "layers, so sharing removes a different share of its bytes"
    )


def _quality_lines(adds: list[dict]) -> list[str]:
    """The combinations whose quality costs add up, and those worse or better together than the parts' sum."""
    add, worse, better = [], [], []
    for a in adds:
        z = z_score(a["interaction"], a["interaction_se"]) if a["interaction_se"] else float("nan")
        name = f"{METHOD_LABELS[a['policy']]} {a['budget']}"
        text = (
            f"{name}: ΔNLL {a['nll_diff_combined']:+.3f} combined vs {a['nll_diff_sum']:+.3f} summed "
            f"(interaction {a['interaction']:+.3f} ± {a['interaction_se']:.3f})"
        )
        {1: worse, -1: better, 0: add}[clear_sign(z)].append(text)
    lines = []
    if add:
        lines.append("- **Quality costs add up** (the interaction's 95% interval contains 0): " + "; ".join(add) + ".")
    if worse:
        lines.append("- **Worse together than the sum of the parts**: " + "; ".join(worse) + ".")
    if better:
        lines.append(
            "- **Less than the sum of the parts** (the combined loss is smaller than the two losses added): "
            + "; ".join(better)
            + "."
        )
    return lines


def _peak_lines(rows: list[dict], full: dict) -> list[str]:
    """The whole run's peak memory against the full model's (reached in the prefill), and the decoding peak's."""
    peaks = sorted(rows, key=lambda r: r["peak_ratio"])
    by_prefill = full.get("decode_peak_bytes") is not None and full["peak_bytes"] > full["decode_peak_bytes"]
    lines = [
        f"- Peak memory of the whole run ranges from {peaks[0]['peak_ratio']:.2f}× ({peaks[0]['label']}) to "
        f"{peaks[-1]['peak_ratio']:.2f}× ({peaks[-1]['label']}) of "
        f"the full model's {full['peak_bytes'] / 2**20:.0f} MiB"
        + (
            f"; it is reached in the prefill ({full['peak_bytes'] / 2**20:.0f} MiB against "
            f"{full['decode_peak_bytes'] / 2**20:.0f} MiB while decoding), which every configuration runs over the "
            "whole prompt before it evicts anything."
            if by_prefill
            else "."
        )
    ]
    dec = [r for r in rows if r.get("decode_peak_minus_full_mib") is not None]
    if dec:
        low = min(dec, key=lambda r: r["decode_peak_minus_full_mib"])
        if low["decode_peak_minus_full_mib"] < 0:
            saved = (full["kv_bytes"] - low["kv_bytes"]) / 2**20
            lines.append(
                f"- While decoding, the peak falls by up to {-low['decode_peak_minus_full_mib']:.0f} MiB "
                f"({low['label']}, whose cache holds {saved:.0f} MiB less K/V than the full model's)."
            )
        else:
            lines.append("- While decoding, no configuration's peak is below the full model's.")
    return lines


# ------------------------------------------------------------------------------------------------
# figure and tables
# ------------------------------------------------------------------------------------------------
METHOD_STYLE = {
    "": ("#222222", "*"),
    "h2o": ("#1f77b4", "o"),
    "pyramidinfer": ("#2ca02c", "s"),
    "streamingllm": ("#ff7f0e", "^"),
}


def pareto_figure(rows: list[dict], title: str = ""):
    """Left: K/V bytes vs perplexity (filled: alone, hollow: with sharing; arrows: adding sharing; grey
    steps: the Pareto front). Right: decode tokens/s and peak memory above the loaded model, vs full."""
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(13, 5.6), constrained_layout=True, gridspec_kw={"width_ratios": [1.25, 1]}
    )
    xs, ys = _front_steps(rows)
    ax.plot(xs, ys, color="#bbbbbb", lw=6, alpha=0.6, zorder=0, label="Pareto front")
    _draw_configurations(ax, rows)
    ax.set_xlim(0, 1.12)  # a ratio of bytes: from zero, so the distances between methods read true
    ax.set_yscale("log")
    _label_configurations(ax, rows)
    ax.set_xlabel("K/V bytes at the end of decoding / full model")
    ax.set_ylabel("perplexity of decoded tokens (± s.e., log)")
    ax.legend(handles=_legend_handles(rows), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    ax.grid(alpha=0.3, which="both")
    _cost_bars(bx, rows)
    if title:
        fig.suptitle(title)
    return fig


def _front_steps(rows: list[dict]) -> tuple[list[float], list[float]]:
    """The Pareto front as a staircase through its points, fewest bytes first."""
    t = {r["label"]: r for r in rows}
    front = sorted((t[label] for label in pareto_front(rows)), key=lambda r: r["kv_ratio"])
    xs, ys = [], []
    for r in front:
        if xs:
            xs.append(r["kv_ratio"])
            ys.append(ys[-1])
        xs.append(r["kv_ratio"])
        ys.append(r["ppl"])
    return xs, ys


def _draw_configurations(ax, rows: list[dict]):
    """Every configuration at (bytes, perplexity): filled alone, hollow with sharing, an arrow from alone to it."""
    t = {r["label"]: r for r in rows}
    for r in rows:
        color, marker = METHOD_STYLE.get(r["policy"], ("#7f7f7f", "o"))
        if r["policy"] == "" and r["shared"]:
            color, marker = "#d62728", "D"
        ax.errorbar(
            r["kv_ratio"],
            r["ppl"],
            yerr=r["ppl_se"],
            fmt=marker,
            ms=9,
            color=color,
            mfc="white" if (r["shared"] and r["policy"]) else color,
            mew=2,
            capsize=2,
            zorder=3,
        )
        if r["shared"] and r["policy"]:
            alone = t[r["label"].replace(" + sharing", "")]
            ax.annotate(
                "",
                (r["kv_ratio"], r["ppl"]),
                (alone["kv_ratio"], alone["ppl"]),
                arrowprops=dict(arrowstyle="->", color=color, alpha=0.5),
            )


def _label_configurations(ax, rows: list[dict]):
    """Labels in axes fractions, pushed apart where points crowd (several configurations share a byte ratio), each
    joined to its point by a thin line; sets the y range they are placed in."""
    ylo, yhi = (math.log(v) for v in (min(r["ppl"] for r in rows) / 1.25, max(r["ppl"] for r in rows) * 1.3))
    ax.set_ylim(math.exp(ylo), math.exp(yhi))
    points = [(r["kv_ratio"] / 1.12, (math.log(r["ppl"]) - ylo) / (yhi - ylo), r) for r in rows]
    for (px, _, r), ly in zip(points, spread_labels([(px, py) for px, py, _ in points])):
        ax.annotate(
            r["label"].replace(" + sharing", "+S"),
            (r["kv_ratio"], r["ppl"]),
            xytext=(px + 0.025, ly),
            textcoords="axes fraction",
            fontsize=7,
            va="center",
            arrowprops=dict(arrowstyle="-", color="#999999", lw=0.5, shrinkA=0, shrinkB=3),
        )


def _legend_handles(rows: list[dict]) -> list:
    """One entry per method present, then sharing alone, a method with sharing, and the front (off the points)."""
    handles = [
        plt.Line2D([], [], color=c, marker=m, ls="", ms=8, label=METHOD_LABELS.get(p, "full"))
        for p, (c, m) in METHOD_STYLE.items()
        if any(r["policy"] == p for r in rows)
    ]
    handles.append(plt.Line2D([], [], color="#d62728", marker="D", ls="", ms=8, label="sharing 25%"))
    handles.append(plt.Line2D([], [], color="#555555", marker="o", mfc="white", ls="", ms=8, label="policy + sharing"))
    handles.append(plt.Line2D([], [], color="#bbbbbb", lw=6, alpha=0.6, label="Pareto front"))
    return handles


def _cost_bars(bx, rows: list[dict]):
    """Decode speed and the two peaks of every configuration against the full model, with the rounds' spread."""
    labels = [r["label"] for r in rows]
    y = np.arange(len(rows))
    h = 0.27
    bars = [
        (-h, "decode_tps_ratio", "#4c72b0", "decode tokens/s"),
        (0.0, "peak_ratio", "#dd8452", "peak memory (whole run)"),
        (h, "decode_peak_ratio", "#8172b3", "peak memory while decoding"),
    ]
    for shift, key, color, label in bars:
        values = [r.get(key) or 0.0 for r in rows]
        bx.barh(y + shift, values, height=h, color=color, label=label, xerr=spread_errors(rows, key), capsize=1.5)
    bx.axvline(1.0, color="k", lw=0.8)
    bx.set_yticks(y, labels, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlim(left=0)
    bx.set_xlabel("ratio to the full model (bars: the rounds' lowest..highest)")
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    bx.grid(alpha=0.3, axis="x")


def spread_labels(points: list[tuple[float, float]], gap: float = 0.04, near: float = 0.2) -> list[float]:
    """Label heights (axes fractions) for points at (x, y) in axes fractions: each label starts level with its
    point and moves up just enough to keep `gap` from the labels already placed within `near` of it in x (lowest
    points first)."""
    placed: list[tuple[float, float]] = []
    heights = [0.0] * len(points)
    for i in sorted(range(len(points)), key=lambda i: points[i][1]):
        x, y = points[i]
        for px, py in sorted(placed, key=lambda p: p[1]):
            if abs(px - x) < near and abs(py - y) < gap:
                y = py + gap
        heights[i] = y
        placed.append((x, y))
    return heights


def spread_errors(rows: list[dict], key: str):
    """xerr for bars of `key`: the distance to `key`_lo and `key`_hi (zero where the rows carry no spread)."""
    lo = [max(0.0, (r.get(key) or 0.0) - r[f"{key}_lo"]) if r.get(f"{key}_lo") is not None else 0.0 for r in rows]
    hi = [max(0.0, r[f"{key}_hi"] - (r.get(key) or 0.0)) if r.get(f"{key}_hi") is not None else 0.0 for r in rows]
    return [lo, hi]


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (ratios against the full model)."""
    head = (
        "| configuration | ppl (± s.e.) | ppl / full | MC acc (Δ vs full) | K/V MiB | K/V / full | "
        "peak MiB | peak / full | decode-phase peak − full, MiB | decode tok/s | tok/s / full |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]

    def score(r, key):
        if r.get(key) is None:
            return ""
        d = r.get(f"{key}_diff")
        return f"{r[key]:.3f}" + ("" if d is None or d != d else f" ({d:+.3f})")

    for r in rows:
        dp = r.get("decode_peak_minus_full_mib")
        lines.append(
            f"| {r['label']} | {r['ppl']:.2f} ± {r['ppl_se']:.2f} | {r['ppl_ratio']:.3f} | "
            f"{score(r, 'mc_acc')} | "
            f"{r['kv_bytes'] / 2**20:.2f} | {r['kv_ratio']:.3f} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{r['peak_ratio']:.3f} | {'' if dp is None else f'{dp:+.0f}'} | "
            f"{r['decode_tps']:.1f} | {r['decode_tps_ratio']:.3f} |"
        )
    return "\n".join(lines)


def overhead_markdown(rows: list[dict]) -> str:
    lines = [
        "| attention | policy | prefill s | of which scoring | "
        "decode ms/token | of which scoring | of which evicting |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = r["decode_s"] / max(1e-9, r["decode_step_ms"] / 1000)
        lines.append(
            f"| {r['attention']} | {METHOD_LABELS.get(r['policy'], r['policy'])} | {r['prefill_s']:.2f} | "
            f"{r['prefill_score_s']:.2f} | {r['decode_step_ms']:.1f} | {1000 * r['decode_score_s'] / steps:.1f} | "
            f"{1000 * r['decode_evict_s'] / steps:.1f} |"
        )
    return "\n".join(lines)
