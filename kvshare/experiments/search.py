"""Notebook 02 (02_search.ipynb): the anatomy of the greedy search: what the dissimilarity ranking and the
threshold each decide (traces, acceptance by rank decile, a threshold sweep, the search's cost), against a random-order
control that is a distribution: `cfg.random_seeds` seeds drawn for the calibration set (`common.random_seeds`, the
rule of notebooks 01 and 11), summarised by a mean with its 95% t-interval over seeds. Perplexities are under the
held-out protocol (`kvshare.metrics.HELDOUT`) through `common.HeldOutScorer` and the store shared with 01 and 11.

Figures and the conclusion: `kvshare.experiments.reports.search`.
"""

from __future__ import annotations

import math

from ..metrics import clearly_higher, clearly_lower, paired_difference
from ..progress import Progress
from ..search import candidate_pairs
from ..strategy import Strategy
from .common import (
    HeldOutScorer,
    SearchRun,
    Settings,
    ci95,
    mapping_key,
    ppl_ci95,
    random_seeds,
    result_ci95,
    run_search,
)


def dissimilarity_ranks(distances) -> dict[tuple[int, int], int]:
    """(r, s) -> its position in the dissimilar (KVSharer) order, 0 = most dissimilar."""
    return {pair: i for i, pair in enumerate(candidate_pairs(distances, "dissimilar"))}


def trace_rows(trace: list[dict], ranks: dict[tuple[int, int], int] | None = None) -> list[dict]:
    """The search trace with each candidate's dissimilarity rank (0 = the most dissimilar pair)."""
    out = []
    for i, t in enumerate(trace):
        row = {"visited": i, **t}
        if ranks is not None:
            row["dissimilarity_rank"] = ranks[(t["replaced"], t["source"])]
        out.append(row)
    return out


