"""Notebook 09: does layer-wise sharing survive long inputs? RULER accuracy against context length for KVSharer, the
eviction methods and the cross-layer peers at comparable KV bytes, and their cost at length.

Accuracy: kvshare.evaluation's long suite (lm-eval's generated RULER tasks in the model's own tokens, answers
generated greedily from the compressed cache, scored by RULER's string match), every point on the same examples,
so differences to the full model are paired per example. Results are cached per (method, task, length, examples)
by the evaluator's results cache, so an interrupted run resumes where it stopped.

Points. KVSharer replaces C = num_shared_for(rate) layers (dissimilar and similar orders, and the best-first search),
which keeps (L - C) / L of the bytes at any length. The eviction methods and the peers are placed at the bytes of
KVSharer at `target_rate`: a token budget of that share of each length's prompt (StreamingLLM, H2O, PyramidInfer),
the MiniCache start layer whose predicted bytes come closest (kvshare.accounting), the SimLayerKV threshold set on
calibration text (never RULER's) so that the share of lazy layers aims at it. KV bytes are measured at every length
by kvshare.bench (random prompt tokens, batch 1), together with decode tokens/s.

Cost model (measured on the default model, one CPU thread, in a machine loaded by other jobs: CPU seconds of a
prefill plus 16 decoded tokens): 8.7 s at 1,024 tokens, 16 s at 2,048, 35 s at 4,096; one RULER example costs
about that (NIAH answers stop at the end-of-sequence token after ~10 tokens). `estimate_seconds` turns the settings
into a run time with these numbers; the full run's sample counts are chosen so that it fits in 45 minutes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from .. import methods
from ..accounting import num_shared_for, predicted_cache_bytes
from ..adapter import num_layers
from ..evaluation import Evaluator
from ..metrics import Z95
from ..strategy import Strategy
from .scaffold import ResultCache, RunSettings

FAMILIES = (
    "full",
    "kvsharer-dissimilar",
    "kvsharer-similar",
    "kvsharer-best",
    "streamingllm",
    "h2o",
    "pyramidinfer",
    "minicache",
    "simlayerkv",
)
LABELS = {
    "full": "full model",
    "kvsharer-dissimilar": "KVSharer (dissimilar)",
    "kvsharer-similar": "KVSharer (similar)",
    "kvsharer-best": "KVSharer (best-first)",
    "streamingllm": "StreamingLLM",
    "h2o": "H2O",
    "pyramidinfer": "PyramidInfer",
    "minicache": "MiniCache",
    "simlayerkv": "SimLayerKV",
}
# CPU seconds of one example (prefill + a short answer) at each length, one thread: see the module docstring
EXAMPLE_SECONDS = {1024: 8.7, 2048: 16.0, 4096: 35.0}
# seconds of one KVSharer search to C = 8 on the default model (quick run, 4 calibration texts, a loaded machine)
SEARCH_SECONDS = {"dissimilar": 3.0, "similar": 7.0, "best": 244.0}  # best: its damage map is scored on 4 texts
GENERATION_SECONDS = 20.0  # lm-eval generating one task's 500 RULER examples at one length (first use only)
GEN_ALLOWANCE = 128  # RULER's NIAH length includes 128 generated tokens: the prompt is at most length - 128


@dataclass
class Settings(RunSettings):
    """Everything notebook 09's numbers depend on (saved beside its figures)."""

    lengths: list = field(default_factory=lambda: [1024, 2048, 4096])
    samples: list = field(default_factory=lambda: [4, 2, 2])  # examples per task at each length (fits 45 min)
    tasks: list = field(default_factory=lambda: ["niah_single_1"])  # the sweep's tasks (every point)
    screen_tasks: list = field(
        default_factory=lambda: ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt"]
    )
    screen_length: int = 1024  # the full model alone on every screen task at this length
    screen_samples: int = 4
    rates: list = field(default_factory=lambda: [0.125, 0.25])  # KVSharer compression rates
    orders: list = field(default_factory=lambda: ["dissimilar", "similar", "best"])
    search_samples: int = 10  # calibration texts of the KVSharer searches
    target_rate: float = 0.25  # eviction and peers at the bytes KVSharer keeps at this rate
    evictions: list = field(default_factory=lambda: ["streamingllm", "h2o", "pyramidinfer"])
    peers: list = field(default_factory=lambda: ["minicache", "simlayerkv"])
    retain: float = 0.05  # MiniCache
    merge_interval: int = 16
    sink: int = 4  # SimLayerKV
    recent: int = 64
    query_window: int = 32
    calibration_context: int = 448  # SimLayerKV calibration windows (calibration text)
    batch_size: int = 8  # generation batch (the long suite caps it at 8,192 prompt tokens)
    bench_new_tokens: int = 16
    alpha: float = 0.05  # a loss is significant when the paired sign test's two-sided p is below this

    QUICK = dict(
        lengths=[512, 1024],
        samples=[2, 1],
        screen_tasks=["niah_single_1", "ruler_vt"],
        screen_samples=1,
        search_samples=4,
        evictions=["streamingllm", "h2o"],
        recent=16,
        query_window=8,
        calibration_context=128,
        bench_new_tokens=4,
        orders=["dissimilar", "similar"],  # the best-first search takes ~4 min even on 4 texts
    )

    def __post_init__(self):
        if len(self.samples) != len(self.lengths):
            raise ValueError(f"samples ({self.samples}) needs one count per length ({self.lengths})")


