"""Notebook 11 (11_best_search.ipynb): the damage map, and the best-first search proven on held-out text.

1. The damage map of calibration set 0 (`kvshare.damage_map`): every single pair scored by the hidden cosine
   (the paper's score) and by KL(full || shared); how well each calibration distance predicts that damage
   (Spearman), and where the dissimilar order's first picks sit on it.
2. Searches per calibration set: `best` once to the largest C, the fixed orders (dissimilar, similar, random
   with seeds drawn per set) once each; every smaller C is a prefix of the same search.
3. Held-out perplexity (`kvshare.metrics.HELDOUT`: 16,384 BBC tokens, 32 windows of 512, never in a calibration
   set) of every distinct strategy, and `best` against every fixed order paired per window.

Every expensive result is cached in `<out_dir>/<name>_results.json` under a key of the settings it depends on,
written atomically after each unit, so an interrupted run resumes and a finished one only re-plots.
Figures and the conclusion: `kvshare.experiments.reports.best_search`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..adapter import layer_types, num_layers
from ..calibration import METRICS
from ..combine import sharing
from ..damage import DamageMap, damage_map, same_type_pairs
from ..data import calibration_texts
from ..metrics import HELDOUT, clearly_higher, clearly_lower, heldout_perplexity, paired_difference
from ..progress import Progress, format_seconds
from ..search import search
from ..strategy import Strategy
from .common import HeldOutStore, SearchSettings, random_seeds  # random_seeds: the seed rule 01, 02 and 11 share
from .scaffold import ResultCache

FIXED = ("dissimilar", "similar", "random")
ORDERS = ("best", *FIXED)


@dataclass
class BestSettings(SearchSettings):
    """Everything notebook 11's numbers depend on (saved beside its figures): the searches' settings (those of
    notebooks 01 and 02) and the best-first search's own."""

    c_values: list = field(default_factory=lambda: [2, 4, 6, 8, 10, 12])
    criterion: str = "kl"
    shortlist: int = 24
    screen_texts: int = 4
    kl_stride: int = 4
    lazy: bool = True
    criterion_evidence: bool = True  # score the set-0 strategies by calibration KL and cosine too
    check_from: int = 25  # the shortcut checks re-score the pairs whose replaced layer is at least this
    target_c: int = 8  # the C of the "within 1.5x of the full model" claim
    target_ratio: float = 1.5
    # the offline benchmark suite at 25% (C = 8 of 30 = 26.7%): `best` against every fixed order (random: every
    # seed) on one calibration set, paired per example. 8 examples per task, the same ones for every strategy: 8 suite
    # runs at the tasks' default sizes (~3-5 min each) do not fit the run's budget; None: each task's default size
    # (kvshare.tasks)
    suite: bool = True
    suite_c: int = 8
    suite_set: int = 0
    suite_limit: int | None = 8

    QUICK = dict(
        samples=4,
        max_tokens=16,
        calibration_sets=2,
        c_values=[1, 2],
        random_seeds=2,
        random_c_values=[2],
        heldout_tokens=1024,
        shortlist=4,
        screen_texts=2,
        target_c=2,
        check_from=27,
        suite_c=2,
        suite_limit=2,
    )


settings = BestSettings.for_run  # notebook 11: settings(model, quick, seed, **overrides)


