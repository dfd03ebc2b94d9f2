"""The logic behind notebook 04: sweeps over the benchmark, the byte accounting, and the paper check.

The paper reports, for Llama2-13B-Chat with 512 input and 2048 output tokens at 25% compression,
peak memory 51,639 MB -> 37,049 MB (72%) and 18.2 -> 30.0 tokens/s (1.65x). Reviewers asked why
memory falls by more than the compression rate and where a speed-up can come from when every
layer still reads a cache of the same length. The functions here answer with counts and
measurements: nothing below is a fitted or assumed number except where a name says "paper".

Figures and the conclusion: `kvshare.experiments.reports.memory_speed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from ..accounting import kv_token_bytes, num_shared_for
from ..bench import (
    BUDGET_WARMUP_PROMPT,
    PRESETS,
    SPEED_ROUNDS,
    analysis,
    bench,
    budget_comparison,
    load_note,
    param_count,
)
from .scaffold import RunSettings

PAPER = {
    "model": "llama2-13b",
    "prompt_len": 512,
    "new_tokens": 2048,
    "rate": 0.25,
    "peak_mb": (51639, 37049),
    "tokens_per_s": (18.2, 30.0),
    "min_speedup": 1.3,  # the abstract: "at least 1.3 times generation acceleration"
}
#: The paper's peak-memory claim as a ratio (shared over plain): 37,049 / 51,639 MB = 71.7%, "72%".
PAPER_PEAK_RATIO = PAPER["peak_mb"][1] / PAPER["peak_mb"][0]


@dataclass
class Settings(RunSettings):
    """Everything notebook 04's numbers depend on (saved beside its figures, by `plan`, with what it predicts)."""

    prompt_len: int = 256
    new_tokens: int = 64
    rates: tuple = (0.0, 0.25, 0.5)
    batches: tuple = (4,)  # batch 4 only: the quoted configuration (the run stays under 20 min)
    lengths: tuple = (64, 128)  # the length equal to new_tokens is the rate sweep's rows
    repeats: int = 1  # timed runs per configuration and round: the rounds give the spread
    rounds: int = SPEED_ROUNDS  # every sweep measured 5 times, in alternating order: the fastest run is kept
    isolate: bool = True  # CPU peak memory needs a process per configuration
    compile_rounds: int = 1  # rounds of the torch.compile rows: compiling takes minutes per process
    budget_gib: float = 2.0  # section 4's budget
    budget: str = "the whole process's peak memory"  # what budget_gib bounds
    budget_prompt_len: int = 2048
    budget_new_tokens: int = 32
    budget_rates: tuple = (0.25, 0.5)
    budget_limit: int = 256  # largest batch tried
    budget_time_limit_s: int = 200  # no budget probe starts past this (the whole search)
    budget_max_probes: int = 4  # full runs per search (plain, 25%, 50%)
    budget_probe_repeats: int = 3  # runs of every probe (each in its own process): a batch fits if all of them fit
    # section 5, decode speed against the context (kvshare.speed): every method at each share of the bytes
    speed_contexts: tuple = (1024, 2048, 4096, 8192)
    speed_batches: tuple = (1, 4)
    speed_keep: tuple = (0.75, 0.5)
    speed_new_tokens: int = 32
    speed_methods: tuple | None = None  # None: every registered method

    QUICK = dict(
        prompt_len=64,
        new_tokens=16,
        batches=(1, 2),
        lengths=(8, 16, 32),
        rounds=1,
        isolate=False,  # quick mode skips the spawns
        compile_rounds=0,
        budget_gib=1.1,
        budget_prompt_len=128,
        budget_new_tokens=8,
        budget_limit=8,
        budget_time_limit_s=120,
        budget_max_probes=3,
        budget_probe_repeats=1,
        speed_contexts=(128,),
        speed_batches=(1,),
        speed_keep=(0.75,),
        speed_new_tokens=4,
        speed_methods=("streamingllm", "kvsharer"),
    )


settings = Settings.for_run  # notebook 04: settings(model, quick, seed, **overrides)