settings = Settings.for_run  # notebook 09: settings(model, quick, seed, **overrides)


# ------------------------------------------------------------------------------------------------
# the points
# ------------------------------------------------------------------------------------------------
@dataclass
class Point:
    family: str
    knob: str
    value: float | None  # the knob's value (per length for eviction: the budget at the first length)
    build: object  # length -> (Strategy or None, cache method or None)
    rate: float | None = None

    @property
    def label(self) -> str:
        if self.family == "full":
            return LABELS["full"]
        if self.family.startswith("kvsharer"):
            return f"{LABELS[self.family]} {100 * self.rate:g}%"
        return f"{LABELS[self.family]} {self.knob}={self.value:g}" if self.knob != "budget" else LABELS[self.family]


def kept_share(rate: float, layers: int) -> float:
    """Share of the cache's bytes KVSharer keeps at `rate`: (L - C) / L."""
    return 1 - num_shared_for(rate, layers) / layers


def eviction_budget(length: int, share: float) -> int:
    """Tokens an evicting layer keeps at `length`: `share` of the longest prompt (length - RULER's 128)."""
    return max(8, int(round(share * (length - GEN_ALLOWANCE))))


def minicache_start(config, share: float, length: int, cfg: Settings) -> int:
    """The MiniCache start layer whose predicted bytes at `length` come closest to `share` of the full cache."""
    full = predicted_cache_bytes(config, None, 1, [length])
    best = None
    for s in range(num_layers(config)):
        m = methods.make("minicache", start_layer=s, retain=cfg.retain, merge_interval=cfg.merge_interval)
        ratio = predicted_cache_bytes(config, m, 1, [length]) / full
        if best is None or abs(ratio - share) < best[0]:
            best = (abs(ratio - share), s)
    return best[1]


def simlayerkv_threshold(shares: list[float], share: float, length: int, cfg: Settings) -> float:
    """Notebook 07's rule (kvshare.experiments.peers.simlayerkv_thresholds) at a window of `length`."""
    from .peers import simlayerkv_thresholds

    ns = SimpleNamespace(sink=cfg.sink, recent=cfg.recent, window=length, lazy_targets=[share])
    return simlayerkv_thresholds(shares, ns)[0]