def use_all_cores() -> int:
    """Give torch every core this process may run on (the search and the perplexities are matmul-bound)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def protocol(cfg: BestSettings):
    return replace(HELDOUT, tokens=cfg.heldout_tokens)


# ------------------------------------------------------------------------------------------------
# 1. the damage map
# ------------------------------------------------------------------------------------------------
def damage(
    model,
    tokenizer,
    cfg: BestSettings,
    cache: ResultCache,
    calibration_set: int = 0,
    texts: int | None = None,
    kl_stride: int | None = None,
    min_replaced: int = 0,
    progress: bool = True,
) -> DamageMap:
    """The damage map of a calibration set's first `texts` texts (default: the search's screen), cached.

    `min_replaced` keeps only the pairs whose replaced layer is at least that (a cheaper map for checks)."""
    n = cfg.screen_texts if texts is None else texts
    stride = cfg.kl_stride if kl_stride is None else kl_stride
    name = f"damage_set{calibration_set}_texts{n}_stride{stride}" + (f"_from{min_replaced}" if min_replaced else "")
    key = cache.key(cfg.model, n, cfg.max_tokens, calibration_set, stride, min_replaced)
    hit = cache.get(name, key)
    if hit is not None:
        return DamageMap.from_dict(hit)
    texts_ = calibration_texts(cfg.samples, set_index=calibration_set)[:n]
    pairs = None
    if min_replaced:
        pairs = [(r, s) for r, s in same_type_pairs(model) if r >= min_replaced]
    dm = damage_map(model, tokenizer, texts_, cfg.max_tokens, progress=progress, kl_stride=stride, pairs=pairs)
    cache.put(name, key, dm.to_dict())
    return dm


def map_forwards(model, texts: int) -> int:
    """Layer-forwards of a damage map of every pair on `texts` texts: the reference, then layers r..L-1 per pair."""
    L = len(layer_types(model))
    return texts * (L + sum(L - r for r, _ in same_type_pairs(model)))


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(a):
        a = np.asarray(a, dtype=float)
        order = np.argsort(a, kind="mergesort")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for v in np.unique(a):  # ties share their mean rank
            idx = a == v
            if idx.sum() > 1:
                r[idx] = r[idx].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def distance_vs_damage(dm: DamageMap) -> list[dict]:
    """Per metric: Spearman of the calibration distance with each damage score over all pairs.

    The paper's premise is that dissimilar pairs are safe to share: a NEGATIVE correlation of distance with
    damage. A positive one means the dissimilar order picks the most harmful pairs first.
    """
    kl = [r["kl"] for r in dm]
    cos_damage = [1 - r["hidden_cosine"] for r in dm]
    return [
        {
            "metric": m,
            "spearman_vs_kl": spearman([r[f"distance_{m}"] for r in dm], kl),
            "spearman_vs_hidden_damage": spearman([r[f"distance_{m}"] for r in dm], cos_damage),
            "pairs": len(dm),
        }
        for m in METRICS
        if all(f"distance_{m}" in r for r in dm)  # a map cached before a metric existed lacks its column
    ]


def ranking_check(reference: DamageMap, cheap: DamageMap, top: int = 24) -> dict:
    """How a cheap damage map ranks the pairs against the map it stands in for, on the pairs both hold:
    Spearman of the KL, and how many of the reference's `top` least harmful pairs are among the cheap map's."""
    ref = {(r["replaced"], r["source"]): r["kl"] for r in reference}
    other = {(r["replaced"], r["source"]): r["kl"] for r in cheap}
    pairs = sorted(set(ref) & set(other))
    rank = lambda d: sorted(pairs, key=lambda p: (d[p], p))[:top]
    describe = lambda dm: {
        **dm.metadata.get("calibration", {}),
        "kl_stride": dm.metadata.get("kl_stride"),
        "seconds": dm.metadata.get("seconds"),
        "layer_forwards": dm.metadata.get("layer_forwards"),
    }
    return {
        "pairs": len(pairs),
        "spearman_kl": spearman([ref[p] for p in pairs], [other[p] for p in pairs]),
        "top": top,
        "top_overlap": len(set(rank(ref)) & set(rank(other))),
        "reference": describe(reference),
        "cheap": describe(cheap),
    }


def first_picks(dm: DamageMap, strategy: dict, k: int = 8) -> list[dict]:
    """The first `k` pairs a search accepted, with their single-pair damage and rank on the damage map."""
    rows = {(r["replaced"], r["source"]): r for r in dm}
    by_kl = {p: i for i, p in enumerate(dm.ranked("kl"))}
    out = []
    for step, (r, s) in enumerate(strategy["metadata"]["accepted_pairs"][:k], start=1):
        row = rows[(r, s)]
        out.append(
            {
                "step": step,
                "replaced": r,
                "source": s,
                "kl": row["kl"],
                "hidden_cosine": row["hidden_cosine"],
                "kl_rank": by_kl[(r, s)],
                "kl_percentile": 100 * by_kl[(r, s)] / max(1, len(dm) - 1),
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# 2. the searches
# ------------------------------------------------------------------------------------------------
def search_plan(cfg: BestSettings) -> list[tuple[int, str, int]]:
    """(calibration set, order, seed) of every search."""
    sets = range(cfg.calibration_sets)
    plan = [(i, order, cfg.seed) for order in ("best", "dissimilar", "similar") for i in sets]
    return plan + [(i, "random", s) for i in sets for s in random_seeds(cfg, i)]


def run_searches(
    model, tokenizer, cfg: BestSettings, cache: ResultCache, damage_maps: dict | None = None, progress: bool = True
) -> list[dict]:
    """One search per (set, order, seed) to max(c_values): {set, order, seed, strategy (dict), trace}. Cached.

    `damage_maps` ({set: DamageMap of its first `screen_texts` texts}) hands `best` its screening map."""
    plan = search_plan(cfg)
    runs = []
    bar = Progress(len(plan), "searches", enabled=progress, every=0)
    for i, order, seed in plan:
        name = f"search_set{i}_{order}_seed{seed}"
        top = max(cfg.random_c_values if order == "random" else cfg.c_values)  # random seeds: to their largest C
        extra = (
            dict(
                criterion=cfg.criterion,
                shortlist=cfg.shortlist,
                screen_texts=cfg.screen_texts,
                kl_stride=cfg.kl_stride,
                lazy=cfg.lazy,
            )
            if order == "best"
            else {}
        )
        key = cache.key(cfg.model, cfg.samples, cfg.max_tokens, i, order, seed, top, cfg.threshold, cfg.metric, extra)
        hit = cache.get(name, key)
        if hit is None:
            texts = calibration_texts(cfg.samples, set_index=i)
            if order == "best" and damage_maps and i in damage_maps:
                extra["damage"] = damage_maps[i]  # the set's screening map, already made: not computed twice
            strategy, trace = search(
                model,
                tokenizer,
                texts,
                top,
                cfg.threshold,
                order,
                cfg.metric,
                seed,
                cfg.max_tokens,
                progress=progress and order == "best",
                **extra,
            )
            strategy.metadata["calibration"].update(source="offline", set_index=i)
            hit = cache.put(
                name, key, {"set": i, "order": order, "seed": seed, "strategy": strategy.to_dict(), "trace": trace}
            )
        runs.append(hit)
        m = hit["strategy"]["metadata"]
        bar.update(
            note=f"set {i} {order}{f' seed {seed}' if order == 'random' else ''}: "
            f"{m['search_seconds']:.1f} s, {m['layer_forwards']:,} layer-forwards"
        )
    return runs


def prefix(run: dict, c: int) -> Strategy | None:
    """The run's strategy after its first c acceptances (None when it accepted fewer)."""
    st = Strategy.from_dict(run["strategy"])
    return st.prefix(c) if c <= st.num_shared else None


