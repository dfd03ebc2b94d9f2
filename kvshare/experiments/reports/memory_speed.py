"""Notebook 04's conclusion (computed from the measurements, no hand-written numbers) and its figures, from the
rows of `kvshare.experiments.memory_speed`. Each figure function returns a Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..memory_speed import BOUND_GOAL, PAPER, PAPER_PEAK_RATIO, SPEED_GOAL_FROM, figure_title


def conclusion(
    cpu_rows: list[dict],
    budget_rows: list[dict],
    check: dict,
    accounting: list[dict],
    cuda: dict | None = None,
    cache_rows: list[dict] | None = None,
    speed_goals: list[dict] | None = None,
) -> str:
    """A markdown conclusion computed from the measurements (no hand-written numbers)."""
    plain = [r for r in cpu_rows if r["mode"] == "plain"]
    shared25 = [r for r in cpu_rows if r["mode"] == "shared" and abs(r["rate"] - 0.25) < 1e-9]
    zero = [r for r in cpu_rows if r["mode"] == "shared" and r["rate"] == 0]
    lines = _quarter_shared_lines(shared25[-1]) if shared25 else []
    if zero:
        lines.append(_zero_overhead_line(zero, plain))
    lines += _budget_lines(budget_rows)
    lines.append(_paper_peak_line(check))
    lines += _speedup_lines(accounting)
    lines += cache_lines(cache_rows or [])
    lines += speed_goal_lines(speed_goals or [])
    if cuda:
        lines.append(
            f"- **CUDA** ({cuda.get('gpu', 'GPU')}): see the CUDA panels; measured rows are in the results file."
        )
    else:
        lines.append("- **CUDA**: no GPU results file yet (`scripts/cuda_bench.sh` writes it when a GPU is lent).")
    if plain:
        lines += _machine_lines(cpu_rows, plain[0])
    return "\n".join(lines)


def _quarter_shared_lines(r: dict) -> list[str]:
    """KV bytes, peak memory and decode speed at 25% sharing against plain transformers."""
    return [
        f"- **KV cache** at 25% sharing ({r['num_shared']}/{r['num_layers']} layers): "
        f"{r['kv_bytes_ratio']:.4f} of the plain cache, exactly (L−C)/L = {r['kv_bytes_expected_ratio']:.4f}.",
        f"- **Peak memory on this CPU** (batch {r['batch']}): {r['peak_ratio']:.3f} of plain transformers; the "
        f"weights and the runtime dominate a {r['model']} process, so the KV saving hardly shows in the total.",
        f"- **Decode speed** at 25% (batch {r['batch']}): {r['decode_tps_ratio']:.2f}x plain "
        f"({r['decode_tps']:.1f} vs {r['decode_tps'] / r['decode_tps_ratio']:.1f} tokens/s).",
    ]


def _zero_overhead_line(zero: list[dict], plain: list[dict]) -> str:
    """Decode speed at C = 0 against plain transformers, beside the machine's own run-to-run spread."""
    worst = min(z["decode_tps_ratio"] for z in zero)
    verdict = "meets" if worst >= 0.98 else "misses"
    ratios = ", ".join(f"{z['decode_tps_ratio']:.3f} at batch {z['batch']}" for z in zero)
    text = (
        f"- **C=0 overhead**: decode tokens/s against plain transformers {ratios} ({verdict} the ≥ 0.98 "
        "target). At C=0 the model is left untouched (no hook, no patched module: the very same code runs)"
    )
    # the machine's own run-to-run spread: plain transformers against itself across measurement rounds
    spreads = [
        min(x["decode_tps"] for x in r["rounds"]) / max(x["decode_tps"] for x in r["rounds"])
        for r in plain
        if r.get("rounds")
    ]
    if spreads:
        text += (
            f", so any gap is measurement noise: plain transformers' own runs of one configuration differ by "
            f"up to {1 - min(spreads):.0%} in this run"
        )
    return text + "."


