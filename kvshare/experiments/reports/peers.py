"""Notebook 07's figure and report text: quality against measured KV bytes for every method, with decode speed
and peak memory beside it, and the computed conclusion at 75% and 50% of the bytes."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ...metrics import HELDOUT, clearly_different, clearly_higher
from ..peers import LABELS

STYLE = {
    "full": ("#000000", "*"),
    "kvsharer-dissimilar": ("#d62728", "o"),
    "kvsharer-similar": ("#1f77b4", "s"),
    "kvsharer-random": ("#7f7f7f", "^"),
    "kvsharer-best": ("#17becf", "X"),
    "minicache": ("#2ca02c", "D"),
    "simlayerkv": ("#9467bd", "v"),
    "streamingllm": ("#ff7f0e", "<"),
    "h2o": ("#8c564b", ">"),
    "pyramidinfer": ("#e377c2", "P"),
}


def _bars(y: list[float], lows: list[float], highs: list[float]) -> list[list[float]]:
    """[lower, upper] error-bar lengths for points y spanning lows..highs, never negative: a point may lie outside
    its own span (the median of the repeats against the quarters of the last repeat, or a NaN standard error),
    and matplotlib refuses a negative length; the bar then starts at the point."""
    ok = lambda v: v if v == v and v > 0 else 0.0  # noqa: E731 (NaN and negative lengths become 0)
    return [[ok(v - lo) for v, lo in zip(y, lows)], [ok(hi - v) for v, hi in zip(y, highs)]]


def _xy_err(rows: list[dict], ratio_of: dict, key: str) -> tuple[list, list, list]:
    """x (byte ratio), y and [lower, upper] error bars per point; several rows of one point (random KVSharer's
    seeds) become their mean with bars spanning the seeds' min..max, a single row gets ± its standard error."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["family"] in STYLE:
            groups.setdefault((r["family"], r["value"]), []).append(r)
    pts = []
    for k, rs in groups.items():
        ys = [r[key] for r in rs]
        y = sum(ys) / len(ys)
        if len(rs) > 1:
            lo, hi = y - min(ys), max(ys) - y
        else:
            se = rs[0].get(key + "_se")
            lo = hi = 0.0 if se is None or se != se else se
        pts.append((ratio_of[k], y, lo, hi))
    pts.sort(key=lambda p: p[0])
    y = [p[1] for p in pts]
    return (
        [p[0] for p in pts],
        y,
        _bars(y, [v - p[2] for v, p in zip(y, pts)], [v + p[3] for v, p in zip(y, pts)]),
    )


def pareto_figure(curves: list[dict], cost_rows: list[dict], suite_rows: list[dict] | None = None, title: str = ""):
    """Top left: decoded perplexity relative to the full model (paired per window) against measured KV bytes
    (fraction of the full cache), every family a line; bars one paired standard error (random KVSharer: mean of
    the seeds, bars spanning the seeds' min..max). Top middle: the offline suite's multiple-choice average at the
    evaluated points (bars: one standard error). Bottom: decode speed and the peak memory the run added, of the points
    the cost step measured. Right: the legend."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 10), gridspec_kw={"width_ratios": [1.5, 1, 0.6]})  # right: the legend
    handles = _perplexity_panel(axes[0, 0], curves)
    ratio_of = {(c["family"], c["value"]): c["kv_ratio"] for c in curves}
    _suite_panel(axes[0, 1], [r for r in suite_rows or [] if (r["family"], r["value"]) in ratio_of], ratio_of)
    by_key = {(r["family"], r["value"]): r for r in cost_rows}
    _cost_panel(axes[1, 0], curves, by_key, "decode_tps", "decode tokens/s")
    _cost_panel(axes[1, 1], curves, by_key, "peak_above_baseline_bytes", "peak memory added by the run (MiB)")
    axes[1, 0].set_title("decode speed (bars: the decode's four quarters)")
    axes[1, 1].set_title("peak memory (above the process's resident set before the run)")
    # the right column holds only the legend, over both rows
    for a in axes[:, 2]:
        a.remove()
    legend_ax = fig.add_subplot(axes[0, 0].get_gridspec()[:, 2])
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, loc="center", fontsize=9, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _perplexity_panel(ax, curves: list[dict]) -> list:
    """Each family's decoded perplexity ratio against its byte ratio; returns the lines for the shared legend."""
    handles = []
    for fam, (color, marker) in STYLE.items():
        mine = sorted((c for c in curves if c["family"] == fam), key=lambda c: c["kv_ratio"])
        if not mine:
            continue
        x = [c["kv_ratio"] for c in mine]
        y = [c["ratio_vs_full"] for c in mine]
        lo, hi = ("ratio_min", "ratio_max") if fam == "kvsharer-random" else ("ratio_lo", "ratio_hi")
        err = _bars(y, [c[lo] for c in mine], [c[hi] for c in mine])
        label = LABELS[fam] + (
            f" (mean of {mine[0]['seeds']} seeds, bars: min..max)" if fam == "kvsharer-random" else ""
        )
        handles.append(
            ax.errorbar(
                x,
                y,
                yerr=err,
                color=color,
                marker=marker,
                ms=7 if fam != "full" else 12,
                capsize=3,
                lw=1.4,
                label=label,
            )
        )
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("measured KV bytes / full cache (per sequence, end of window)")
    ax.set_ylabel("decoded perplexity / full model's (paired per window)")
    top = max(c["ratio_hi"] for c in curves)
    if top > 3:
        ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(alpha=0.3, which="both")
    ax.set_title("held-out decoded perplexity vs memory (lower is better)")
    return handles


