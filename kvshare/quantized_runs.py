"""Quantized runs: KV sharing with GPTQ weights and with an int8 / int4 KV cache (notebook 06).

The rebuttal's claim: KVSharer on Llama-2-7B-Chat-GPTQ gives perplexity 8.61 / 10.40 / 16.68 / 25.89
with 0 / 4 / 8 / 12 shared layers. Here the same rows are measured for every combination of
- weights: the embedded default (SmolLM2-135M-Instruct, itself GGUF Q4_1, held in float32) and its
  GPTQ re-quantization (4-bit, group size 128, GPTQModel, made once; `kvshare.gptq`);
- KV cache: unquantized, int8 and int4 (`kvshare.quantized_kv.QuantizedKV`, per-token group-wise);
- shared layers C = 0, 4, 8, 12: ONE KVSharer search per weight set to the largest C, smaller C as its
  prefixes (`Strategy.prefix`), the search run on the weights it is applied to.

Quality: one-pass perplexity over the same held-out windows for every cell (the quantized cache is
causal and attention reads exactly the stored codes, so one pass measures what decoding would see);
cells are compared by paired per-window NLL differences.
Cost: K/V bytes of the cache after a prefill and greedy decode (checked against what sharing and the
quantizer predict together from the shapes) and decode tokens/s, measured in this process
(`kvshare.bench._run_once`: fresh cache, prefill, timed greedy decode; best of the repeats).
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .quantized_kv import QuantizedKV, plain_cache_bytes
from .sharing import cache_bytes, compression, num_layers
from .strategy import Strategy

# the rebuttal's numbers (Llama-2-7B-Chat-GPTQ, 32 layers; perplexity by shared layers)
REBUTTAL = {"model": "Llama-2-7B-Chat-GPTQ", "num_layers": 32, "ppl": {0: 8.61, 4: 10.40, 8: 16.68, 12: 25.89}}
KV_LABELS = {None: "unquantized", 8: "int8", 4: "int4"}


@dataclass
class Settings:
    """Everything notebook 06's numbers depend on (saved beside its figures)."""

    model: str
    quick: bool
    seed: int
    gptq_model: str | None = None  # None: "<model>-gptq" when kvshare knows how to make it
    gptq: str = "auto"  # "auto": make it if missing (quick: only if already made); "skip"; "require"
    num_shared: list = field(default_factory=lambda: [0, 4, 8, 12])
    kv_bits: list = field(default_factory=lambda: [None, 8, 4])
    group_size: int = 32
    samples: int = 30  # calibration texts of the search
    max_tokens: int = 64  # tokens per calibration text
    threshold: float = 0.5
    window: int = 512
    eval_tokens: int = 4096  # held-out tokens per cell (8 windows of 512)
    eval_batch: int = 4
    bench_prompt: int = 512
    bench_new_tokens: int = 32
    bench_batch: int = 1
    bench_repeats: int = 2
    threads: int | None = None  # torch threads (None: torch's default); 1 is steadier on a shared machine

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = dict(num_shared=[0, 4], samples=6, eval_tokens=256, window=128, bench_prompt=64, bench_new_tokens=4,
             bench_repeats=1)


def settings(model: str, quick: bool, seed: int = 0, **overrides) -> Settings:
    """Notebook 06's settings (see `kvshare.experiments.make_settings`)."""
    from .experiments import make_settings

    base = make_settings(Settings, QUICK, model, quick, seed, **overrides)
    if base.gptq not in ("auto", "skip", "require"):
        raise ValueError(f"gptq must be 'auto', 'skip' or 'require', got {base.gptq!r}")
    return base


def kv_policy(bits, group_size: int = 32) -> QuantizedKV | None:
    return None if bits is None else QuantizedKV(bits=int(bits), group_size=group_size)


# ------------------------------------------------------------------------------------------------
# the weight sets
# ------------------------------------------------------------------------------------------------
def weight_sets(cfg: Settings) -> tuple[list[tuple[str, str]], list[str]]:
    """[(label, model name)] to run, and notes on what was left out and why."""
    from .gptq import GPTQ_MODELS, gptq_status, is_ready

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
            notes.append(f"GPTQ weights left out of the quick run: {gptq_name} is not made yet (a full run makes it once).")
        else:
            sets.append(("GPTQ 4-bit weights", gptq_name))
    if cfg.gptq == "require" and len(sets) < 2:
        raise RuntimeError(" ".join(notes))
    return sets, notes


