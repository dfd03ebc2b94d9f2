"""The logic behind notebook 04: sweeps over the benchmark, the byte accounting, and the paper check.

The paper reports, for Llama2-13B-Chat with 512 input and 2048 output tokens at 25% compression,
peak memory 51,639 MB -> 37,049 MB (72%) and 18.2 -> 30.0 tokens/s (1.65x). Reviewers asked why
memory falls by more than the compression rate and where a speed-up can come from when every
layer still reads a cache of the same length. The functions here answer with counts and
measurements: nothing below is a fitted or assumed number except where a name says "paper".

Figures and the conclusion: `kvshare.experiments.reports.memory_speed`.
"""

from __future__ import annotations

from transformers import LlamaConfig

from ..accounting import kv_token_bytes, num_shared_for
from ..bench import PRESETS, SPEED_ROUNDS, analysis, bench, budget_comparison, load_note, param_count

PAPER = {
    "model": "llama2-13b",
    "prompt_len": 512,
    "new_tokens": 2048,
    "rate": 0.25,
    "peak_mb": (51639, 37049),
    "tokens_per_s": (18.2, 30.0),
}


def rate_sweep(
    model: str,
    rates=(0.0, 0.125, 0.25, 0.375, 0.5),
    batches=(1, 4),
    prompt_len: int = 512,
    new_tokens: int = 128,
    cache: str = "dynamic",
    repeats: int = 3,
    rounds: int = SPEED_ROUNDS,
    **kwargs,
) -> list[dict]:
    """Memory and tokens/s versus compression rate (plain transformers measured in the same run), `rounds`
    alternating rounds (SPEED_ROUNDS for a figure; fewer is flagged by `figure_title`)."""
    return bench(
        model,
        rates=rates,
        batches=batches,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        cache=cache,
        repeats=repeats,
        rounds=rounds,
        **kwargs,
    )


def length_sweep(
    model: str,
    lengths=(32, 128, 512),
    rate: float = 0.25,
    batch: int = 4,
    prompt_len: int = 512,
    cache: str = "dynamic",
    repeats: int = 3,
    rounds: int = SPEED_ROUNDS,
    **kwargs,
) -> list[dict]:
    """Memory and tokens/s versus the number of generated tokens, plain next to shared (`rounds` as in
    `rate_sweep`)."""
    rows = []
    for n in lengths:
        rows += bench(
            model,
            rates=(rate,),
            batches=(batch,),
            prompt_len=prompt_len,
            new_tokens=n,
            cache=cache,
            repeats=repeats,
            rounds=rounds,
            **kwargs,
        )
    return rows


def figure_title(title: str, rows: list[dict]) -> str:
    """A speed figure's title with what its rows say about how they were taken: flagged when any run was under
    load (kvshare.bench.LOAD_LIMIT_PER_CORE) or when fewer than SPEED_ROUNDS alternating rounds stand behind it."""
    return title + load_note(rows)


def budget_sweep(
    model: str,
    budget_bytes: int,
    rates=(0.25, 0.5),
    prompt_len: int = 512,
    new_tokens: int = 128,
    cache: str = "dynamic",
    **kwargs,
) -> list[dict]:
    """Throughput at the largest batch within a peak-memory budget, plain and shared."""
    return budget_comparison(model, budget_bytes, rates, prompt_len, new_tokens, cache, **kwargs)


def byte_accounting(
    config, rates=(0.0, 0.25), batch: int = 1, prompt_len: int = 512, new_tokens: int = 2048, elem: int = 2
) -> list[dict]:
    """Where the bytes and FLOPs go over a whole decode, dynamic and static cache, each rate (exact counts).

    Decoding is memory-bound: each step reads every weight once, rewrites the cache (dynamic: all of
    it, by `torch.cat`; static: one token) and reads every layer's K/V for attention. The ratio of
    total bytes moved, plain over shared, bounds the decode speed-up sharing can give.
    """
    L = config.num_hidden_layers
    weights_read = param_count(config) * elem * new_tokens
    rows, plain_traffic = [], {}
    for cache in ("dynamic", "static"):
        for rate in rates:
            C = num_shared_for(rate, L)
            row = {"cache": cache, "rate": rate, "num_shared": C, "batch": batch}
            row.update(analysis(config, C, batch, prompt_len, new_tokens, cache, elem))
            row["kv_bytes_final"] = (L - C) * row["kv_token_bytes"] * (prompt_len + new_tokens)
            row["weights_read_bytes"] = weights_read
            # cat reads the old cache and writes the new one; a static write touches one token
            row["bytes_moved"] = weights_read + 2 * row["cache_copy_bytes"] + row["attn_read_bytes"]
            plain_traffic.setdefault(cache, row["bytes_moved"])
            row["speedup_bound"] = plain_traffic[cache] / row["bytes_moved"]
            rows.append(row)
    return rows


def paper_memory_check(
    preset: str = PAPER["model"],
    rate: float = PAPER["rate"],
    prompt_len: int = PAPER["prompt_len"],
    new_tokens: int = PAPER["new_tokens"],
    paper_peak_mb=PAPER["peak_mb"],
    elem: int = 2,
) -> dict:
    """What fraction of peak memory KV sharing can remove, from the model's shapes.

    Weights and the KV cache are exact byte counts for fp16. Whatever else the paper's baseline
    peak holds (activations, allocator slack) is `other`; only the KV cache shrinks with sharing.
    The largest batch consistent with the paper's baseline gives the *most* the KV cache could
    account for, hence an upper bound on the saving.
    """
    cfg = LlamaConfig(**PRESETS[preset])
    L, C = cfg.num_hidden_layers, num_shared_for(rate, cfg.num_hidden_layers)
    params = param_count(cfg)
    weights = params * elem
    kv_per_seq = L * kv_token_bytes(cfg, elem) * (prompt_len + new_tokens)
    base = paper_peak_mb[0] * 2**20  # MB as reported, read as MiB (the larger reading: generous to the paper)
    max_batch = int((base - weights) // kv_per_seq)
    kv = max_batch * kv_per_seq
    other = base - weights - kv
    best_shared = weights + other + kv * (L - C) / L
    return {
        "preset": preset,
        "num_layers": L,
        "num_shared": C,
        "parameters": params,
        "weights_bytes": weights,
        "kv_bytes_per_sequence": kv_per_seq,
        "paper_peak_bytes": base,
        "max_batch_in_paper_peak": max_batch,
        "kv_bytes_at_max_batch": kv,
        "other_bytes": other,
        "predicted_peak_ratio_lower_bound": best_shared / base,
        "paper_peak_ratio": paper_peak_mb[1] / paper_peak_mb[0],
        "kv_only_ratio": (L - C) / L,
    }
