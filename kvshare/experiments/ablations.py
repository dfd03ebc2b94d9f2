"""Notebook 08 (08_ablations.ipynb): the reviewers' ablations of KVSharer's search, on held-out text.

1. Threshold T: every order (dissimilar, similar, random with seeds, best) searched at each T to C = threshold_c:
   layers reached, candidates rejected, search time, held-out perplexity at that C.
2. Metric: the dissimilar order by Euclidean, cosine and magnitude-normalized distance (`kvshare.calibration`:
   each layer's mean K and V divided by its RMS vector norm, then the Euclidean distance) at several C on several
   calibration sets: overlap of the chosen pairs (Jaccard) and perplexity, against the rebuttal's claim.
3. Depth-matched control: for the layers the dissimilar order replaces, and for those the similar order replaces,
   the source chosen by the dissimilar rule, the similar rule and the nearest earlier layer (r - 1).
4. Calibration sensitivity: number of texts, tokens per text and domain (news against Wikipedia paragraphs:
   kvshare.data.DOMAINS).
5. Search cost: seconds and layer-forwards against C and the calibration size, from the searches above.

Every held-out number is `kvshare.metrics.HELDOUT` (a slice in quick mode), scored once per distinct strategy through
the store shared by the notebooks (`common.HeldOutStore`); every search is cached in
`<out_dir>/08_ablations_results.json` under a key of what it depends on, so an interrupted run resumes and a
finished one only re-plots.
Figures and the conclusion: `kvshare.experiments.reports.ablations`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..adapter import layer_types
from ..calibration import distances_from_means, encode_calibration, kv_means, layer_norms, reference_forward
from ..damage import DamageMap, damage_map
from ..data import DOMAINS, calibration_texts
from ..metrics import HELDOUT, clearly_different, clearly_higher, clearly_lower, paired_difference
from ..progress import Progress
from ..search import search
from ..strategy import Strategy, apply_pair
from .best_search import prefix_cost
from .common import HeldOutScorer, HeldOutStore, ci95, heldout_protocol, mapping_key, random_seeds
from .scaffold import ResultCache, RunSettings

FIXED = ("dissimilar", "similar", "random")
# the rebuttal's numbers (Llama-2-7B, KVSharer with cosine vs Euclidean distance): perplexity at C shared layers
REBUTTAL_METRIC = {
    "model": "Llama-2-7B",
    "ppl": {4: {"cosine": 8.57, "euclidean": 8.96}, 12: {"cosine": 30.67, "euclidean": 42.81}},
}


@dataclass
class AblationSettings(RunSettings):
    """Everything notebook 08's numbers depend on (saved beside its figures)."""

    samples: int = 30  # calibration texts (the default calibration of notebooks 01, 02, 11)
    max_tokens: int = 64
    threshold: float = 0.5  # the default T (sections 2-4)
    metric: str = "euclidean"  # the default metric (sections 1, 3, 4)
    # 1. threshold: each order searched at each T to threshold_c on calibration set threshold_set, scored at it.
    # `best` at every T (its damage map is made once; a T only changes its re-scoring); the fixed orders up to 0.8:
    # from 0.9 on their search walks nearly every pair and stops short of C = 8 (notebook 02's sweep: the dissimilar
    # order reaches 6 of 8 layers at T = 0.9 after 327 candidates, ~10 minutes on 2 cores), a strategy that cannot
    # be compared at C = 8, for a third of this notebook's budget
    thresholds: list = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    fixed_thresholds: list = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8])
    threshold_orders: list = field(default_factory=lambda: ["dissimilar", "similar", "best"])
    random_seeds: int = 5  # random-order seeds (common.random_seeds: drawn per set, as notebooks 01, 02, 11)
    # T values for the random seeds: 5 seeds x every T would be ~30 more strategies (~20 min); T <= 0.7 rejects
    # nothing at C = 8 on this model, so 0.5 stands for them, 0.8 is where the threshold first bites
    random_thresholds: list = field(default_factory=lambda: [0.5, 0.8])
    threshold_c: int = 8
    threshold_set: int = 0
    # best-first settings (notebook 11's)
    criterion: str = "kl"
    shortlist: int = 24
    screen_texts: int = 4
    kl_stride: int = 4
    lazy: bool = True
    # 2. metric: the dissimilar order (the paper's) by each metric, to max(metric_c_values), on metric_sets sets
    metrics: list = field(default_factory=lambda: ["euclidean", "cosine", "normalized"])
    metric_orders: list = field(default_factory=lambda: ["dissimilar"])
    metric_c_values: list = field(default_factory=lambda: [4, 8, 12])
    metric_sets: int = 3
    # 3. depth-matched control: the replaced layers of the dissimilar and similar searches on depth_set at each C
    depth_c_values: list = field(default_factory=lambda: [8])
    depth_set: int = 0
    # 4. calibration sensitivity at calibration_c: texts (at max_tokens), tokens (at samples), domains (samples x
    # max_tokens), each on calibration set 0 of its own size
    calibration_c: int = 8
    calibration_orders: list = field(default_factory=lambda: ["dissimilar"])  # + "similar": ~+6 min
    texts_grid: list = field(default_factory=lambda: [5, 10, 30, 100])
    tokens_grid: list = field(default_factory=lambda: [32, 64, 128, 256])
    domains: list = field(default_factory=lambda: list(DOMAINS))
    heldout_tokens: int = HELDOUT.tokens  # quick mode scores a slice
    heldout_window: int = HELDOUT.window
    seconds_per_strategy: float = 39.0  # held-out scoring on 2 idle cores (notebook 11's full run)

    QUICK = dict(
        samples=4,
        max_tokens=16,
        thresholds=[0.5, 0.9],
        fixed_thresholds=[0.5, 0.9],
        # without `best`: its damage map of 435 pairs is most of a quick run's time (tests/test_ablations.py runs it)
        threshold_orders=["dissimilar", "similar"],
        random_seeds=2,
        calibration_orders=["dissimilar", "similar"],
        random_thresholds=[0.5],
        threshold_c=2,
        shortlist=4,
        screen_texts=2,
        metric_c_values=[1, 2],
        metric_sets=2,
        depth_c_values=[2],
        calibration_c=2,
        texts_grid=[2, 4],
        tokens_grid=[16, 32],
        heldout_tokens=1024,
    )

    def __post_init__(self):
        for name in ("thresholds", "fixed_thresholds", "random_thresholds"):
            setattr(self, name, sorted(float(t) for t in getattr(self, name)))
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown calibration domain(s) {unknown}; use {', '.join(DOMAINS)}")


