"""Intra-layer compression (token eviction) next to and combined with KV sharing: notebook 05.

Quality protocol, through the evaluation entry point (`kvshare.evaluation.Evaluator` with the
cell's strategy and eviction method, scored by decoding). Eviction only acts on what later tokens can see,
and a single forward over a window attends over the whole window before anything is dropped, so the
usual one-pass perplexity is the same with or without eviction. Here each window of `window`
held-out tokens is split (the shared protocol kvshare.metrics.HELDOUT: 16,384 tokens in 32 windows of 512):
the first `context` tokens are prefilled (the method compresses them), then the remaining tokens are fed one at
a time, exactly like generation with teacher forcing, and every token predicted by a decoding step is scored.
Beside it: a multiple-choice task whose question and answers are scored by decoding as well (its prompts are
short, up to ~50 tokens: eviction can only matter at the smaller budget). The full model and sharing alone go through
the same protocol, so every configuration is scored on the same tokens and examples, and compared by paired
differences.

Cost protocol: `kvshare.bench.measure` with the configuration's strategy and method (prompt of
random tokens, greedy decoding): K/V bytes of the cache at the end, peak memory, decode tokens/s.

Table, figure and conclusion text: `kvshare.experiments.reports.intra_layer`. Results files name a cell's eviction
method in their `policy` column (and `kv_ratio_policy`, `nll_diff_policy`, `ppl_policy`): the committed figures are
read back by those names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import methods
from ..accounting import num_shared_for
from ..adapter import model_cache_kwarg, num_layers
from ..combine import compression
from ..methods.eviction import timing
from ..metrics import HELDOUT
from ..strategy import Strategy
from .scaffold import RunSettings

METHOD_LABELS = {"h2o": "H2O", "pyramidinfer": "PyramidInfer", "streamingllm": "StreamingLLM"}


def budget_methods() -> list[str]:
    """The registered eviction methods that keep a token budget (kvshare.methods), in registry order."""
    return [n for n, c in methods.REGISTRY.items() if c.role == "eviction" and "budget" in c.setting_names()]


# ------------------------------------------------------------------------------------------------
# the configurations
# ------------------------------------------------------------------------------------------------
@dataclass
class Settings(RunSettings):
    """Everything notebook 05's numbers depend on (saved beside its figures)."""

    budgets: list = field(default_factory=lambda: [32, 96])  # tokens per layer (PyramidInfer: average)
    methods: list = field(default_factory=lambda: ["h2o", "pyramidinfer", "streamingllm"])  # eviction, by name
    share_fraction: float = 0.25  # sharing at 25% of the layers
    samples: int = 30  # calibration texts of the sharing search
    # the shared held-out protocol (kvshare.metrics.HELDOUT), all of it: 32 windows of 512 = 16,384 tokens, as in
    # notebook 07. The context is long and the decoded part short (63 tokens per window, 2,016 in all) because a
    # decoded token costs ~20x a prefilled one on 2 CPU cores; eviction then acts on a 448-token prompt.
    window: int = HELDOUT.window  # tokens per evaluation window
    context: int = 448  # prefilled tokens per window (the rest is decoded and scored)
    eval_windows: int = HELDOUT.tokens // HELDOUT.window
    eval_batch: int = 8  # windows decoded together (the Evaluator decodes at most 8 at once)
    mc_tasks: list = field(default_factory=lambda: ["sciq"])  # offline suite names (or MCTask specs)
    mc_limit: int | None = None  # examples per multiple-choice task (None: the task's default)
    bench_batch: int = 4
    bench_prompt: int = 512
    bench_new_tokens: int = 64
    bench_repeats: int = 1  # timed runs per cell and round
    bench_rounds: int = 5  # passes over all cells (forward, then reverse order): best speed per cell
    bench_isolate: bool = True  # each cell's cost in a fresh process (CPU peak memory is then its own)

    QUICK = dict(
        budgets=[16, 48],
        samples=6,
        window=160,
        context=96,
        eval_windows=2,
        eval_batch=2,
        mc_limit=4,
        bench_batch=1,
        bench_prompt=96,
        bench_new_tokens=8,
        bench_repeats=1,
        bench_rounds=1,
        bench_isolate=False,
    )