def plan(cfg: Settings, config, elem: int) -> dict:
    """Notebook 04's settings file: `cfg`, the largest batch per rate the accounting predicts for section 4
    (`budget_predicted_batches`) and each section's estimated seconds (`estimated_s`), for the model's `config`
    with `elem` bytes per element."""
    out = cfg.to_dict()
    out["budget_predicted_batches"] = predicted_budget_batches(
        config, int(cfg.budget_gib * 2**30), cfg.budget_rates, cfg.budget_prompt_len, cfg.budget_new_tokens, elem
    )
    out["estimated_s"] = estimate_seconds(config, out)
    return out


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
    reuse: list[dict] = (),
    **kwargs,
) -> list[dict]:
    """Memory and tokens/s versus the number of generated tokens, plain next to shared (`rounds` as in
    `rate_sweep`). A length whose plain and shared rows are already in `reuse` (e.g. the rate sweep's, same batch,
    prompt and cache) is taken from there instead of measured again."""
    rows = []
    for n in lengths:
        known = [
            r
            for r in reuse
            if (r["batch"], r["prompt_len"], r["new_tokens"], r["cache"]) == (batch, prompt_len, n, cache)
            and not r.get("compile")
            and (r["mode"] == "plain" or abs(r["rate"] - rate) < 1e-9)
        ]
        if {r["mode"] for r in known} == {"plain", "shared"}:
            rows += [dict(r, reused=True) for r in known]
            continue
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


def cache_sweep(
    model: str,
    rates=(0.0, 0.25),
    batch: int = 4,
    prompt_len: int = 512,
    new_tokens: int = 128,
    repeats: int = 3,
    rounds: int = SPEED_ROUNDS,
    compile_rounds: int = 1,
    **kwargs,
) -> list[dict]:
    """A static (preallocated) cache next to the dynamic one's rows, and the same static rows decoded through
    torch.compile as transformers' generate does (`bench(compile=True)`): plain and shared at each rate > 0.

    Compiling takes minutes per process on a small CPU, so the compiled rows get `compile_rounds` (0: left out);
    their titles say so (`load_note`). Rows carry `cache` and `compile`; the ratios are against plain with the same
    cache and compile setting."""
    shared_rates = tuple(r for r in rates if r > 0)
    same = dict(rates=shared_rates, batches=(batch,), prompt_len=prompt_len, new_tokens=new_tokens, cache="static")
    rows = bench(model, repeats=repeats, rounds=rounds, **same, **kwargs)
    if compile_rounds:
        rows += bench(model, repeats=repeats, rounds=compile_rounds, compile=True, **same, **kwargs)
    return rows


# ------------------------------------------------------------------------------------------------
# the regime sharing exists for: long prompts, batches filled up to a memory budget
# ------------------------------------------------------------------------------------------------
def budget_sweep(
    model: str,
    budget_bytes: int,
    rates=(0.25, 0.5),
    prompt_len: int = 2048,
    new_tokens: int = 32,
    cache: str = "dynamic",
    time_limit_s: float | None = 300.0,
    max_probes: int = 4,
    **kwargs,
) -> list[dict]:
    """Throughput at the largest batch within a peak-memory budget (the whole process's peak), plain and shared at
    each rate (C = num_shared_for(rate, L)): `kvshare.bench.budget_comparison`, bounded by `time_limit_s` and
    `max_probes` full runs per search. Each shared row also says how it stands against the limits of KV sharing
    and the paper's claims (`against_claims`)."""
    rows = budget_comparison(
        model,
        budget_bytes,
        rates,
        prompt_len,
        new_tokens,
        cache,
        time_limit_s=time_limit_s,
        max_probes=max_probes,
        **kwargs,
    )
    return against_claims(rows)


def against_claims(rows: list[dict]) -> list[dict]:
    """Shared budget rows with the paper's claims beside the measurement: its 72% peak memory (at the same batch:
    `peak_ratio`, here at the larger shared batch, so the per-sequence bytes are the comparable number) and its
    at-least-1.3x throughput."""
    for r in rows:
        if r["mode"] == "shared":
            r["paper_peak_ratio"] = PAPER_PEAK_RATIO
            r["paper_min_speedup"] = PAPER["min_speedup"]
            if "throughput_ratio" in r:
                r["meets_paper_speedup"] = r["throughput_ratio"] >= PAPER["min_speedup"]
                r["meets_paper_memory"] = r["per_sequence_bytes_ratio"] <= PAPER_PEAK_RATIO
    return rows