settings = AblationSettings.for_run  # notebook 08: settings(model, quick, seed, **overrides)


def evaluation_plan(cfg: AblationSettings) -> dict:
    """The run's size before it starts, on the default model: strategy points per section (an upper bound on the
    held-out scorings), the expected number of DISTINCT strategies and the expected minutes on 2 idle cores.

    Expected distinct, by notebooks 02 and 11: a fixed order's strategy at C = 8 changes only at 0.8 <= T < 0.9
    (below nothing is rejected, from 0.9 the search stops short of C); `best`'s changes at most at the two highest T;
    the dissimilar order picks the same pairs on every set by the Euclidean distance, the other metrics may not; the
    depth rules reproduce the searches' own strategies in 2 of 6 cells; a calibration condition changes the
    strategy about once in three. Strategies that notebooks 01 and 11 scored (the fixed and random orders at T = 0.5,
    C = 4, 8, 12, `best` at T = 0.5) come from the shared store when they ran before into the same folder: `shared`.
    Search seconds (30 x 64 calibration): a fixed order ~10 s below T = 0.8, ~45 s at 0.8, ~270 s from 0.9;
    `best`'s damage map ~110 s once, ~40 s per T; other calibrations in proportion to their tokens."""
    scale = cfg.samples * cfg.max_tokens / (30 * 64)
    fixed = [o for o in cfg.threshold_orders if o != "best"]
    mid = sum(0.8 <= t < 0.9 for t in cfg.fixed_thresholds)
    s1_points = len(cfg.fixed_thresholds) * len(fixed) + ("best" in cfg.threshold_orders) * len(cfg.thresholds)
    s1_points += cfg.random_seeds * len(cfg.random_thresholds)
    s1 = len(fixed) * (1 + mid) + ("best" in cfg.threshold_orders) * min(len(cfg.thresholds), 2)
    s1 += cfg.random_seeds * len(cfg.random_thresholds)
    nc = len(cfg.metric_c_values)
    s2_points = len(cfg.metrics) * cfg.metric_sets * nc * len(cfg.metric_orders)
    others = len([m for m in cfg.metrics if m != "euclidean"])
    s2 = len(cfg.metric_orders) * nc * (1 + others * cfg.metric_sets) - nc  # Euclidean at C = 8 is section 1's
    s3_points = 6 * len(cfg.depth_c_values)
    s3 = 4 * len(cfg.depth_c_values)
    conditions = len(cfg.texts_grid) + len(cfg.tokens_grid) + len(cfg.domains) - 2
    s4_points = conditions * len(cfg.calibration_orders)
    s4 = math.ceil(s4_points / 3)
    expected = s1 + s2 + s3 + s4 + 1  # + the full model
    shared = 1 + len(fixed) + ("best" in cfg.threshold_orders) + cfg.random_seeds * (0.5 in cfg.random_thresholds)
    shared += nc - 1  # the Euclidean dissimilar strategies at the other C values
    search = 0.0
    for ts in [cfg.fixed_thresholds] * len(fixed) + [cfg.random_thresholds] * cfg.random_seeds:
        search += sum(10 if t < 0.8 else 45 if t < 0.9 else 270 for t in ts if t >= 0.8) + 10 * any(t < 0.8 for t in ts)
    if "best" in cfg.threshold_orders:
        search += 110 + 40 * min(len(cfg.thresholds), 3)
    search += len(cfg.metrics) * cfg.metric_sets * len(cfg.metric_orders) * 15
    search += len(cfg.calibration_orders) * 15 * sum(n * cfg.max_tokens / (30 * 64) for n in cfg.texts_grid) + len(
        cfg.calibration_orders
    ) * 15 * sum(cfg.samples * t / (30 * 64) for t in cfg.tokens_grid)
    search *= scale
    return {
        "points": {"threshold": s1_points, "metric": s2_points, "depth": s3_points, "calibration": s4_points},
        "expected_distinct": {"threshold": s1, "metric": s2, "depth": s3, "calibration": s4, "full": 1},
        "expected_distinct_total": expected,
        "expected_from_store_after_01_and_11": shared,
        "expected_scoring_minutes": round(expected * cfg.seconds_per_strategy / 60, 1),
        "expected_scoring_minutes_with_store": round((expected - shared) * cfg.seconds_per_strategy / 60, 1),
        "expected_search_minutes": round(search / 60, 1),
    }


# ------------------------------------------------------------------------------------------------
# calibration texts of any size, domain
# ------------------------------------------------------------------------------------------------
def texts_for(domain: str, n: int, set_index: int = 0) -> list[str]:
    """`n` calibration texts of `domain` (kvshare.data.DOMAINS: news or wikipedia); different `set_index` values
    give disjoint sets."""
    return calibration_texts(n, set_index=set_index, domain=domain)


@dataclass(frozen=True)
class Calibration:
    domain: str = "news"
    texts: int = 30
    tokens: int = 64
    set_index: int = 0

    def label(self) -> str:
        return f"{self.domain} set {self.set_index}, {self.texts} x {self.tokens} tokens"


# ------------------------------------------------------------------------------------------------
# searches, cached
# ------------------------------------------------------------------------------------------------
def _best_extra(cfg: AblationSettings) -> dict:
    return dict(
        criterion=cfg.criterion,
        shortlist=cfg.shortlist,
        screen_texts=cfg.screen_texts,
        kl_stride=cfg.kl_stride,
        lazy=cfg.lazy,
    )


def _screen(model, tokenizer, cfg, cache: ResultCache, cal: Calibration, progress: bool) -> DamageMap:
    """The damage map `best` screens with on this calibration (the first screen_texts texts), cached: every `best`
    search on the same calibration (one per T) reads it instead of making it again."""
    n = min(cfg.screen_texts, cal.texts)
    name = f"damage_{cal.domain}_set{cal.set_index}_n{cal.texts}_tok{cal.tokens}_screen{n}"
    key = cache.key(cfg.model, asdict(cal), n, cfg.kl_stride)
    hit = cache.get(name, key)
    if hit is not None:
        return DamageMap.from_dict(hit)
    texts = texts_for(cal.domain, cal.texts, cal.set_index)[:n]
    dm = damage_map(model, tokenizer, texts, cal.tokens, progress=progress, kl_stride=cfg.kl_stride)
    cache.put(name, key, dm.to_dict())
    return dm


