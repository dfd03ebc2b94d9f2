"""Quantized runs: KV sharing with GPTQ weights and with an int8 / int4 KV cache (notebook 06).

The rebuttal's claim: KVSharer on Llama-2-7B-Chat-GPTQ gives perplexity 8.61 / 10.40 / 16.68 / 25.89
with 0 / 4 / 8 / 12 shared layers. Here the same rows are measured for every combination of
- weights: the embedded default (SmolLM2-135M-Instruct, itself GGUF Q4_1, held in float32) and its
  GPTQ re-quantization (4-bit, group size 128, GPTQModel, made once; `kvshare.gptq`);
- KV cache: unquantized, int8 and int4 (the method `quantized`, `kvshare.methods.quantized.QuantizedKV`:
  per-token group-wise);
- shared layers C = 0, 4, 8, 12: ONE KVSharer search per weight set to the largest C, smaller C as its
  prefixes (`Strategy.prefix`), the search run on the weights it is applied to.

Quality: one-pass perplexity over the same held-out windows for every cell, under the shared held-out protocol
(`kvshare.metrics.HELDOUT`: 16,384 BBC tokens never in a calibration set, windows of 512; the quantized cache is
causal and attention reads exactly the stored codes, so one pass measures what decoding would see);
cells are compared by paired per-window NLL differences.
Cost: K/V bytes of the cache after a prefill and greedy decode (checked against what sharing and the
quantizer predict together from the shapes) and decode tokens/s, measured in this process
(`kvshare.bench.run_once`: fresh cache, prefill, timed greedy decode; best of the repeats).

Tables in Markdown, the figure and the conclusion: `kvshare.experiments.reports.quantized`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..accounting import cache_bytes, predicted_cache_bytes
from ..adapter import head_dim, num_layers
from ..combine import compression
from ..methods.quantized import QuantizedKV
from ..metrics import HELDOUT
from ..strategy import Strategy
from .scaffold import RunSettings

# the rebuttal's numbers (Llama-2-7B-Chat-GPTQ, 32 layers; perplexity by shared layers)
REBUTTAL = {"model": "Llama-2-7B-Chat-GPTQ", "num_layers": 32, "ppl": {0: 8.61, 4: 10.40, 8: 16.68, 12: 25.89}}
KV_LABELS = {None: "unquantized", 8: "int8", 4: "int4"}


@dataclass
class Settings(RunSettings):
    """Everything notebook 06's numbers depend on (saved beside its figures)."""

    gptq_model: str | None = None  # None: "<model>-gptq" when kvshare knows how to make it
    gptq: str = "auto"  # "auto": make it if missing (quick: only if already made); "skip"; "require"
    num_shared: list = field(default_factory=lambda: [0, 4, 8, 12])
    kv_bits: list = field(default_factory=lambda: [None, 8, 4])
    group_size: int = 32
    samples: int = 30  # calibration texts of the search
    max_tokens: int = 64  # tokens per calibration text
    threshold: float = 0.5
    # the shared held-out protocol (kvshare.metrics.HELDOUT), all of it: 32 windows of 512 = 16,384 tokens, the
    # baseline every notebook shows (quick mode scores a slice)
    window: int = HELDOUT.window
    eval_tokens: int = HELDOUT.tokens
    eval_batch: int = 4
    bench_prompt: int = 512
    bench_new_tokens: int = 32
    bench_batch: int = 1
    bench_repeats: int = 2
    threads: int | None = None  # torch threads (None: torch's default); 1 is steadier on a shared machine

    QUICK = dict(
        num_shared=[0, 4], samples=6, eval_tokens=256, window=128, bench_prompt=64, bench_new_tokens=4, bench_repeats=1
    )

    def __post_init__(self):
        if self.gptq not in ("auto", "skip", "require"):
            raise ValueError(f"gptq must be 'auto', 'skip' or 'require', got {self.gptq!r}")


settings = Settings.for_run  # notebook 06: settings(model, quick, seed, **overrides)


def kv_method(bits, group_size: int = 32) -> QuantizedKV | None:
    return None if bits is None else QuantizedKV(bits=int(bits), group_size=group_size)