def _suite_panel(ax, suite_rows: list[dict], ratio_of: dict):
    """The offline suite's average at the points it evaluated, placed at their byte ratios, the full model dotted."""
    for fam, (color, marker) in STYLE.items():
        mine = [r for r in suite_rows if r["family"] == fam]
        if not mine:
            continue
        x, y, e = _xy_err(mine, ratio_of, "average")
        ax.errorbar(x, y, yerr=e, color=color, marker=marker, ms=6 if fam != "full" else 11, capsize=3, lw=1.2)
    full = next((r for r in suite_rows if r["family"] == "full"), None)
    if full is not None:
        ax.axhline(full["average"], color="k", lw=0.6, ls=":")
    ax.set_xlabel("measured KV bytes / full cache")
    ax.set_ylabel("multiple-choice average (primary metric)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    n = suite_rows[0]["average_n"] if suite_rows else 0
    ax.set_title(f"offline suite ({n} examples per point)")


def _cost_panel(ax, curves: list[dict], by_key: dict, key: str, ylabel: str):
    """One cost measure (`key` of the cost rows) of each family's measured points against their byte ratios."""
    for fam, (color, marker) in STYLE.items():
        pts = sorted(
            (
                (c["kv_ratio"], by_key[(fam, c["value"])])
                for c in curves
                if c["family"] == fam and (fam, c["value"]) in by_key
            ),
            key=lambda p: p[0],
        )
        if not pts:
            continue
        scale = 2**20 if "bytes" in key else 1
        y = [row[key] / scale for _, row in pts]
        # decode speed: bars span the speeds of the decode's four quarters (the spread within the run)
        quarters = [row.get("decode_tps_quarters") if key == "decode_tps" else None for _, row in pts]
        err = (
            _bars(y, [min(q) for q in quarters], [max(q) for q in quarters])
            if all(isinstance(q, list) and q for q in quarters)
            else None
        )
        ax.errorbar(
            [p[0] for p in pts],
            y,
            yerr=err,
            color=color,
            marker=marker,
            lw=1.2,
            capsize=3,
            ms=6 if fam != "full" else 11,
        )
    ax.set_xlabel("measured KV bytes / full cache")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)  # bytes and speeds from zero: the differences are a few percent
    ax.invert_xaxis()
    ax.grid(alpha=0.3)


def _fmt_point(r: dict) -> str:
    return f"{r['label']} {r['knob']}={r['value']:g}" if r["knob"] else r["label"]


def _z_words(z: float) -> str:
    if z != z:
        return "no spread to test"
    return f"z = {z:.1f}, " + ("significant" if clearly_different(z) else "not significant") + " at 95%"