def run(
    model,
    tokenizer,
    cfg: AblationSettings,
    cache: ResultCache,
    order: str,
    target: int,
    threshold: float | None = None,
    metric: str | None = None,
    seed: int | None = None,
    cal: Calibration | None = None,
    progress: bool = True,
) -> dict:
    """One search, cached under a name of everything it depends on (the same search asked for by two sections
    runs once): {order, threshold, metric, seed, calibration, target, strategy (dict), trace}."""
    T = cfg.threshold if threshold is None else float(threshold)
    metric = metric or cfg.metric
    seed = cfg.seed if seed is None else seed
    cal = cal or Calibration(texts=cfg.samples, tokens=cfg.max_tokens)
    extra = _best_extra(cfg) if order == "best" else {}
    name = (
        f"search_{order}_T{T:g}_{metric}"
        + (f"_seed{seed}" if order == "random" else "")
        + f"_{cal.domain}_set{cal.set_index}_n{cal.texts}_tok{cal.tokens}_C{target}"
    )
    key = cache.key(cfg.model, order, T, metric, seed, asdict(cal), target, extra)
    hit = cache.get(name, key)
    if hit is None:
        texts = texts_for(cal.domain, cal.texts, cal.set_index)
        if order == "best":
            extra["damage"] = _screen(model, tokenizer, cfg, cache, cal, progress)
        strategy, trace = search(
            model, tokenizer, texts, target, T, order, metric, seed, cal.tokens, progress=False, **extra
        )
        strategy.metadata["calibration"].update(source=cal.domain, set_index=cal.set_index)
        hit = cache.put(
            name,
            key,
            {
                "order": order,
                "threshold": T,
                "metric": metric,
                "seed": seed,
                "calibration": asdict(cal),
                "target": target,
                "strategy": strategy.to_dict(),
                "trace": trace,
            },
        )
    return hit


def strategy_of(run_: dict, c: int | None = None) -> Strategy | None:
    """The run's strategy after its first c acceptances (all of them when c is None); None when it has fewer."""
    st = Strategy.from_dict(run_["strategy"])
    if c is None:
        return st
    return st.prefix(c) if c <= st.num_shared else None


def rejected(run_: dict) -> int:
    """Candidates the threshold turned down (for `best`: below the threshold, not merely re-scored and passed over)."""
    if run_["order"] == "best":
        return sum(t.get("decision") == "below threshold" for t in run_["trace"])
    return sum(not t["accepted"] for t in run_["trace"])


def same_walk(trace: list[dict], searched_at: float, threshold: float) -> bool:
    """Whether a search at `threshold` makes exactly the decisions of the one at `searched_at` that left `trace`.

    Every decision is "score > T" for a visited candidate, and the walk is deterministic given the decisions, so
    the two searches are one when no visited candidate scored between the two thresholds."""
    lo, hi = sorted((searched_at, threshold))
    return not any(lo < t["score"] <= hi for t in trace)


def pairs_of(strategy: Strategy | None) -> set[tuple[int, int]]:
    return set() if strategy is None else set(strategy.mapping.items())


def jaccard(a: Strategy | None, b: Strategy | None) -> float:
    """Overlap of two strategies' (replaced layer, source) pairs: |A ∩ B| / |A ∪ B| (1 for two empty strategies)."""
    pa, pb = pairs_of(a), pairs_of(b)
    return len(pa & pb) / len(pa | pb) if pa | pb else 1.0


def layer_jaccard(a: Strategy | None, b: Strategy | None) -> float:
    """Overlap of the replaced layers alone."""
    la, lb = set(a.mapping if a else {}), set(b.mapping if b else {})
    return len(la & lb) / len(la | lb) if la | lb else 1.0


def scorer(model, tokenizer, cfg: AblationSettings, out_dir) -> HeldOutScorer:
    """The held-out scorer of this run, reading and filling the store beside the figures."""
    return HeldOutScorer(model, tokenizer, cfg.model, heldout_protocol(cfg), store=HeldOutStore.beside(out_dir))


def score_all(score: HeldOutScorer, strategies: list[Strategy | None], what: str, progress: bool = True) -> dict:
    """Score every distinct strategy of `strategies` (and the full model): {mapping key: result}."""
    wanted = {"full": None}
    for st in strategies:
        wanted.setdefault(mapping_key(st), st)
    todo = [k for k in wanted if k not in score.results]
    bar = Progress(len(todo), f"held-out perplexity, {what} ({score.protocol.describe()})", enabled=progress, every=0)
    for k in todo:
        res = score(wanted[k])
        bar.update(note=f"{k if len(k) < 50 else k[:47] + '...'}: ppl {res['ppl']:.2f}")
    return {k: score.results[k] for k in wanted}


def _vs(a: dict, b: dict) -> dict:
    d = paired_difference(a, b)
    return {"ratio": d["ppl_ratio"], "ratio_ci95": d["ppl_ratio_ci95"], "z": d["z"]}


