"""Notebook 09's figure and report text: RULER accuracy against context length for every method, KV bytes and decode
speed at each length, and the computed verdict."""

from __future__ import annotations

import matplotlib.pyplot as plt

STYLE = {
    "full": ("#000000", "*"),
    "kvsharer-dissimilar": ("#d62728", "o"),
    "kvsharer-similar": ("#1f77b4", "s"),
    "kvsharer-best": ("#17becf", "X"),
    "streamingllm": ("#ff7f0e", "<"),
    "h2o": ("#8c564b", ">"),
    "pyramidinfer": ("#e377c2", "P"),
    "minicache": ("#2ca02c", "D"),
    "simlayerkv": ("#9467bd", "v"),
}


def figure(curve_rows: list[dict], cost_rows: list[dict], title: str = ""):
    """Left: accuracy (tasks pooled) against context length, 95% intervals (Wilson or bootstrap); KVSharer's 12.5%
    points dashed. Middle: measured KV bytes / full cache at each length. Right: decode tokens/s at each length."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    ax = axes[0]
    labels = list(dict.fromkeys(r["label"] for r in curve_rows))
    spread = {lab: (i - (len(labels) - 1) / 2) * 0.012 for i, lab in enumerate(labels)}  # offsets: bars stay apart
    for lab in labels:
        mine = sorted((r for r in curve_rows if r["label"] == lab), key=lambda r: r["length"])
        color, marker = STYLE[mine[0]["family"]]
        x = [r["length"] * (1 + spread[lab]) for r in mine]
        y = [r["acc"] for r in mine]
        err = [[r["acc"] - r["lo"] for r in mine], [r["hi"] - r["acc"] for r in mine]]
        dashed = mine[0]["rate"] is not None and mine[0]["rate"] < max(
            (r["rate"] for r in curve_rows if r["rate"] is not None), default=0
        )
        ax.errorbar(
            x, y, yerr=err, color=color, marker=marker, ls="--" if dashed else "-", capsize=3, lw=1.3, label=lab
        )
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in curve_rows})
    ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens, RULER's max_seq_length)")
    ax.set_ylabel("RULER accuracy (string match), 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("accuracy vs context length")
    for ax, key, ylabel in ((axes[1], "kv_ratio", "KV bytes / full cache"), (axes[2], "decode_tps", "decode tokens/s")):
        for lab in dict.fromkeys(r["label"] for r in cost_rows):
            mine = sorted((r for r in cost_rows if r["label"] == lab), key=lambda r: r["length"])
            color, marker = STYLE[mine[0]["family"]]
            ax.plot([r["length"] for r in mine], [r[key] for r in mine], color=color, marker=marker, lw=1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_xlabel("context length")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_title("measured KV bytes (kvshare.bench)")
    axes[2].set_title("decode speed (batch 1, prompt = length - 128)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def markdown_table(curve_rows: list[dict], cost_rows: list[dict]) -> str:
    """One row per (method, length): accuracy with interval, paired difference to the full model, bytes, speed."""
    cost = {(r["label"], r["length"]): r for r in cost_rows}
    out = [
        "| method | length | accuracy [95%] | n | vs full (paired) | KV bytes | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in curve_rows:
        c = cost.get((r["label"], r["length"]))
        if c is None and r["family"].startswith("kvsharer"):  # same C as the dissimilar order: same bytes and work
            same = ("kvsharer-dissimilar", r["rate"], r["length"])
            c = next((x for x in cost_rows if (x["family"], x["rate"], x["length"]) == same), None)
        diff = "" if r["diff"] is None or r["family"] == "full" else f"{r['diff']:+.2f} ± {r['diff_se']:.2f}"
        kv = "" if c is None else f"{100 * c['kv_ratio']:.1f}%"
        tps = "" if c is None else f"{c['decode_tps']:.1f}"
        out.append(
            f"| {r['label']} | {r['length']} | {r['acc']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] | {r['n']} | {diff} | "
            f"{kv} | {tps} |"
        )
    return "\n".join(out)


def conclusion(
    verdict: dict,
    curve_rows: list[dict],
    screen_rows: list[dict],
    cost_rows: list[dict],
    cfg: dict,
    record: dict,
    estimate: dict,
    model: str,
    num_layers: int,
) -> str:
    """The computed verdict (Markdown): protocol, the screen, each method against the full model, the best method
    at the target bytes, costs, and what the budget left out."""
    lengths = ", ".join(f"{n:,}" for n in cfg["lengths"])
    lines = [
        f"# Notebook 09: long context, RULER at {lengths} tokens ({model}, {num_layers} layers)",
        "",
        _protocol_paragraph(cfg, estimate),
        "",
    ]
    lines += _screen_lines(screen_rows, cfg)
    lines += ["", _comparable_bytes_paragraph(cfg, record), ""]
    lines += _against_full_lines(verdict, cfg)
    lines += _verdict_lines(verdict, record)
    if cost_rows:
        lines += [_cost_paragraph(cost_rows), ""]
    lines.append(
        "**Left out.** 8k contexts (the 45-minute budget does not allow them), RULER's essay haystacks (they "
        "need a download), and more examples per length."
    )
    return "\n".join(lines) + "\n"


def _protocol_paragraph(cfg: dict, estimate: dict) -> str:
    """The tasks, how answers are generated and scored, the examples per length, and the time they imply."""
    counts = ", ".join(f"{n} at {length:,}" for n, length in zip(cfg["samples"], cfg["lengths"]))
    return (
        f"**Protocol.** lm-eval's generated RULER tasks ({', '.join(cfg['tasks'])}) in the model's own tokens, through "
        "`kvshare eval --suite long`: the answer is generated greedily from each method's cache and scored by RULER's "
        f"string match. Examples per task: {counts} (every method on the same examples, so differences to the full "
        "model are paired per example). Intervals are 95%: Wilson for 0/1 scores, bootstrap otherwise. "
        f"These counts were chosen so that the full run fits in 45 minutes on 2 CPU cores: the settings imply "
        f"{estimate['total_s'] / 60:.0f} min of one core's CPU time (sweep {estimate['sweep_s'] / 60:.0f}, screen "
        f"{estimate['screen_s'] / 60:.0f}, cost {estimate['bench_s'] / 60:.0f}, searches and data "
        f"{estimate['setup_s'] / 60:.0f}), from measured per-example costs (about 9, 16 and 35 s of one core at 1k, 2k "
        "and 4k tokens; the notebook runs two threads on the 2 cores); with so few examples per length only large "
        "differences can be significant."
    )


def _screen_lines(screen_rows: list[dict], cfg: dict) -> list[str]:
    """The full model alone on every candidate task: a task it fails cannot show what compression loses."""
    lines = [
        f"**Screen** (the full model alone at {cfg['screen_length']:,} tokens, {cfg['screen_samples']} examples each):"
    ]
    for r in screen_rows:
        lines.append(f"- {r['ruler_task']}: {r['value']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]")
    lines.append(
        f"Only the sweep's tasks ({', '.join(cfg['tasks'])}) are run for every method; a task the full model fails "
        "cannot show what compression loses."
    )
    return lines


def _comparable_bytes_paragraph(cfg: dict, record: dict) -> str:
    """How every method is placed at KVSharer's share of the bytes."""
    return (
        "**Comparable bytes.** KVSharer keeps (L - C) / L of the cache; the eviction policies and the peers are "
        f"placed at KVSharer's share at {100 * cfg['target_rate']:g}% "
        f"({100 * record['kept_share_target']:.1f}% of the bytes): "
        "a token budget of that share of each prompt, "
        + (f"MiniCache from layer {record['minicache_start_layer']}, " if "minicache_start_layer" in record else "")
        + "SimLayerKV's threshold set on calibration text. The measured ratios are in the table (kvshare.bench, random "
        "prompt tokens, RULER's longest prompt at each length: length - 128)."
    )