# ------------------------------------------------------------------------------------------------
# the weight sets
# ------------------------------------------------------------------------------------------------
def weight_sets(cfg: Settings) -> tuple[list[tuple[str, str]], list[str]]:
    """[(label, model name)] to run, and notes on what was left out and why."""
    from ..gptq import GPTQ_MODELS, gptq_status, is_ready

    sets = [("fp32 weights", cfg.model)]
    notes = []
    gptq_name = cfg.gptq_model or (f"{cfg.model}-gptq" if f"{cfg.model}-gptq" in GPTQ_MODELS else None)
    if cfg.gptq == "skip":
        notes.append("GPTQ weights skipped (gptq='skip').")
    elif gptq_name is None:
        notes.append(f"no GPTQ version of {cfg.model} is known to kvshare: pass gptq_model (a GPTQ checkpoint).")
    else:
        ok, reason = gptq_status()
        local = gptq_name in GPTQ_MODELS
        if not ok:
            notes.append(f"GPTQ weights left out: {reason}.")
        elif local and cfg.quick and cfg.gptq == "auto" and not is_ready(gptq_name):
            notes.append(
                f"GPTQ weights left out of the quick run: {gptq_name} is not made yet (a full run makes it once)."
            )
        else:
            sets.append(("GPTQ 4-bit weights", gptq_name))
    if cfg.gptq == "require" and len(sets) < 2:
        raise RuntimeError(" ".join(notes))
    return sets, notes


def load(name: str):
    from ..models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(name)


def weight_info(model) -> dict:
    from ..gptq import is_gptq_model, weight_bytes

    return {"weight_bytes": weight_bytes(model), "gptq": is_gptq_model(model)}


# ------------------------------------------------------------------------------------------------
# the search (one per weight set) and the strategies
# ------------------------------------------------------------------------------------------------
def search_strategies(model, tokenizer, cfg: Settings) -> tuple[dict[int, Strategy], Strategy]:
    """{C: strategy} for every C of the grid the search reached, from one search to the largest C."""
    from ..data import calibration_texts
    from ..search import search

    top = max(cfg.num_shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, _ = search(
            model,
            tokenizer,
            calibration_texts(cfg.samples),
            top,
            threshold=cfg.threshold,
            seed=cfg.seed,
            max_tokens=cfg.max_tokens,
            progress=False,
        )
    reached = len(full.metadata.get("accepted_pairs", []))
    L = num_layers(model)
    return {c: (full.prefix(c) if c else Strategy({}, L)) for c in cfg.num_shared if c <= reached}, full


def eval_prefix(tokenizer, text: str, tokens: int) -> str:
    """The shortest run of whole paragraphs of `text` holding at least `tokens` tokens: the same first
    `tokens` tokens as the whole text (the cut is at a paragraph break), without tokenizing all of it
    for every cell."""
    paragraphs = text.split("\n\n")
    k = 1
    while k < len(paragraphs):
        prefix = "\n\n".join(paragraphs[:k])
        if len(tokenizer(prefix, add_special_tokens=True)["input_ids"]) > tokens:
            return prefix
        k *= 2
    return text


# ------------------------------------------------------------------------------------------------
# quality and cost of one cell
# ------------------------------------------------------------------------------------------------
def perplexity_cell(model, tokenizer, text: str, strategy, method, cfg: Settings) -> dict:
    from ..metrics import window_nlls

    t0 = time.perf_counter()
    with compression(model, strategy if strategy is not None and strategy.mapping else None, method):
        chunks = window_nlls(
            model,
            tokenizer,
            text,
            window=cfg.window,
            stride=cfg.window,
            max_tokens=cfg.eval_tokens,
            batch_size=cfg.eval_batch,
        )
    nll = torch.cat(chunks)
    means = np.array([c.mean().item() for c in chunks])
    mean = float(nll.mean())
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "nll_se": se,
        "ppl_se": math.exp(mean) * se,
        "tokens": int(nll.numel()),
        "windows": len(means),
        "window_nll": means.tolist(),
        "ppl_seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def cost_cell(model, strategy, method, cfg: Settings) -> dict:
    """K/V bytes after prefill + decode, the bytes predicted from the shapes, decode tokens/s."""
    from ..bench import run_once

    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, vocab, (cfg.bench_batch, cfg.bench_prompt), generator=gen).to(device)
    decode, prefill, kv = [], [], None
    with compression(model, strategy if strategy is not None and strategy.mapping else None, method):
        run_once(model, prompt, min(cfg.bench_new_tokens, 2), "dynamic")  # warm-up
        for _ in range(cfg.bench_repeats):
            p, d, cache = run_once(model, prompt, cfg.bench_new_tokens, "dynamic")
            prefill.append(p)
            decode.append(d)
            kv = cache_bytes(cache)
            del cache
    tokens = cfg.bench_prompt + cfg.bench_new_tokens
    elem = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    strat = strategy if strategy is not None and strategy.mapping else None
    predicted = predicted_cache_bytes(model.config, method, cfg.bench_batch, [tokens], elem, strategy=strat)
    best = min(decode)
    return {
        "kv_bytes": kv,
        "kv_bytes_predicted": predicted,
        "kv_tokens": tokens,
        "decode_tps": cfg.bench_batch * cfg.bench_new_tokens / best,
        "prefill_s": min(prefill),
        "decode_s_all": decode,
    }


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------
def run_weight_set(label: str, name: str, cfg: Settings, text: str, progress: bool = True) -> dict:
    """Search, then every (C, KV bits) cell on one weight set. Returns rows and the strategies."""
    from ..models import model_name

    t0 = time.perf_counter()
    model, tokenizer = load(name)
    load_s = time.perf_counter() - t0
    info = weight_info(model)
    text_cfg = model.config.get_text_config()
    elem = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    text = eval_prefix(tokenizer, text, cfg.eval_tokens)
    t1 = time.perf_counter()
    strategies, full = search_strategies(model, tokenizer, cfg)
    search_s = time.perf_counter() - t1
    if progress:
        print(
            f"[{label}] {model_name(model)}: loaded in {load_s:.0f} s; search to C={max(cfg.num_shared)} in "
            f"{search_s:.0f} s reached C={len(full.metadata.get('accepted_pairs', []))}",
            flush=True,
        )
    rows = []
    for c in cfg.num_shared:
        if c not in strategies:
            if progress:
                print(
                    f"[{label}] C={c}: the search stopped before C={c} (threshold {cfg.threshold}); no row", flush=True
                )
            continue
        for bits in cfg.kv_bits:
            method = kv_method(bits, cfg.group_size)
            q = perplexity_cell(model, tokenizer, text, strategies[c], method, cfg)
            k = cost_cell(model, strategies[c], method, cfg)
            row = {
                "weights": label,
                "model": name,
                "num_shared": c,
                "num_layers": num_layers(model),
                "kv_bits": bits,
                "kv": KV_LABELS.get(bits, f"int{bits}"),
                "kv_quant_ratio": 1.0 if method is None else method.compression_ratio(head_dim(text_cfg), elem),
                **info,
                **q,
                **k,
            }
            rows.append(row)
            if progress:
                print(
                    f"[{label}] C={c:2d} KV {row['kv']:>11}: ppl {q['ppl']:8.3f} ± {q['ppl_se']:.3f}  "
                    f"KV {k['kv_bytes'] / 2**20:6.2f} MiB  decode {k['decode_tps']:6.1f} tok/s  "
                    f"({q['ppl_seconds']:.0f} s)",
                    flush=True,
                )
    del model
    return {
        "label": label,
        "model": name,
        "rows": rows,
        "search": full.to_dict(),
        "search_seconds": search_s,
        "strategies": {c: s.to_dict() for c, s in strategies.items()},
        **info,
    }