def c_values_of(run: dict, cfg: BestSettings) -> list[int]:
    return cfg.random_c_values if run["order"] == "random" else cfg.c_values


def mapping_key(strategy: Strategy | None) -> str:
    if strategy is None or not strategy.mapping:
        return "full"
    return ",".join(f"{r}:{s}" for r, s in strategy.mapping.items())


# ------------------------------------------------------------------------------------------------
# 3. held-out perplexity
# ------------------------------------------------------------------------------------------------
def evaluate(
    model, tokenizer, runs: list[dict], cfg: BestSettings, cache: ResultCache, progress: bool = True
) -> dict[str, dict]:
    """Held-out perplexity of the full model and of every distinct strategy the runs give at their C values.

    Returns {mapping key: heldout_perplexity result}; identical strategies (across sets, orders) run once, and
    strategies already in the model's held-out store (`common.HeldOutStore`, shared with notebooks 01 and 02) are
    read from it, not evaluated again; `cache` only says where the store lies (beside it).
    """
    proto = protocol(cfg)
    wanted = {"full": None}
    priority = {"full": (-1, 0, 0)}  # full, best, dissimilar, similar, random: a cut-short run keeps the key ones
    for run in runs:
        for c in c_values_of(run, cfg):
            st = prefix(run, c)
            if st is not None:
                k = mapping_key(st)
                wanted.setdefault(k, st)
                priority[k] = min(priority.get(k, (9, 0, 0)), (ORDERS.index(run["order"]), run["set"], c))
    # the held-out store shared by every notebook of the model (<out_dir>/heldout_scores.json, beside the cache)
    store = HeldOutStore.beside(cache.path.parent)
    results = {k: hit for k in wanted if (hit := store.get(cfg.model, proto, k)) is not None}
    todo = sorted((k for k in wanted if k not in results), key=lambda k: priority[k])
    bar = Progress(len(todo), f"held-out perplexity ({proto.describe()})", enabled=progress, every=0)
    for k in todo:
        t0 = time.perf_counter()
        with sharing(model, wanted[k]):
            res = heldout_perplexity(model, tokenizer, proto)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results[k] = store.put(cfg.model, proto, k, res)
        bar.update(note=f"{k if len(k) < 60 else k[:57] + '...'}: ppl {res['ppl']:.2f} in {res['seconds']:.0f} s")
    return {k: results[k] for k in wanted}