# ------------------------------------------------------------------------------------------------
# 1. the threshold
# ------------------------------------------------------------------------------------------------
def threshold_runs(model, tokenizer, cfg: AblationSettings, cache: ResultCache, progress: bool = True) -> list[dict]:
    """Per order (and random seed), one row per T: the search at T, or the search at a lower T when no candidate it
    visited scored between the two (`same_walk`: the same search exactly, not run twice)."""
    cal = Calibration(texts=cfg.samples, tokens=cfg.max_tokens, set_index=cfg.threshold_set)
    walks = [(o, cfg.seed, cfg.thresholds if o == "best" else cfg.fixed_thresholds) for o in cfg.threshold_orders]
    walks += [("random", s, cfg.random_thresholds) for s in random_seeds(cfg, cfg.threshold_set)]
    rows = []
    bar = Progress(sum(len(ts) for *_, ts in walks), "threshold sweep searches", enabled=progress, every=0)
    for order, seed, ts in walks:
        searched = None
        for T in ts:
            if searched is not None and same_walk(searched["trace"], searched["threshold"], T):
                r, reused = searched, True
            else:
                r = searched = run(
                    model, tokenizer, cfg, cache, order, cfg.threshold_c, T, seed=seed, cal=cal, progress=progress
                )
                reused = False
            m = r["strategy"]["metadata"]
            rows.append(
                {
                    "order": order,
                    "seed": seed if order == "random" else None,
                    "threshold": T,
                    "searched_at": r["threshold"],
                    "reused": reused,
                    "target": cfg.threshold_c,
                    "layers_reached": m["num_shared"],
                    "candidates_visited": m["candidates_visited"],
                    "rejected": rejected(r),
                    "search_seconds": m["search_seconds"],
                    "layer_forwards": m["layer_forwards"],
                    "run": r,
                }
            )
            same = f" (the search at T={r['threshold']:g})" if reused else ""
            who = f"{order}{f' seed {seed}' if order == 'random' else ''}"
            bar.update(note=f"{who} T={T:g}: {m['num_shared']} layers, {rejected(r)} rejected{same}")
    return rows


def threshold_table(rows: list[dict], heldout: dict) -> list[dict]:
    """The rows with the strategy at C = target (where reached), its perplexity, and the paired ratio against the same
    order (and seed) at the default T of the sweep (its lowest T that reached C)."""
    out = []
    base: dict[tuple, dict] = {}
    for row in rows:
        st = strategy_of(row["run"], row["target"])
        r = {k: v for k, v in row.items() if k != "run"}
        r["mapping"] = mapping_key(st) if st is not None else None
        if st is not None:
            res = heldout[r["mapping"]]
            r.update(ppl=res["ppl"], ppl_se=res["ppl_se"], ratio_to_full=res["ppl"] / heldout["full"]["ppl"])
            key = (row["order"], row["seed"])
            if key not in base:
                base[key] = r
            r["vs_lowest_T"] = _vs(res, heldout[base[key]["mapping"]])
            r["lowest_T"] = base[key]["threshold"]
        out.append(r)
    return out


def threshold_strategies(rows: list[dict]) -> list[Strategy]:
    return [st for row in rows if (st := strategy_of(row["run"], row["target"])) is not None]


def threshold_verdict(table: list[dict], full_ppl: float) -> dict:
    """Per order: distinct strategies over T, the lowest-perplexity T at C (random: geometric mean over seeds, with
    the seeds' 95% interval), the strictest T that still reaches C, and what the search cost there; overall: the
    order and T a user should pick for C, and its search time. All sentences are built from the rows."""
    per_order = {}
    for order in dict.fromkeys(r["order"] for r in table):
        rows = [r for r in table if r["order"] == order]
        by_t: dict[float, list[dict]] = {}
        for r in rows:
            by_t.setdefault(r["threshold"], []).append(r)
        points = []
        for T, rs in sorted(by_t.items()):
            reached = [r for r in rs if r.get("ppl") is not None]
            nll = [math.log(r["ppl"]) for r in reached]
            ci = ci95(nll)
            points.append(
                {
                    "threshold": T,
                    "runs": len(rs),
                    "reached": len(reached),
                    "layers_reached_min": min(r["layers_reached"] for r in rs),
                    "rejected_mean": float(np.mean([r["rejected"] for r in rs])),
                    "search_seconds_mean": float(np.mean([r["search_seconds"] for r in rs])),
                    "ppl": math.exp(ci["mean"]) if reached else None,
                    "ppl_lo": math.exp(ci["lo"]) if len(reached) > 1 else None,
                    "ppl_hi": math.exp(ci["hi"]) if len(reached) > 1 else None,
                    "all_reached": len(reached) == len(rs),
                }
            )
        ok = [p for p in points if p["all_reached"]]
        best = min(ok, key=lambda p: (p["ppl"], p["threshold"])) if ok else None
        lowest = ok[0] if ok else None
        per_order[order] = {
            "points": points,
            "distinct_strategies": len({r["mapping"] for r in rows if r["mapping"]}),
            "best": best,
            "lowest": lowest,
            "strictest_reaching": max(ok, key=lambda p: p["threshold"]) if ok else None,
            "first_short": next((p for p in points if not p["all_reached"]), None),
            "gain": (best["ppl"] / lowest["ppl"]) if best and lowest else None,
        }
    choice = min(
        ((o, v["best"]) for o, v in per_order.items() if v["best"]), key=lambda x: x[1]["ppl"], default=(None, None)
    )
    return {"per_order": per_order, "choice_order": choice[0], "choice": choice[1], "full_ppl": full_ppl}


def threshold_sentences(v: dict, c: int) -> list[str]:
    lines = []
    for order, o in v["per_order"].items():
        if o["best"] is None:
            lines.append(f"- **{order}**: no T reached C = {c}.")
            continue
        b, low = o["best"], o["lowest"]
        changed = o["distinct_strategies"] > 1
        seeds = max(p["runs"] for p in o["points"])
        over = f"{len(o['points'])} thresholds" + (f" x {seeds} seeds" if seeds > 1 else "")
        changed = o["distinct_strategies"] > (seeds if seeds > 1 else 1)
        s = (
            f"- **{order}**: {o['distinct_strategies']} distinct strategies over {over}"
            f"{'' if changed else ' (T changed nothing: no candidate scored between the thresholds)'}; "
        )
        if changed and b["threshold"] != low["threshold"]:
            s += (
                f"T = {b['threshold']:g} gives the lowest perplexity at C = {c}, {b['ppl']:.2f} "
                f"({b['ppl'] / low['ppl']:.2f}x that of T = {low['threshold']:g}), its search "
                f"{b['search_seconds_mean']:.0f} s against {low['search_seconds_mean']:.0f} s"
            )
        else:
            s += f"perplexity at C = {c}: {low['ppl']:.2f}, no T lower it"
        if o["first_short"] is not None:
            f = o["first_short"]
            s += (
                f"; from T = {f['threshold']:g} the search no longer reaches C = {c} "
                f"(it stops at {f['layers_reached_min']} layers after rejecting {f['rejected_mean']:.0f} candidates "
                f"in {f['search_seconds_mean']:.0f} s)"
            )
        lines.append(s + ".")
    if v["choice"] is not None:
        ch = v["choice"]
        lines.insert(
            0,
            f"**Verdict (threshold).** For C = {c}: use the **{v['choice_order']}** order at "
            f"**T = {ch['threshold']:g}** (perplexity {ch['ppl']:.2f}, {ch['ppl'] / v['full_ppl']:.2f}x the full "
            "model's; search "
            f"{ch['search_seconds_mean']:.0f} s). A threshold changes a strategy only where it rejects candidates.",
        )
    return lines


