"""Notebook 07: KVSharer beside the cross-layer peers (MiniCache, SimLayerKV) and token eviction, at equal KV bytes.

Every method is swept over its own knob so that it lands at several KV-cache sizes between half and all of
the full cache: KVSharer by the number of replaced layers C (dissimilar, similar and random orders; random
over several seeds), MiniCache by its start layer, SimLayerKV by its laziness threshold, StreamingLLM, H2O
and PyramidInfer by their token budget. Each point is scored on the same held-out windows and placed by the
bytes its cache MEASURABLY holds (`kvshare.cache_bytes`) at the end of a window.

Protocol (decoded perplexity). The held-out text of kvshare.metrics.HELDOUT, all of it in the full run: 32
windows of 512 = 16,384 tokens. In every window the first `context` tokens are prefilled and the rest is fed one
token at a time, each step scoring the next token: `window - 1 - context` scored tokens per window (63 in the full
run, 2,016 in all; `Settings.scored_per_window`). The context is long and the decoded part short because decoding
on 2 CPU cores costs ~20x a prefilled token: the measured per-unit costs are in the notebook's report. Methods
whose cache changes after the prefill (MiniCache, SimLayerKV, eviction) are decoded step by step; the full model
and KVSharer are causal (decoding equals one forward: tests/test_methods.py checks it), so the same tokens are
scored from one forward per window, with the same logits up to float noise. Windows are the paired units of
every comparison (kvshare.metrics.paired_difference).

Offline suite. The multiple-choice tasks of kvshare's offline suite (kvshare.evaluation.Evaluator; its perplexity
task is left out: the held-out perplexity above is the longer measurement) for the full model and, per method, its
point nearest to each target byte ratio (`suite_points`), `suite_limit` examples per task. Lossy methods are scored
by decoding there too (the Evaluator decides).

Cost. Decode speed and peak memory (kvshare.bench.measure) of the full model and the points at the targets, in
this process with the loaded model, in alternating rounds (kvshare.bench.measure_rounds).

Resumable. Every unit (a search, the calibration, one point's scoring, one point's suite, the cost step) is
stored in a `ResultCache` (`<out>/07_peers_results.json`, rewritten atomically after each unit) under a key of
what it depends on: an interrupted run recomputes only what is missing.

Bytes. Per sequence, at the end of a window (`window - 1` tokens seen). A batch's cache is rectangular; for
SimLayerKV, whose laziness is decided per sequence, a layer lazy for only some rows of a batch keeps every
token stored, so its batched bytes overstate what each sequence needs: the x axis uses the bytes of the tokens
each row really keeps (counted from the cache's own kept sets, `sequence_bytes`), and the batched bytes are
in the table beside them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import methods
from ..accounting import cache_bytes, kv_token_bytes, layer_bytes
from ..adapter import model_cache_kwarg, num_layers
from ..combine import compression
from ..data import calibration_texts, eval_text
from ..methods.simlayerkv import SimLayerKVLayer
from ..metrics import HELDOUT, decode_windows, paired_difference
from ..strategy import Strategy
from .scaffold import ResultCache, RunSettings

FAMILIES = (
    "full",
    "kvsharer-dissimilar",
    "kvsharer-similar",
    "kvsharer-random",
    "kvsharer-best",
    "minicache",
    "simlayerkv",
    "streamingllm",
    "h2o",
    "pyramidinfer",
)
LABELS = {
    "full": "full model",
    "kvsharer-dissimilar": "KVSharer (dissimilar)",
    "kvsharer-similar": "KVSharer (similar)",
    "kvsharer-random": "KVSharer (random)",
    "kvsharer-best": "KVSharer (best-first)",
    "minicache": "MiniCache",
    "simlayerkv": "SimLayerKV",
    "streamingllm": "StreamingLLM",
    "h2o": "H2O",
    "pyramidinfer": "PyramidInfer",
}


@dataclass
class Settings(RunSettings):
    """Everything notebook 07's numbers depend on (saved beside its figures)."""

    window: int = HELDOUT.window
    windows: int = HELDOUT.tokens // HELDOUT.window  # 32 x 512 = 16,384 held-out tokens: the whole protocol
    context: int = 448  # prefilled tokens per window; the last window - 1 - context (63) are decoded and scored
    batch: int = 32  # windows decoded together (all of them in one batch: a decode step's fixed cost is paid once)
    num_shared: list = field(default_factory=lambda: [8, 15])  # KVSharer: 73% and 50% of the bytes
    random_seeds: int = 5
    samples: int = 10  # calibration texts of the KVSharer search (the paper: 30; 10 keeps 7 searches in budget)
    start_layers: list = field(default_factory=lambda: [10, 0])  # MiniCache: ~69% and ~54% of the bytes
    retain: float = 0.05
    merge_interval: int = 16
    lazy_targets: list = field(default_factory=lambda: [0.75, 0.5])  # SimLayerKV: byte ratios aimed at
    sink: int = 4
    recent: int = 64
    query_window: int = 32
    budget_ratios: list = field(default_factory=lambda: [0.75, 0.5])  # eviction: budget / tokens seen
    # eviction methods swept (StreamingLLM only in the full run: each decoded method costs ~10 min of the 45-minute
    # budget with its suite; "h2o" and "pyramidinfer" are the same code path, add them when time allows)
    evictions: list = field(default_factory=lambda: ["streamingllm"])
    targets: list = field(default_factory=lambda: [0.75, 0.5])  # byte ratios of the conclusion
    tolerance: float = 0.05  # a method's point counts at a target when its ratio is within this of it
    suite_tasks: list | None = None  # offline suite tasks (None: its defaults but the perplexity task)
    suite_limit: int = 4  # examples per suite task, the same ones at every point: what fits
    suite_seeds: int = 5  # random KVSharer: the suite runs the first this many seeds' points
    bench_batch: int = 1
    bench_prompt: int = 448
    bench_new_tokens: int = 64
    bench_rounds: int = 1  # alternating rounds (kvshare.bench.measure_rounds): the fastest of each kept
    # each cost in a fresh process: CPU peak memory needs a process of its own (in the notebook's process the
    # allocator reuses freed memory and a run adds ~0 to the resident set); False: in this process, speed only
    bench_isolate: bool = True

    QUICK = dict(
        window=128,
        windows=2,
        context=96,
        batch=2,
        num_shared=[8],
        random_seeds=2,
        samples=6,
        start_layers=[10],
        lazy_targets=[0.75],
        recent=16,
        query_window=8,
        budget_ratios=[0.75],
        evictions=["streamingllm", "h2o"],
        targets=[0.75],
        tolerance=0.1,
        suite_tasks=["kvshare_sciq"],
        suite_limit=2,
        bench_batch=1,
        bench_prompt=64,
        bench_new_tokens=8,
        bench_rounds=1,
        bench_isolate=False,
    )

    @property
    def scored_per_window(self) -> int:
        """Tokens scored in each window: those after the prefilled `context` (the first token has no prediction)."""
        return self.window - 1 - self.context

    @property
    def scored_tokens(self) -> int:
        return self.windows * self.scored_per_window

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "heldout_tokens": self.windows * self.window,
            "scored_per_window": self.scored_per_window,
            "scored_tokens": self.scored_tokens,
        }