def verdict_line(verdicts: list[dict]) -> str:
    """One sentence per target byte ratio: the best method there, and where KVSharer's best point stands against
    it and against the full model (the line the README quotes)."""
    parts = []
    for v in verdicts:
        pct = f"{100 * v['target']:.0f}%"
        if v["best"] is None:
            parts.append(f"at {pct} of the bytes no method has a point")
            continue
        b = v["best"]
        text = (
            f"at {pct} of the bytes the best is {_fmt_point(b)} "
            f"(perplexity ×{b['vs_full_ppl_ratio']:.2f} the full model's)"
        )
        sharer = [r for r in v["ranking"] if r["family"].startswith("kvsharer")]
        if sharer and sharer[0] is not b:
            k = sharer[0]
            worse = "vs_best_z" in k and clearly_higher(k["vs_best_z"])
            text += f"; KVSharer's best there, {_fmt_point(k)}, is ×{k['vs_full_ppl_ratio']:.2f}" + (
                f", significantly worse (z = {k['vs_best_z']:.1f})" if worse else ", not significantly worse"
            )
        elif sharer:
            text += ", a KVSharer point"
        else:
            text += "; KVSharer has no point there"
        parts.append(text)
    return "**Verdict.** " + "; ".join(parts)[:1].upper() + "; ".join(parts)[1:] + "."


def conclusion(
    verdicts: list[dict],
    curves: list[dict],
    cost_rows: list[dict],
    cfg: dict,
    calibration: dict,
    model: str,
    num_layers: int,
    suite_rows: list[dict] | None = None,
) -> str:
    """The computed conclusion (Markdown): protocol, the best method at each target ratio with paired
    statistics against the runner-up and the full model, what the byte sweep reached, the offline suite at the
    target points, costs, and what was left out."""
    full = next(c for c in curves if c["family"] == "full")
    lines = [
        f"# Notebook 07: KVSharer and its peers at equal KV bytes ({model}, {num_layers} layers)",
        "",
        _protocol_paragraph(cfg),
        "",
        f"Full model: decoded perplexity {full['ppl']:.3f} ± {full['ppl_se']:.3f}.",
        "",
        verdict_line(verdicts),
        "",
    ]
    for v in verdicts:
        lines += _target_section(v)
    lines += _landed_section(curves, calibration)
    if suite_rows:
        lines += suite_lines(suite_rows, cfg) + [""]
    full_cost = next((r for r in cost_rows if r["family"] == "full"), None)
    if full_cost is not None:
        lines += [_cost_line(cost_rows, full_cost, cfg), ""]
    lines.append(_left_out_line(curves))
    return "\n".join(lines) + "\n"


def _protocol_paragraph(cfg: dict) -> str:
    """What was scored (windows, prefilled and decoded tokens), how each kind of method is scored, and how bytes
    are measured."""
    text_tokens = cfg["windows"] * cfg["window"]
    per_window = cfg["window"] - 1 - cfg["context"]
    scored = cfg["windows"] * per_window
    return (
        f"**Protocol.** {cfg['windows']} held-out windows of {cfg['window']} tokens ({text_tokens:,} tokens of "
        "text"
        + (
            f", the whole held-out protocol of {HELDOUT.tokens:,}"
            if text_tokens >= HELDOUT.tokens
            else f", less than the held-out protocol's {HELDOUT.tokens:,}"
        )
        + f"); in each, {cfg['context']} tokens are prefilled and the next {per_window} are scored one decoding step "
        f"at a time: **{per_window} scored tokens per window, {scored:,} in all**. Methods lossy after the prefill "
        "(MiniCache, SimLayerKV, eviction) are decoded step by step; the full model and KVSharer are causal, so the "
        "same tokens are scored from one forward per window (equal to decoding; tests/test_methods.py checks it). "
        "KV bytes are measured (`kvshare.cache_bytes` of the cache each method really builds) per sequence at the "
        "end of a window; SimLayerKV's are the bytes of the tokens each sequence keeps (its batched, rectangular "
        "cache is in the table). Differences are paired per window (kvshare.metrics.paired_difference)."
    )