# ------------------------------------------------------------------------------------------------
# 2. the metric
# ------------------------------------------------------------------------------------------------
def metric_runs(model, tokenizer, cfg: AblationSettings, cache: ResultCache, progress: bool = True) -> list[dict]:
    runs = []
    plan = [(o, m, i) for o in cfg.metric_orders for i in range(cfg.metric_sets) for m in cfg.metrics]
    bar = Progress(len(plan), "metric searches", enabled=progress, every=0)
    for order, metric, i in plan:
        cal = Calibration(texts=cfg.samples, tokens=cfg.max_tokens, set_index=i)
        r = run(
            model, tokenizer, cfg, cache, order, max(cfg.metric_c_values), metric=metric, cal=cal, progress=progress
        )
        runs.append(r)
        bar.update(note=f"{order} {metric} set {i}: {r['strategy']['metadata']['search_seconds']:.1f} s")
    return runs


def metric_strategies(runs: list[dict], cfg: AblationSettings) -> list[Strategy]:
    return [st for r in runs for c in cfg.metric_c_values if (st := strategy_of(r, c)) is not None]


def metric_table(runs: list[dict], heldout: dict, cfg: AblationSettings) -> list[dict]:
    """One row per (order, metric, set, C): perplexity, and against Euclidean on the same set: Jaccard of the pairs
    and of the replaced layers, the paired perplexity ratio."""
    rows = []
    key = lambda r: (r["order"], r["metric"], r["calibration"]["set_index"])
    by = {key(r): r for r in runs}
    for r in runs:
        for c in cfg.metric_c_values:
            st = strategy_of(r, c)
            if st is None:
                continue
            res = heldout[mapping_key(st)]
            row = {
                "order": r["order"],
                "metric": r["metric"],
                "set": r["calibration"]["set_index"],
                "C": c,
                "mapping": mapping_key(st),
                "ppl": res["ppl"],
                "ppl_se": res["ppl_se"],
                "ratio_to_full": res["ppl"] / heldout["full"]["ppl"],
            }
            ref = by.get((r["order"], "euclidean", row["set"]))
            ref_st = strategy_of(ref, c) if ref else None
            if ref_st is not None:
                row["jaccard_vs_euclidean"] = jaccard(st, ref_st)
                row["layer_jaccard_vs_euclidean"] = layer_jaccard(st, ref_st)
                vs = _vs(res, heldout[mapping_key(ref_st)])
                row.update(vs_euclidean_ratio=vs["ratio"], vs_euclidean_ci95=vs["ratio_ci95"], vs_euclidean_z=vs["z"])
            rows.append(row)
    return rows


def layer_norm_rows(model, tokenizer, cfg: AblationSettings, set_index: int = 0) -> list[dict]:
    """Per layer: the RMS norm of its mean K and V vectors on a calibration set (what the normalized metric divides
    by), and the Euclidean distance to its farthest and nearest earlier layer."""
    texts = texts_for("news", cfg.samples, set_index)
    ids, _ = encode_calibration(tokenizer, texts, cfg.max_tokens)
    keys, values = kv_means(reference_forward(model, ids))
    nk, nv = layer_norms(keys).tolist(), layer_norms(values).tolist()
    return [{"layer": i, "key_norm": nk[i], "value_norm": nv[i]} for i in range(len(nk))]


def metric_verdict(rows: list[dict], norms: list[dict], cfg: AblationSettings) -> dict:
    """Does the metric change the strategy (Jaccard < 1) and the perplexity (clearly: `kvshare.metrics.clear_sign`)?
    And the rebuttal's direction (cosine below Euclidean) at its C values, where this run has them."""
    out = {"per_metric": {}, "rebuttal": [], "norm_driven": None}
    for metric in cfg.metrics:
        if metric == "euclidean":
            continue
        rs = [r for r in rows if r["metric"] == metric and "vs_euclidean_z" in r]
        out["per_metric"][metric] = {
            "points": len(rs),
            "changed": sum(r["jaccard_vs_euclidean"] < 1 for r in rs),
            "jaccard_mean": float(np.mean([r["jaccard_vs_euclidean"] for r in rs])) if rs else None,
            "lower": sum(clearly_lower(r["vs_euclidean_z"]) for r in rs),
            "higher": sum(clearly_higher(r["vs_euclidean_z"]) for r in rs),
            "ratio_geo": float(np.exp(np.mean([math.log(r["vs_euclidean_ratio"]) for r in rs]))) if rs else None,
        }
    for c, reb in REBUTTAL_METRIC["ppl"].items():
        rs = [
            r
            for r in rows
            if r["metric"] == "cosine" and r["C"] == c and "vs_euclidean_z" in r and r["order"] == "dissimilar"
        ]
        if rs:
            out["rebuttal"].append(
                {
                    "C": c,
                    "rebuttal_ratio": reb["cosine"] / reb["euclidean"],
                    "ratio_geo": float(np.exp(np.mean([math.log(r["vs_euclidean_ratio"]) for r in rs]))),
                    "sets": len(rs),
                    "sets_clearly_lower": sum(clearly_lower(r["vs_euclidean_z"]) for r in rs),
                    "sets_clearly_higher": sum(clearly_higher(r["vs_euclidean_z"]) for r in rs),
                }
            )
    if norms:
        kn = np.array([n["key_norm"] for n in norms])
        vn = np.array([n["value_norm"] for n in norms])
        spread = float(max(kn.max() / kn.min(), vn.max() / vn.min()))
        out["norm_driven"] = {
            "norm_spread": spread,
            "smallest_key_norm_layer": int(kn.argmin()),
            "largest_key_norm_layer": int(kn.argmax()),
        }
    return out