def load(name: str):
    from .models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(name)


def weight_info(model) -> dict:
    from .gptq import is_gptq_model, weight_bytes

    return {"weight_bytes": weight_bytes(model), "gptq": is_gptq_model(model)}


# ------------------------------------------------------------------------------------------------
# the search (one per weight set) and the strategies
# ------------------------------------------------------------------------------------------------
def search_strategies(model, tokenizer, cfg: Settings) -> tuple[dict[int, Strategy], Strategy]:
    """{C: strategy} for every C of the grid the search reached, from one search to the largest C."""
    from .data import calibration_texts
    from .search import search

    top = max(cfg.num_shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, _ = search(model, tokenizer, calibration_texts(cfg.samples), top, threshold=cfg.threshold,
                         seed=cfg.seed, max_tokens=cfg.max_tokens, progress=False)
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
def perplexity_cell(model, tokenizer, text: str, strategy, policy, cfg: Settings) -> dict:
    from .metrics import window_nlls

    t0 = time.perf_counter()
    with compression(model, strategy if strategy is not None and strategy.mapping else None, policy):
        chunks = window_nlls(model, tokenizer, text, window=cfg.window, stride=cfg.window, max_tokens=cfg.eval_tokens,
                             batch_size=cfg.eval_batch)
    nll = torch.cat(chunks)
    means = np.array([c.mean().item() for c in chunks])
    mean = float(nll.mean())
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return {"ppl": math.exp(mean), "nll": mean, "nll_se": se, "ppl_se": math.exp(mean) * se,
            "tokens": int(nll.numel()), "windows": len(means), "window_nll": means.tolist(),
            "ppl_seconds": time.perf_counter() - t0}


@torch.no_grad()
def cost_cell(model, strategy, policy, cfg: Settings) -> dict:
    """K/V bytes after prefill + decode, the bytes predicted from the shapes, decode tokens/s."""
    from .bench import _run_once

    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, vocab, (cfg.bench_batch, cfg.bench_prompt), generator=gen).to(device)
    decode, prefill, kv = [], [], None
    with compression(model, strategy if strategy is not None and strategy.mapping else None, policy):
        _run_once(model, prompt, min(cfg.bench_new_tokens, 2), "dynamic")  # warm-up
        for _ in range(cfg.bench_repeats):
            p, d, cache = _run_once(model, prompt, cfg.bench_new_tokens, "dynamic")
            prefill.append(p)
            decode.append(d)
            kv = cache_bytes(cache)
            del cache
    tokens = cfg.bench_prompt + cfg.bench_new_tokens
    elem = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    strat = strategy if strategy is not None and strategy.mapping else None
    predicted = (policy.predicted_cache_bytes(model.config, strat, cfg.bench_batch, tokens, elem) if policy is not None
                 else plain_cache_bytes(model.config, strat, cfg.bench_batch, tokens, elem))
    best = min(decode)
    return {"kv_bytes": kv, "kv_bytes_predicted": predicted, "kv_tokens": tokens,
            "decode_tps": cfg.bench_batch * cfg.bench_new_tokens / best, "prefill_s": min(prefill),
            "decode_s_all": decode}


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------
def run_weight_set(label: str, name: str, cfg: Settings, text: str, progress: bool = True) -> dict:
    """Search, then every (C, KV bits) cell on one weight set. Returns rows and the strategies."""
    from .models import model_name

    t0 = time.perf_counter()
    model, tokenizer = load(name)
    load_s = time.perf_counter() - t0
    info = weight_info(model)
    text_cfg = model.config.get_text_config()
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    elem = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    text = eval_prefix(tokenizer, text, cfg.eval_tokens)
    t1 = time.perf_counter()
    strategies, full = search_strategies(model, tokenizer, cfg)
    search_s = time.perf_counter() - t1
    if progress:
        print(f"[{label}] {model_name(model)}: loaded in {load_s:.0f} s; search to C={max(cfg.num_shared)} in "
              f"{search_s:.0f} s reached C={len(full.metadata.get('accepted_pairs', []))}", flush=True)
    rows = []
    for c in cfg.num_shared:
        if c not in strategies:
            if progress:
                print(f"[{label}] C={c}: the search stopped before C={c} (threshold {cfg.threshold}); no row", flush=True)
            continue
        for bits in cfg.kv_bits:
            policy = kv_policy(bits, cfg.group_size)
            q = perplexity_cell(model, tokenizer, text, strategies[c], policy, cfg)
            k = cost_cell(model, strategies[c], policy, cfg)
            row = {"weights": label, "model": name, "num_shared": c, "num_layers": num_layers(model),
                   "kv_bits": bits, "kv": KV_LABELS.get(bits, f"int{bits}"),
                   "kv_quant_ratio": 1.0 if policy is None else policy.compression_ratio(head_dim, elem), **info, **q, **k}
            rows.append(row)
            if progress:
                print(f"[{label}] C={c:2d} KV {row['kv']:>11}: ppl {q['ppl']:8.3f} ± {q['ppl_se']:.3f}  "
                      f"KV {k['kv_bytes'] / 2**20:6.2f} MiB  decode {k['decode_tps']:6.1f} tok/s  "
                      f"({q['ppl_seconds']:.0f} s)", flush=True)
    del model
    return {"label": label, "model": name, "rows": rows, "search": full.to_dict(), "search_seconds": search_s,
            "strategies": {c: s.to_dict() for c, s in strategies.items()}, **info}


