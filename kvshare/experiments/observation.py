"""Notebook 01 (01_observation.ipynb): layer-to-layer KV distances, and perplexity versus the number of replaced
layers C for the dissimilar (KVSharer), similar and random search orders on several calibration sets.

One greedy search per (calibration set, order, seed) to the largest C gives every smaller C as a prefix; every
distinct strategy is scored once under the held-out protocol (`kvshare.metrics.HELDOUT`, through
`common.HeldOutScorer` and the store shared with the other notebooks), and orders are compared by paired
per-window differences. The random order is a distribution: `cfg.random_seeds` seeds per calibration set, drawn
per set (`common.random_seeds`), scored at `cfg.random_c_values`, summarised by a mean with a 95% t-interval over
seeds. Two searches on different calibration sets that choose the same strategy make one comparison, not two
(`distinct_comparisons`). Figures and the conclusion: `kvshare.experiments.reports.observation`.
"""

from __future__ import annotations

import math

import numpy as np

from ..adapter import num_layers
from ..data import calibration_texts
from ..metrics import clear_sign, paired_difference
from ..progress import Progress
from .common import (
    ORDER_LABELS,
    HeldOutScorer,
    Settings,
    ci95,
    mapping_key,
    ppl_ci95,
    random_seeds,
    result_ci95,
    run_search,
)


def c_grid(num_layers_: int, max_fraction: float = 0.4, step: int = 2) -> list[int]:
    """0, step, 2*step, ... up to at least `max_fraction` of the layers (never all of them)."""
    top = min(num_layers_ - 1, math.ceil(num_layers_ * max_fraction - 1e-9))
    grid = list(range(0, top + 1, step))
    if grid[-1] < top:
        grid.append(grid[-1] + step if grid[-1] + step <= num_layers_ - 1 else top)
    return grid


def curve_grid(cfg: Settings, num_layers_: int) -> list[int]:
    """The C points of notebook 01's curves: `cfg.c_points` (with C = 0) when set, else `c_grid`."""
    if cfg.c_points:
        points = sorted({0, *(int(c) for c in cfg.c_points)})
        if points[-1] >= num_layers_:
            raise ValueError(
                f"c_points {cfg.c_points}: a model with {num_layers_} layers shares at most {num_layers_ - 1}"
            )
        return points
    return c_grid(num_layers_, cfg.max_fraction, cfg.c_step)


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
def order_runs(cfg: Settings, calibration_set: int = 0) -> list[tuple[str, int]]:
    """(order, seed) of every search on one calibration set: dissimilar, similar, random x its seeds (drawn per set)."""
    return [("dissimilar", cfg.seed), ("similar", cfg.seed)] + [
        ("random", s) for s in random_seeds(cfg, calibration_set)
    ]


def c_values(order: str, grid: list[int], cfg: Settings) -> list[int]:
    """The C points scored for an order: the whole grid, random only at `cfg.random_c_values` (and C = 0)."""
    if order != "random":
        return list(grid)
    return [0] + sorted(c for c in set(cfg.random_c_values) if 0 < c <= grid[-1])


def ppl_curves(model, tokenizer, cfg: Settings, scorer: HeldOutScorer, progress: bool = True):
    """One greedy search per (calibration set, order, seed) to its largest C; every C is a prefix.

    Returns (rows, runs): one row per (set, order, seed, C) with perplexity and per-window NLLs.
    """
    L = num_layers(model)
    grid = curve_grid(cfg, L)
    plan = [(k, o, s) for k in range(cfg.calibration_sets) for o, s in order_runs(cfg, k)]
    points = sum(len(c_values(o, grid, cfg)) for _, o, _ in plan)
    bar = Progress(points, f"ppl curves ({len(plan)} searches, {points} points)", enabled=progress)
    rows, runs = [], []
    try:
        for k, order, seed in plan:
            cs = c_values(order, grid, cfg)
            texts = calibration_texts(cfg.samples, set_index=k)
            run = run_search(model, tokenizer, texts, cs[-1], order, seed, cfg, calibration_set=k)
            runs.append(run)
            reached = run.strategy.num_shared
            for c in cs:
                if c > reached:  # the search ran out of candidates above the threshold
                    bar.update()
                    continue
                strategy = run.strategy.prefix(c)
                result = scorer(strategy)
                rows.append(
                    {
                        "calibration_set": k,
                        "order": order,
                        "seed": seed,
                        "num_shared": c,
                        "kv_fraction": (L - c) / L,
                        "mapping": {str(r): s for r, s in strategy.mapping.items()},
                        "mapping_key": mapping_key(strategy),
                        **result,
                    }
                )
                bar.update(
                    note=f"set {k} {order}{'' if order != 'random' else f' seed {seed}'} C={c} ppl={result['ppl']:.2f}"
                )
    finally:
        bar.close()
    return rows, runs