def run_all(cfg: Settings, text: str | None = None, progress: bool = True) -> dict:
    from ..data import eval_text

    text = eval_text(HELDOUT.source) if text is None else text
    sets, notes = weight_sets(cfg)
    for n in notes:
        print(n, flush=True)
    runs = [run_weight_set(label, name, cfg, text, progress) for label, name in sets]
    return {"runs": runs, "notes": notes, "rows": add_ratios([r for run in runs for r in run["rows"]])}


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios against the same weights with no sharing and an unquantized cache (perplexity, bytes, speed),
    and paired NLL differences against it (same windows)."""
    base = {r["weights"]: r for r in rows if r["num_shared"] == 0 and r["kv_bits"] is None}
    ref = base.get("fp32 weights")
    for r in rows:
        b = base.get(r["weights"])
        if b is None:
            continue
        d = np.asarray(r["window_nll"]) - np.asarray(b["window_nll"])
        r["nll_diff"] = float(d.mean())
        r["nll_diff_se"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        r["ppl_ratio"] = r["ppl"] / b["ppl"]
        r["kv_ratio"] = r["kv_bytes"] / b["kv_bytes"]
        r["kv_ratio_predicted"] = (1 - r["num_shared"] / r["num_layers"]) * r["kv_quant_ratio"]
        r["decode_tps_ratio"] = r["decode_tps"] / b["decode_tps"]
        if ref is not None:
            r["ppl_vs_fp32_full"] = r["ppl"] / ref["ppl"]
    return rows


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
TABLE_COLUMNS = [
    "weights",
    "kv",
    "num_shared",
    "ppl",
    "ppl_se",
    "ppl_ratio",
    "nll_diff",
    "nll_diff_se",
    "kv_bytes",
    "kv_bytes_predicted",
    "kv_ratio",
    "kv_ratio_predicted",
    "decode_tps",
    "decode_tps_ratio",
    "prefill_s",
    "weight_bytes",
    "tokens",
]


def table(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in TABLE_COLUMNS} for r in rows]


def wide_table(rows: list[dict]) -> list[dict]:
    """The rebuttal's layout: one row per (weights, KV cache), perplexity by shared layers."""
    out = {}
    for r in rows:
        key = (r["weights"], r["kv"])
        out.setdefault(key, {"weights": r["weights"], "kv cache": r["kv"]})[f"C={r['num_shared']}"] = r["ppl"]
    return list(out.values())