settings = Settings.for_run  # notebook 07: settings(model, quick, seed, **overrides)


# ------------------------------------------------------------------------------------------------
# bytes per sequence
# ------------------------------------------------------------------------------------------------
def sequence_bytes(cache, config, dtype_bytes: int) -> list[int]:
    """Per sequence of a batch: the K/V bytes of the tokens it really keeps -- a slot's own bytes split evenly
    over the rows, except SimLayerKV slots, where a row lazy in a layer lazy for only some rows holds its kept
    tokens only (the rest are stored for the other rows and hidden from it)."""
    batch = None
    per_row = None
    for layer in cache.layers:
        if isinstance(layer, SimLayerKVLayer) and layer.is_initialized and layer.held():
            held = layer.held()
            hidden = layer.hidden[:, 0].sum(-1) if layer.hidden is not None else torch.zeros(layer.keys.shape[0])
            row = [(held - int(h)) * kv_token_bytes(config, dtype_bytes) for h in hidden.tolist()]
        else:
            rows = _rows(layer)
            if rows is None:
                continue
            row = [layer_bytes(layer) / rows] * rows
        batch = len(row) if batch is None else batch
        per_row = row if per_row is None else [a + b for a, b in zip(per_row, row)]
    return [] if per_row is None else [int(round(x)) for x in per_row]


def _rows(layer) -> int | None:
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            return t.shape[0]
    pair = getattr(layer, "pair", None)
    if pair is not None and pair.tensors():
        return pair.tensors()[0].shape[0]
    storage = getattr(layer, "storage", None)
    if storage is not None and getattr(storage, "qkeys", None) is not None:
        return storage.qkeys.packed.shape[0]
    return None