settings = Settings.for_run  # notebook 05: settings(model, quick, seed, **overrides)


@dataclass(frozen=True)
class Cell:
    """One configuration: sharing or not, and an eviction method at a budget or none."""

    method: str | None = None
    budget: int | None = None
    shared: bool = False

    @property
    def label(self) -> str:
        parts = []
        if self.method:
            parts.append(f"{METHOD_LABELS.get(self.method, self.method)} {self.budget}")
        if self.shared:
            parts.append("sharing")
        return " + ".join(parts) if parts else "full"

    def make_method(self):
        return None if self.method is None else methods.make(self.method, budget=self.budget)


def cells(cfg: Settings) -> list[Cell]:
    """full; sharing; each eviction method at each budget; each of those with sharing."""
    out = [Cell(), Cell(shared=True)]
    for shared in (False, True):
        for p in cfg.methods:
            if p not in budget_methods():
                raise ValueError(f"unknown eviction method {p!r}; use one of {', '.join(budget_methods())}")
            for b in cfg.budgets:
                out.append(Cell(p, int(b), shared))
    return out


def sharing_strategy(model, tokenizer, cfg: Settings, order: str = "dissimilar") -> Strategy:
    """The `order` strategy at `share_fraction` of the layers, from the one store (kvshare.strategies: calibration
    set 0, `samples` texts; searched there the first time)."""
    from ..strategies import get, key_for

    c = num_shared_for(cfg.share_fraction, num_layers(model))
    return get(model, tokenizer, key_for(model, order, c, samples=cfg.samples, seed=cfg.seed))


# ------------------------------------------------------------------------------------------------
# quality
# ------------------------------------------------------------------------------------------------
def quality_tasks(cfg: Settings) -> list:
    """The evaluation tasks of the quality columns: decoded perplexity, multiple choice."""
    from dataclasses import replace

    from ..tasks import OFFLINE_TASKS, PerplexityTask

    tasks = [PerplexityTask(window=cfg.window, limit=cfg.eval_windows, context=cfg.context)]
    offline = {t.source: t for t in OFFLINE_TASKS if t.kind == "multiple_choice"}
    for name in cfg.mc_tasks:
        if isinstance(name, str) and name not in offline:
            raise ValueError(f"unknown multiple-choice task {name!r}; use one of {', '.join(offline)}")
        spec = offline[name] if isinstance(name, str) else name  # a name, or a spec (e.g. an MCTask on a local file)
        tasks.append(replace(spec, limit=cfg.mc_limit) if cfg.mc_limit else spec)
    return tasks


def quality(model, tokenizer, cfg: Settings, strategy: Strategy, progress: bool = True, evaluator=None) -> list[dict]:
    """Every cell through `kvshare.evaluation.Evaluator` (its strategy and method, scored by decoding), on the
    same windows and examples: one row per cell with the decoded perplexity (`ppl`, `ppl_se`, `window_nll`) and
    multiple-choice accuracy (`mc_acc`, the mean over `cfg.mc_tasks`, per-example `mc_scores`), plus the
    evaluation's own rows (`eval_rows`)."""
    from ..evaluation import Evaluator

    ev = evaluator or Evaluator(model, tokenizer, batch_size=cfg.eval_batch, progress=progress)
    tasks = quality_tasks(cfg)
    rows = []
    for cell in cells(cfg):
        t0 = time.perf_counter()
        result = ev.evaluate(
            strategy if cell.shared else None, tasks=tasks, method=cell.make_method(), decode=True, label=cell.label
        )
        by = {(r["task"], r["metric"]): r for r in result["rows"]}
        ppl, nll = by[(tasks[0].name, "ppl")], by[(tasks[0].name, "nll")]
        row = {
            "label": cell.label,
            "policy": cell.method,
            "budget": cell.budget,
            "shared": cell.shared,
            "num_shared": strategy.num_shared if cell.shared else 0,
            "ppl": ppl["value"],
            "ppl_se": ppl["stderr"],
            "nll": nll["value"],
            "nll_se": nll["stderr"],
            "tokens": ppl["n"],
            "window_nll": nll["scores"],
            "window": cfg.window,
            "context": cfg.context,
            "windows": len(nll["scores"]),
        }
        mc = [by[(t.name, t.metric)] for t in tasks if t.kind == "multiple_choice"]
        if mc:
            row.update(
                mc_acc=float(np.mean([r["value"] for r in mc])),
                mc_scores=[s for r in mc for s in (r["scores"] or [])],
                mc_chance=float(np.mean([r["chance"] for r in mc])),
            )
        row.update(
            seconds=time.perf_counter() - t0,
            cached=bool(result["cached_tasks"]),
            eval_rows=[{k: v for k, v in r.items() if k != "scores"} for r in result["rows"]],
        )
        rows.append(row)
        if progress:
            extra = f", MC acc {row['mc_acc']:.3f}" if "mc_acc" in row else ""
            print(
                f"{cell.label}: ppl {row['ppl']:.3f} ± {row['ppl_se']:.3f}{extra} ({row['seconds']:.0f} s)", flush=True
            )
    return rows