def run_all(cfg: Settings, text: str | None = None, progress: bool = True) -> dict:
    from .data import eval_text

    text = eval_text() if text is None else text
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
# tables, figure, conclusion
# ------------------------------------------------------------------------------------------------
TABLE_COLUMNS = ["weights", "kv", "num_shared", "ppl", "ppl_se", "ppl_ratio", "nll_diff", "nll_diff_se", "kv_bytes",
                 "kv_bytes_predicted", "kv_ratio", "kv_ratio_predicted", "decode_tps", "decode_tps_ratio", "prefill_s", "weight_bytes",
                 "tokens"]


def table(rows: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in TABLE_COLUMNS} for r in rows]


def wide_table(rows: list[dict]) -> list[dict]:
    """The rebuttal's layout: one row per (weights, KV cache), perplexity by shared layers."""
    out = {}
    for r in rows:
        key = (r["weights"], r["kv"])
        out.setdefault(key, {"weights": r["weights"], "kv cache": r["kv"]})[f"C={r['num_shared']}"] = r["ppl"]
    return list(out.values())


def markdown_table(rows: list[dict]) -> str:
    head = ("| weights | KV cache | C | perplexity | × C=0 fp-KV | ΔNLL (paired) | KV bytes | predicted | KV ratio "
            "| decode tok/s |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['weights']} | {r['kv']} | {r['num_shared']} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} | "
            f"{r.get('ppl_ratio', float('nan')):.3f} | {r.get('nll_diff', float('nan')):+.3f} ± {r.get('nll_diff_se', float('nan')):.3f} | "
            f"{r['kv_bytes']:,} | {r['kv_bytes_predicted']:,} | {r.get('kv_ratio', float('nan')):.4f} | "
            f"{r['decode_tps']:.1f} |")
    return "\n".join(lines)


def wide_markdown(rows: list[dict], grid) -> str:
    cols = [f"C={c}" for c in grid]
    lines = ["| weights | KV cache | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    lines.append(f"| {REBUTTAL['model']} (rebuttal) | fp16 | "
                 + " | ".join(f"{REBUTTAL['ppl'][c]:.2f}" if c in REBUTTAL["ppl"] else "" for c in grid) + " |")
    for w in wide_table(rows):
        lines.append(f"| {w['weights']} | {w['kv cache']} | "
                     + " | ".join(f"{w[c]:.2f}" if c in w else "—" for c in cols) + " |")
    return "\n".join(lines)


STYLE_W = {"fp32 weights": ("#1f77b4", "-"), "GPTQ 4-bit weights": ("#d62728", "--")}
STYLE_KV = {"unquantized": "o", "int8": "s", "int4": "^"}