# ------------------------------------------------------------------------------------------------
# scoring one point
# ------------------------------------------------------------------------------------------------
def heldout_ids(tokenizer, cfg: Settings) -> torch.Tensor:
    """[windows, window] token ids: the first windows x window tokens of the held-out text."""
    ids = tokenizer(eval_text(HELDOUT.source), return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    spans = decode_windows(len(ids), cfg.window, cfg.windows)
    if len(spans) < cfg.windows:
        raise ValueError(f"the held-out text has only {len(spans)} windows of {cfg.window}")
    return torch.stack([ids[b:e] for b, e in spans])


@torch.no_grad()
def score(model, ids: torch.Tensor, applied: tuple, cfg: Settings, decode: bool) -> dict:
    """Per-window mean NLL of tokens context+1 .. window-1 of every window (decoded step by step, or -- causal
    methods -- from one forward), the bytes each sequence's cache holds at the end, and the time taken."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    kw_name = model_cache_kwarg(model)
    dtype_bytes = next(model.parameters()).element_size()
    window_nll, rows_bytes, batch_bytes = [], [], []
    t0 = time.perf_counter()
    with compression(model, *applied):
        for s in range(0, ids.shape[0], cfg.batch):
            batch = ids[s : s + cfg.batch].to(device)
            cache = DynamicCache(config=model.config)
            kw = {kw_name: cache}
            if decode:
                model(input_ids=batch[:, : cfg.context], use_cache=True, logits_to_keep=1, **kw)
                nll = []
                for t in range(cfg.context, cfg.window - 1):
                    logits = model(input_ids=batch[:, t : t + 1], use_cache=True, **kw).logits[:, -1].float()
                    nll.append(-F.log_softmax(logits, dim=-1).gather(-1, batch[:, t + 1 : t + 2])[:, 0])
                nll = torch.stack(nll, dim=1)
            else:
                keep = cfg.window - 1 - cfg.context
                logits = model(
                    input_ids=batch[:, : cfg.window - 1], use_cache=True, logits_to_keep=keep, **kw
                ).logits.float()
                nll = -F.log_softmax(logits, dim=-1).gather(-1, batch[:, cfg.context + 1 :, None])[..., 0]
            window_nll.extend(nll.double().mean(dim=1).tolist())
            rows_bytes.extend(sequence_bytes(cache, model.config, dtype_bytes))
            batch_bytes.append(cache_bytes(cache) / batch.shape[0])
            del cache
    mean = float(np.mean(window_nll))
    se = float(np.std(window_nll, ddof=1) / math.sqrt(len(window_nll))) if len(window_nll) > 1 else float("nan")
    return {
        "nll": mean,
        "nll_se": se,
        "ppl": math.exp(mean),
        "window_nll": window_nll,
        "kv_bytes": float(np.mean(rows_bytes)),
        "kv_bytes_batched": float(np.mean(batch_bytes)),
        "scored_tokens": len(window_nll) * (cfg.window - 1 - cfg.context),
        "decoded": decode,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------
# the points of the sweep
# ------------------------------------------------------------------------------------------------
@dataclass
class Point:
    family: str
    knob: str
    value: float
    applied: tuple  # what kvshare.compression gets
    seed: int | None = None

    @property
    def name(self) -> str:
        """A stable unit name for the results cache: family, knob value and seed."""
        seed = f"_seed{self.seed}" if self.seed is not None else ""
        return "full" if self.family == "full" else f"{self.family}_{self.knob}{self.value:g}{seed}"

    @property
    def label(self) -> str:
        seed = f" seed {self.seed}" if self.seed is not None else ""
        return f"{LABELS[self.family]} {self.knob}={self.value:g}{seed}" if self.family != "full" else "full model"

    def describe(self) -> dict:
        out = {"family": self.family, "label": self.label, "knob": self.knob, "value": self.value, "seed": self.seed}
        for a in self.applied:
            if isinstance(a, Strategy):
                out["strategy"] = a.to_dict()
            elif a is not None:
                out["method"] = a.to_dict()
        return out


def kvsharer_points(model, cfg: Settings, progress: bool = True, cache: ResultCache | None = None) -> list[Point]:
    """One search per (order, seed) to the largest C (kvshare.methods.make('kvsharer', ...), searched on first use);
    every smaller C is a prefix of it (the greedy search visits the same candidates up to there). With a
    `cache`, each search's strategy is stored there and reused."""
    top = max(cfg.num_shared)
    plans = [("dissimilar", None), ("similar", None)] + [("random", s) for s in range(cfg.random_seeds)]
    plans += [("best", None)]  # the best-first search (notebook 11): each step adds one pair, so C is a prefix too
    out = []
    for order, seed in plans:
        t0 = time.perf_counter()
        s_seed = cfg.seed if seed is None else seed
        name = f"search_{order}" + ("" if seed is None else f"_seed{seed}")
        key = ResultCache.key(cfg.model, top, order, s_seed, cfg.samples)
        hit = None if cache is None else cache.get(name, key)
        if hit is not None:
            strategy = Strategy.from_dict(hit)
        else:
            method = methods.make("kvsharer", num_shared=top, order=order, seed=s_seed, samples=cfg.samples)
            strategy = method.strategy_for(model)
            if cache is not None:
                cache.put(name, key, strategy.to_dict())
        if progress:
            print(
                f"search {order}{'' if seed is None else f' seed {seed}'} to C={top}: "
                f"{time.perf_counter() - t0:.1f} s{' (cached)' if hit is not None else ''}, "
                f"{strategy.num_shared} layers replaced",
                flush=True,
            )
        for c in cfg.num_shared:
            s = strategy.prefix(c) if c < strategy.num_shared else strategy
            out.append(Point(f"kvsharer-{order}", "C", c, (s,), seed))
    return out


@torch.no_grad()
def layer_shares(model, tokenizer, cfg: Settings, texts: int = 8) -> list[float]:
    """Each layer's mean SimLayerKV laziness score (share of the last queries' attention on sink + recent) over
    `texts` windows of `context` tokens of calibration text (never held-out text)."""
    probe = methods.make("simlayerkv", threshold=0.5, sink=cfg.sink, recent=cfg.recent, query_window=cfg.query_window)
    joined = "\n\n".join(calibration_texts(max(cfg.samples, texts)))
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    n = min(texts, len(ids) // cfg.context)
    batch = ids[: n * cfg.context].view(n, cfg.context).to(next(model.parameters()).device)
    with compression(model, probe):
        model(input_ids=batch, use_cache=True, logits_to_keep=1)
    return [float(np.mean(probe.decisions[i]["share"])) for i in range(num_layers(model))]


def simlayerkv_thresholds(shares: list[float], cfg: Settings) -> list[float]:
    """Thresholds aimed at the byte ratios `cfg.lazy_targets`: a lazy layer keeps sink + recent of the window - 1
    tokens, so a ratio r needs a share (1 - r) / (1 - kept) of the layers lazy; the threshold sits between the
    k-th and (k+1)-th largest calibration share."""
    kept = min(1.0, (cfg.sink + cfg.recent) / (cfg.window - 1))
    ordered = sorted(shares, reverse=True)
    out = []
    for r in cfg.lazy_targets:
        k = min(len(ordered), max(1, round((1 - r) / max(1e-9, 1 - kept) * len(ordered))))
        upper = ordered[k - 1]
        lower = ordered[k] if k < len(ordered) else 0.0
        out.append(round((upper + lower) / 2, 6))
    return out


def other_points(model, tokenizer, cfg: Settings, cache: ResultCache | None = None) -> tuple[list[Point], dict]:
    """MiniCache, SimLayerKV and eviction points; and the SimLayerKV calibration (shares, thresholds)."""
    pts = [
        Point(
            "minicache",
            "start_layer",
            s,
            (methods.make("minicache", start_layer=s, retain=cfg.retain, merge_interval=cfg.merge_interval),),
        )
        for s in cfg.start_layers
    ]
    key = ResultCache.key(cfg.model, cfg.sink, cfg.recent, cfg.query_window, cfg.context, cfg.samples)
    shares = None if cache is None else cache.get("simlayerkv_calibration", key)
    if shares is None:
        shares = layer_shares(model, tokenizer, cfg)
        if cache is not None:
            cache.put("simlayerkv_calibration", key, shares)
    thresholds = simlayerkv_thresholds(shares, cfg)
    pts += [
        Point(
            "simlayerkv",
            "threshold",
            t,
            (methods.make("simlayerkv", threshold=t, sink=cfg.sink, recent=cfg.recent, query_window=cfg.query_window),),
        )
        for t in thresholds
    ]
    seen = cfg.window - 1
    for name in cfg.evictions:
        for r in cfg.budget_ratios:
            budget = max(2, int(round(r * seen)))
            pts.append(Point(name, "budget", budget, (methods.make(name, budget=budget),)))
    return pts, {"layer_shares": shares, "thresholds": thresholds, "targets": list(cfg.lazy_targets)}


def points(
    model, tokenizer, cfg: Settings, progress: bool = True, cache: ResultCache | None = None
) -> tuple[list[Point], dict]:
    """Every point of the sweep (the full model first) and the SimLayerKV calibration (`cache`: reuse searches and
    calibration stored there)."""
    others, calibration = other_points(model, tokenizer, cfg, cache)
    return [Point("full", "", 0, ())] + others + kvsharer_points(model, cfg, progress, cache), calibration


def heldout_key(p: Point, cfg: Settings) -> str:
    """What one point's held-out scores depend on (its results-cache key)."""
    return ResultCache.key(cfg.model, cfg.window, cfg.windows, cfg.context, cfg.batch, p.describe(), HELDOUT.source)


def evaluate(
    model, tokenizer, pts: list[Point], cfg: Settings, progress: bool = True, cache: ResultCache | None = None
) -> list[dict]:
    """Score every point on the held-out windows (see `score`); rows carry the point's description. With a
    `cache`, each point's row is stored there as soon as it is scored and reused on a re-run."""
    ids = heldout_ids(tokenizer, cfg)
    rows = []
    t_all = time.perf_counter()
    for i, p in enumerate(pts):
        name, key = f"heldout_{p.name}", heldout_key(p, cfg)
        row = None if cache is None else cache.get(name, key)
        cached = row is not None
        if row is None:
            decode = any(getattr(a, "scored_by_decoding", False) for a in p.applied)
            r = score(model, ids, p.applied, cfg, decode)
            row = {**p.describe(), **r}
            if p.family == "simlayerkv":
                row["lazy_layers_last_batch"] = p.applied[0].lazy_layers
            if cache is not None:
                cache.put(name, key, row)
        rows.append(dict(row))  # the ratios added below stay out of the cache
        if progress:
            print(
                f"[{i + 1}/{len(pts)}] {p.label}: ppl {row['ppl']:.3f} ± {row['ppl'] * row['nll_se']:.3f}, "
                f"kv {row['kv_bytes'] / 2**20:.2f} MiB/seq, {row['seconds']:.0f} s"
                f"{' (cached)' if cached else ''} ({time.perf_counter() - t_all:.0f} s so far)",
                flush=True,
            )
    full = rows[0]
    for r in rows:
        r["kv_ratio"] = r["kv_bytes"] / full["kv_bytes"]
        r["kv_ratio_batched"] = r["kv_bytes_batched"] / full["kv_bytes"]
        if r is not full:
            d = paired_difference(r, full)
            r.update(
                nll_diff_vs_full=d["nll_diff"], nll_diff_vs_full_se=d["nll_diff_se"], ppl_ratio_vs_full=d["ppl_ratio"]
            )
    return rows


# ------------------------------------------------------------------------------------------------
# families, random mean, costs, conclusion
# ------------------------------------------------------------------------------------------------
def family_curves(rows: list[dict]) -> list[dict]:
    """One row per (family, knob value): random KVSharer averaged over seeds (mean NLL of the seeds' per-window
    NLLs, spread = min..max of the seeds' perplexities); others as they are. `ratio_vs_full` is the perplexity
    ratio to the full model from the paired per-window difference (`ratio_lo`..`ratio_hi`: one standard error;
    `ratio_min`..`ratio_max`: over seeds)."""
    out = []
    full = np.asarray(next(r for r in rows if r["family"] == "full")["window_nll"])
    for fam in FAMILIES:
        mine = [r for r in rows if r["family"] == fam]
        for value in dict.fromkeys(r["value"] for r in mine):
            group = [r for r in mine if r["value"] == value]
            wn = np.mean([r["window_nll"] for r in group], axis=0)
            mean = float(wn.mean())
            se = float(wn.std(ddof=1) / math.sqrt(len(wn))) if len(wn) > 1 else float("nan")
            ppls = [r["ppl"] for r in group]
            diff = wn - full  # paired per window against the full model
            d_se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
            seed_ratios = [math.exp(float(np.mean(np.asarray(r["window_nll"]) - full))) for r in group]
            out.append(
                {
                    "family": fam,
                    "label": LABELS[fam],
                    "knob": group[0]["knob"],
                    "value": value,
                    "seeds": len(group),
                    "nll": mean,
                    "nll_se": se,
                    "ppl": math.exp(mean),
                    "ppl_se": math.exp(mean) * se,
                    "ppl_min": min(ppls),
                    "ppl_max": max(ppls),
                    "ratio_vs_full": math.exp(float(diff.mean())),
                    "ratio_lo": math.exp(float(diff.mean()) - d_se),
                    "ratio_hi": math.exp(float(diff.mean()) + d_se),
                    "ratio_min": min(seed_ratios),
                    "ratio_max": max(seed_ratios),
                    "kv_ratio": float(np.mean([r["kv_ratio"] for r in group])),
                    "kv_ratio_batched": float(np.mean([r["kv_ratio_batched"] for r in group])),
                    "kv_bytes": float(np.mean([r["kv_bytes"] for r in group])),
                    "window_nll": wn.tolist(),
                    "decoded": group[0]["decoded"],
                }
            )
    return out


def at_target(curves: list[dict], target: float, tolerance: float) -> list[dict]:
    """Per family (full model excluded), its point whose byte ratio is closest to `target` within `tolerance`."""
    out = []
    for fam in FAMILIES[1:]:
        mine = [c for c in curves if c["family"] == fam and abs(c["kv_ratio"] - target) <= tolerance]
        if mine:
            out.append(min(mine, key=lambda c: (abs(c["kv_ratio"] - target), c["kv_ratio"])))
    return out


def verdict(curves: list[dict], cfg: Settings) -> list[dict]:
    """At every target byte ratio: the families' points there ranked by mean NLL, the best one, its paired
    difference (per window) to the runner-up and to the full model, and every other point's to the best."""
    full = next(c for c in curves if c["family"] == "full")
    out = []
    for target in cfg.targets:
        pts = sorted(at_target(curves, target, cfg.tolerance), key=lambda c: c["nll"])
        entry = {"target": target, "tolerance": cfg.tolerance, "ranking": [], "best": None, "runner_up": None}
        if pts:
            best = pts[0]
            for c in pts:
                row = {
                    "family": c["family"],
                    "label": c["label"],
                    "knob": c["knob"],
                    "value": c["value"],
                    "seeds": c["seeds"],
                    "kv_ratio": c["kv_ratio"],
                    "ppl": c["ppl"],
                    "ppl_se": c["ppl_se"],
                }
                vs_full = paired_difference(c, full)
                row.update(
                    vs_full_nll_diff=vs_full["nll_diff"],
                    vs_full_se=vs_full["nll_diff_se"],
                    vs_full_z=vs_full["z"],
                    vs_full_ppl_ratio=vs_full["ppl_ratio"],
                    vs_full_ppl_ratio_ci95=vs_full["ppl_ratio_ci95"],
                )
                if c is not best:
                    d = paired_difference(c, best)
                    row.update(vs_best_nll_diff=d["nll_diff"], vs_best_se=d["nll_diff_se"], vs_best_z=d["z"])
                entry["ranking"].append(row)
            entry["best"] = entry["ranking"][0]
            entry["runner_up"] = entry["ranking"][1] if len(pts) > 1 else None
        entry["missing"] = [LABELS[f] for f in FAMILIES[1:] if f not in {c["family"] for c in pts}]
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------
# the offline suite at the points nearest to the targets
# ------------------------------------------------------------------------------------------------
def suite_points(rows: list[dict], pts: list[Point], cfg: Settings) -> list[Point]:
    """The full model and, per family and target byte ratio, the knob value whose measured ratio (`rows`, scored
    by `evaluate`) is nearest to the target, if within `tolerance`; random KVSharer at its first `suite_seeds`
    seeds. In sweep order, each point once."""
    wanted = {("full", 0)}
    for fam in FAMILIES[1:]:
        mine = [r for r in rows if r["family"] == fam]
        for target in cfg.targets:
            near = [r for r in mine if abs(r["kv_ratio"] - target) <= cfg.tolerance]
            if near:
                best = min(near, key=lambda r: (abs(r["kv_ratio"] - target), r["kv_ratio"]))
                wanted.add((fam, best["value"]))
    return [
        p
        for p in pts
        if (p.family, p.value) in wanted and (p.family != "kvsharer-random" or (p.seed or 0) < cfg.suite_seeds)
    ]


def suite_specs(cfg: Settings) -> list:
    """The suite's tasks: `cfg.suite_tasks`, or the offline defaults without the perplexity task."""
    from ..evaluation import resolve_tasks

    if cfg.suite_tasks:
        return resolve_tasks("offline", cfg.suite_tasks)
    return [s for s in resolve_tasks("offline") if s.kind != "perplexity"]


def suite_task_names(cfg: Settings) -> list[str]:
    return [s.name for s in suite_specs(cfg)]


def run_suite(
    model, tokenizer, pts: list[Point], cfg: Settings, cache: ResultCache | None = None, progress: bool = True
) -> list[dict]:
    """The offline suite (kvshare.evaluation.Evaluator, `suite_limit` examples per task) at every point of `pts`:
    KVSharer as the strategy, the other methods as the cache method (scored by decoding when lossy after the
    prefill). One unit per point in `cache`. Returns one record per point: its description and the rows (with
    per-example scores)."""
    from ..evaluation import Evaluator, task_key

    tasks = suite_task_names(cfg)
    # a task's identity (its prompt, its examples' split, the offline format), not its name alone: a cached point
    # scored on other examples of a task of the same name is scored again
    task_keys = [task_key(s) for s in suite_specs(cfg)]
    evaluator = Evaluator(model, tokenizer, progress=False)
    out = []
    t_all = time.perf_counter()
    for i, p in enumerate(pts):
        name = f"suite_{p.name}"
        key = ResultCache.key(cfg.model, task_keys, cfg.suite_limit, p.describe())
        hit = None if cache is None else cache.get(name, key)
        if hit is None:
            strategy = next((a for a in p.applied if isinstance(a, Strategy)), None)
            method = next((a for a in p.applied if a is not None and not isinstance(a, Strategy)), None)
            t0 = time.perf_counter()
            result = evaluator.evaluate(strategy, tasks=tasks, limit=cfg.suite_limit, label=p.label, method=method)
            hit = {
                **p.describe(),
                "protocol": result["protocol"],
                "rows": result["rows"],
                "seconds": time.perf_counter() - t0,
            }
            if cache is not None:
                cache.put(name, key, hit)
        out.append(hit)
        if progress:
            s = suite_scores(hit["rows"])
            print(
                f"suite [{i + 1}/{len(pts)}] {p.label} ({hit['protocol']}): average {s['average']:.3f}, "
                f"{hit['seconds']:.0f} s ({time.perf_counter() - t_all:.0f} s so far)",
                flush=True,
            )
    return out


def suite_scores(rows: list[dict]) -> dict:
    """The multiple-choice average of one point's suite rows: the mean of the tasks' primary accuracies, its stderr
    from theirs, and the examples and tasks it covers."""
    mc = [r for r in rows if r.get("primary") and r.get("higher_is_better", True)]
    nan = float("nan")
    return {
        "average": float(np.mean([r["value"] for r in mc])) if mc else nan,
        "average_se": math.sqrt(sum((r["stderr"] or 0.0) ** 2 for r in mc)) / len(mc) if mc else nan,
        "average_n": sum(r["n"] or 0 for r in mc),
        "average_tasks": len(mc),
    }


def _paired(a: list | None, b: list | None) -> tuple[float, float] | None:
    """Mean of a - b per example and its standard error (None without per-example scores of equal length)."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def suite_summary(records: list[dict]) -> list[dict]:
    """One row per suite point: the multiple-choice average (stderr, n) and its paired difference against the full
    model from the per-example scores (per task the mean per-example difference, averaged over tasks, variances
    added; a task without per-example scores adds both stderrs squared)."""
    full = next(r for r in records if r["family"] == "full")
    full_rows = {(r["task"], r["metric"]): r for r in full["rows"]}
    out = []
    for rec in records:
        s = suite_scores(rec["rows"])
        row = {k: rec[k] for k in ("family", "label", "knob", "value", "seed")}
        row.update(s, protocol=rec["protocol"])
        if rec is not full:
            mc = [r for r in rec["rows"] if r.get("primary") and r.get("higher_is_better", True)]
            diffs, var = [], 0.0
            for r in mc:
                f = full_rows.get((r["task"], r["metric"]))
                if f is None:
                    continue
                paired = _paired(r.get("scores"), f.get("scores"))
                if paired is None:
                    diffs.append(r["value"] - f["value"])
                    var += (r["stderr"] or 0.0) ** 2 + (f["stderr"] or 0.0) ** 2
                else:
                    diffs.append(paired[0])
                    var += paired[1] ** 2
            row["average_diff_vs_full"] = float(np.mean(diffs)) if diffs else float("nan")
            row["average_diff_vs_full_se"] = math.sqrt(var) / len(diffs) if diffs else float("nan")
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# cost
# ------------------------------------------------------------------------------------------------
def cost_points(pts: list[Point]) -> list[Point]:
    """One point per (family, knob value), KVSharer in its dissimilar order only: the similar and random orders
    replace as many layers, and which layers are replaced does not change the work."""
    chosen, seen = [], set()
    for p in pts:
        if p.family in ("kvsharer-similar", "kvsharer-random", "kvsharer-best"):
            continue
        if (p.family, p.value) not in seen:
            seen.add((p.family, p.value))
            chosen.append(p)
    return chosen


def bench_config(p: Point, cfg: Settings):
    """The kvshare.bench configuration of one point (random prompt tokens, greedy decoding)."""
    from ..bench import Config

    strategy = next((a for a in p.applied if isinstance(a, Strategy)), None)
    method = next((a for a in p.applied if a is not None and not isinstance(a, Strategy)), None)
    return Config(
        cfg.model,
        "plain" if p.family == "full" else "shared",
        0.0,
        cfg.bench_batch,
        cfg.bench_prompt,
        cfg.bench_new_tokens,
        repeats=1,
        seed=cfg.seed,
        strategy=None if strategy is None or not strategy.mapping else strategy.to_dict(),
        method=None if method is None else method.to_dict(),
    )


def cost_key(config) -> dict:
    """What the cost unit is keyed by for one configuration: its fields, plus `policy`, `budget` and `kv_bits` as None.
    The committed unit (figures/07_peers_results.json) was keyed with those three fields of the configuration, always
    None here (`method` says what they said); keeping them keeps that unit valid, so a re-run reuses it."""
    return {**asdict(config), "policy": None, "budget": None, "kv_bits": None}


def cost(
    cfg: Settings,
    pts: list[Point],
    model=None,
    progress: bool = True,
    cache: ResultCache | None = None,
) -> list[dict]:
    """Decode speed and peak memory (kvshare.bench.measure) of `cost_points(pts)`: in this process with the
    loaded `model`, `bench_rounds` alternating rounds (kvshare.bench.measure_rounds; per point its fastest round,
    its lowest peaks), a warm-up only before a point's first round; with `bench_isolate` (or no model) each run
    in a fresh process instead. Peak memory in one process is its resident set: `peak_above_baseline_bytes`
    (what the run added to what the process held before it) is the comparable number. Stored in `cache` as one
    unit."""
    from dataclasses import replace

    from ..bench import measure, measure_isolated, measure_rounds

    chosen = cost_points(pts)
    configs = [bench_config(p, cfg) for p in chosen]
    key = ResultCache.key([cost_key(c) for c in configs], cfg.bench_rounds, cfg.bench_isolate or model is None)
    hit = None if cache is None else cache.get("cost", key)
    if hit is not None:
        return hit
    runs_so_far: dict[int, int] = {}

    isolate = cfg.bench_isolate or model is None

    def run(config):
        seen = runs_so_far.get(id(config), 0)
        runs_so_far[id(config)] = seen + 1
        try:
            if isolate:  # a fresh process warms up every time
                return measure_isolated(config)
            return measure(replace(config, warmup=1 if seen == 0 else 0), model)
        except RuntimeError as e:  # one failed configuration must not lose the others
            return {"error": str(e), "decode_tps": float("-inf"), "prefill_s": float("inf")}

    measured = measure_rounds(configs, run, cfg.bench_rounds, progress=False, desc="cost")
    rows = []
    for p, row in zip(chosen, measured):
        if "error" in row:
            print(f"cost {p.label}: FAILED ({row['error']}); left out", flush=True)
            continue
        row.update(
            family=p.family,
            label=LABELS[p.family] if p.family == "full" else f"{LABELS[p.family]} {p.knob}={p.value:g}",
            knob=p.knob,
            value=p.value,
            peak_above_baseline_bytes=row["peak_bytes"] - row["baseline_bytes"],
            in_process=not isolate,
        )
        rows.append({k: v for k, v in row.items() if k not in ("strategy", "method")})
        if progress:
            print(
                f"cost {row['label']}: decode {row['decode_tps']:.1f} tok/s, "
                f"peak +{row['peak_above_baseline_bytes'] / 2**20:.0f} MiB over {row['baseline_bytes'] / 2**20:.0f}, "
                f"kv {row['kv_bytes'] / 2**20:.2f} MiB (load {row.get('load_avg_1min')})",
                flush=True,
            )
    full = next((r for r in rows if r["family"] == "full"), None)
    for r in rows if full is not None else []:
        r["decode_tps_ratio"] = r["decode_tps"] / full["decode_tps"]
        r["peak_ratio"] = r["peak_bytes"] / full["peak_bytes"]
        r["peak_above_baseline_ratio"] = r["peak_above_baseline_bytes"] / max(1, full["peak_above_baseline_bytes"])
    if cache is not None:
        cache.put("cost", key, rows)
    return rows


def table(curves: list[dict], cost_rows: list[dict], suite_rows: list[dict] | None = None) -> list[dict]:
    """One row per (family, knob value): quality, measured bytes, suite scores where evaluated (random KVSharer:
    its first seeds'), speed and peak memory."""
    by_key = {(r["family"], r["value"]): r for r in cost_rows}
    suite_by_key = {}
    for r in suite_rows or []:
        suite_by_key.setdefault((r["family"], r["value"]), r)
    out = []
    for c in curves:
        b = by_key.get((c["family"], c["value"]), {})
        st = suite_by_key.get((c["family"], c["value"]), {})
        peak_above = b.get("peak_above_baseline_bytes")
        out.append(
            {
                "family": c["family"],
                "label": c["label"],
                "knob": c["knob"],
                "value": c["value"],
                "seeds": c["seeds"],
                "ppl": c["ppl"],
                "ppl_se": c["ppl_se"],
                "ppl_min": c["ppl_min"],
                "ppl_max": c["ppl_max"],
                "ppl_ratio_vs_full": c["ratio_vs_full"],
                "kv_ratio": c["kv_ratio"],
                "kv_ratio_batched": c["kv_ratio_batched"],
                "kv_mib_per_seq": c["kv_bytes"] / 2**20,
                "decoded": c["decoded"],
                "suite_average": st.get("average"),
                "suite_average_se": st.get("average_se"),
                "decode_tps": b.get("decode_tps"),
                "decode_tps_ratio": b.get("decode_tps_ratio"),
                "peak_mib": None if b.get("peak_bytes") is None else b["peak_bytes"] / 2**20,
                "peak_above_baseline_mib": None if peak_above is None else peak_above / 2**20,
                "peak_ratio": b.get("peak_ratio"),
            }
        )
    return out