def points(model, tokenizer, cfg: Settings, cache: ResultCache | None = None, progress: bool = True):
    """Every point (the full model first) and the calibration record (KVSharer searches, SimLayerKV shares)."""
    L = num_layers(model)
    share = kept_share(cfg.target_rate, L)
    pts = [Point("full", "", None, lambda n: (None, None))]
    record = {"kept_share_target": share, "searches": {}}
    c_max = max(num_shared_for(r, L) for r in cfg.rates)
    for order in cfg.orders:
        t0 = time.perf_counter()
        key = ResultCache.key(cfg.model, order, c_max, cfg.search_samples, cfg.seed)
        found = None if cache is None else cache.get(f"search_{order}", key)
        if found is None:
            m = methods.make("kvsharer", num_shared=c_max, order=order, seed=cfg.seed, samples=cfg.search_samples)
            found = m.strategy_for(model).to_dict()
            if cache is not None:
                cache.put(f"search_{order}", key, found)
        strategy = Strategy.from_dict(found)
        record["searches"][order] = {
            "num_shared": strategy.num_shared,
            "mapping": {str(k): v for k, v in strategy.mapping.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if progress:
            print(f"search {order} to C={c_max}: {strategy.num_shared} layers, {time.perf_counter() - t0:.0f} s")
        for rate in cfg.rates:
            c = num_shared_for(rate, L)
            if c > strategy.num_shared:
                continue  # the search found fewer layers to share: no point at this rate
            s = strategy.prefix(c)
            pts.append(Point(f"kvsharer-{order}", "C", c, lambda n, s=s: (s, None), rate))
    for name in cfg.evictions:
        pts.append(
            Point(
                name,
                "budget",
                eviction_budget(cfg.lengths[0], share),
                lambda n, name=name: (None, methods.make(name, budget=eviction_budget(n, share))),
            )
        )
    if "minicache" in cfg.peers:
        start = minicache_start(model.config, share, max(cfg.lengths), cfg)
        record["minicache_start_layer"] = start
        mc = methods.make("minicache", start_layer=start, retain=cfg.retain, merge_interval=cfg.merge_interval)
        pts.append(Point("minicache", "start_layer", start, lambda n, mc=mc: (None, mc)))
    if "simlayerkv" in cfg.peers:
        from .peers import layer_shares

        ns = SimpleNamespace(
            sink=cfg.sink,
            recent=cfg.recent,
            query_window=cfg.query_window,
            samples=cfg.search_samples,
            context=cfg.calibration_context,
        )
        key = ResultCache.key(cfg.model, cfg.sink, cfg.recent, cfg.query_window, cfg.calibration_context)
        shares = None if cache is None else cache.get("simlayerkv_shares", key)
        if shares is None:
            shares = layer_shares(model, tokenizer, ns)
            if cache is not None:
                cache.put("simlayerkv_shares", key, shares)
        thresholds = {n: simlayerkv_threshold(shares, share, n, cfg) for n in cfg.lengths}
        record["simlayerkv"] = {"layer_shares": shares, "thresholds": {str(k): v for k, v in thresholds.items()}}

        def build(n, thresholds=thresholds):
            kw = dict(sink=cfg.sink, recent=cfg.recent, query_window=cfg.query_window)
            return None, methods.make("simlayerkv", threshold=thresholds[n], **kw)

        pts.append(Point("simlayerkv", "threshold", thresholds[cfg.lengths[0]], build))
    return pts, record


# ------------------------------------------------------------------------------------------------
# accuracy
# ------------------------------------------------------------------------------------------------
def screen(evaluator: Evaluator, cfg: Settings) -> list[dict]:
    """The full model on every screen task at `screen_length`: which tasks it can do at all."""
    r = evaluator.evaluate(
        None, suite="long", tasks=cfg.screen_tasks, lengths=[cfg.screen_length], limit=cfg.screen_samples
    )
    return [{**row, **interval(row["scores"])} for row in r["rows"]]


def accuracy(evaluator: Evaluator, pts: list[Point], cfg: Settings, progress: bool = True) -> list[dict]:
    """One row per (point, task, length): score, interval, per-example scores, and the time it took."""
    rows = []
    for p in pts:
        for length, n in zip(cfg.lengths, cfg.samples):
            strategy, method = p.build(length)
            r = evaluator.evaluate(strategy, suite="long", tasks=cfg.tasks, lengths=[length], limit=n, method=method)
            for row in r["rows"]:
                rows.append(
                    {
                        "family": p.family,
                        "label": p.label,
                        "knob": p.knob,
                        "value_knob": p.value,
                        "rate": p.rate,
                        "method": None if method is None else method.to_dict(),
                        "num_shared": r["num_shared"],
                        "task": row["ruler_task"],
                        "length": length,
                        "acc": row["value"],
                        "stderr": row["stderr"],
                        "n": row["n"],
                        "scores": row["scores"],
                        "seconds": r["compute_seconds"],
                        **interval(row["scores"]),
                    }
                )
            if progress:
                got = [x for x in rows if x["label"] == p.label and x["length"] == length]
                print(
                    f"{p.label} @ {length}: "
                    + ", ".join(f"{x['task']} {x['acc']:.2f} [{x['lo']:.2f}, {x['hi']:.2f}]" for x in got)
                    + f" ({r['compute_seconds']:.0f} s)",
                    flush=True,
                )
    return rows


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (95% by default, the one interval convention)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap(scores: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choice(scores) for _ in range(n)) / n for _ in range(iters))
    return means[int(0.025 * iters)], means[int(0.975 * iters) - 1]


def interval(scores: list[float]) -> dict:
    """95% interval of a mean score: Wilson where every score is 0 or 1 (NIAH), else bootstrap (variable tracking)."""
    if not scores:
        return {"lo": float("nan"), "hi": float("nan"), "interval": "none"}
    if all(s in (0.0, 1.0) for s in scores):
        lo, hi = wilson(sum(scores), len(scores))
        return {"lo": lo, "hi": hi, "interval": "wilson"}
    lo, hi = bootstrap(list(scores))
    return {"lo": lo, "hi": hi, "interval": "bootstrap"}


def curves(rows: list[dict]) -> list[dict]:
    """One row per (point, length): the tasks' examples pooled, with interval and paired difference to the full
    model on the same examples (mean, stderr, z)."""
    full = {(r["task"], r["length"]): r["scores"] for r in rows if r["family"] == "full"}
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        for length in dict.fromkeys(r["length"] for r in mine):
            here = [r for r in mine if r["length"] == length]
            scores = [s for r in here for s in r["scores"]]
            ref = [s for r in here for s in full.get((r["task"], length), [])]
            d = paired(scores, ref)
            out.append(
                {
                    "family": here[0]["family"],
                    "label": label,
                    "rate": here[0]["rate"],
                    "length": length,
                    "acc": sum(scores) / len(scores),
                    "n": len(scores),
                    **interval(scores),
                    **d,
                }
            )
    return out


def paired(a: list[float], b: list[float]) -> dict:
    """Mean paired difference a - b with its standard error and z (None where the examples do not match)."""
    if len(a) != len(b) or not a:
        return {"diff": None, "diff_se": None, "z": None, "worse": None, "better": None, "p": None}
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    z = m / se if se and se > 0 else None  # undefined when every difference is the same
    worse, better = sum(x < 0 for x in d), sum(x > 0 for x in d)
    return {"diff": m, "diff_se": se, "z": z, "worse": worse, "better": better, "p": sign_test(worse, better)}


def sign_test(worse: int, better: int) -> float:
    """Two-sided exact sign test of paired outcomes (McNemar's exact test for 0/1 scores): ties are dropped."""
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(worse, better) + 1)) / 2**n
    return min(1.0, 2 * tail)