def figure(rows: list[dict], title: str = ""):
    """Left: perplexity vs K/V bytes for every (weights, KV cache) series, points at C = 0, 4, 8, 12.
    Right: perplexity relative to C = 0 (same weights and cache) vs C, with the rebuttal's trend."""
    import matplotlib.pyplot as plt

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
            ax.annotate(f"C={r['num_shared']}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7,
                        color=color)
        base = rs[0]["ppl"] if rs[0]["num_shared"] == 0 else float("nan")
        ax2.plot([r["num_shared"] for r in rs], [r["ppl"] / base for r in rs], ls=ls, color=color, marker=marker,
                 label=f"{w}, {kv} KV")
    reb = REBUTTAL["ppl"]
    ax2.plot(list(reb), [v / reb[0] for v in reb.values()], color="black", lw=2, marker="D",
             label=f"{REBUTTAL['model']} (rebuttal)")
    handles, labels = ax2.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.13), frameon=False)
    from matplotlib.ticker import FuncFormatter, LogLocator

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


def conclusion(rows: list[dict], notes: list[str], model: str, z_crit: float = 2.0) -> str:
    """Markdown computed from the rows: the trend with C per combination, against the rebuttal; what KV
    quantization and GPTQ add; whether bytes equal the prediction."""
    reb = REBUTTAL["ppl"]
    grid = sorted({r["num_shared"] for r in rows})
    series = {}
    for r in rows:
        series.setdefault((r["weights"], r["kv"]), {})[r["num_shared"]] = r
    lines = []
    top = max(grid)
    reb_ratio = {c: reb[c] / reb[0] for c in reb}
    lines.append(f"**Rebuttal ({REBUTTAL['model']}):** perplexity × {reb_ratio[4]:.2f} / × {reb_ratio[8]:.2f} / "
                 f"× {reb_ratio[12]:.2f} at C = 4 / 8 / 12 of {REBUTTAL['num_layers']} layers (vs C = 0).")
    lines.append("")
    monotone_all = True
    for (w, kv), s in series.items():
        if 0 not in s:
            continue
        ratios = {c: s[c]["ppl"] / s[0]["ppl"] for c in sorted(s)}
        mono = all(ratios[a] <= ratios[b] for a, b in zip(sorted(ratios), sorted(ratios)[1:]))
        monotone_all &= mono
        lines.append(f"- {w}, {kv} KV cache: perplexity {s[0]['ppl']:.2f} at C = 0 → "
                     + ", ".join(f"× {ratios[c]:.2f} at C = {c}" for c in sorted(ratios) if c) +
                     (" (rises with C)" if mono else " (not monotone in C)"))
    lines.append("")
    same = "the same direction as the rebuttal's: perplexity rises with every added shared layer" if monotone_all else \
        "not everywhere the rebuttal's monotone rise"
    lines.append(f"**Trend:** {same}.")
    if top in reb_ratio:
        ours = [s[top]["ppl"] / s[0]["ppl"] for s in series.values() if 0 in s and top in s]
        if ours:
            lines.append(f" At C = {top} the rise here is × {min(ours):.2f}–{max(ours):.2f} against the rebuttal's "
                         f"× {reb_ratio[top]:.2f} (a {rows[0]['num_layers']}-layer 135M model against a 32-layer 7B one: "
                         f"{top / rows[0]['num_layers']:.0%} vs {top / REBUTTAL['num_layers']:.0%} of the layers).")
    # what KV quantization adds, per weights and C, paired
    lines.append("")
    lines.append("**KV-cache quantization on top of sharing** (paired ΔNLL against the unquantized cache at the same "
                 "weights and C; mean over C):")
    for w in dict.fromkeys(r["weights"] for r in rows):
        for kv in ("int8", "int4"):
            diffs = []
            for c in grid:
                a, b = series.get((w, kv), {}).get(c), series.get((w, "unquantized"), {}).get(c)
                if a and b:
                    d = np.asarray(a["window_nll"]) - np.asarray(b["window_nll"])
                    diffs.append((c, float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
                                  a["ppl"] / b["ppl"]))
            if not diffs:
                continue
            mean_ratio = statistics.mean(x[3] for x in diffs)
            sig = [c for c, d, se, _ in diffs if se and se > 0 and abs(d) > z_crit * se]
            lines.append(f"- {w}, {kv}: perplexity × {mean_ratio:.3f} on average over C = "
                         f"{', '.join(str(x[0]) for x in diffs)}"
                         + (f"; beyond {z_crit:g} standard errors at C = {', '.join(map(str, sig))}" if sig else
                            f"; within {z_crit:g} standard errors of the unquantized cache at every C") + ".")
    # does GPTQ change sharing's relative cost?
    fp_s, g_s = series.get(("fp32 weights", "unquantized"), {}), None
    gptq_label = next((r["weights"] for r in rows if r["weights"] != "fp32 weights"), None)
    if gptq_label is not None:
        g_s = series.get((gptq_label, "unquantized"), {})
    if fp_s and g_s and 0 in fp_s and 0 in g_s:
        both = [c for c in grid if c and c in fp_s and c in g_s]
        if both:
            lines.append("")
            lines.append("**Sharing on GPTQ weights vs full-precision weights** (perplexity rise from C = 0, unquantized "
                         "cache): " + "; ".join(f"C = {c}: × {g_s[c]['ppl'] / g_s[0]['ppl']:.2f} vs × "
                                                f"{fp_s[c]['ppl'] / fp_s[0]['ppl']:.2f}" for c in both)
                         + ". Ratio of the two rises at C = "
                         + f"{both[-1]}: {(g_s[both[-1]]['ppl'] / g_s[0]['ppl']) / (fp_s[both[-1]]['ppl'] / fp_s[0]['ppl']):.2f}.")
    # which configuration is best at a given K/V budget
    lines.append("")
    lines.append("**At a given K/V budget** (Pareto front of K/V bytes and perplexity, per weight set, fewest bytes first):")
    for w in dict.fromkeys(r["weights"] for r in rows):
        mine = [r for r in rows if r["weights"] == w]
        front = [r for r in mine if not any(o["kv_bytes"] <= r["kv_bytes"] and o["ppl"] <= r["ppl"]
                                            and (o["kv_bytes"] < r["kv_bytes"] or o["ppl"] < r["ppl"]) for o in mine)]
        front.sort(key=lambda r: r["kv_bytes"])
        lines.append(f"- {w}: " + " → ".join(f"{r['kv']} C = {r['num_shared']} ({r['kv_bytes'] / 2**20:.2f} MiB, "
                                             f"ppl {r['ppl']:.1f})" for r in front) + ".")
        ties = [(a, b) for a in mine for b in mine if a is not b and a["num_shared"] > b["num_shared"]
                and a["kv_bits"] != b["kv_bits"] and abs(a["kv_bytes"] - b["kv_bytes"]) <= 0.01 * b["kv_bytes"]]
        for a, b in ties:
            lines.append(f"  - equal bytes ({a['kv_bytes'] / 2**20:.2f} MiB): {a['kv']} cache with C = {a['num_shared']}, "
                         f"perplexity {a['ppl']:.1f}, vs {b['kv']} cache with C = {b['num_shared']}, {b['ppl']:.1f}.")
    gptq = [r for r in rows if r["weights"] != "fp32 weights"]
    if gptq:
        lines.append("")
        fp0 = series.get(("fp32 weights", "unquantized"), {}).get(0)
        g0 = series.get((gptq[0]["weights"], "unquantized"), {}).get(0)
        if fp0 and g0:
            lines.append(f"**GPTQ weights:** perplexity {g0['ppl']:.2f} vs {fp0['ppl']:.2f} at C = 0 "
                         f"(× {g0['ppl'] / fp0['ppl']:.2f}), weights {g0['weight_bytes'] / 2**20:.0f} MiB vs "
                         f"{fp0['weight_bytes'] / 2**20:.0f} MiB as stored; decode {g0['decode_tps']:.1f} vs "
                         f"{fp0['decode_tps']:.1f} tok/s on this machine (GPTQModel's torch kernel dequantizes per forward).")
    lines.append("")
    ok = all(r["kv_bytes"] == r["kv_bytes_predicted"] for r in rows)
    lines.append("**Bytes:** " + ("in every cell the K/V bytes equal what sharing and the quantizer predict together "
                                  "((L − C) kept layers × per-token bytes of codes, scales and zeros)." if ok else
                                  "some cells differ from the prediction: "
                                  + ", ".join(f"{r['weights']}/{r['kv']}/C={r['num_shared']}" for r in rows
                                              if r["kv_bytes"] != r["kv_bytes_predicted"])))
    if notes:
        lines.append("")
        lines.append("Notes: " + " ".join(notes))
    return "\n".join(lines)
