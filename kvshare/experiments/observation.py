"""Notebook 01 (01_observation.ipynb): layer-to-layer KV distances, and perplexity versus the number of replaced
layers C for the dissimilar (KVSharer), similar and random search orders on several calibration sets.

One greedy search per (calibration set, order, seed) to the largest C gives every smaller C as a prefix; every
strategy is scored on the same held-out tokens (`common.HeldOutScorer`) and orders are compared by paired
per-window differences. Figures and the conclusion: `kvshare.experiments.reports.observation`.
"""

from __future__ import annotations

import math

import numpy as np

from ..adapter import num_layers
from ..data import calibration_texts
from ..metrics import paired_difference
from ..progress import Progress
from .common import ORDER_LABELS, HeldOutScorer, Settings, run_search


def c_grid(num_layers_: int, max_fraction: float = 0.4, step: int = 2) -> list[int]:
    """0, step, 2*step, ... up to at least `max_fraction` of the layers (never all of them)."""
    top = min(num_layers_ - 1, math.ceil(num_layers_ * max_fraction - 1e-9))
    grid = list(range(0, top + 1, step))
    if grid[-1] < top:
        grid.append(grid[-1] + step if grid[-1] + step <= num_layers_ - 1 else top)
    return grid


def matrix_rows(matrices: dict[str, np.ndarray]) -> list[dict]:
    """Long-format rows (metric, layer_a, layer_b, distance) for CSV."""
    return [
        {"metric": m, "layer_a": a, "layer_b": b, "distance": float(d[a, b])}
        for m, d in matrices.items()
        for a in range(d.shape[0])
        for b in range(d.shape[1])
    ]


# ------------------------------------------------------------------------------------------------
# perplexity-versus-C curves
# ------------------------------------------------------------------------------------------------
def order_runs(cfg: Settings) -> list[tuple[str, int]]:
    """(order, seed) of every search per calibration set: dissimilar, similar, random x seeds."""
    return [("dissimilar", cfg.seed), ("similar", cfg.seed)] + [
        ("random", cfg.seed + i) for i in range(cfg.random_seeds)
    ]


def ppl_curves(model, tokenizer, cfg: Settings, evaluator: HeldOutScorer, progress: bool = True):
    """One greedy search per (calibration set, order, seed) to the largest C; every C is a prefix.

    Returns (rows, runs): one row per (set, order, seed, C) with perplexity and per-window NLLs.
    """
    L = num_layers(model)
    grid = c_grid(L, cfg.max_fraction, cfg.c_step)
    top = grid[-1]
    plan = [(k, o, s) for k in range(cfg.calibration_sets) for o, s in order_runs(cfg)]
    bar = Progress(
        len(plan) * len(grid),
        f"ppl curves ({len(plan)} searches to C={top}, {len(grid)} points each)",
        enabled=progress,
    )
    rows, runs = [], []
    try:
        for k, order, seed in plan:
            texts = calibration_texts(cfg.samples, set_index=k)
            run = run_search(model, tokenizer, texts, top, order, seed, cfg, calibration_set=k)
            runs.append(run)
            reached = run.strategy.num_shared
            for c in grid:
                if c > reached:  # the search ran out of candidates above the threshold
                    bar.update()
                    continue
                strategy = run.strategy.prefix(c)
                result = evaluator(strategy)
                rows.append(
                    {
                        "calibration_set": k,
                        "order": order,
                        "seed": seed,
                        "num_shared": c,
                        "kv_fraction": (L - c) / L,
                        "mapping": {str(r): s for r, s in strategy.mapping.items()},
                        **result,
                    }
                )
                bar.update(
                    note=f"set {k} {order}{'' if order != 'random' else f' seed {seed}'} C={c} ppl={result['ppl']:.2f}"
                )
    finally:
        bar.close()
    return rows, runs


def curve_summary(rows: list[dict]) -> list[dict]:
    """Per (set, order, C): perplexity; random as the mean over seeds with its spread (std, min, max)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["calibration_set"], r["order"], r["num_shared"]), []).append(r)
    out = []
    for (k, order, c), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], list(ORDER_LABELS).index(kv[0][1]), kv[0][2])
    ):
        ppls = np.array([r["ppl"] for r in rs])
        out.append(
            {
                "calibration_set": k,
                "order": order,
                "num_shared": c,
                "seeds": len(rs),
                "ppl": float(ppls.mean()),
                "ppl_std": float(ppls.std(ddof=1)) if len(rs) > 1 else 0.0,
                "ppl_min": float(ppls.min()),
                "ppl_max": float(ppls.max()),
                "ppl_se": float(np.mean([r["ppl_se"] for r in rs])),
                "nll": float(np.mean([r["nll"] for r in rs])),
            }
        )
    return out


def find_rows(rows, **match):
    """The rows whose columns equal `match`."""
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def paired_comparisons(rows: list[dict]) -> list[dict]:
    """Per (set, C > 0): dissimilar vs similar, and dissimilar vs each random seed (paired on windows)."""
    out = []
    sets = sorted({r["calibration_set"] for r in rows})
    for k in sets:
        for c in sorted({r["num_shared"] for r in rows if r["calibration_set"] == k and r["num_shared"] > 0}):
            dis = find_rows(rows, calibration_set=k, order="dissimilar", num_shared=c)
            if not dis:
                continue
            for other in ("similar", "random"):
                for o in find_rows(rows, calibration_set=k, order=other, num_shared=c):
                    d = paired_difference(dis[0], o)
                    out.append(
                        {
                            "calibration_set": k,
                            "num_shared": c,
                            "versus": other,
                            "seed": o["seed"],
                            "ppl_dissimilar": dis[0]["ppl"],
                            "ppl_other": o["ppl"],
                            **d,
                        }
                    )
    return out