def _budget_lines(budget_rows: list[dict]) -> list[str]:
    """The largest batch of long prompts within a memory budget, shared against plain, and against the paper."""
    fits = [b for b in budget_rows if b.get("fits") and b["mode"] == "shared" and "throughput_ratio" in b]
    plain = next((b for b in budget_rows if b["mode"] == "plain"), None)
    if not plain:
        return []
    if not fits:  # a section that ran and found nothing to compare says so, rather than nothing
        found = ", ".join(
            f"{b['mode']}{'' if b['mode'] == 'plain' else ' ' + format(b['rate'], '.0%')}: "
            + (f"batch {b['batch']}" if b.get("fits") else "no batch fits")
            for b in budget_rows
        )
        return [
            f"- **Long prompts within a memory budget** ({plain['prompt_len']}-token prompts, the whole "
            f"process's peak within {plain['budget_bytes'] / 2**30:.2f} GiB): no comparison ({found}; "
            "probes in the budget file)."
        ]
    lines = [
        f"- **Long prompts within a memory budget** ({plain['prompt_len']}-token prompts, "
        f"{plain['new_tokens']} generated, the whole process's peak within "
        f"{plain['budget_bytes'] / 2**30:.2f} GiB): plain transformers fits batch {plain['batch']}"
        + ("" if plain.get("largest_proven") else " (the search stopped before proving it the largest)")
        + "."
    ]
    for b in fits:
        proven = "" if b.get("largest_proven") else " (not proven the largest: the search hit its bound)"
        lines.append(
            f"  - {b['num_shared']}/{b['num_layers']} layers shared ({100 * b['rate']:.0f}%): batch {b['batch']}"
            f"{proven}, {b['batch_ratio']:.2f}x plain's against the limit L/(L−C) = {b['ideal_ratio']:.2f}x; "
            f"peak bytes per sequence {b['per_sequence_bytes_ratio']:.3f} of plain's against (L−C)/L = "
            f"{b['kv_limit_ratio']:.3f} (K/V alone: {b['kv_per_sequence_ratio']:.3f}; the prefill's activations "
            f"do not shrink); decode throughput {b['throughput_ratio']:.2f}x "
            f"({b['throughput_tps']:.1f} vs {plain['throughput_tps']:.1f} tokens/s; with the prefill "
            f"{b['e2e_ratio']:.2f}x). Against the paper: "
            f"{'meets' if b['meets_paper_speedup'] else 'misses'} its ≥ {b['paper_min_speedup']:.1f}x "
            f"throughput; per-sequence memory {'within' if b['meets_paper_memory'] else 'above'} its "
            f"{b['paper_peak_ratio']:.0%}."
        )
    return lines


def _paper_peak_line(check: dict) -> str:
    """Whether removing the shared layers' K/V can explain the paper's 72% peak memory at its own shapes."""
    return (
        f"- **The paper's 72% peak memory** ({check['preset']}, 512+2048 tokens): fp16 weights alone are "
        f"{check['weights_bytes'] / 2**30:.1f} GiB of the "
        f"{check['paper_peak_bytes'] / 2**30:.1f} GiB baseline. Even if "
        f"everything else were KV cache (batch {check['max_batch_in_paper_peak']}), removing {check['num_shared']}/"
        f"{check['num_layers']} layers' K/V leaves at least "
        f"{check['predicted_peak_ratio_lower_bound']:.1%} of the peak. "
        f"The reported {check['paper_peak_ratio']:.1%} is below what sharing the KV cache can explain; it cannot be "
        "reproduced by KV sharing alone (allocator reuse and a different batch or measurement may explain it)."
    )


def _speedup_lines(accounting: list[dict]) -> list[str]:
    """Where a decode speed-up can come from, and its bound from the bytes moved, per cache kind."""
    lines = [
        "- **Where a speed-up can come from**: every layer still reads a cache of full length, so attention bytes "
        "per step do not fall (see the byte table). What falls is the work of k_proj/v_proj in replaced layers and, "
        "with transformers' dynamic cache, the bytes rewritten by `torch.cat` as the cache grows (quadratic in "
        "length, proportional to the kept layers). With a static cache that copy is gone, and so is most of that "
        "gain."
    ]
    for cache in ("dynamic", "static"):
        best = max(
            (a for a in accounting if a["cache"] == cache and a["num_shared"] > 0),
            key=lambda a: a["speedup_bound"],
            default=None,
        )
        if best:
            lines.append(
                f"  - {cache} cache, batch {best['batch']}, rate {best['rate']:.3f}: bytes moved per decode fall to "
                f"1/{best['speedup_bound']:.3f}, so a memory-bound decode can speed up by at most "
                f"{best['speedup_bound']:.2f}x (the paper reports "
                f"{PAPER['tokens_per_s'][1] / PAPER['tokens_per_s'][0]:.2f}x)."
            )
    return lines