def _against_full_lines(verdict: dict, cfg: dict) -> list[str]:
    """Each method's pooled accuracy against the full model's, with the paired difference and its sign test."""
    lines = [
        f"**Each method against the full model** (all lengths pooled; paired difference on the same examples; a loss "
        f"is significant when the exact sign test gives p < {cfg['alpha']:g}):",
    ]
    full = next(p for p in verdict["pooled"] if p["family"] == "full")
    lines.append(f"- full model: {full['acc']:.2f} [{full['lo']:.2f}, {full['hi']:.2f}], n = {full['n']}")
    for p in verdict["pooled"]:
        if p["family"] == "full":
            continue
        sig = "a significant loss" if p["significant_loss"] else "no significant loss"
        test = "" if p["p"] is None else f" ({p['worse']} worse, {p['better']} better; sign test p = {p['p']:.3f})"
        diff = "" if p["diff"] is None else f"; Δ {p['diff']:+.2f} ± {p['diff_se']:.2f}: {sig}{test}"
        trend = "" if p["trend"] is None else f"; longest minus shortest length {p['trend']:+.2f}"
        lines.append(f"- {p['label']}: {p['acc']:.2f} [{p['lo']:.2f}, {p['hi']:.2f}]{diff}{trend}")
    lines.append("")
    return lines


def _verdict_lines(verdict: dict, record: dict) -> list[str]:
    """The best method at the target bytes, and which methods (KVSharer's points among them) lose significantly."""
    lines = []
    if verdict["best_at_target"]:
        lines.append(
            f"**At {100 * record['kept_share_target']:.1f}% of the bytes** the highest pooled accuracy is "
            f"**{verdict['best_at_target']}** (ties broken by the paired difference)."
        )
    losers = [p["label"] for p in verdict["pooled"] if p["significant_loss"]]
    kvsharer_ok = [
        p["label"] for p in verdict["pooled"] if p["family"].startswith("kvsharer") and not p["significant_loss"]
    ]
    lines.append(
        "**Verdict.** "
        + (
            f"Significant losses against the full model: {', '.join(losers)}. "
            if losers
            else "No method loses significantly. "
        )
        + (
            f"KVSharer points without a significant loss: {', '.join(kvsharer_ok)}."
            if kvsharer_ok
            else "Every KVSharer point loses significantly."
        )
    )
    lines.append("")
    return lines


def _cost_paragraph(cost_rows: list[dict]) -> str:
    """Bytes and decode speed of every method at the longest length, relative to the full model's."""
    longest = max(r["length"] for r in cost_rows)
    at = [r for r in cost_rows if r["length"] == longest]
    full_c = next(r for r in at if r["family"] == "full")
    cells = ", ".join(
        f"{r['label']} {100 * r['kv_ratio']:.0f}% / ×{r['decode_tps_ratio']:.2f}" for r in at if r is not full_c
    )
    return (
        f"**Cost at {longest:,} tokens** (bytes / decode speed relative to the full model's "
        f"{full_c['kv_bytes'] / 2**20:.1f} MiB and {full_c['decode_tps']:.1f} tokens/s): {cells}. On 2 shared CPU "
        "cores speed differences of a few percent are noise."
    )
