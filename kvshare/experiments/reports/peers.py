"""Notebook 07's figure and report text: quality against measured KV bytes for every method, with decode speed
and peak memory beside it, and the computed conclusion at 75% and 50% of the bytes."""

from __future__ import annotations

import matplotlib.pyplot as plt

from ...metrics import HELDOUT
from ..peers import LABELS

STYLE = {
    "full": ("#000000", "*"),
    "kvsharer-dissimilar": ("#d62728", "o"),
    "kvsharer-similar": ("#1f77b4", "s"),
    "kvsharer-random": ("#7f7f7f", "^"),
    "minicache": ("#2ca02c", "D"),
    "simlayerkv": ("#9467bd", "v"),
    "streamingllm": ("#ff7f0e", "<"),
    "h2o": ("#8c564b", ">"),
    "pyramidinfer": ("#e377c2", "P"),
}


def pareto_figure(curves: list[dict], cost_rows: list[dict], title: str = ""):
    """Left: decoded perplexity relative to the full model (paired per window) against measured KV bytes
    (fraction of the full cache); bars one paired standard error (random KVSharer: mean of the seeds, bars
    spanning the seeds' min..max); middle and right: decode speed and peak memory of the same points."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    ax = axes[0]
    for fam, (color, marker) in STYLE.items():
        mine = sorted((c for c in curves if c["family"] == fam), key=lambda c: c["kv_ratio"])
        if not mine:
            continue
        x = [c["kv_ratio"] for c in mine]
        y = [c["ratio_vs_full"] for c in mine]
        lo, hi = ("ratio_min", "ratio_max") if fam == "kvsharer-random" else ("ratio_lo", "ratio_hi")
        err = [[c["ratio_vs_full"] - c[lo] for c in mine], [c[hi] - c["ratio_vs_full"] for c in mine]]
        label = LABELS[fam] + (
            f" (mean of {mine[0]['seeds']} seeds, bars: min..max)" if fam == "kvsharer-random" else ""
        )
        ax.errorbar(
            x, y, yerr=err, color=color, marker=marker, ms=7 if fam != "full" else 12, capsize=3, lw=1.4, label=label
        )
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("measured KV bytes / full cache (per sequence, end of window)")
    ax.set_ylabel("decoded perplexity / full model's (paired per window)")
    top = max(c["ratio_hi"] for c in curves)
    if top > 3:
        ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("quality vs memory (lower is better at equal bytes)")
    by_key = {(r["family"], r["value"]): r for r in cost_rows}
    for ax, key, ylabel in ((axes[1], "decode_tps", "decode tokens/s"), (axes[2], "peak_bytes", "peak memory (MiB)")):
        for fam, (color, marker) in STYLE.items():
            pts = sorted(
                (
                    (c["kv_ratio"], by_key[(fam, c["value"])][key])
                    for c in curves
                    if c["family"] == fam and (fam, c["value"]) in by_key
                ),
                key=lambda p: p[0],
            )
            if not pts:
                continue
            scale = 2**20 if key == "peak_bytes" else 1
            ax.plot(
                [p[0] for p in pts],
                [p[1] / scale for p in pts],
                color=color,
                marker=marker,
                lw=1.2,
                ms=6 if fam != "full" else 11,
            )
        ax.set_xlabel("measured KV bytes / full cache")
        ax.set_ylabel(ylabel)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[1].set_title("decode speed")
    axes[2].set_title("peak memory of the run")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fmt_point(r: dict) -> str:
    return f"{r['label']} {r['knob']}={r['value']:g}" if r["knob"] else r["label"]


def conclusion(
    verdicts: list[dict],
    curves: list[dict],
    cost_rows: list[dict],
    cfg: dict,
    calibration: dict,
    model: str,
    num_layers: int,
    z_crit: float = 2.0,
) -> str:
    """The computed conclusion (Markdown): protocol, the best method at each target ratio with paired
    statistics, what the byte sweep reached, costs, and what was left out."""
    full = next(c for c in curves if c["family"] == "full")
    scored = cfg["windows"] * (cfg["window"] - 1 - cfg["context"])
    lines = [
        f"# Notebook 07: KVSharer and its peers at equal KV bytes ({model}, {num_layers} layers)",
        "",
        f"**Protocol.** {cfg['windows']} held-out windows of {cfg['window']} tokens "
        f"({cfg['windows'] * cfg['window']:,} tokens of text); in each, {cfg['context']} tokens are prefilled and the "
        f"next {cfg['window'] - 1 - cfg['context']} are scored one decoding step at a time ({scored:,} scored tokens). "
        "Methods lossy after the prefill (MiniCache, SimLayerKV, eviction) are decoded step by step; the full model "
        "and KVSharer are causal, so the same tokens are scored from one forward per window (equal to decoding; "
        "tests/test_methods.py checks it). The context is long and the decoded part short because decoding on 2 CPU "
        "cores is slow: the whole sweep has to fit in 35 minutes"
        + (
            f"; for the same reason the text is {cfg['windows'] * cfg['window']:,} held-out tokens, less than the "
            f"held-out protocol's {HELDOUT.tokens:,}"
            if cfg["windows"] * cfg["window"] < HELDOUT.tokens
            else ""
        )
        + ". KV bytes are measured (`kvshare.cache_bytes` of "
        "the cache each method really builds) per sequence at the end of a window; SimLayerKV's are the bytes of the "
        "tokens each sequence keeps (its batched, rectangular cache is in the table). Differences are paired per "
        "window (kvshare.metrics.paired_difference).",
        "",
        f"Full model: decoded perplexity {full['ppl']:.3f} ± {full['ppl_se']:.3f}.",
        "",
    ]
    for v in verdicts:
        pct = f"{100 * v['target']:.0f}%"
        if v["best"] is None:
            lines.append(
                f"**At {pct} of the bytes** (±{100 * v['tolerance']:.0f} points): no method has a point there."
            )
            continue
        b = v["best"]
        lines.append(
            f"**At {pct} of the bytes** (points within ±{100 * v['tolerance']:.0f} points of it): the best is "
            f"**{b['label']}** ({b['knob']}={b['value']:g}, {100 * b['kv_ratio']:.1f}% of the bytes, "
            f"perplexity {b['ppl']:.3f})."
        )
        for r in v["ranking"]:
            vs_full = (
                f"vs full: ×{r['vs_full_ppl_ratio']:.3f} (ΔNLL {r['vs_full_nll_diff']:+.4f} ± {r['vs_full_se']:.4f})"
            )
            if "vs_best_nll_diff" in r:
                z = r["vs_best_z"]
                sig = "significantly worse" if z > z_crit else "not significantly different"
                vs_best = (
                    f"; vs best: ΔNLL {r['vs_best_nll_diff']:+.4f} ± {r['vs_best_se']:.4f} (z = {z:.1f}, "
                    f"{sig} at |z| > {z_crit:g})"
                )
            else:
                vs_best = ""
            lines.append(
                f"- {_fmt_point(r)}: {100 * r['kv_ratio']:.1f}% bytes, perplexity {r['ppl']:.3f}; {vs_full}{vs_best}"
            )
        if v["missing"]:
            lines.append(f"- no point within the tolerance: {', '.join(v['missing'])}")
        lines.append("")
    lines.append("**Where each method landed** (measured byte ratio: perplexity):")
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
    full_cost = next((r for r in cost_rows if r["family"] == "full"), None)
    if full_cost is not None:
        fastest = max(cost_rows, key=lambda r: r["decode_tps"])
        slowest = min(cost_rows, key=lambda r: r["decode_tps"])
        lowest = min(cost_rows, key=lambda r: r["peak_bytes"])
        lines.append(
            f"**Costs** (batch {cfg['bench_batch']}, prompt {cfg['bench_prompt']}, {cfg['bench_new_tokens']} new "
            f"tokens{', each in a fresh process' if cfg['bench_isolate'] else ''}): the full model decodes "
            f"{full_cost['decode_tps']:.1f} tokens/s with a peak of {full_cost['peak_bytes'] / 2**20:.0f} MiB; the "
            f"fastest point is {fastest['label']} (×{fastest['decode_tps_ratio']:.2f}), the slowest {slowest['label']} "
            f"(×{slowest['decode_tps_ratio']:.2f}); the lowest peak {lowest['label']} (×{lowest['peak_ratio']:.2f}). "
            "On 2 shared CPU cores speed differences of a few percent are within the machine's noise."
        )
        lines.append("")
    lines.append(
        "**Left out.** The offline multiple-choice suite and XSum ROUGE-L (kvshare.evaluation.Evaluator) "
        "are not run here: every point would need them by decoding, and the decoded perplexity sweep alone "
        "takes most of the 35-minute budget on 2 CPU cores. xKV (cross-layer SVD) is not implemented."
    )
    return "\n".join(lines) + "\n"


def markdown_table(rows: list[dict]) -> str:
    """The table as Markdown."""
    head = (
        "| method | knob | bytes | bytes (batched) | perplexity | decode tok/s | peak MiB |\n"
        "|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in rows:
        tps = "" if r["decode_tps"] is None else f"{r['decode_tps']:.1f}"
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        spread = f" ({r['ppl_min']:.3f}..{r['ppl_max']:.3f})" if r["seeds"] > 1 else ""
        knob = f"{r['knob']}={r['value']:g}" if r["knob"] else ""
        out.append(
            f"| {r['label']} | {knob} | {100 * r['kv_ratio']:.1f}% | {100 * r['kv_ratio_batched']:.1f}% | "
            f"{r['ppl']:.3f} ± {r['ppl_se']:.3f}{spread} | {tps} | {peak} |"
        )
    return "\n".join(out)