def verdict(rows: list[dict], cfg: Settings) -> dict:
    """Per point, all lengths pooled: accuracy, interval, paired difference to the full model, whether it is a
    significant loss (fewer right, sign test p < alpha), and its trend (accuracy at the longest length minus
    at the shortest)."""
    pooled = []
    full = {(r["task"], r["length"]): r["scores"] for r in rows if r["family"] == "full"}
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        scores = [s for r in mine for s in r["scores"]]
        ref = [s for r in mine for s in full.get((r["task"], r["length"]), [])]
        by_length = {n: [s for r in mine if r["length"] == n for s in r["scores"]] for n in cfg.lengths}
        acc_at = {n: sum(v) / len(v) for n, v in by_length.items() if v}
        d = paired(scores, ref)
        pooled.append(
            {
                "family": mine[0]["family"],
                "label": label,
                "rate": mine[0]["rate"],
                "acc": sum(scores) / len(scores),
                "n": len(scores),
                **interval(scores),
                **d,
                "significant_loss": d["p"] is not None and d["diff"] < 0 and d["p"] < cfg.alpha,
                "trend": acc_at[max(acc_at)] - acc_at[min(acc_at)] if len(acc_at) > 1 else None,
            }
        )
    at_target = [p for p in pooled if p["rate"] in (None, cfg.target_rate) and p["family"] != "full"]
    best = max(at_target, key=lambda p: (p["acc"], p["diff"] or 0.0)) if at_target else None
    return {"pooled": pooled, "best_at_target": None if best is None else best["label"]}