def metric_sentences(v: dict) -> list[str]:
    lines = []
    for m, p in v["per_metric"].items():
        if not p["points"]:
            continue
        lines.append(
            f"- **{m}** against Euclidean: the strategy differs at {p['changed']} of {p['points']} (set, C) points "
            f"(mean Jaccard of the pairs {p['jaccard_mean']:.2f}); perplexity clearly lower (the ratio's paired "
            f"95% interval below 1) at {p['lower']}, clearly higher at {p['higher']}; geometric mean ratio "
            f"{p['ratio_geo']:.2f}x."
        )
    reb = []
    for r in v["rebuttal"]:
        holds = r["sets_clearly_lower"] == r["sets"]
        against = r["sets_clearly_higher"] > 0
        word = "holds" if holds else "is contradicted" if against else "is not reproduced"
        reb.append(
            f"at C = {r['C']} cosine/Euclidean = {r['ratio_geo']:.2f}x here (rebuttal {r['rebuttal_ratio']:.2f}x on "
            f"{REBUTTAL_METRIC['model']}), clearly lower on {r['sets_clearly_lower']} of {r['sets']} sets: {word}"
        )
    if reb:
        lines.insert(
            0, "**Verdict (metric).** The rebuttal's claim that cosine beats Euclidean: " + "; ".join(reb) + "."
        )
    nd = v.get("norm_driven")
    if nd:
        lines.append(
            f"- Per-layer mean-vector norms span {nd['norm_spread']:.1f}x (smallest K norm: layer "
            f"{nd['smallest_key_norm_layer']}, largest: layer {nd['largest_key_norm_layer']}): the plain Euclidean "
            "distance ranks pairs largely by these norms; the normalized metric divides them out."
        )
    return lines


# ------------------------------------------------------------------------------------------------
# 3. the depth-matched control
# ------------------------------------------------------------------------------------------------
SOURCE_RULES = ("dissimilar", "similar", "previous")


def rule_source(distances, r: int, rule: str, types=None) -> int:
    """The source layer s < r of replaced layer r by `rule`: the most distant earlier layer (dissimilar), the nearest
    by distance (similar) or the nearest earlier one (previous: r - 1); only layers of r's attention type."""
    candidates = [s for s in range(r) if types is None or types[s] == types[r]]
    if not candidates:
        raise ValueError(f"layer {r} has no earlier layer of its attention type")
    if rule == "previous":
        return max(candidates)
    if rule == "dissimilar":
        return max(candidates, key=lambda s: (distances[r][s], -s))
    if rule == "similar":
        return min(candidates, key=lambda s: (distances[r][s], s))
    raise ValueError(f"unknown source rule {rule!r}; use one of {', '.join(SOURCE_RULES)}")


def depth_strategy(distances, replaced, rule: str, types=None, meta: dict | None = None) -> Strategy:
    """Replace exactly the layers `replaced`, each reading its source by `rule` (chains resolved: a source that is
    itself replaced hands on its own source, as the searches' strategies do)."""
    mapping: dict[int, int] = {}
    pairs = []
    for r in sorted(replaced):
        s = rule_source(distances, r, rule, types)
        mapping = apply_pair(mapping, r, s)
        pairs.append([r, s])
    return Strategy(mapping, len(distances), {"rule": rule, "accepted_pairs": pairs, **(meta or {})})


def depth_runs(model, tokenizer, cfg: AblationSettings, cache: ResultCache, progress: bool = True) -> dict[str, dict]:
    """The dissimilar and similar searches (default T and metric) on depth_set to max(depth_c_values)."""
    cal = Calibration(texts=cfg.samples, tokens=cfg.max_tokens, set_index=cfg.depth_set)
    target = max(cfg.depth_c_values + cfg.metric_c_values)  # the metric section's Euclidean search: one search
    return {
        o: run(model, tokenizer, cfg, cache, o, target, cal=cal, progress=progress) for o in ("dissimilar", "similar")
    }


def depth_cells(model, tokenizer, runs: dict[str, dict], cfg: AblationSettings) -> list[dict]:
    """Per C and layer set (the dissimilar search's replaced layers, the similar search's): one strategy per rule."""
    texts = texts_for("news", cfg.samples, cfg.depth_set)
    ids, _ = encode_calibration(tokenizer, texts, cfg.max_tokens)
    distances = distances_from_means(*kv_means(reference_forward(model, ids)), metric=cfg.metric)
    types = layer_types(model)
    cells = []
    for c in cfg.depth_c_values:
        for layers_of, r in runs.items():
            st = strategy_of(r, c)
            if st is None:
                continue
            replaced = sorted(st.mapping)
            for rule in SOURCE_RULES:
                d = depth_strategy(distances, replaced, rule, types, {"layers_of": layers_of, "C": c})
                cells.append(
                    {
                        "C": c,
                        "layers_of": layers_of,
                        "rule": rule,
                        "replaced": replaced,
                        "strategy": d,
                        "search_strategy": mapping_key(st),
                    }
                )
    return cells


def depth_table(cells: list[dict], heldout: dict) -> list[dict]:
    rows = []
    for cell in cells:
        k = mapping_key(cell["strategy"])
        res = heldout[k]
        rows.append(
            {
                "C": cell["C"],
                "layers_of": cell["layers_of"],
                "rule": cell["rule"],
                "replaced": " ".join(map(str, cell["replaced"])),
                "mapping": k,
                "is_search_strategy": k == cell["search_strategy"],
                "ppl": res["ppl"],
                "ppl_se": res["ppl_se"],
                "ratio_to_full": res["ppl"] / heldout["full"]["ppl"],
            }
        )
    return rows