def _machine_lines(cpu_rows: list[dict], plain: dict) -> list[str]:
    """The machine the timings come from, and a caution when other work loaded it meanwhile."""
    lines = [
        f"\nMeasured on: {plain.get('device_name', plain['device'])}, torch {plain['torch']}, "
        f"transformers {plain['transformers']}, {plain.get('threads', '?')} threads."
    ]
    loads = [r["load_avg_1min"] for r in cpu_rows if r.get("load_avg_1min") is not None]
    if loads and max(loads) > (plain.get("threads") or 1) + 0.5:
        lines.append(
            f"**Caution:** other work was running during these measurements (1-minute load average up to "
            f"{max(loads):.1f} on {plain.get('threads', '?')} threads): the timings and their ratios "
            "are noisy; the byte counts are exact regardless."
        )
    return lines


def cache_lines(rows: list[dict]) -> list[str]:
    """The static-cache and compiled rows' decode ratios (shared over plain with the same cache and compile)."""
    lines = []
    for compiled in (False, True):
        shared = [r for r in rows if r["mode"] == "shared" and bool(r.get("compile")) == compiled and r["rate"] > 0]
        for r in shared:
            how = "static cache, decode through torch.compile" if compiled else "static cache"
            breaks = f", {r['compile_graph_breaks']} graph breaks" if compiled and "compile_graph_breaks" in r else ""
            lines.append(
                f"- **{how}** (batch {r['batch']}, rate {r['rate']:.3f}{breaks}): decode {r['decode_tps_ratio']:.2f}x "
                f"plain ({r['decode_tps']:.1f} tokens/s), K/V bytes {r['kv_bytes_ratio']:.4f} of plain."
            )
    return lines


# ------------------------------------------------------------------------------------------------
# figures (matplotlib; each returns a Figure). Bytes and ratios of bytes start at zero; every measured value
# carries its spread (min to max over the alternating rounds; a row measured once: over the quarters of its
# decode); legends sit outside the plotting area.
# ------------------------------------------------------------------------------------------------
SPREAD_NOTE = (
    "error bars and bands: lowest to highest over the rounds (a row measured once: over its decode's quarters)"
)


def speed_goal_lines(goals: list[dict]) -> list[str]:
    """Section 5 in sentences: which method settings decode at or above the full model's speed at batch 1 from 2k
    tokens, and which reach 80% of their bytes bound at the largest batch and context."""
    if not goals:
        return []

    def name(g):
        return f"{g['method']} at {100 * g['kept_share16']:.0f}%"

    judged = [g for g in goals if g["at_or_above_full"] is not None]
    below = [g for g in judged if not g["at_or_above_full"]]
    lines = []
    if judged:
        lines.append(
            f"- **Decode speed against the context** (batch 1, from {SPEED_GOAL_FROM} tokens; shares of the 16-bit "
            f"cache's bytes): {len(judged) - len(below)} of {len(judged)} method settings decode at or above the "
            "full model's speed at every context."
        )
    if below:
        slow = ", ".join(f"{name(g)} (x{g['min_ratio_batch1']:.2f} at {g['min_ratio_context']})" for g in below)
        lines.append(f"  Below it: {slow}.")
    big = [g for g in goals if g["within_bound_goal"] is not None]
    if big:
        batch, context = big[0]["largest"]
        short = [g for g in big if not g["within_bound_goal"]]
        lines.append(
            f"- **Against the bytes bound** (batch {batch}, {context} tokens): {len(big) - len(short)} of {len(big)} "
            f"method settings reach {100 * BOUND_GOAL:.0f}% of the speed-up their bytes allow."
        )
        if short:
            lines.append(
                "  Short of it: "
                + ", ".join(f"{name(g)} (x{g['ratio_largest']:.2f} of x{g['bound_largest']:.2f})" for g in short)
                + "."
            )
    return lines


def spread(row: dict, key: str) -> tuple[float, float] | None:
    """(lowest, highest) of `key` over a row's rounds, or of the decode quarters' tokens/s for a row measured once."""
    values = [x[key] for x in row.get("rounds") or [] if x.get(key) is not None]
    if len(values) > 1:
        return min(values), max(values)
    if key in ("decode_tps", "throughput_tps") and row.get("decode_tps_quarters"):
        return min(row["decode_tps_quarters"]), max(row["decode_tps_quarters"])
    return None


