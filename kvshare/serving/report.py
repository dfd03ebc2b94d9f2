"""The serving proof's results (figures/10_serving_vllm.json, written by scripts/vllm_proof.py) as a summary,
a table and a figure. Reads the file only: notebook 10 and the proof script use it, neither needs vLLM here."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS_NAME = "10_serving_vllm.json"


def load_results(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `.venv-vllm/bin/python scripts/vllm_proof.py` "
            "(after scripts/setup_vllm.sh) to measure it"
        )
    return json.loads(path.read_text())


def other_model_note(r: dict, model: str) -> str | None:
    """None when the results `r` were measured with `model`; otherwise one line saying whose they are and how
    `model`'s would be measured, or that kvshare's vLLM plugin cannot serve its architecture (read from its
    config; an embedded model is converted once if it is not yet)."""
    if r["model"] == model:
        return None
    from .export import resolve_checkpoint
    from .mapping import ARCHITECTURES

    try:
        archs = json.loads((resolve_checkpoint(model) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        archs = []
    arch = archs[0] if archs else None
    if arch is not None and arch not in ARCHITECTURES:
        how = (
            f"kvshare's vLLM plugin serves {', '.join(ARCHITECTURES)}, not {model}'s {arch}, so there is no "
            f"serving result for {model}"
        )
    else:
        how = f"scripts/vllm_proof.py measures {r['model']} (its MODEL); set it to {model} to measure that one"
    return f"these results are {r['model']}'s, not {model}'s: {how}"


def expected_ratio(r: dict) -> float:
    return r["num_layers"] / (r["num_layers"] - r["num_shared"])


def table(r: dict) -> list[dict]:
    """One row per measured quantity: plain, shared, their ratio and what L/(L-C) predicts."""
    cap, gen, thr = r["capacity"], r["generations"], r["throughput"]
    expected = expected_ratio(r)
    return [
        {
            "quantity": f"KV capacity (tokens, {cap['kvcache_space_gib']} GiB)",
            "plain": cap["plain_tokens"],
            "shared": cap["shared_tokens"],
            "ratio": round(cap["ratio"], 4),
            "L/(L-C)": round(expected, 4),
        },
        {
            "quantity": f"KV blocks ({cap['block_size']} tokens each)",
            "plain": cap["plain_blocks"],
            "shared": cap["shared_blocks"],
            "ratio": round(cap["shared_blocks"] / cap["plain_blocks"], 4),
            "L/(L-C)": round(expected, 4),
        },
        {
            "quantity": f"throughput (tokens/s, KV {thr['kv_cache_bytes'] / 2**20:.0f} MiB)",
            "plain": round(thr["plain"]["tokens_per_second"], 1),
            "shared": round(thr["shared"]["tokens_per_second"], 1),
            "ratio": round(thr["ratio"], 4),
            "L/(L-C)": round(expected, 4),
        },
        {
            "quantity": f"greedy generations identical to transformers (of {gen['prompts']})",
            "plain": gen["plain"]["matches"],
            "shared": gen["shared"]["matches"],
            "ratio": None,
            "L/(L-C)": None,
        },
    ]


def summary_markdown(r: dict) -> str:
    cap, gen, thr = r["capacity"], r["generations"], r["throughput"]
    L, C = r["num_layers"], r["num_shared"]
    lines = [
        f"# Serving a kvshare strategy on vLLM ({r['model']}, {r['vllm']}, CPU)",
        "",
        f"Strategy: {C} of {L} layers replaced (mapping {r['mapping']}); L/(L-C) = {expected_ratio(r):.4f}.",
        "",
        f"**KV capacity** for one budget (VLLM_CPU_KVCACHE_SPACE={cap['kvcache_space_gib']} GiB): plain "
        f"{cap['plain_tokens']:,} tokens, shared {cap['shared_tokens']:,} tokens, ratio {cap['ratio']:.4f} "
        f"({cap['plain_blocks']} vs {cap['shared_blocks']} blocks of {cap['block_size']} tokens; "
        f"L/(L-C) × {cap['plain_blocks']} = {cap['expected_shared_blocks']:.1f}). In vLLM the replaced layers "
        f"{cap['replaced_layers_in_vllm']} hold no cache and project {cap['replaced_layer_projection_outputs']} "
        f"query features instead of the kept layers' {cap['kept_layer_projection_outputs']} q/k/v features.",
        "",
        f"**Greedy generations** ({gen['max_tokens']} new tokens, {gen['prompts']} chat prompts, vLLM vs kvshare's "
        f"transformers path with the same strategy): shared {gen['shared']['matches']}/{gen['prompts']} identical "
        f"({gen['shared']['match_rate']:.0%}); plain {gen['plain']['matches']}/{gen['prompts']} identical "
        f"({gen['plain']['match_rate']:.0%}). Sharing itself changed {gen['sharing_changed_generations']} of the "
        f"{gen['prompts']} transformers generations, so the comparison can tell a wrong sharing layout apart.",
    ]
    for name in ("shared", "plain"):
        for row in gen[name]["rows"]:
            if not row["match"]:
                margin = row.get("transformers_margin")
                lines.append(
                    f"- {name}, prompt {row['prompt']}: first differs at new token {row['first_difference']}"
                    f" (transformers' top-2 log-probability margin there: "
                    f"{'n/a' if margin is None else f'{margin:.3g}'})"
                )
    if gen.get("explanation"):
        lines += ["", gen["explanation"]]
    mc = thr.get("max_concurrent_requests", {})
    lines += [
        "",
        f"**Throughput** (`vllm bench throughput`, {thr['num_prompts']} random prompts of {thr['input_len']} + "
        f"{thr['output_len']} tokens, KV budget {thr['kv_cache_bytes'] / 2**20:.0f} MiB: room for "
        f"{mc.get('plain')} plain vs {mc.get('shared')} shared requests at once): plain "
        f"{thr['plain']['tokens_per_second']:.1f} tokens/s, shared {thr['shared']['tokens_per_second']:.1f} "
        f"tokens/s, ratio {thr['ratio']:.3f} beside L/(L-C) = {expected_ratio(r):.3f}{_rounds_note(thr)}.",
        "",
        f"Measured {r['measured_at']} on {r['cpu_count']} CPU cores in {r['seconds'] / 60:.0f} min by "
        f"scripts/vllm_proof.py{' (quick run)' if r.get('quick') else ''}; every number is in {RESULTS_NAME}.",
        "",
    ]
    return "\n".join(lines)


def _rounds_note(thr: dict) -> str:
    """How many alternating runs the ratio stands on (results from before the rounds had one run each)."""
    rounds = thr.get("rounds", 1)
    if rounds <= 1 or "ratio_range" not in thr:
        return " (one run of each)"
    lo, hi = thr["ratio_range"]
    return (
        f" (the median of {rounds} alternating runs of each, ratios {lo:.3f}-{hi:.3f}; each model's fastest run shown)"
    )


def figure(r: dict):
    """Capacity, generation agreement and throughput, plain vs shared, with L/(L-C) marked."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib comes with the notebooks extra only
        raise ImportError("drawing the serving figure needs matplotlib: pip install 'kvshare[notebooks]'") from e

    cap, gen, thr = r["capacity"], r["generations"], r["throughput"]
    expected = expected_ratio(r)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = ["#8c8c8c", "#1f77b4"]
    labels = ["plain", f"shared (C={r['num_shared']})"]

    ax = axes[0]
    ax.bar(labels, [cap["plain_tokens"], cap["shared_tokens"]], color=colors)
    ax.axhline(cap["plain_tokens"] * expected, color="k", ls="--", lw=1, label="plain × L/(L−C)")
    ax.set_ylim(0, 1.15 * max(cap["shared_tokens"], cap["plain_tokens"] * expected))
    ax.set_title(f"KV capacity, {cap['kvcache_space_gib']} GiB budget")
    ax.set_ylabel("tokens")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1]
    ax.bar(labels, [gen["plain"]["match_rate"], gen["shared"]["match_rate"]], color=colors)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"greedy output = transformers ({gen['prompts']} prompts)")
    ax.set_ylabel("fraction identical")

    ax = axes[2]
    ax.bar(labels, [thr["plain"]["tokens_per_second"], thr["shared"]["tokens_per_second"]], color=colors)
    ax.axhline(thr["plain"]["tokens_per_second"] * expected, color="k", ls="--", lw=1, label="plain × L/(L−C)")
    ax.set_ylim(0, 1.15 * max(thr["shared"]["tokens_per_second"], thr["plain"]["tokens_per_second"] * expected))
    ax.set_title(f"vllm bench throughput (ratio {thr['ratio']:.2f})")
    ax.set_ylabel("tokens/s")
    ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{r['model']} on {r['vllm']} (CPU): {r['num_shared']} of {r['num_layers']} layers share KV")
    fig.tight_layout()
    return fig