def predicted_budget_batches(
    config, budget_bytes: int, rates, prompt_len, new_tokens, elem, fixed_bytes: int | None = None
) -> dict:
    """The largest batch per rate the accounting predicts (before any probe): the budget less the fixed bytes
    (None: the weights plus `COST["runtime_bytes"]`) over the bytes one sequence adds
    (`kvshare.bench.sequence_bytes`)."""
    from ..bench import sequence_bytes

    if fixed_bytes is None:
        fixed_bytes = param_count(config) * elem + COST["runtime_bytes"]
    L = config.num_hidden_layers
    return {
        rate: max(
            0,
            (budget_bytes - fixed_bytes)
            // sequence_bytes(config, num_shared_for(rate, L), prompt_len, new_tokens, elem),
        )
        for rate in (0.0, *rates)
    }


# ------------------------------------------------------------------------------------------------
# how long the notebook takes (an estimate written to its settings, compared with the measured times)
# ------------------------------------------------------------------------------------------------
#: What one configuration costs, from notebook 04's committed rows on the 2-core machine (smollm2-135m, fp32; a
#: quiet machine). They scale with the parameters for another model. Rough: the notebook records each section's
#: measured time beside the estimate.
COST = {
    "spawn_s": 10.0,  # a fresh process per configuration: import torch and transformers, load the model
    "prefill_tokens_per_s": 1000.0,  # at a 256-token prompt
    "attention_tokens": 900.0,  # prefill time grows by prompt / this with the prompt (attention; 2k-prompt probes)
    "step_s": 0.03,  # a decode step: the weights read once
    "step_sequence_s": 0.007,  # ... plus per sequence in the batch
    "step_sequence_token_s": 1.0e-5,  # ... plus per sequence and cached token (K/V read and torch.cat copy)
    "compile_s": 60.0,  # torch.compile of the decode step, per process (inductor, CPU)
    "runtime_bytes": 300 * 2**20,  # a process's peak besides the weights and the batch (torch, buffers)
    "params": 162_826_560,  # smollm2-135m by `param_count` (embeddings counted twice): these timings
}


def estimate_run_s(
    config,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int = 1,
    warmup: int = 1,
    isolate: bool = True,
    warmup_prompt: int | None = None,
    compile: bool = False,
) -> float:
    """Seconds one configuration takes (`COST`): a process start, the warm-up (prompt and 8 decode steps) and
    `repeats` timed prefills and decodes."""
    scale = param_count(config) / COST["params"]

    def prefill(n):
        return batch * n * (1 + n / COST["attention_tokens"]) / COST["prefill_tokens_per_s"] * scale

    def decode(steps, context):
        per_seq = COST["step_sequence_s"] + (context + steps / 2) * COST["step_sequence_token_s"]
        return steps * (COST["step_s"] + batch * per_seq) * scale

    warm_prompt = min(prompt_len, warmup_prompt or prompt_len)
    total = (COST["spawn_s"] if isolate else 0.0) + (COST["compile_s"] if compile else 0.0)
    total += warmup * (prefill(warm_prompt) + decode(min(new_tokens, 8), warm_prompt))
    total += repeats * (prefill(prompt_len) + decode(new_tokens, prompt_len))
    return total


def estimate_seconds(config, s: dict) -> dict:
    """Estimated seconds of each section of notebook 04 for its settings `s` (keys as the notebook's settings),
    and their total: the sweeps measure every configuration `rounds` times; the budget search at most its time
    limit (its first guesses: two full runs per mode, b and b + 1)."""
    run = {"repeats": s["repeats"], "isolate": s["isolate"]}
    rates_shared = list(s["rates"])  # rate 0 shared (the C = 0 overhead check) included
    rate_s = s["rounds"] * sum(
        estimate_run_s(config, b, s["prompt_len"], s["new_tokens"], **run) * (1 + len(rates_shared))
        for b in s["batches"]
    )
    measured_lengths = [n for n in s["lengths"] if n != s["new_tokens"]]  # the rate sweep's length is reused
    length_s = s["rounds"] * sum(
        2 * estimate_run_s(config, max(s["batches"]), s["prompt_len"], n, **run) for n in measured_lengths
    )
    static_one = estimate_run_s(config, max(s["batches"]), s["prompt_len"], s["new_tokens"], **run)
    static_s = s["rounds"] * 2 * static_one
    compile_s = (
        s["compile_rounds"]
        * 2
        * estimate_run_s(config, max(s["batches"]), s["prompt_len"], s["new_tokens"], compile=True, **run)
    )
    budget = s["budget_predicted_batches"]
    budget_s = sum(estimate_run_s(config, b, s["budget_prompt_len"], 4, warmup=0) for b in (1, 2))  # the line probes
    for b in budget.values():
        for batch in (b, b + 1):
            budget_s += s.get("budget_probe_repeats", 1) * estimate_run_s(
                config, batch, s["budget_prompt_len"], s["budget_new_tokens"], warmup_prompt=BUDGET_WARMUP_PROMPT
            )
    budget_s = min(budget_s, s["budget_time_limit_s"] + max(1, max(budget.values())) * 10)
    sections = {
        "1_rates": rate_s,
        "2_lengths": length_s,
        "3_static_compile": static_s + compile_s,
        "4_budget_2k": budget_s,
        "5_speed_context": speed_grid_s(config, s),
        "6_accounting": 5.0,
    }
    sections = {k: round(v) for k, v in sections.items()}
    sections["total"] = sum(sections.values())
    return sections


