"""Notebook 02 (02_search.ipynb): the anatomy of the greedy search: what the dissimilarity ranking and the
threshold each decide (traces, acceptance by rank decile, a threshold sweep, the search's cost).

Figures and the conclusion: `kvshare.experiments.reports.search`.
"""

from __future__ import annotations

import math

from ..metrics import paired_difference
from ..progress import Progress
from ..search import candidate_pairs
from ..strategy import Strategy
from .common import HeldOutScorer, SearchRun, Settings, run_search


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
    runs: list[SearchRun], evaluator: HeldOutScorer, reference: Strategy | None = None, progress: bool = True
) -> list[dict]:
    """Per threshold: how many visited candidates passed, and the perplexity of the resulting strategy.

    With a `reference` strategy (the default search's), each row also holds the paired perplexity ratio
    against it and its z-score (same evaluation windows).
    """
    rows = []
    ref = evaluator(reference) if reference is not None else None
    bar = Progress(len(runs), "threshold sweep: perplexity per T", enabled=progress, every=0)
    for run in runs:
        st = run.strategy
        visited = len(run.trace)
        accepted = sum(t["accepted"] for t in run.trace)
        target = st.metadata["target_num_shared"]
        result = evaluator(st)
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
                **{k: v for k, v in result.items() if k != "window_nll"},
            }
        )
        if ref is not None:
            d = paired_difference(result, ref)
            rows[-1].update(ppl_ratio_vs_default=d["ppl_ratio"], z_vs_default=d["z"])
        bar.update(note=f"T={rows[-1]['threshold']}: ppl={result['ppl']:.2f}")
    return rows


def threshold_sweep(
    model,
    tokenizer,
    texts,
    cfg: Settings,
    evaluator: HeldOutScorer,
    num_shared: int,
    order: str = "dissimilar",
    reuse: dict | None = None,
    progress: bool = True,
):
    """`sweep_searches` then `sweep_rows`: returns (rows, runs)."""
    runs = sweep_searches(model, tokenizer, texts, cfg, num_shared, order, reuse, progress)
    return sweep_rows(runs, evaluator, progress=progress), runs


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