def depth_verdict(rows: list[dict], heldout: dict) -> dict:
    """Per C: the spread of perplexity across source rules with the layers fixed (which source), and across layer sets
    with the rule fixed (which layers), as max/min ratios; and which factor is larger."""
    per_c = []
    for c in sorted({r["C"] for r in rows}):
        at = [r for r in rows if r["C"] == c]
        layer_sets = sorted({r["layers_of"] for r in at})
        rules = [x for x in SOURCE_RULES if any(r["rule"] == x for r in at)]
        cell = {(r["layers_of"], r["rule"]): r for r in at}
        source_effect = {
            ls: max(cell[(ls, x)]["ppl"] for x in rules) / min(cell[(ls, x)]["ppl"] for x in rules) for ls in layer_sets
        }
        layer_effect = {
            x: max(cell[(ls, x)]["ppl"] for ls in layer_sets) / min(cell[(ls, x)]["ppl"] for ls in layer_sets)
            for x in rules
        }
        best = min(at, key=lambda r: r["ppl"])
        comparisons = []
        for ls in layer_sets:
            for x in rules:
                if x == "dissimilar":
                    continue
                d = paired_difference(heldout[cell[(ls, x)]["mapping"]], heldout[cell[(ls, "dissimilar")]["mapping"]])
                comparisons.append(
                    {"layers_of": ls, "rule": x, "vs_dissimilar_rule_ratio": d["ppl_ratio"], "z": d["z"]}
                )
        per_c.append(
            {
                "C": c,
                "source_effect": source_effect,
                "layer_effect": layer_effect,
                "max_source_effect": max(source_effect.values()),
                "max_layer_effect": max(layer_effect.values()),
                "best": {k: best[k] for k in ("layers_of", "rule", "ppl")},
                "comparisons": comparisons,
            }
        )
    return {"per_C": per_c}


def depth_sentences(v: dict) -> list[str]:
    lines = []
    for p in v["per_C"]:
        bigger = "which source" if p["max_source_effect"] > p["max_layer_effect"] else "which layers"
        src = ", ".join(f"{ls} layers ×{e:.2f}" for ls, e in p["source_effect"].items())
        lay = ", ".join(f"{x} rule ×{e:.2f}" for x, e in p["layer_effect"].items())
        b = p["best"]
        lines.append(
            f"- C = {p['C']}: the source rule moves perplexity by {src} (layers fixed); the layer set by {lay} "
            f"(rule fixed): **{bigger}** matters more. Lowest: the {b['layers_of']} order's layers with the "
            f"{b['rule']} rule ({b['ppl']:.2f})."
        )
    if v["per_C"]:
        counts = {"which source": 0, "which layers": 0}
        for p in v["per_C"]:
            counts["which source" if p["max_source_effect"] > p["max_layer_effect"] else "which layers"] += 1
        main = max(counts, key=counts.get)
        lines.insert(
            0,
            f"**Verdict (depth-matched).** At {counts[main]} of {len(v['per_C'])} C values **{main}** moves "
            "perplexity more than the other factor.",
        )
    return lines


# ------------------------------------------------------------------------------------------------
# 4. calibration sensitivity
# ------------------------------------------------------------------------------------------------
def calibration_conditions(cfg: AblationSettings) -> list[tuple[str, Calibration]]:
    """(factor, calibration) of every condition; the reference (news, samples x max_tokens) appears once per factor."""
    out = [("texts", Calibration("news", n, cfg.max_tokens)) for n in cfg.texts_grid]
    out += [("tokens", Calibration("news", cfg.samples, t)) for t in cfg.tokens_grid]
    out += [("domain", Calibration(d, cfg.samples, cfg.max_tokens)) for d in cfg.domains]
    return out


def calibration_runs(model, tokenizer, cfg: AblationSettings, cache: ResultCache, progress: bool = True) -> list[dict]:
    plan = [(f, cal, o) for o in cfg.calibration_orders for f, cal in calibration_conditions(cfg)]
    runs = []
    bar = Progress(len(plan), "calibration searches", enabled=progress, every=0)
    for factor, cal, order in plan:
        r = run(model, tokenizer, cfg, cache, order, cfg.calibration_c, cal=cal, progress=progress)
        runs.append({"factor": factor, **r})
        bar.update(note=f"{order}, {cal.label()}: {r['strategy']['metadata']['search_seconds']:.1f} s")
    return runs


def calibration_table(runs: list[dict], heldout: dict, cfg: AblationSettings) -> list[dict]:
    reference = Calibration("news", cfg.samples, cfg.max_tokens)
    refs = {r["order"]: r for r in runs if Calibration(**r["calibration"]) == reference}
    rows = []
    for r in runs:
        st = strategy_of(r, cfg.calibration_c)
        meta = r["strategy"]["metadata"]
        row = {
            "factor": r["factor"],
            "order": r["order"],
            **r["calibration"],
            "tokens_used": meta["calibration"]["tokens_per_text"],
            "layers_reached": meta["num_shared"],
            "search_seconds": meta["search_seconds"],
            "layer_forwards": meta["layer_forwards"],
            "mapping": mapping_key(st) if st is not None else None,
        }
        if st is not None:
            res = heldout[row["mapping"]]
            row.update(ppl=res["ppl"], ppl_se=res["ppl_se"], ratio_to_full=res["ppl"] / heldout["full"]["ppl"])
            ref = strategy_of(refs[r["order"]], cfg.calibration_c) if r["order"] in refs else None
            if ref is not None:
                vs = _vs(res, heldout[mapping_key(ref)])
                row.update(
                    jaccard_vs_reference=jaccard(st, ref),
                    vs_reference_ratio=vs["ratio"],
                    vs_reference_ci95=vs["ratio_ci95"],
                    vs_reference_z=vs["z"],
                )
        rows.append(row)
    return rows


def calibration_strategies(runs: list[dict], cfg: AblationSettings) -> list[Strategy]:
    return [st for r in runs if (st := strategy_of(r, cfg.calibration_c)) is not None]


def calibration_verdict(rows: list[dict]) -> dict:
    per = {}
    for factor, order in dict.fromkeys((r["factor"], r["order"]) for r in rows):
        rs = [r for r in rows if r["factor"] == factor and r["order"] == order and "vs_reference_z" in r]
        if not rs:
            continue
        per[f"{order} / {factor}"] = {
            "order": order,
            "factor": factor,
            "conditions": len(rs),
            "distinct_strategies": len({r["mapping"] for r in rs}),
            "min_jaccard": min(r["jaccard_vs_reference"] for r in rs),
            "max_ratio": max(r["vs_reference_ratio"] for r in rs),
            "min_ratio": min(r["vs_reference_ratio"] for r in rs),
            "clear": sum(clearly_different(r["vs_reference_z"]) for r in rs),
        }
    stable = [k for k, p in per.items() if p["distinct_strategies"] == 1]
    return {"per": per, "stable": stable}