def _target_section(v: dict) -> list[str]:
    """One target byte ratio: the best point against the full model and the runner-up, then every point there."""
    pct = f"{100 * v['target']:.0f}%"
    if v["best"] is None:
        return [f"**At {pct} of the bytes** (±{100 * v['tolerance']:.0f} points): no method has a point there.", ""]
    b, r2 = v["best"], v["runner_up"]
    head = (
        f"**At {pct} of the bytes** (points within ±{100 * v['tolerance']:.0f} points of it): the best is "
        f"**{_fmt_point(b)}** ({100 * b['kv_ratio']:.1f}% of the bytes, perplexity {b['ppl']:.3f} ± "
        f"{b['ppl_se']:.3f}; vs the full model ×{b['vs_full_ppl_ratio']:.3f}, 95% CI "
        f"{b['vs_full_ppl_ratio_ci95'][0]:.3f}..{b['vs_full_ppl_ratio_ci95'][1]:.3f}, "
        f"ΔNLL {b['vs_full_nll_diff']:+.4f} ± {b['vs_full_se']:.4f}, {_z_words(b['vs_full_z'])})"
    )
    if r2 is not None:
        head += (
            f"; the runner-up, {_fmt_point(r2)}, is worse by ΔNLL {r2['vs_best_nll_diff']:+.4f} ± "
            f"{r2['vs_best_se']:.4f} per window ({_z_words(r2['vs_best_z'])})."
        )
    else:
        head += "; no other method has a point there."
    lines = [head]
    for r in v["ranking"]:
        vs_full = f"vs full: ×{r['vs_full_ppl_ratio']:.3f} (ΔNLL {r['vs_full_nll_diff']:+.4f} ± {r['vs_full_se']:.4f})"
        vs_best = (
            f"; vs best: ΔNLL {r['vs_best_nll_diff']:+.4f} ± {r['vs_best_se']:.4f} ({_z_words(r['vs_best_z'])})"
            if "vs_best_nll_diff" in r
            else ""
        )
        seeds = f" (mean of {r['seeds']} seeds)" if r.get("seeds", 1) > 1 else ""
        lines.append(
            f"- {_fmt_point(r)}{seeds}: {100 * r['kv_ratio']:.1f}% bytes, perplexity {r['ppl']:.3f}; {vs_full}{vs_best}"
        )
    if v["missing"]:
        lines.append(f"- no point within the tolerance: {', '.join(v['missing'])}")
    lines.append("")
    return lines


def _landed_section(curves: list[dict], calibration: dict) -> list[str]:
    """Every family's knob values with the byte ratio and perplexity each reached (SimLayerKV's thresholds aim
    at ratios on calibration text, so they land beside them)."""
    lines = ["**Where each method landed** (measured byte ratio: perplexity):"]
    for fam in dict.fromkeys(c["family"] for c in curves):
        if fam == "full":
            continue
        mine = sorted((c for c in curves if c["family"] == fam), key=lambda c: -c["kv_ratio"])
        cells = ", ".join(
            f"{c['knob']}={c['value']:g} → {100 * c['kv_ratio']:.1f}%: {c['ppl']:.3f}"
            + (f" (seeds {c['ppl_min']:.3f}..{c['ppl_max']:.3f})" if c["seeds"] > 1 else "")
            for c in mine
        )
        lines.append(f"- {mine[0]['label']}: {cells}")
    if calibration.get("thresholds"):
        lines.append(
            f"- SimLayerKV thresholds {', '.join(f'{t:.4f}' for t in calibration['thresholds'])} were "
            f"set on calibration text (never the held-out windows) to aim at "
            f"{', '.join(f'{100 * t:.0f}%' for t in calibration['targets'])} of the bytes; laziness is "
            "decided per window, so the measured ratios differ from the aims."
        )
    lines.append("")
    return lines


def _cost_line(cost_rows: list[dict], full_cost: dict, cfg: dict) -> str:
    """The benchmark's setting, the full model's speed and peak, and the fastest, slowest and leanest points."""
    fastest = max(cost_rows, key=lambda r: r["decode_tps"])
    slowest = min(cost_rows, key=lambda r: r["decode_tps"])
    key = "peak_above_baseline_bytes" if "peak_above_baseline_bytes" in full_cost else "peak_bytes"
    ratio_key = "peak_above_baseline_ratio" if key == "peak_above_baseline_bytes" else "peak_ratio"
    lowest = min(cost_rows, key=lambda r: r[key])
    where = (
        "each in a fresh process"
        if cfg.get("bench_isolate")
        else f"in one process, {cfg.get('bench_rounds', 1)} alternating round(s), the fastest kept"
    )
    return (
        f"**Costs** (batch {cfg['bench_batch']}, prompt {cfg['bench_prompt']}, {cfg['bench_new_tokens']} new "
        f"tokens, {where}): the full model decodes {full_cost['decode_tps']:.1f} tokens/s and its run adds "
        f"{full_cost[key] / 2**20:.0f} MiB at its peak; the fastest point is {fastest['label']} "
        f"(×{fastest['decode_tps_ratio']:.2f}), the slowest {slowest['label']} "
        f"(×{slowest['decode_tps_ratio']:.2f}); the lowest peak {lowest['label']} (×{lowest[ratio_key]:.2f}). "
        "On 2 CPU cores speed differences of a few percent are within the machine's noise."
    )