def curve_rows(runs: list[dict], heldout: dict[str, dict], cfg: BestSettings) -> list[dict]:
    """One row per (set, order, seed, C): perplexity, its error, and the paired comparison of `best` against it."""
    best = {r["set"]: r for r in runs if r["order"] == "best"}
    full = heldout["full"]
    rows = []
    for run in runs:
        for c in c_values_of(run, cfg):
            st = prefix(run, c)
            if st is None:
                continue
            res = heldout[mapping_key(st)]
            row = {
                "set": run["set"],
                "order": run["order"],
                "seed": run["seed"],
                "C": c,
                "ppl": res["ppl"],
                "ppl_se": res["ppl_se"],
                "ratio_to_full": res["ppl"] / full["ppl"],
                "mapping": mapping_key(st),
            }
            vs_full = paired_difference(res, full)
            row.update(z_vs_full=vs_full["z"])
            if run["order"] != "best" and run["set"] in best:
                b = prefix(best[run["set"]], c)
                if b is not None:
                    d = paired_difference(heldout[mapping_key(b)], res)
                    row.update(
                        best_ppl=heldout[mapping_key(b)]["ppl"],
                        best_vs_this_ratio=d["ppl_ratio"],
                        best_vs_this_ci95=d["ppl_ratio_ci95"],
                        best_vs_this_z=d["z"],
                    )
            rows.append(row)
    return rows