def calibration_sentences(v: dict, cfg: AblationSettings) -> list[str]:
    lines = []
    for k, p in v["per"].items():
        lines.append(
            f"- {k}: {p['distinct_strategies']} distinct strategies over {p['conditions']} conditions (lowest Jaccard "
            f"against the reference {p['min_jaccard']:.2f}); perplexity {p['min_ratio']:.2f}–{p['max_ratio']:.2f}x "
            f"the reference's, clearly different (the ratio's paired 95% interval excludes 1) in {p['clear']}."
        )
    if v["per"]:
        n = len(v["per"])
        lines.insert(
            0,
            f"**Verdict (calibration).** The chosen strategy stays the same across a factor's conditions in "
            f"{len(v['stable'])} of {n} (order, factor) groups (reference: news, {cfg.samples} texts x "
            f"{cfg.max_tokens} tokens)" + (f": {', '.join(v['stable'])}." if v["stable"] else "."),
        )
    return lines


# ------------------------------------------------------------------------------------------------
# 5. search cost
# ------------------------------------------------------------------------------------------------
def fixed_prefix_cost(run_: dict, c: int) -> dict:
    """Layer-forwards (and seconds, apportioned by them) a fixed-order search spent up to its c-th acceptance."""
    m = run_["strategy"]["metadata"]
    L, n = run_["strategy"]["num_layers"], m["calibration"]["texts"]
    forwards, accepted = L * n, 0
    for t in run_["trace"]:
        if accepted >= c:
            break
        forwards += (L - t["replaced"]) * n
        accepted += bool(t["accepted"])
    share = forwards / max(1, m["layer_forwards"])
    return {"C": c, "layer_forwards": forwards, "seconds_estimate": m["search_seconds"] * share}


def cost_rows(runs: list[dict]) -> list[dict]:
    """One row per distinct search: what it was, how far it got and what it cost."""
    seen, rows = set(), []
    for r in runs:
        m = r["strategy"]["metadata"]
        key = (r["order"], r["threshold"], r["metric"], r["seed"], tuple(sorted(r["calibration"].items())), r["target"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "order": r["order"],
                "threshold": r["threshold"],
                "metric": r["metric"],
                "seed": r["seed"] if r["order"] == "random" else None,
                **r["calibration"],
                "tokens_used": m["calibration"]["tokens_per_text"],
                "target": r["target"],
                "layers_reached": m["num_shared"],
                "candidates_visited": m["candidates_visited"],
                "search_seconds": m["search_seconds"],
                "layer_forwards": m["layer_forwards"],
                "ms_per_layer_forward_token": 1000
                * m["search_seconds"]
                / max(1, m["layer_forwards"] * m["calibration"]["tokens_per_text"]),
            }
        )
    return rows


def cost_vs_c(runs: list[dict]) -> list[dict]:
    """Seconds and layer-forwards up to each C of the longest search per order at the default settings."""
    rows = []
    for r in runs:
        top = r["strategy"]["metadata"]["num_shared"]
        for c in range(1, top + 1):
            p = prefix_cost(r, c) if r["order"] == "best" else fixed_prefix_cost(r, c)
            rows.append(
                {"order": r["order"], "C": c, "layer_forwards": p["layer_forwards"], "seconds": p["seconds_estimate"]}
            )
    return rows


def cost_verdict(costs: list[dict], by_c: list[dict], cfg: AblationSettings) -> dict:
    """How search cost scales: with the number of texts (at max_tokens, the dissimilar order at the default T),
    with tokens per text, and with C (per order); ratios of largest to smallest."""

    def scaling(rows, x):
        rows = sorted(rows, key=lambda r: r[x])
        if len(rows) < 2:
            return None
        a, b = rows[0], rows[-1]
        return {
            "from": a[x],
            "to": b[x],
            "x_ratio": b[x] / a[x],
            "seconds_ratio": b["search_seconds"] / max(1e-9, a["search_seconds"]),
            "forwards_ratio": b["layer_forwards"] / max(1, a["layer_forwards"]),
            "seconds": [a["search_seconds"], b["search_seconds"]],
        }

    base = lambda r: (
        r["order"] == "dissimilar"
        and r["threshold"] == cfg.threshold
        and r["metric"] == cfg.metric
        and r["domain"] == "news"
        and r["set_index"] == 0
        and r["target"] == cfg.calibration_c
    )
    texts = [r for r in costs if base(r) and r["tokens"] == cfg.max_tokens]
    tokens = [r for r in costs if base(r) and r["texts"] == cfg.samples]
    per_order_c = {}
    for order in dict.fromkeys(r["order"] for r in by_c):
        rs = [r for r in by_c if r["order"] == order]
        top = max(rs, key=lambda r: r["C"])
        per_order_c[order] = {"C": top["C"], "seconds": top["seconds"], "layer_forwards": top["layer_forwards"]}
    return {
        "texts": scaling(texts, "texts"),
        "tokens": scaling(tokens, "tokens_used"),
        "per_order_at_max_C": per_order_c,
    }


def cost_sentences(v: dict) -> list[str]:
    lines = []
    for name, s in (("texts", v["texts"]), ("tokens per text", v["tokens"])):
        if s:
            lines.append(
                f"- {name} {s['from']} → {s['to']} (×{s['x_ratio']:.1f}): layer-forwards ×{s['forwards_ratio']:.1f}, "
                f"seconds ×{s['seconds_ratio']:.1f} ({s['seconds'][0]:.1f} → {s['seconds'][1]:.1f} s, dissimilar "
                "order)."
            )
    for order, p in v["per_order_at_max_C"].items():
        lines.append(f"- {order}: to C = {p['C']} in ~{p['seconds']:.0f} s, {p['layer_forwards']:,} layer-forwards.")
    if v["texts"]:
        s = v["texts"]
        proportional = abs(s["forwards_ratio"] / s["x_ratio"] - 1) < 0.15
        lines.insert(
            0,
            f"**Verdict (cost).** A fixed-order search's layer-forwards grow "
            f"{'in proportion to' if proportional else 'not in proportion to'} the calibration texts "
            f"(×{s['forwards_ratio']:.1f} for ×{s['x_ratio']:.1f} texts, seconds ×{s['seconds_ratio']:.1f}).",
        )
    return lines


def timing(t_start: float) -> float:
    return time.perf_counter() - t_start
