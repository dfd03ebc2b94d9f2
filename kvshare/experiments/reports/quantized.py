"""Notebook 06's report: the tables in Markdown (beside the rebuttal's numbers), the figure and the conclusion,
computed from the rows of `kvshare.experiments.quantized`."""

from __future__ import annotations

import math
import statistics

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator

from ...metrics import clearly_different, z_score
from ..quantized import REBUTTAL, wide_table


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| weights | KV cache | C | perplexity | × C=0 fp-KV | ΔNLL (paired) | KV bytes | predicted | KV ratio "
        "| decode tok/s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['weights']} | {r['kv']} | {r['num_shared']} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} | "
            f"{r.get('ppl_ratio', float('nan')):.3f} | {r.get('nll_diff', float('nan')):+.3f} "
            f"± {r.get('nll_diff_se', float('nan')):.3f} | "
            f"{r['kv_bytes']:,} | {r['kv_bytes_predicted']:,} | {r.get('kv_ratio', float('nan')):.4f} | "
            f"{r['decode_tps']:.1f} |"
        )
    return "\n".join(lines)


def wide_markdown(rows: list[dict], grid) -> str:
    cols = [f"C={c}" for c in grid]
    lines = ["| weights | KV cache | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines.append(
        f"| {REBUTTAL['model']} (rebuttal) | fp16 | "
        + " | ".join(f"{REBUTTAL['ppl'][c]:.2f}" if c in REBUTTAL["ppl"] else "" for c in grid)
        + " |"
    )
    for w in wide_table(rows):
        lines.append(
            f"| {w['weights']} | {w['kv cache']} | " + " | ".join(f"{w[c]:.2f}" if c in w else "—" for c in cols) + " |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# figure and conclusion
# ------------------------------------------------------------------------------------------------
STYLE_W = {"fp32 weights": ("#1f77b4", "-"), "GPTQ 4-bit weights": ("#d62728", "--")}
STYLE_KV = {"unquantized": "o", "int8": "s", "int4": "^"}


def figure(rows: list[dict], title: str = ""):
    """Left: perplexity vs K/V bytes for every (weights, KV cache) series, points at C = 0, 4, 8, 12.
    Right: perplexity relative to C = 0 (same weights and cache) vs C, with the rebuttal's trend."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.8), constrained_layout=True)
    series = {}
    for r in rows:
        series.setdefault((r["weights"], r["kv"]), []).append(r)
    for (w, kv), rs in series.items():
        rs = sorted(rs, key=lambda r: r["num_shared"])
        color, ls = STYLE_W.get(w, ("#555555", ":"))
        marker = STYLE_KV.get(kv, "x")
        x = [r["kv_bytes"] / 2**20 for r in rs]
        y = [r["ppl"] for r in rs]
        ax.plot(x, y, ls=ls, color=color, marker=marker, label=f"{w}, {kv} KV", alpha=0.9)
        for r, xi, yi in zip(rs, x, y):
            ax.annotate(
                f"C={r['num_shared']}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color
            )
        base = rs[0]["ppl"] if rs[0]["num_shared"] == 0 else float("nan")
        ax2.plot(
            [r["num_shared"] for r in rs],
            [r["ppl"] / base for r in rs],
            ls=ls,
            color=color,
            marker=marker,
            label=f"{w}, {kv} KV",
        )
    reb = REBUTTAL["ppl"]
    ax2.plot(
        list(reb),
        [v / reb[0] for v in reb.values()],
        color="black",
        lw=2,
        marker="D",
        label=f"{REBUTTAL['model']} (rebuttal)",
    )
    handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.13), frameon=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for a in (ax, ax2):
        a.set_yscale("log")
        a.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        a.yaxis.set_major_formatter(plain)
        a.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("K/V cache bytes (MiB, log scale)")
    ax.set_ylabel("perplexity (held-out BBC text, log scale)")
    ax.set_title("perplexity vs K/V bytes (points: C shared layers)")
    ax.grid(alpha=0.3, which="both")
    ax2.set_xlabel("shared layers C")
    ax2.set_ylabel("perplexity / perplexity at C = 0 (log scale)")
    ax2.set_title("trend with C, against the rebuttal's")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def protocol_line(rows: list[dict]) -> str:
    """What every cell's perplexity was scored on, and the baseline: whether it is the whole shared held-out protocol
    (kvshare.metrics.HELDOUT, whose full-model perplexity every notebook shows) or a slice of it (quick mode)."""
    from ...metrics import HELDOUT

    r = rows[0]
    tokens, windows = r.get("tokens"), r.get("windows")
    base = next(
        (x for x in rows if x["weights"] == "fp32 weights" and x["kv"] == "unquantized" and x["num_shared"] == 0),
        None,
    )
    whole = windows == HELDOUT.windows() and tokens == HELDOUT.scored_tokens()
    if whole:
        line = (
            f"**Held-out text:** every cell on the same windows: the shared held-out protocol ({HELDOUT.describe()}; "
            f"{tokens:,} tokens scored, every one after the first)."
        )
    else:
        scored = f"{tokens:,} scored tokens in {windows} windows" if tokens else "the held-out windows"
        line = (
            f"**Held-out text:** {scored}, every cell on the same windows: a slice of the shared held-out protocol "
            f"(quick mode; the full run scores {HELDOUT.scored_tokens():,} tokens)."
        )
    if base is not None:
        line += f" The full model (fp32 weights, unquantized cache, C = 0): perplexity {base['ppl']:.2f}."
    return line


def conclusion(rows: list[dict], notes: list[str], model: str) -> str:
    """Markdown computed from the rows: the trend with C per combination, against the rebuttal; what KV
    quantization and GPTQ add; whether bytes equal the prediction."""
    reb = REBUTTAL["ppl"]
    reb_ratio = {c: reb[c] / reb[0] for c in reb}
    series = {}
    for r in rows:
        series.setdefault((r["weights"], r["kv"]), {})[r["num_shared"]] = r
    lines = [
        f"**Rebuttal ({REBUTTAL['model']}):** perplexity × {reb_ratio[4]:.2f} / × {reb_ratio[8]:.2f} / "
        f"× {reb_ratio[12]:.2f} at C = 4 / 8 / 12 of {REBUTTAL['num_layers']} layers (vs C = 0).",
        "",
        protocol_line(rows),
        "",
    ]
    lines += _trend_section(rows, series, reb_ratio)
    lines += _kv_quantization_section(rows, series)
    lines += _gptq_sharing_section(rows, series)
    lines += _budget_section(rows)
    lines += _gptq_weights_section(rows, series)
    lines += ["", _bytes_line(rows)]
    if notes:
        lines += ["", "Notes: " + " ".join(notes)]
    return "\n".join(lines)


def _trend_section(rows: list[dict], series: dict, reb_ratio: dict) -> list[str]:
    """Perplexity's rise with C for each (weights, cache) series, and whether it goes the rebuttal's way."""
    lines = []
    monotone_all = True
    for (w, kv), s in series.items():
        if 0 not in s:
            continue
        ratios = {c: s[c]["ppl"] / s[0]["ppl"] for c in sorted(s)}
        mono = all(ratios[a] <= ratios[b] for a, b in zip(sorted(ratios), sorted(ratios)[1:]))
        monotone_all &= mono
        lines.append(
            f"- {w}, {kv} KV cache: perplexity {s[0]['ppl']:.2f} at C = 0 → "
            + ", ".join(f"× {ratios[c]:.2f} at C = {c}" for c in sorted(ratios) if c)
            + (" (rises with C)" if mono else " (not monotone in C)")
        )
    lines.append("")
    same = (
        "the same direction as the rebuttal's: perplexity rises with every added shared layer"
        if monotone_all
        else "not everywhere the rebuttal's monotone rise"
    )
    lines.append(f"**Trend:** {same}.")
    top = max(r["num_shared"] for r in rows)
    ours = [s[top]["ppl"] / s[0]["ppl"] for s in series.values() if 0 in s and top in s]
    if top in reb_ratio and ours:
        num_layers = rows[0]["num_layers"]
        lines.append(
            f" At C = {top} the rise here is × {min(ours):.2f}–{max(ours):.2f} against the rebuttal's "
            f"× {reb_ratio[top]:.2f} (a {num_layers}-layer 135M model against a 32-layer 7B one: "
            f"{top / num_layers:.0%} vs {top / REBUTTAL['num_layers']:.0%} of the layers)."
        )
    return lines


def _paired_quantization_cost(quantized: dict, plain: dict, grid: list[int]) -> list[tuple]:
    """(C, mean paired ΔNLL per window, its standard error, perplexity ratio) of a quantized cache against the
    unquantized one at the same weights, at every C both were scored at."""
    diffs = []
    for c in grid:
        a, b = quantized.get(c), plain.get(c)
        if a and b:
            d = np.asarray(a["window_nll"]) - np.asarray(b["window_nll"])
            se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
            diffs.append((c, float(d.mean()), se, a["ppl"] / b["ppl"]))
    return diffs


def _kv_quantization_section(rows: list[dict], series: dict) -> list[str]:
    """What int8 and int4 caches add on top of sharing, per weight set, and at which C it is beyond noise."""
    grid = sorted({r["num_shared"] for r in rows})
    lines = [
        "",
        "**KV-cache quantization on top of sharing** (paired ΔNLL against the unquantized cache at the same "
        "weights and C; mean over C):",
    ]
    for w in dict.fromkeys(r["weights"] for r in rows):
        for kv in ("int8", "int4"):
            diffs = _paired_quantization_cost(series.get((w, kv), {}), series.get((w, "unquantized"), {}), grid)
            if not diffs:
                continue
            mean_ratio = statistics.mean(x[3] for x in diffs)
            sig = [c for c, d, se, _ in diffs if se and clearly_different(z_score(d, se))]
            lines.append(
                f"- {w}, {kv}: perplexity × {mean_ratio:.3f} on average over C = "
                f"{', '.join(str(x[0]) for x in diffs)}"
                + (
                    f"; its paired 95% interval excludes the unquantized cache at C = {', '.join(map(str, sig))}"
                    if sig
                    else "; its paired 95% interval contains the unquantized cache at every C"
                )
                + "."
            )
    return lines


def _gptq_sharing_section(rows: list[dict], series: dict) -> list[str]:
    """Whether GPTQ weights change sharing's relative cost: the rise from C = 0 on each weight set."""
    fp_s = series.get(("fp32 weights", "unquantized"), {})
    gptq_label = next((r["weights"] for r in rows if r["weights"] != "fp32 weights"), None)
    g_s = series.get((gptq_label, "unquantized"), {}) if gptq_label is not None else None
    if not (fp_s and g_s and 0 in fp_s and 0 in g_s):
        return []
    grid = sorted({r["num_shared"] for r in rows})
    both = [c for c in grid if c and c in fp_s and c in g_s]
    if not both:
        return []
    last = both[-1]
    return [
        "",
        "**Sharing on GPTQ weights vs full-precision weights** (perplexity rise from C = 0, unquantized "
        "cache): "
        + "; ".join(
            f"C = {c}: × {g_s[c]['ppl'] / g_s[0]['ppl']:.2f} vs × {fp_s[c]['ppl'] / fp_s[0]['ppl']:.2f}" for c in both
        )
        + f". Ratio of the two rises at C = {last}: "
        f"{(g_s[last]['ppl'] / g_s[0]['ppl']) / (fp_s[last]['ppl'] / fp_s[0]['ppl']):.2f}.",
    ]


def _pareto_front(cells: list[dict]) -> list[dict]:
    """The cells no other cell beats on both K/V bytes and perplexity, fewest bytes first."""
    front = [
        r
        for r in cells
        if not any(
            o["kv_bytes"] <= r["kv_bytes"]
            and o["ppl"] <= r["ppl"]
            and (o["kv_bytes"] < r["kv_bytes"] or o["ppl"] < r["ppl"])
            for o in cells
        )
    ]
    return sorted(front, key=lambda r: r["kv_bytes"])


def _budget_section(rows: list[dict]) -> list[str]:
    """Which configuration is best at a given K/V budget: the Pareto front per weight set, and the cells where
    more sharing with more bits costs the same bytes as less sharing with fewer."""
    lines = [
        "",
        "**At a given K/V budget** (Pareto front of K/V bytes and perplexity, per weight set, fewest bytes first):",
    ]
    for w in dict.fromkeys(r["weights"] for r in rows):
        mine = [r for r in rows if r["weights"] == w]
        lines.append(
            f"- {w}: "
            + " → ".join(
                f"{r['kv']} C = {r['num_shared']} ({r['kv_bytes'] / 2**20:.2f} MiB, ppl {r['ppl']:.1f})"
                for r in _pareto_front(mine)
            )
            + "."
        )
        ties = [
            (a, b)
            for a in mine
            for b in mine
            if a is not b
            and a["num_shared"] > b["num_shared"]
            and a["kv_bits"] != b["kv_bits"]
            and abs(a["kv_bytes"] - b["kv_bytes"]) <= 0.01 * b["kv_bytes"]
        ]
        for a, b in ties:
            lines.append(
                f"  - equal bytes ({a['kv_bytes'] / 2**20:.2f} MiB): {a['kv']} cache with C = {a['num_shared']}, "
                f"perplexity {a['ppl']:.1f}, vs {b['kv']} cache with C = {b['num_shared']}, {b['ppl']:.1f}."
            )
    return lines


def _gptq_weights_section(rows: list[dict], series: dict) -> list[str]:
    """GPTQ weights against full-precision ones at C = 0: perplexity, stored bytes and decode speed."""
    gptq = [r for r in rows if r["weights"] != "fp32 weights"]
    if not gptq:
        return []

    def median_tps(weights: str) -> float:
        return float(np.median([r["decode_tps"] for r in rows if r["weights"] == weights]))

    fp0 = series.get(("fp32 weights", "unquantized"), {}).get(0)
    g0 = series.get((gptq[0]["weights"], "unquantized"), {}).get(0)
    if not (fp0 and g0):
        return [""]
    return [
        "",
        f"**GPTQ weights:** perplexity {g0['ppl']:.2f} vs {fp0['ppl']:.2f} at C = 0 "
        f"(× {g0['ppl'] / fp0['ppl']:.2f}), weights {g0['weight_bytes'] / 2**20:.0f} MiB vs "
        f"{fp0['weight_bytes'] / 2**20:.0f} MiB as stored; decode {median_tps(g0['weights']):.1f} vs "
        f"{median_tps(fp0['weights']):.1f} tok/s on this machine, the median over each weight set's "
        f"{len(gptq)} cells (GPTQModel's torch kernel dequantizes per forward; a cell's own figure is the "
        f"best of {len(g0.get('decode_s_all') or [0])} timed runs at batch 1 and they spread widely here: "
        "notebook 04 measures speed).",
    ]


def _bytes_line(rows: list[dict]) -> str:
    """Whether every cell's measured K/V bytes equal what sharing and the quantizer predict together."""
    if all(r["kv_bytes"] == r["kv_bytes_predicted"] for r in rows):
        return (
            "**Bytes:** in every cell the K/V bytes equal what sharing and the quantizer predict together "
            "((L − C) kept layers × per-token bytes of codes, scales and zeros)."
        )
    return "**Bytes:** some cells differ from the prediction: " + ", ".join(
        f"{r['weights']}/{r['kv']}/C={r['num_shared']}" for r in rows if r["kv_bytes"] != r["kv_bytes_predicted"]
    )