def _key(row: dict) -> str:
    return row.get("mapping_key") or (
        ",".join(f"{r}:{s}" for r, s in sorted((int(r), s) for r, s in row["mapping"].items())) or "full"
    )


def curve_summary(rows: list[dict]) -> list[dict]:
    """Per (set, order, C): perplexity with its 95% interval.

    Fixed orders: the strategy's perplexity, interval `common.result_ci95` over the evaluation windows. Random: the
    mean over seeds, as exp(mean NLL) (the geometric mean of the seeds' perplexities), with the 95% t-interval over
    seeds (n - 1 degrees of freedom), and the seeds' min and max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["calibration_set"], r["order"], r["num_shared"]), []).append(r)
    out = []
    for (k, order, c), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], list(ORDER_LABELS).index(kv[0][1]), kv[0][2])
    ):
        ppls = np.array([r["ppl"] for r in rs])
        if order == "random":
            ci = ppl_ci95([r["nll"] for r in rs])
            ppl, lo, hi = ci["ppl"], ci["lo"], ci["hi"]
            interval = f"95% t-interval over {len(rs)} seeds"
        else:
            ppl = rs[0]["ppl"]
            lo, hi = result_ci95(rs[0])
            interval = "95% over evaluation windows"
        out.append(
            {
                "calibration_set": k,
                "order": order,
                "num_shared": c,
                "seeds": len(rs),
                "ppl": float(ppl),
                "ppl_lo": float(lo),
                "ppl_hi": float(hi),
                "interval": interval,
                "ppl_min": float(ppls.min()),
                "ppl_max": float(ppls.max()),
                "ppl_se": float(np.mean([r["ppl_se"] for r in rs])),
                "nll": float(np.mean([r["nll"] for r in rs])),
                "distinct_strategies": len({_key(r) for r in rs}),
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
                            "mapping_dissimilar": _key(dis[0]),
                            "mapping_other": _key(o),
                            "ppl_dissimilar": dis[0]["ppl"],
                            "ppl_other": o["ppl"],
                            **d,
                        }
                    )
    return out


def distinct_comparisons(comparisons: list[dict]) -> list[dict]:
    """The comparisons of distinct (dissimilar strategy, rival strategy) pairs at each C.

    When the searches on several calibration sets chose the same two strategies, their paired difference is the
    same number measured once: it is one comparison, listed with every set (and seed) that chose it."""
    out: dict[tuple, dict] = {}
    for c in comparisons:
        key = (c["versus"], c["num_shared"], c["mapping_dissimilar"], c["mapping_other"])
        if key not in out:
            out[key] = {**c, "calibration_sets": [], "seeds": []}
            out[key].pop("calibration_set", None)
            out[key].pop("seed", None)
        if c["calibration_set"] not in out[key]["calibration_sets"]:
            out[key]["calibration_sets"].append(c["calibration_set"])
        out[key]["seeds"].append(c["seed"])
    return sorted(out.values(), key=lambda d: (d["versus"], d["num_shared"], d["calibration_sets"]))


def outcome(comparison: dict) -> str:
    """'better' / 'worse' (dissimilar's perplexity clearly lower / higher: its 95% paired interval excludes 1, read by
    `kvshare.metrics.clear_sign`) or 'unclear'."""
    return {-1: "better", 1: "worse", 0: "unclear"}[clear_sign(comparison["z"])]


def random_versus(comparisons: list[dict]) -> list[dict]:
    """Per C: dissimilar against the random order as a distribution, over every distinct (set, seed) random strategy:
    the mean of log(ppl dissimilar / ppl random) with its 95% t-interval over those strategies, as a ratio."""
    out = []
    rnd = [c for c in distinct_comparisons(comparisons) if c["versus"] == "random"]
    for c in sorted({r["num_shared"] for r in rnd}):
        rs = [r for r in rnd if r["num_shared"] == c]
        ci = ci95([r["nll_diff"] for r in rs])
        out.append(
            {
                "num_shared": c,
                "strategies": len(rs),
                "sets": sorted({k for r in rs for k in r["calibration_sets"]}),
                "ratio": math.exp(ci["mean"]),
                "ratio_lo": math.exp(ci["lo"]),
                "ratio_hi": math.exp(ci["hi"]),
                "better": sum(outcome(r) == "better" for r in rs),
                "worse": sum(outcome(r) == "worse" for r in rs),
                "unclear": sum(outcome(r) == "unclear" for r in rs),
            }
        )
    return out


def identical_across_sets(rows: list[dict], order: str) -> list[int]:
    """The C > 0 at which the searches of `order` on every calibration set chose one and the same strategy."""
    sets = {r["calibration_set"] for r in rows}
    out = []
    for c in sorted({r["num_shared"] for r in rows if r["order"] == order and r["num_shared"] > 0}):
        rs = find_rows(rows, order=order, num_shared=c)
        if len(sets) > 1 and {r["calibration_set"] for r in rs} == sets and len({_key(r) for r in rs}) == 1:
            out.append(c)
    return out