# ------------------------------------------------------------------------------------------------
# cost at length
# ------------------------------------------------------------------------------------------------
def cost(model, pts: list[Point], cfg: Settings, cache: ResultCache | None = None, progress: bool = True) -> list:
    """KV bytes and decode tokens/s at every length (kvshare.bench.measure in this process: batch 1, random
    prompt tokens, `bench_new_tokens` greedy tokens, no warm-up). The prompt is RULER's longest at that length
    (length - 128 tokens), the one the eviction budgets are a share of. KVSharer's similar and best orders replace as
    many layers as the dissimilar one (the same bytes and work), so only the dissimilar order is measured."""
    from ..bench import Config, measure

    rows = []
    for p in pts:
        if p.family in ("kvsharer-similar", "kvsharer-best"):
            continue
        for length in cfg.lengths:
            strategy, method = p.build(length)
            config = Config(
                cfg.model,
                "plain" if p.family == "full" else "shared",
                0.0,
                1,
                length - GEN_ALLOWANCE,
                cfg.bench_new_tokens,
                repeats=1,
                warmup=0,
                seed=cfg.seed,
                strategy=None if strategy is None else strategy.to_dict(),
                method=None if method is None else method.to_dict(),
            )
            key = ResultCache.key(asdict(config), cfg.model)
            name = f"cost_{p.label}_{length}"
            row = None if cache is None else cache.get(name, key)
            if row is None:
                m = measure(config, model)
                row = {k: m[k] for k in ("kv_bytes", "decode_tps", "prefill_s", "load_avg_1min", "threads")}
                if cache is not None:
                    cache.put(name, key, row)
            rows.append({"family": p.family, "label": p.label, "rate": p.rate, "length": length, **row})
            if progress:
                print(f"cost {p.label} @ {length}: {row['kv_bytes'] / 2**20:.1f} MiB, {row['decode_tps']:.1f} tok/s")
    for r in rows:
        full = next(x for x in rows if x["family"] == "full" and x["length"] == r["length"])
        r["kv_ratio"] = r["kv_bytes"] / full["kv_bytes"]
        r["decode_tps_ratio"] = r["decode_tps"] / full["decode_tps"]
    return rows


def estimate_seconds(cfg: Settings, num_points: int, num_cost_points: int, example_seconds=None) -> dict:
    """The run time the settings imply on one core, from the measured seconds per example and length
    (EXAMPLE_SECONDS; a length not measured scales linearly from the nearest measured one), per search
    (SEARCH_SECONDS) and per generated task (GENERATION_SECONDS)."""
    per = dict(EXAMPLE_SECONDS if example_seconds is None else example_seconds)

    def at(n):
        if n in per:
            return per[n]
        ref = min(per, key=lambda m: abs(m - n))
        return per[ref] * n / ref

    sweep = num_points * len(cfg.tasks) * sum(n * at(length) for length, n in zip(cfg.lengths, cfg.samples))
    screen_s = len(cfg.screen_tasks) * cfg.screen_samples * at(cfg.screen_length)
    bench = num_cost_points * sum(at(length) for length in cfg.lengths)
    searches = sum(SEARCH_SECONDS.get(o, max(SEARCH_SECONDS.values())) for o in cfg.orders)
    units = {(t, n) for t in cfg.tasks for n in cfg.lengths} | {(t, cfg.screen_length) for t in cfg.screen_tasks}
    setup = searches + GENERATION_SECONDS * len(units)
    return {
        "sweep_s": sweep,
        "screen_s": screen_s,
        "bench_s": bench,
        "setup_s": setup,
        "total_s": sweep + screen_s + bench + setup,
    }