def verdict(rows: list[dict], heldout: dict, runs: list[dict], cfg: BestSettings) -> dict:
    """The claims, checked on the rows.

    Per (set, C): `best` wins clearly when it is clearly lower (`kvshare.metrics.clearly_lower` of its NLL minus
    theirs, in paired standard errors) than dissimilar, similar and every random seed scored at that C. The claim
    holds on a set when it wins clearly at every C; overall when it holds on at least 2 of the sets
    (`lower_everywhere`).
    """
    sets = sorted({r["set"] for r in rows})
    per_point = []
    for i in sets:
        for c in cfg.c_values:
            rivals = [
                r for r in rows if r["set"] == i and r["C"] == c and r["order"] != "best" and "best_vs_this_z" in r
            ]
            if not rivals:
                continue
            worst = max(rivals, key=lambda r: r["best_vs_this_z"])  # the rival best beats least clearly
            per_point.append(
                {
                    "set": i,
                    "C": c,
                    "rivals": len(rivals),
                    "clear_wins": sum(clearly_lower(r["best_vs_this_z"]) for r in rivals),
                    "lower_than_all": all(r["best_vs_this_ratio"] < 1 for r in rivals),
                    "clear": all(clearly_lower(r["best_vs_this_z"]) for r in rivals),
                    "closest_rival": f"{worst['order']}"
                    + (f" seed {worst['seed']}" if worst["order"] == "random" else ""),
                    "closest_z": worst["best_vs_this_z"],
                    "closest_ratio": worst["best_vs_this_ratio"],
                    "orders_with_random_c": sorted({r["order"] for r in rivals}),
                }
            )
    full = heldout["full"]
    target = []
    for run in (r for r in runs if r["order"] == "best"):
        st = prefix(run, cfg.target_c)
        if st is not None:
            res = heldout[mapping_key(st)]
            d = paired_difference(res, full)
            target.append(
                {
                    "set": run["set"],
                    "C": cfg.target_c,
                    "ppl": res["ppl"],
                    "ratio_to_full": res["ppl"] / full["ppl"],
                    "ratio_ci95": d["ppl_ratio_ci95"],
                    "within": res["ppl"] / full["ppl"] <= cfg.target_ratio,
                }
            )
    claim = lower_everywhere(per_point, sets)
    return {
        "per_point": per_point,
        "sets_where_clear_at_every_C": claim["sets_where_clear_at_every_C"],
        "claim_lower_everywhere_on_2_of_3_sets": claim["holds"],
        "target": target,
        "target_ratio": cfg.target_ratio,
        "claim_within_target_on_every_set": bool(target) and all(t["within"] for t in target),
        "full_ppl": full["ppl"],
        "full_ppl_se": full["ppl_se"],
    }


def lower_everywhere(per_point: list[dict], sets: list[int]) -> dict:
    """Claim 1 from the per-(set, C) points: a point is clear when `best` is clearly lower than its closest rival
    (the one with the highest z), so than every rival; the claim holds on a set clear at every C, and overall on at
    least 2 of the sets (all of them, with fewer). Read from `closest_z`, so committed verdict files are read by the
    same rule as a new run. {clear_points, sets_where_clear_at_every_C, holds}."""
    clear = [p for p in per_point if clearly_lower(p["closest_z"])]
    sets_clear = [i for i in sets if all(clearly_lower(p["closest_z"]) for p in per_point if p["set"] == i)]
    return {
        "clear_points": len(clear),
        "sets_where_clear_at_every_C": sets_clear,
        "holds": len(sets_clear) >= min(2, len(sets)),
    }


# ------------------------------------------------------------------------------------------------
# 4. the offline benchmark suite at 25%
# ------------------------------------------------------------------------------------------------
def _run_label(run: dict) -> str:
    return run["order"] + (f" seed {run['seed']}" if run["order"] == "random" else "")