def acceptance_by_decile(
    rows: list[dict], num_pairs: int, bins: int = 10, rank_key: str = "dissimilarity_rank"
) -> list[dict]:
    """Acceptance rate of the visited candidates per decile of dissimilarity rank (decile 1 = most dissimilar)."""
    out = []
    for b in range(bins):
        lo, hi = b * num_pairs / bins, (b + 1) * num_pairs / bins
        sel = [r for r in rows if lo <= r[rank_key] < hi]
        acc = sum(bool(r["accepted"]) for r in sel)
        out.append(
            {
                "decile": b + 1,
                "rank_from": int(math.ceil(lo)),
                "rank_to": int(math.ceil(hi)) - 1,
                "visited": len(sel),
                "accepted": acc,
                "rate": acc / len(sel) if sel else float("nan"),
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# threshold sweep
# ------------------------------------------------------------------------------------------------
def sweep_searches(
    model,
    tokenizer,
    texts,
    cfg: Settings,
    num_shared: int,
    order: str = "dissimilar",
    reuse: dict | None = None,
    progress: bool = True,
) -> list[SearchRun]:
    """One greedy search to `num_shared` per threshold in `cfg.thresholds`.

    `reuse` maps a threshold to a SearchRun already made with the same settings (not searched again).
    A strict threshold rejects most candidates, so its search walks far down the list: that is its real cost.
    """
    reuse = reuse or {}
    runs = []
    bar = Progress(len(cfg.thresholds), f"threshold sweep: a search to C={num_shared} per T", enabled=progress, every=0)
    try:
        for T in cfg.thresholds:
            run = reuse.get(T)
            if run is None or run.strategy.metadata.get("target_num_shared") != num_shared:
                run = run_search(model, tokenizer, texts, num_shared, order, cfg.seed, cfg, threshold=T)
            runs.append(run)
            acc = sum(t["accepted"] for t in run.trace)
            bar.update(note=f"T={T}: {acc}/{len(run.trace)} passed in {run.strategy.metadata['search_seconds']:.0f} s")
    finally:
        bar.close()
    return runs


def sweep_rows(
    runs: list[SearchRun], scorer: HeldOutScorer, reference: Strategy | None = None, progress: bool = True
) -> list[dict]:
    """Per threshold: how many visited candidates passed, and the perplexity of the resulting strategy.

    With a `reference` strategy (the default search's), each row also holds the paired perplexity ratio
    against it and its z-score (same evaluation windows).
    """
    rows = []
    ref = scorer(reference) if reference is not None else None
    bar = Progress(len(runs), "threshold sweep: perplexity per T", enabled=progress, every=0)
    for run in runs:
        st = run.strategy
        visited = len(run.trace)
        accepted = sum(t["accepted"] for t in run.trace)
        target = st.metadata["target_num_shared"]
        result = scorer(st)
        lo, hi = result_ci95(result)
        rows.append(
            {
                "threshold": st.metadata["threshold"],
                "target": target,
                "accepted": accepted,
                "visited": visited,
                "rejected": visited - accepted,
                "pass_rate": accepted / visited if visited else float("nan"),
                "reached_target": st.num_shared >= target,
                "num_shared": st.num_shared,
                "search_seconds": st.metadata["search_seconds"],
                "layer_forwards": st.metadata["layer_forwards"],
                "mapping": {str(r): s for r, s in st.mapping.items()},
                "mapping_key": mapping_key(st),
                **{k: v for k, v in result.items() if k not in ("window_nll", "protocol")},
                "ppl_lo": lo,
                "ppl_hi": hi,
            }
        )
        if ref is not None:
            d = paired_difference(result, ref)
            rows[-1].update(
                ppl_ratio_vs_default=d["ppl_ratio"],
                ppl_ratio_vs_default_ci95=d["ppl_ratio_ci95"],
                z_vs_default=d["z"],
            )
        bar.update(note=f"T={rows[-1]['threshold']}: ppl={result['ppl']:.2f}")
    return rows


def threshold_sweep(
    model,
    tokenizer,
    texts,
    cfg: Settings,
    scorer: HeldOutScorer,
    num_shared: int,
    order: str = "dissimilar",
    reuse: dict | None = None,
    progress: bool = True,
):
    """`sweep_searches` then `sweep_rows`: returns (rows, runs)."""
    runs = sweep_searches(model, tokenizer, texts, cfg, num_shared, order, reuse, progress)
    return sweep_rows(runs, scorer, progress=progress), runs


# ------------------------------------------------------------------------------------------------
# the random-order control: a distribution over seeds
# ------------------------------------------------------------------------------------------------
def random_controls(
    model, tokenizer, texts, cfg: Settings, num_shared: int, calibration_set: int = 0, progress: bool = True
) -> list[SearchRun]:
    """One random-order search to `num_shared` at the default T per seed of `calibration_set` (`common.random_seeds`:
    the seeds notebooks 01 and 11 search on that set, so their strategies are already in the held-out store)."""
    return [
        run_search(
            model, tokenizer, texts, num_shared, "random", s, cfg, calibration_set=calibration_set, progress=progress
        )
        for s in random_seeds(cfg, calibration_set)
    ]


def pooled_counts(runs: list[SearchRun]) -> dict:
    """Visited / accepted / rejected candidates summed over several searches, with the per-search pass rates'
    mean and its 95% t-interval over the searches."""
    counts = [run_counts(r) for r in runs]
    rates = ci95([c["accepted"] / c["visited"] for c in counts if c["visited"]])
    return {
        "searches": len(runs),
        "visited": sum(c["visited"] for c in counts),
        "accepted": sum(c["accepted"] for c in counts),
        "rejected": sum(c["rejected"] for c in counts),
        "pass_rate_mean": rates["mean"],
        "pass_rate_lo": rates["lo"],
        "pass_rate_hi": rates["hi"],
        "seeds": [r.seed for r in runs],
    }


def pooled_acceptance(tables: list[list[dict]]) -> list[dict]:
    """Several searches' `acceptance_by_decile` tables summed per decile (accepted / visited over all of them)."""
    out = []
    for rows in zip(*tables):
        visited = sum(r["visited"] for r in rows)
        accepted = sum(r["accepted"] for r in rows)
        out.append(
            {
                **{k: rows[0][k] for k in ("decile", "rank_from", "rank_to")},
                "visited": visited,
                "accepted": accepted,
                "rate": accepted / visited if visited else float("nan"),
            }
        )
    return out


def random_quality(runs: list[SearchRun], scorer: HeldOutScorer, num_shared: int, reference=None) -> dict:
    """Held-out perplexity of the random-order strategies at `num_shared` (the runs' prefixes): per seed, and their
    mean as exp(mean NLL) (the geometric mean) with the 95% t-interval over seeds. With a `reference` strategy (the
    default search's), the paired ratio reference / random per seed and its mean over seeds with a 95% t-interval
    (below 1: the reference is better than a random order)."""
    seeds, diffs = [], []
    ref = scorer(reference) if reference is not None else None
    for run in runs:
        if run.strategy.num_shared < num_shared:
            continue
        st = run.strategy.prefix(num_shared)
        res = scorer(st)
        lo, hi = result_ci95(res)
        row = {
            "seed": run.seed,
            "num_shared": num_shared,
            "mapping_key": mapping_key(st),
            "ppl": res["ppl"],
            "nll": res["nll"],
            "ppl_lo": lo,
            "ppl_hi": hi,
        }
        if ref is not None:
            d = paired_difference(ref, res)
            row.update(reference_vs_this=d["ppl_ratio"], reference_vs_this_ci95=d["ppl_ratio_ci95"], z=d["z"])
            diffs.append(d["nll_diff"])
        seeds.append(row)
    ci = ppl_ci95([r["nll"] for r in seeds])
    out = {
        "num_shared": num_shared,
        "seeds": seeds,
        "n": len(seeds),
        "ppl": ci["ppl"],
        "ppl_lo": ci["lo"],
        "ppl_hi": ci["hi"],
        "interval": f"95% t-interval over {len(seeds)} seeds",
    }
    if ref is not None and diffs:
        d = ci95(diffs)
        out.update(
            reference_ppl=ref["ppl"],
            reference_vs_random=math.exp(d["mean"]),
            reference_vs_random_lo=math.exp(d["lo"]),
            reference_vs_random_hi=math.exp(d["hi"]),
            reference_better=sum(clearly_lower(r["z"]) for r in seeds),
            reference_worse=sum(clearly_higher(r["z"]) for r in seeds),
        )
    return out


# ------------------------------------------------------------------------------------------------
# counts and cost of one search
# ------------------------------------------------------------------------------------------------
def run_counts(run: SearchRun) -> dict:
    visited = len(run.trace)
    accepted = sum(t["accepted"] for t in run.trace)
    return {"visited": visited, "accepted": accepted, "rejected": visited - accepted}


def search_summary(run: SearchRun) -> dict:
    m = run.strategy.metadata
    return {
        "num_shared": run.strategy.num_shared,
        "candidates_visited": m["candidates_visited"],
        "search_seconds": m["search_seconds"],
        "layer_forwards": m["layer_forwards"],
        "naive_layer_forwards": m["naive_layer_forwards"],
        "speedup_vs_naive": m["naive_layer_forwards"] / max(1, m["layer_forwards"]),
    }