def _yerr(rows: list[dict], key: str, scale: float = 1.0):
    """Asymmetric error bars (2 x n) around each row's value, zero where a row has no spread."""
    lo, hi = [], []
    for r in rows:
        v, s = r[key] / scale, spread(r, key)
        lo.append(max(0.0, v - s[0] / scale) if s else 0.0)
        hi.append(max(0.0, s[1] / scale - v) if s else 0.0)
    return np.array([lo, hi])


def bytes_unit(largest: float) -> tuple[float, str]:
    """The binary unit that keeps `largest` bytes between 1 and 1024: (divisor, name)."""
    for power, name in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if largest >= 2 ** (10 * power):
            return 2 ** (10 * power), name
    return 1, "bytes"


def _legend_below(fig, axes, ncol: int = 3, **kwargs):
    """One legend for the figure, under the panels (never over a curve or a label)."""
    handles, labels = {}, []
    for ax in np.atleast_1d(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[k] for k in labels], labels, loc="outside lower center", ncol=ncol, fontsize=8, **kwargs)


def plot_rate_sweep(rows: list[dict], title: str = ""):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    largest = max(max(r["kv_bytes"], r["peak_bytes"]) for r in rows)
    kv_scale, kv_unit = bytes_unit(max(r["kv_bytes"] for r in rows))
    peak_scale, peak_unit = bytes_unit(largest)
    for batch in sorted({r["batch"] for r in rows}):
        sub = sorted((r for r in rows if r["batch"] == batch and r["mode"] == "shared"), key=lambda r: r["rate"])
        plain = next(r for r in rows if r["batch"] == batch and r["mode"] == "plain")
        x = [100 * r["rate"] for r in sub]
        for ax, key, scale in (
            (axes[0], "kv_bytes", kv_scale),
            (axes[1], "peak_bytes", peak_scale),
            (axes[2], "decode_tps", 1),
        ):
            line = ax.errorbar(
                x,
                [r[key] / scale for r in sub],
                yerr=_yerr(sub, key, scale),
                fmt="o-",
                capsize=3,
                label=f"shared, batch {batch}",
            )
            color = line[0].get_color()
            ax.axhline(plain[key] / scale, ls=":", color=color, label=f"plain transformers, batch {batch}")
            band = spread(plain, key)
            if band:
                ax.axhspan(band[0] / scale, band[1] / scale, color=color, alpha=0.12, lw=0)
    for ax, label in zip(
        axes, [f"KV cache ({kv_unit})", f"peak memory ({peak_unit}, whole process)", "decode tokens/s"]
    ):
        ax.set_xlabel("replaced layers (% of L)")
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # from zero, with room above the highest line
    _legend_below(fig, axes, ncol=4)
    title = figure_title(title, rows)  # flagged when taken under load or with fewer than 5 rounds
    fig.suptitle((title + "\n" if title else "") + SPREAD_NOTE, fontsize=10)
    return fig


def plot_length_sweep(rows: list[dict], title: str = ""):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
    kv_scale, kv_unit = bytes_unit(max(r["kv_bytes"] for r in rows))
    for mode, style in (("plain", "s--"), ("shared", "o-")):
        sub = sorted(
            (r for r in rows if r["mode"] == mode and (mode == "plain" or r["rate"] > 0)), key=lambda r: r["new_tokens"]
        )
        label = "plain transformers" if mode == "plain" else f"shared ({100 * sub[0]['rate']:.1f}%)" if sub else mode
        x = [r["new_tokens"] for r in sub]
        axes[0].plot(x, [r["kv_bytes"] / kv_scale for r in sub], style, label=label)  # exact: no spread
        axes[1].errorbar(
            x, [r["decode_tps"] for r in sub], yerr=_yerr(sub, "decode_tps"), fmt=style, capsize=3, label=label
        )
    for ax, label in zip(axes, [f"KV cache at the end ({kv_unit})", "decode tokens/s"]):
        ax.set_xlabel("generated tokens")
        ax.set_xscale("log", base=2)
        ax.set_ylabel(label)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # from zero, with room above the highest line
    _legend_below(fig, axes, ncol=2)
    title = figure_title(title, rows)  # flagged when taken under load or with fewer than 5 rounds
    fig.suptitle((title + "\n" if title else "") + SPREAD_NOTE, fontsize=10)
    return fig