def suite_comparison(model, tokenizer, runs: list[dict], cfg: BestSettings, progress: bool = True) -> dict:
    """The offline suite (kvshare.evaluation, cached per strategy there) of the full model and of every order's
    strategy at C = suite_c on calibration set suite_set; `best` against each rival, paired per example.

    A suite average is the mean over tasks of their primary higher-is-better score (as notebook 03's); the
    paired difference per task is the mean of per-example differences, its variance the per-example variance
    over n, and the average's difference has the variance of the task means' sum over the number of tasks
    squared. `kvshare.metrics.clearly_higher` of that z means `best`'s average is clearly higher.
    """
    from ..evaluation import Evaluator

    ev = Evaluator(model, tokenizer, progress=progress)
    full = ev.evaluate(None, limit=cfg.suite_limit, label="full")
    evaluated = [("full", None, full)]
    for run in runs:
        if run["set"] != cfg.suite_set or cfg.suite_c not in c_values_of(run, cfg):
            continue
        st = prefix(run, cfg.suite_c)
        if st is not None:
            evaluated.append((_run_label(run), run, ev.evaluate(st, limit=cfg.suite_limit, label=_run_label(run))))
    primary = {label: _primary(res["rows"]) for label, _, res in evaluated}
    full_avg = _average(primary["full"])
    best = primary.get("best")
    rows = []
    for label, run, res in evaluated:
        avg = _average(primary[label])
        row = {
            "label": label,
            "order": "full" if run is None else run["order"],
            "seed": None if run is None else run["seed"],
            "C": 0 if run is None else cfg.suite_c,
            "mapping": "full" if run is None else mapping_key(prefix(run, cfg.suite_c)),
            "average": avg,
            "kept_pct": 100 * avg / full_avg,
            "tasks": len(primary[label]),
            "examples": sum(len(r.get("scores") or []) for r in primary[label].values()),
            "seconds": res["compute_seconds"],
        }
        if best is not None and label != "best":
            diff, se = paired_average_difference(best, primary[label])
            row.update(best_minus_this=diff, best_minus_this_se=se, best_vs_this_z=diff / se if se > 0 else math.inf)
        rows.append(row)
    rivals = [r for r in rows if r["order"] not in ("full", "best") and "best_vs_this_z" in r]
    return {
        "C": cfg.suite_c,
        "num_layers": num_layers(model),
        "set": cfg.suite_set,
        "limit": cfg.suite_limit,
        "rows": rows,
        "higher_than_all": bool(rivals) and all(r["best_minus_this"] > 0 for r in rivals),
        "clear": bool(rivals) and all(clearly_higher(r["best_vs_this_z"]) for r in rivals),
        "rivals": len(rivals),
    }


def _primary(rows: list[dict]) -> dict[str, dict]:
    """{task: row} of the primary higher-is-better metric of each task (perplexity is not in the average)."""
    return {r["task"]: r for r in rows if r.get("primary") and r.get("higher_is_better", True)}


def _average(primary: dict[str, dict]) -> float:
    return sum(r["value"] for r in primary.values()) / len(primary) if primary else float("nan")


def paired_average_difference(a: dict[str, dict], b: dict[str, dict]) -> tuple[float, float]:
    """(average of a − average of b, its paired standard error) over the tasks both have, per example.

    A task without per-example scores falls back to its two standard errors as if independent."""
    tasks = [t for t in a if t in b]
    if not tasks:
        raise ValueError("the two evaluations share no task: nothing to pair")
    diff, var = 0.0, 0.0
    for t in tasks:
        diff += a[t]["value"] - b[t]["value"]
        sa, sb = a[t].get("scores"), b[t].get("scores")
        if sa and sb and len(sa) == len(sb) > 1:
            d = np.asarray(sa, dtype=float) - np.asarray(sb, dtype=float)
            var += float(d.var(ddof=1)) / len(d)
        else:
            var += (a[t].get("stderr") or 0.0) ** 2 + (b[t].get("stderr") or 0.0) ** 2
    n = len(tasks)
    return diff / n, math.sqrt(var) / n


def search_costs(runs: list[dict]) -> list[dict]:
    """Time and layer-forwards of every `best` search, with the exhaustive greedy's count beside them."""
    out = []
    for run in runs:
        if run["order"] != "best":
            continue
        m = run["strategy"]["metadata"]
        out.append(
            {
                "set": run["set"],
                "C": m["num_shared"],
                "search_seconds": m["search_seconds"],
                "layer_forwards": m["layer_forwards"],
                "screen_layer_forwards": m["screen_layer_forwards"],
                "rescore_layer_forwards": m["rescore_layer_forwards"],
                "exhaustive_layer_forwards": m["exhaustive_layer_forwards"],
                "fraction_of_exhaustive": m["layer_forwards"] / max(1, m["exhaustive_layer_forwards"]),
                "candidates_rescored": m["candidates_visited"],
            }
        )
    return out


