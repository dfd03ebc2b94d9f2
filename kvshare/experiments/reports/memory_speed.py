"""Notebook 04's conclusion (computed from the measurements, no hand-written numbers) and its figures, from the
rows of `kvshare.experiments.memory_speed`. Each figure function returns a Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..memory_speed import PAPER, figure_title


def conclusion(
    cpu_rows: list[dict], budget_rows: list[dict], check: dict, accounting: list[dict], cuda: dict | None = None
) -> str:
    """A markdown conclusion computed from the measurements (no hand-written numbers)."""
    lines = []
    plain = [r for r in cpu_rows if r["mode"] == "plain"]
    shared25 = [r for r in cpu_rows if r["mode"] == "shared" and abs(r["rate"] - 0.25) < 1e-9]
    zero = [r for r in cpu_rows if r["mode"] == "shared" and r["rate"] == 0]
    if shared25:
        r = shared25[-1]
        lines.append(
            f"- **KV cache** at 25% sharing ({r['num_shared']}/{r['num_layers']} layers): "
            f"{r['kv_bytes_ratio']:.4f} of the plain cache, exactly (L−C)/L = {r['kv_bytes_expected_ratio']:.4f}."
        )
        lines.append(
            f"- **Peak memory on this CPU** (batch {r['batch']}): {r['peak_ratio']:.3f} of plain transformers; the "
            f"weights and the runtime dominate a {r['model']} process, so the KV saving hardly shows in the total."
        )
        lines.append(
            f"- **Decode speed** at 25% (batch {r['batch']}): {r['decode_tps_ratio']:.2f}x plain "
            f"({r['decode_tps']:.1f} vs {r['decode_tps'] / r['decode_tps_ratio']:.1f} tokens/s)."
        )
    if zero:
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
        lines.append(text + ".")
    fits = [b for b in budget_rows if b.get("fits") and b["mode"] == "shared" and "throughput_ratio" in b]
    if fits:
        for b in fits:
            lines.append(
                f"- **Fixed memory budget** ({b['budget_bytes'] / 2**20:,.0f} "
                f"MiB), rate {b['rate']:.3f}: largest batch "
                f"{b['batch']} vs {round(b['batch'] / b['batch_ratio'])} "
                f"plain; throughput {b['throughput_ratio']:.2f}x, "
                f"against the KV-only limit L/(L−C) = {b['ideal_ratio']:.2f}x (gap {b['gap_to_ideal']:+.2f})."
            )
    lines.append(
        f"- **The paper's 72% peak memory** ({check['preset']}, 512+2048 tokens): fp16 weights alone are "
        f"{check['weights_bytes'] / 2**30:.1f} GiB of the "
        f"{check['paper_peak_bytes'] / 2**30:.1f} GiB baseline. Even if "
        f"everything else were KV cache (batch {check['max_batch_in_paper_peak']}), removing {check['num_shared']}/"
        f"{check['num_layers']} layers' K/V leaves at least "
        f"{check['predicted_peak_ratio_lower_bound']:.1%} of the peak. "
        f"The reported {check['paper_peak_ratio']:.1%} is below what sharing the KV cache can explain; it cannot be "
        "reproduced by KV sharing alone (allocator reuse and a different batch or measurement may explain it)."
    )
    lines.append(
        "- **Where a speed-up can come from**: every layer still reads a cache of full length, so attention bytes per "
        "step do not fall (see the byte table). What falls is the work of k_proj/v_proj in replaced layers and, with "
        "transformers' dynamic cache, the bytes rewritten by `torch.cat` as the cache grows (quadratic in length, "
        "proportional to the kept layers). With a static cache that copy is gone, and so is most of that gain."
    )
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
    if cuda:
        lines.append(
            f"- **CUDA** ({cuda.get('gpu', 'GPU')}): see the CUDA panels; measured rows are in the results file."
        )
    else:
        lines.append("- **CUDA**: no GPU results file yet (`scripts/cuda_bench.sh` writes it when a GPU is lent).")
    if plain:
        lines.append(
            f"\nMeasured on: {plain[0].get('device_name', plain[0]['device'])}, torch {plain[0]['torch']}, "
            f"transformers {plain[0]['transformers']}, {plain[0].get('threads', '?')} threads."
        )
        loads = [r["load_avg_1min"] for r in cpu_rows if r.get("load_avg_1min") is not None]
        if loads and max(loads) > (plain[0].get("threads") or 1) + 0.5:
            lines.append(
                f"**Caution:** other work was running during these measurements (1-minute load average up to "
                f"{max(loads):.1f} on {plain[0].get('threads', '?')} threads): the timings and their ratios "
                "are noisy; the byte counts are exact regardless."
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# figures (matplotlib; each returns a Figure)
# ------------------------------------------------------------------------------------------------
def plot_rate_sweep(rows: list[dict], title: str = ""):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for batch in sorted({r["batch"] for r in rows}):
        sub = sorted((r for r in rows if r["batch"] == batch and r["mode"] == "shared"), key=lambda r: r["rate"])
        plain = next(r for r in rows if r["batch"] == batch and r["mode"] == "plain")
        x = [100 * r["rate"] for r in sub]
        for ax, key, scale in (
            (axes[0], "kv_bytes", 2**20),
            (axes[1], "peak_bytes", 2**20),
            (axes[2], "decode_tps", 1),
        ):
            (line,) = ax.plot(x, [r[key] / scale for r in sub], "o-", label=f"shared, batch {batch}")
            ax.axhline(plain[key] / scale, ls=":", color=line.get_color())
    for ax, label in zip(axes, ["KV cache (MiB)", "peak memory (MiB)", "decode tokens/s"]):
        ax.set_xlabel("replaced layers (% of L)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, title="dotted: plain transformers, same batch", title_fontsize=7)
    title = figure_title(title, rows)  # flagged when taken under load or with fewer than 5 rounds
    if title:
        fig.suptitle(title)
    return fig


def plot_length_sweep(rows: list[dict], title: str = ""):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for mode, style in (("plain", "s--"), ("shared", "o-")):
        sub = sorted(
            (r for r in rows if r["mode"] == mode and (mode == "plain" or r["rate"] > 0)), key=lambda r: r["new_tokens"]
        )
        label = "plain transformers" if mode == "plain" else f"shared ({100 * sub[0]['rate']:.1f}%)" if sub else mode
        axes[0].plot([r["new_tokens"] for r in sub], [r["kv_bytes"] / 2**20 for r in sub], style, label=label)
        axes[1].plot([r["new_tokens"] for r in sub], [r["decode_tps"] for r in sub], style, label=label)
    for ax, label in zip(axes, ["KV cache at the end (MiB)", "decode tokens/s"]):
        ax.set_xlabel("generated tokens")
        ax.set_xscale("log", base=2)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    title = figure_title(title, rows)  # flagged when taken under load or with fewer than 5 rounds
    if title:
        fig.suptitle(title)
    return fig


def plot_budget(rows: list[dict], title: str = ""):
    fits = [r for r in rows if r.get("fits")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    labels = [("plain" if r["mode"] == "plain" else f"{100 * r['rate']:.1f}%") for r in fits]
    axes[0].bar(labels, [r["batch"] for r in fits], color="#888")
    axes[0].set_ylabel("largest batch within the budget")
    axes[1].bar(labels, [r["throughput_tps"] for r in fits], color="#d62728")
    plain = next((r for r in fits if r["mode"] == "plain"), None)
    if plain:
        for i, r in enumerate(fits):
            if r["mode"] != "plain":
                ideal = plain["throughput_tps"] * r["ideal_ratio"]
                axes[1].plot([i - 0.4, i + 0.4], [ideal, ideal], "k--", lw=1)
    axes[1].set_ylabel("decode tokens/s (all sequences)\ndashed: plain x L/(L-C)")
    for ax in axes:
        ax.set_xlabel("compression")
    title = figure_title(title, rows)  # flagged when taken under load or with fewer than 5 rounds
    if title:
        fig.suptitle(title)
    return fig


def plot_accounting(rows: list[dict], title: str = ""):
    fig, ax = plt.subplots(figsize=(9, 4.2), constrained_layout=True)
    labels = [f"{r['cache']}\n{100 * r['rate']:.0f}%" for r in rows]
    parts = [
        ("weights read", [r["weights_read_bytes"] for r in rows]),
        ("cache rewrite (cat: read+write)", [2 * r["cache_copy_bytes"] for r in rows]),
        ("attention K/V read", [r["attn_read_bytes"] for r in rows]),
    ]
    bottom = np.zeros(len(rows))
    for name, values in parts:
        v = np.array(values, dtype=float) / 2**40
        ax.bar(labels, v, bottom=bottom, label=name)
        bottom += v
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"≤{r['speedup_bound']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("bytes moved over the decode (TiB)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
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