# ------------------------------------------------------------------------------------------------
# memory and speed
# ------------------------------------------------------------------------------------------------
def cost(cfg: Settings, strategy: Strategy, model=None, progress: bool = True) -> list[dict]:
    """K/V bytes, peak memory and decode tokens/s of every cell (`kvshare.bench.measure`; with
    `cfg.bench_isolate` each cell runs in a fresh process, so a CPU peak is its own; otherwise in this
    process on `model`, where the CPU peak is the process's and says nothing).

    On a shared machine the load drifts: the cells are measured in `cfg.bench_rounds` passes, forward
    then backward, and each cell keeps its fastest run's row (peaks: the lowest of its runs, RSS noise
    only adds); `rounds` keeps every run."""
    from ..bench import Config, measure, measure_isolated, measure_rounds

    isolate = cfg.bench_isolate or model is None
    order = cells(cfg)
    configs = [
        (
            cell,
            Config(
                cfg.model,
                "shared" if (cell.shared or cell.method) else "plain",
                strategy.num_shared / strategy.num_layers if cell.shared else 0.0,
                cfg.bench_batch,
                cfg.bench_prompt,
                cfg.bench_new_tokens,
                repeats=cfg.bench_repeats,
                seed=cfg.seed,
                strategy=strategy.to_dict() if cell.shared else None,
                method=None if cell.method is None else cell.make_method().to_dict(),
            ),
        )
        for cell in order
    ]
    done = [0]

    def run(item):
        cell, config = item
        row = measure_isolated(config) if isolate else measure(config, model)
        row.update(label=cell.label, shared=cell.shared)
        done[0] += 1
        if progress:
            print(
                f"round {(done[0] - 1) // len(configs) + 1}/{cfg.bench_rounds} {cell.label}: kv "
                f"{row['kv_bytes'] / 2**20:.2f} MiB, peak {row['peak_bytes'] / 2**20:.0f} MiB, decode "
                f"{row['decode_tps']:.1f} tok/s (load {row.get('load_avg_1min')})",
                flush=True,
            )
        return row

    return measure_rounds(configs, run, cfg.bench_rounds, progress=False)