def speed_grid_s(config, s: dict) -> float:
    """Section 5's seconds: one prefill per configuration and point, each method's decode rounds beside as many of
    the full model's (no process per configuration: the model is built once)."""
    from ..methods import REGISTRY

    if not s.get("speed_contexts"):
        return 0.0
    configs = 1 + len(s["speed_methods"] or REGISTRY) * len(s["speed_keep"])
    total = 0.0
    for context in s["speed_contexts"]:
        prompt = context - s["speed_new_tokens"]
        for batch in s["speed_batches"]:
            prefill = estimate_run_s(config, batch, prompt, 0, warmup=0, isolate=False)
            decode = estimate_run_s(config, batch, prompt, s["speed_new_tokens"], warmup=0, isolate=False) - prefill
            total += configs * prefill + s["rounds"] * 2 * max(1, configs - 1) * decode
    return total


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


# ------------------------------------------------------------------------------------------------
# section 5: decode speed against the context, every method
# ------------------------------------------------------------------------------------------------
SPEED_GOAL_FROM = 2048  # at or above the full model's decode speed at batch 1 from this context on
BOUND_GOAL = 0.8  # at the largest batch and context: at least this share of the bytes bound


def context_sweep(model, cfg: Settings, progress: bool = True) -> list[dict]:
    """Section 5: kvshare.speed.speed_grid with the notebook's settings (the model built once, every configuration
    prefilled once and decoded in rounds alternating with the full model's)."""
    from ..speed import speed_grid

    return speed_grid(
        model,
        methods=cfg.speed_methods,
        contexts=cfg.speed_contexts,
        batches=cfg.speed_batches,
        keep=cfg.speed_keep,
        new_tokens=cfg.speed_new_tokens,
        rounds=cfg.rounds,
        progress=progress,
    )


def speed_goals(rows: list[dict]) -> list[dict]:
    """Per method and share of the bytes, the two goals read off the grid's rows: the lowest speed ratio at batch 1
    from `SPEED_GOAL_FROM` tokens on (met when >= 1.0), and the share of the bytes bound at the largest batch and
    context (met when >= `BOUND_GOAL`). A goal the grid has no point for is None."""
    out = []
    methods = [r for r in rows if r["method"] != "full"]
    biggest = max(((r["batch"], r["context"]) for r in rows), default=None)
    for name, share in dict.fromkeys((r["method"], r["target_share"]) for r in methods):
        mine = [r for r in methods if (r["method"], r["target_share"]) == (name, share)]
        small = [r for r in mine if r["batch"] == 1 and r["context"] >= SPEED_GOAL_FROM]
        worst = min(small, key=lambda r: r["speed_ratio"], default=None)
        big = next((r for r in mine if (r["batch"], r["context"]) == biggest), None)
        out.append(
            {
                "method": name,
                "target_share": share,
                "kept_share16": max(r["kept_share16"] for r in mine),
                "min_ratio_batch1": None if worst is None else worst["speed_ratio"],
                "min_ratio_context": None if worst is None else worst["context"],
                "at_or_above_full": None if worst is None else worst["speed_ratio"] >= 1.0,
                "largest": biggest,
                "of_bound_largest": None if big is None else big["share_of_bound"],
                "ratio_largest": None if big is None else big["speed_ratio"],
                "bound_largest": None if big is None else big["bytes_bound"],
                "within_bound_goal": None if big is None else big["share_of_bound"] >= BOUND_GOAL,
            }
        )
    return out