def _left_out_line(curves: list[dict]) -> str:
    """What the comparison does not cover: methods not implemented, and eviction methods this run did not sweep."""
    left_out = ["xKV (cross-layer SVD) is not implemented"]
    absent = [LABELS[f] for f in ("h2o", "pyramidinfer", "streamingllm") if f not in {c["family"] for c in curves}]
    if absent:
        left_out.append(
            f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not in this run's sweep (settings "
            "`evictions`: the 45-minute budget on 2 CPU cores)"
        )
    return "**Left out.** " + "; ".join(left_out) + "."


def suite_lines(suite_rows: list[dict], cfg: dict) -> list[str]:
    """Markdown: the offline suite's multiple-choice average at the evaluated points, with paired differences against
    the full model and, for random KVSharer, the spread over its seeds."""
    full_s = next(r for r in suite_rows if r["family"] == "full")
    lines = [
        f"**Offline suite** ({full_s['average_tasks']} multiple-choice tasks, the first {cfg['suite_limit']} "
        f"examples of each: {full_s['average_n']} examples per point, the same at every point; the full model and, "
        "per method, its point nearest to each target byte ratio"
        + (f", random KVSharer at its first {cfg['suite_seeds']} seed(s)" if cfg.get("suite_seeds") else "")
        + "; lossy methods scored by decoding). Average = mean of the tasks' primary accuracies. "
        f"Full model: average {full_s['average']:.3f} ± {full_s['average_se']:.3f}. Paired differences against the "
        "full model (per-example scores):"
    ]
    for r in suite_rows:
        if r is full_s:
            continue
        lines.append(
            f"- {r['label']}: average {r['average']:.3f} ± {r['average_se']:.3f} "
            f"(Δ {r['average_diff_vs_full']:+.3f} ± {r['average_diff_vs_full_se']:.3f})"
        )
    for value in dict.fromkeys(r["value"] for r in suite_rows if r["family"] == "kvsharer-random"):
        avg = [r["average"] for r in suite_rows if r["family"] == "kvsharer-random" and r["value"] == value]
        if len(avg) > 1:
            lines.append(
                f"- KVSharer (random) C={value:g} over its {len(avg)} seeds: average {sum(avg) / len(avg):.3f} "
                f"(seeds {min(avg):.3f}..{max(avg):.3f})"
            )
    lines.append(
        f"With {full_s['average_n']} multiple-choice examples the suite separates only large losses; the held-out "
        "perplexity above is the precise comparison."
    )
    return lines


def markdown_table(rows: list[dict]) -> str:
    """The table as Markdown."""
    head = (
        "| method | knob | bytes | bytes (batched) | perplexity | ppl / full | suite average | "
        "decode tok/s | peak +MiB |\n|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]

    def num(v, fmt, se=None):
        if v is None:
            return ""
        return f"{v:{fmt}}" + ("" if se is None or se != se else f" ± {se:{fmt}}")

    for r in rows:
        spread = f" ({r['ppl_min']:.3f}..{r['ppl_max']:.3f})" if r["seeds"] > 1 else ""
        knob = f"{r['knob']}={r['value']:g}" if r["knob"] else ""
        out.append(
            f"| {r['label']} | {knob} | {100 * r['kv_ratio']:.1f}% | {100 * r['kv_ratio_batched']:.1f}% | "
            f"{r['ppl']:.3f} ± {r['ppl_se']:.3f}{spread} | {r['ppl_ratio_vs_full']:.3f} | "
            f"{num(r.get('suite_average'), '.3f', r.get('suite_average_se'))} | {num(r['decode_tps'], '.1f')} | "
            f"{num(r.get('peak_above_baseline_mib'), '.0f')} |"
        )
    return "\n".join(out)