# ------------------------------------------------------------------------------------------------
# the table and what it says
# ------------------------------------------------------------------------------------------------
def paired(a: dict, b: dict, key: str = "window_nll") -> tuple[float, float]:
    """Mean per-unit difference a - b of `key` (per-window NLLs, per-example accuracy) and its standard error."""
    if not a.get(key) or not b.get(key) or len(a[key]) != len(b[key]):
        return float("nan"), float("nan")
    d = np.asarray(a[key], dtype=float) - np.asarray(b[key], dtype=float)
    return float(d.mean()), (float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"))


def round_spread(row: dict, full: dict, key: str, name: str) -> dict:
    """{name_lo, name_hi}: the lowest and highest of `row`'s measurement rounds' `key`, over the full model's kept
    value (kvshare.bench.measure_rounds keeps the best round; the spread is what the figure's error bars show).
    None without rounds."""
    values = [r[key] for r in row.get("rounds") or [] if r.get(key) is not None]
    if not values or not full.get(key):
        return {f"{name}_lo": None, f"{name}_hi": None}
    return {f"{name}_lo": min(values) / full[key], f"{name}_hi": max(values) / full[key]}


def table(quality_rows: list[dict], cost_rows: list[dict]) -> list[dict]:
    """One row per cell, ratios against the full model."""
    by_label = {r["label"]: r for r in cost_rows}
    full_q = next(r for r in quality_rows if r["label"] == "full")
    full_c = by_label["full"]
    out = []
    for q in quality_rows:
        c = by_label[q["label"]]
        d, se = paired(q, full_q)
        mc_d, mc_se = paired(q, full_q, "mc_scores")
        out.append(
            {
                "label": q["label"],
                "policy": q["policy"] or "",
                "budget": q["budget"],
                "shared": q["shared"],
                "num_shared": q["num_shared"],
                "ppl": q["ppl"],
                "ppl_se": q["ppl_se"],
                "ppl_ratio": q["ppl"] / full_q["ppl"],
                "nll_diff": d,
                "nll_diff_se": se,
                "mc_acc": q.get("mc_acc"),
                "mc_acc_diff": mc_d,
                "mc_acc_diff_se": mc_se,
                "kv_bytes": c["kv_bytes"],
                "kv_bytes_predicted": c.get("kv_bytes_predicted"),
                "kv_ratio": c["kv_bytes"] / full_c["kv_bytes"],
                "peak_bytes": c["peak_bytes"],
                "peak_ratio": c["peak_bytes"] / full_c["peak_bytes"],
                "peak_above_baseline_ratio": (c["peak_bytes"] - c["baseline_bytes"])
                / max(1, full_c["peak_bytes"] - full_c["baseline_bytes"]),
                "decode_peak_bytes": c.get("decode_peak_bytes"),
                "decode_peak_ratio": (
                    c["decode_peak_bytes"] / full_c["decode_peak_bytes"]
                    if c.get("decode_peak_bytes") and full_c.get("decode_peak_bytes")
                    else None
                ),
                "decode_peak_minus_full_mib": (
                    (c["decode_peak_bytes"] - full_c["decode_peak_bytes"]) / 2**20
                    if c.get("decode_peak_bytes") and full_c.get("decode_peak_bytes")
                    else None
                ),
                "decode_tps": c["decode_tps"],
                "decode_tps_ratio": c["decode_tps"] / full_c["decode_tps"],
                # the spread over the measurement rounds (each round's value against the full model's kept one)
                **round_spread(c, full_c, "decode_tps", "decode_tps_ratio"),
                **round_spread(c, full_c, "peak_bytes", "peak_ratio"),
                **round_spread(c, full_c, "decode_peak_bytes", "decode_peak_ratio"),
                "prefill_s": c["prefill_s"],
                "prefill_ratio": c["prefill_s"] / full_c["prefill_s"],
            }
        )
    return out


def pareto_front(rows: list[dict], x: str = "kv_ratio", y: str = "ppl") -> list[str]:
    """Labels of the rows no other row beats on both memory (`x`) and quality (`y`), lower both better."""
    front = []
    for r in rows:
        if not any((o[x] <= r[x] and o[y] <= r[y]) and (o[x] < r[x] or o[y] < r[y]) for o in rows):
            front.append(r["label"])
    return front


def additivity(rows: list[dict], quality_rows: list[dict]) -> list[dict]:
    """For each eviction method and budget: do memory savings multiply and quality costs add when combined with
    sharing?

    - memory: combined K/V ratio against (method ratio x sharing ratio);
    - quality: interaction = dNLL(combined) - dNLL(method) - dNLL(sharing), every dNLL against the
      full model, paired per window (0 = the costs add up exactly; > 0 = worse together than the sum).
    """
    q = {r["label"]: r for r in quality_rows}
    t = {r["label"]: r for r in rows}
    share = t["sharing"]
    out = []
    for r in rows:
        if r["shared"] or not r["policy"]:
            continue
        comb = t[f"{r['label']} + sharing"]
        w = (
            np.asarray(q[comb["label"]]["window_nll"])
            - np.asarray(q[r["label"]]["window_nll"])
            - np.asarray(q["sharing"]["window_nll"])
            + np.asarray(q["full"]["window_nll"])
        )
        se = float(w.std(ddof=1) / math.sqrt(len(w))) if len(w) > 1 else float("nan")
        out.append(
            {
                "policy": r["policy"],
                "budget": r["budget"],
                "kv_ratio_policy": r["kv_ratio"],
                "kv_ratio_sharing": share["kv_ratio"],
                "kv_ratio_combined": comb["kv_ratio"],
                "kv_ratio_product": r["kv_ratio"] * share["kv_ratio"],
                "nll_diff_policy": r["nll_diff"],
                "nll_diff_sharing": share["nll_diff"],
                "nll_diff_combined": comb["nll_diff"],
                "nll_diff_sum": r["nll_diff"] + share["nll_diff"],
                "interaction": float(w.mean()),
                "interaction_se": se,
                "ppl_policy": r["ppl"],
                "ppl_combined": comb["ppl"],
                "combined_on_front": None,
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# what the attention weights cost
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def overhead(model, cfg: Settings, budget: int | None = None, impls=("sdpa", "eager"), repeats: int = 1) -> list[dict]:
    """Prefill and decode time of the full model and each eviction method, under sdpa (H2O/PyramidInfer recompute
    the probabilities they need from the query and kept keys) and eager (the probabilities come with the
    attention); `score_s` / `evict_s`: the methods' own time, scoring and dropping (in-process, CPU)."""
    from transformers import DynamicCache

    from ..bench import last_logits_only

    budget = cfg.budgets[0] if budget is None else budget
    cache_kw = model_cache_kwarg(model)
    last = last_logits_only(model)  # like generate: the prefill computes the last position's logits only
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(
        0, vocab, (cfg.bench_batch, cfg.bench_prompt), generator=torch.Generator().manual_seed(cfg.seed)
    )
    original = model.config._attn_implementation
    best: dict = {}
    try:
        for _ in range(repeats):  # rounds over every configuration, so load drift hits them alike
            for impl in impls:
                model.set_attn_implementation(impl)
                for name in [None, *cfg.methods]:
                    method = None if name is None else methods.make(name, budget=budget)
                    with compression(model, None, method), timing() as t:
                        cache = DynamicCache(config=model.config)
                        t0 = time.perf_counter()
                        token = (
                            model(input_ids=prompt, use_cache=True, **{cache_kw: cache}, **last)
                            .logits[:, -1:]
                            .argmax(-1)
                        )
                        t1 = time.perf_counter()
                        prefill_score, prefill_evict = t["score_s"], t["evict_s"]
                        for _ in range(cfg.bench_new_tokens):
                            token = (
                                model(input_ids=token, use_cache=True, **{cache_kw: cache}).logits[:, -1:].argmax(-1)
                            )
                        t2 = time.perf_counter()
                        row = {
                            "attention": impl,
                            "policy": name or "full",
                            "budget": budget if name else None,
                            "prefill_s": t1 - t0,
                            "decode_s": t2 - t1,
                            "prefill_score_s": prefill_score,
                            "prefill_evict_s": prefill_evict,
                            "decode_score_s": t["score_s"] - prefill_score,
                            "decode_evict_s": t["evict_s"] - prefill_evict,
                        }
                    key = (impl, row["policy"])
                    if (
                        key not in best
                        or row["prefill_s"] + row["decode_s"] < best[key]["prefill_s"] + best[key]["decode_s"]
                    ):
                        best[key] = row
    finally:
        model.set_attn_implementation(original)
    rows = list(best.values())
    base = {r["attention"]: r for r in rows if r["policy"] == "full"}
    ref = base.get("sdpa", rows[0])
    for r in rows:
        r["prefill_ratio"] = r["prefill_s"] / ref["prefill_s"]
        r["decode_ratio"] = r["decode_s"] / ref["decode_s"]
        r["decode_step_ms"] = 1000 * r["decode_s"] / cfg.bench_new_tokens
    return rows