def plot_cache(rows: list[dict], dynamic_rows: list[dict] = (), title: str = ""):
    """Decode tokens/s of plain and shared with the dynamic cache, the static cache and the static cache decoded
    through torch.compile (same batch and lengths), with their spreads."""
    batch = max(r["batch"] for r in rows)
    groups = [("dynamic", False), ("static", False), ("static", True)]
    picked = {}
    for r in [*dynamic_rows, *rows]:
        if r["batch"] != batch or (r["mode"] == "shared" and r["rate"] == 0):
            continue
        picked[(r["cache"], bool(r.get("compile")), r["mode"], r["rate"])] = r
    fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
    series = sorted({(k[2], k[3]) for k in picked}, key=lambda m: (m[0] != "plain", m[1]))
    width = 0.8 / max(1, len(series))
    shown = [g for g in groups if any(k[:2] == g for k in picked)]
    for j, (mode, rate) in enumerate(series):
        xs, ys, rs = [], [], []
        for i, g in enumerate(shown):
            r = picked.get((*g, mode, rate))
            if r:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(r["decode_tps"])
                rs.append(r)
        label = "plain transformers" if mode == "plain" else f"shared ({100 * rate:.0f}%)"
        ax.bar(xs, ys, width, yerr=_yerr(rs, "decode_tps"), capsize=3, label=label)
    names = {
        ("dynamic", False): "dynamic cache",
        ("static", False): "static cache",
        ("static", True): "static cache\n+ torch.compile",
    }
    ax.set_xticks(range(len(shown)), [names[g] for g in shown])
    ax.set_ylabel(f"decode tokens/s (batch {batch})")
    ax.set_ylim(bottom=0)
    fig.legend(loc="outside lower center", ncol=len(series), fontsize=8)
    title = figure_title(title, [*rows, *dynamic_rows])
    fig.suptitle((title + "\n" if title else "") + SPREAD_NOTE, fontsize=10)
    return fig


def plot_budget(rows: list[dict], title: str = ""):
    """The long-prompt budget: largest batch, peak bytes per sequence and throughput, plain and shared, against
    the limits of KV sharing ((L−C)/L of the bytes, L/(L−C) of the batch and throughput) and the paper's claims."""
    fits = [r for r in rows if r.get("fits")]
    plain = next((r for r in fits if r["mode"] == "plain"), None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    if not fits:
        fig.suptitle((title + "\n" if title else "") + "no batch fits the budget")
        return fig
    labels = [("plain" if r["mode"] == "plain" else f"{r['num_shared']}/{r['num_layers']} shared") for r in fits]
    x = np.arange(len(fits))
    axes[0].bar(x, [r["batch"] for r in fits], color="#888")
    for i, r in enumerate(fits):
        if not r.get("largest_proven"):
            axes[0].annotate("not proven\nthe largest", (i, r["batch"]), ha="center", va="bottom", fontsize=7)
    per_seq = [r["per_sequence_peak_bytes"] for r in fits]
    scale, unit = bytes_unit(max(per_seq))
    axes[1].bar(x, [v / scale for v in per_seq], color="#1f77b4")
    axes[2].bar(x, [r["throughput_tps"] for r in fits], yerr=_yerr(fits, "throughput_tps"), capsize=3, color="#d62728")
    if plain:
        for i, r in enumerate(fits):
            if r["mode"] == "plain":
                continue
            limit = r["num_layers"] / (r["num_layers"] - r["num_shared"])
            for ax, base, mark, label in (
                (axes[0], plain["batch"] * limit, "k--", "limit of sharing: plain × L/(L−C)"),
                (axes[1], plain["per_sequence_peak_bytes"] / scale / limit, "k--", "limit of sharing: plain × (L−C)/L"),
                (axes[1], plain["per_sequence_peak_bytes"] / scale * PAPER_PEAK_RATIO, "g:", "paper: 72% of plain"),
                (axes[2], plain["throughput_tps"] * limit, "k--", "limit of sharing: plain × L/(L−C)"),
                (axes[2], plain["throughput_tps"] * PAPER["min_speedup"], "g:", "paper: ≥ 1.3 × plain"),
            ):
                ax.plot([i - 0.4, i + 0.4], [base, base], mark, lw=1.2, label=label)
    for ax, label in zip(
        axes,
        [
            "largest batch within the budget",
            f"peak bytes per sequence ({unit}, above the fixed part)",
            "decode tokens/s (all sequences)",
        ],
    ):
        ax.set_xticks(x, labels)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.12)
    _legend_below(fig, axes, ncol=3)
    title = figure_title(title, fits)
    fig.suptitle((title + "\n" if title else "") + "error bars: lowest to highest decode quarter", fontsize=10)
    return fig