def prefix_cost(run: dict, c: int) -> dict:
    """Layer-forwards and (proportional) seconds the best search spent up to its c-th acceptance."""
    m = run["strategy"]["metadata"]
    trace = run["trace"]
    L = run["strategy"]["num_layers"]
    n = m["calibration"]["texts"]
    steps = [t for t in trace if t.get("step", 0) < c]
    rescore = sum((L - t["replaced"]) * n for t in steps)
    forwards = L * n + m["screen_layer_forwards"] + rescore
    share = forwards / max(1, m["layer_forwards"])
    return {"C": c, "layer_forwards": forwards, "seconds_estimate": m["search_seconds"] * share, "rescored": len(steps)}


# ------------------------------------------------------------------------------------------------
# which calibration score tracks held-out damage (the criterion's evidence)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def criterion_evidence(
    model,
    tokenizer,
    runs: list[dict],
    heldout: dict,
    cfg: BestSettings,
    cache: ResultCache,
    calibration_set: int = 0,
    progress: bool = True,
) -> dict:
    """Every distinct strategy scored on calibration set `calibration_set` by KL and by hidden cosine, against
    its held-out NLL increase: which calibration score ranks strategies as held-out text does (Spearman)."""
    from ..adapter import decoder_layers
    from ..calibration import encode_calibration
    from ..damage import PairScorer
    from ..sharing import restore_attention

    strategies = {}
    for run in runs:
        if run["set"] != calibration_set:
            continue
        for c in c_values_of(run, cfg):
            st = prefix(run, c)
            if st is not None:
                strategies.setdefault(mapping_key(st), st)
    name = f"criterion_evidence_set{calibration_set}"
    key = cache.key(cfg.model, cfg.samples, cfg.max_tokens, cfg.kl_stride, sorted(strategies))
    hit = cache.get(name, key)
    if hit is None:
        t0 = time.perf_counter()
        texts = calibration_texts(cfg.samples, set_index=calibration_set)
        ids, _ = encode_calibration(tokenizer, texts, cfg.max_tokens)
        scorer = PairScorer(model, ids, cfg.kl_stride)
        rows = []
        bar = Progress(
            len(strategies), "criterion evidence: calibration scores of the evaluated strategies", enabled=progress
        )
        try:
            for k, st in strategies.items():
                scores, _, _ = scorer.score(min(st.mapping), st.mapping)
                rows.append({"mapping": k, "C": st.num_shared, **scores})
                bar.update()
        finally:
            for layer in decoder_layers(model):
                restore_attention(layer.self_attn)
        hit = cache.put(name, key, {"rows": rows, "seconds": round(time.perf_counter() - t0, 2)})
    rows = hit["rows"]
    full_nll = heldout["full"]["nll"]
    for r in rows:
        r["heldout_nll_increase"] = heldout[r["mapping"]]["nll"] - full_nll
    y = [r["heldout_nll_increase"] for r in rows]
    return {
        "rows": rows,
        "strategies": len(rows),
        "seconds": hit["seconds"],
        "spearman_kl": spearman([r["kl"] for r in rows], y),
        "spearman_hidden_damage": spearman([1 - r["hidden_cosine"] for r in rows], y),
        "pearson_kl": float(np.corrcoef([r["kl"] for r in rows], y)[0, 1]) if len(rows) > 2 else float("nan"),
    }


def timing_summary(t_start: float) -> str:
    return f"{format_seconds(time.perf_counter() - t_start)} wall with {torch.get_num_threads()} torch thread(s)"


def geometric_mean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