def plot_accounting(rows: list[dict], title: str = ""):
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    labels = [f"{r['cache']}\n{100 * r['rate']:.0f}%" for r in rows]
    parts = [
        ("weights read", [r["weights_read_bytes"] for r in rows]),
        ("cache rewrite (cat: read+write)", [2 * r["cache_copy_bytes"] for r in rows]),
        ("attention K/V read", [r["attn_read_bytes"] for r in rows]),
    ]
    totals = np.sum([np.array(v, dtype=float) for _, v in parts], axis=0)
    scale, unit = bytes_unit(totals.max())
    bottom = np.zeros(len(rows))
    for name, values in parts:
        v = np.array(values, dtype=float) / scale
        ax.bar(labels, v, bottom=bottom, label=name)
        bottom += v
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"≤{r['speedup_bound']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(f"bytes moved over the decode ({unit})")
    ax.set_ylim(0, bottom.max() * 1.12)  # room for the bound over the tallest bar
    fig.legend(loc="outside lower center", ncol=3, fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_cuda(cuda: dict, title: str = ""):
    """Peak memory and decode tokens/s per shape from the CUDA results file."""
    runs = cuda.get("runs", {})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for shape, result in runs.items():
        rows = [r for r in result.get("rows", []) if r["batch"] == 1]
        rows.sort(key=lambda r: (r["mode"] != "plain", r["rate"]))
        labels = [shape + "\n" + ("plain" if r["mode"] == "plain" else f"{100 * r['rate']:.0f}%") for r in rows]
        axes[0].bar(labels, [r["peak_bytes"] / 2**30 for r in rows])
        axes[1].bar(labels, [r["decode_tps"] for r in rows])
    axes[0].set_ylabel("peak memory (GiB, max_memory_allocated)")
    axes[1].set_ylabel("decode tokens/s")
    fig.suptitle(title or f"CUDA: {cuda.get('gpu', '')}")
    return fig


def speed_vs_context_figure(rows: list[dict], title: str = ""):
    """The speed grid (kvshare.speed.speed_grid) as small multiples: one panel per method, decode speed against the
    full model over the context; a colour per batch size, a line style per share of the bytes, the bytes bound
    dashed and thin in the same colour and style's marker, and a line at 1.0 (the full model)."""
    from matplotlib.lines import Line2D

    names = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full"))
    shares = sorted({r["target_share"] for r in rows if r["method"] != "full"}, reverse=True)
    batches = sorted({r["batch"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    colours = {batch: f"C{i % 10}" for i, batch in enumerate(batches)}
    styles = {share: ("-", "o") if i % 2 == 0 else (":", "s") for i, share in enumerate(shares)}
    cols = min(4, max(1, len(names)))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.4 * cols, 2.9 * nrows + 0.8), layout="constrained", squeeze=False, sharey=True
    )
    for ax, name in zip(axes.flat, names):
        for batch in batches:
            for share in shares:
                sub = sorted(
                    (r for r in rows if r["method"] == name and r["target_share"] == share and r["batch"] == batch),
                    key=lambda r: r["context"],
                )
                if not sub:
                    continue
                x = [r["context"] for r in sub]
                ls, marker = styles[share]
                ax.plot(x, [r["speed_ratio"] for r in sub], ls=ls, marker=marker, ms=4, color=colours[batch])
                bound = [r["bytes_bound"] for r in sub]
                ax.plot(x, bound, ls="--", lw=0.8, alpha=0.6, marker=marker, mfc="none", ms=3, color=colours[batch])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
        ax.set_title(name, fontsize=10)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("decode speed vs full")
    for ax in axes[-1, :]:
        ax.set_xlabel("context (tokens)")
    handles = [Line2D([], [], color=colours[b], lw=2) for b in batches]
    handles += [Line2D([], [], color="grey", ls=styles[s][0], marker=styles[s][1]) for s in shares]
    handles.append(Line2D([], [], color="grey", ls="--", lw=0.8))
    labels = [f"batch {b}" for b in batches] + [f"at {100 * s:.0f}% of the bytes" for s in shares]
    labels.append("bytes bound (same colour and marker)")
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    rounds = min((len(r.get("rounds") or [r]) for r in rows if r["method"] != "full"), default=0)
    heading = title or "Decode speed against the full model"
    fig.suptitle(figure_title(f"{heading} (best of {rounds} alternating rounds)", rows), fontsize=10)
    return fig
