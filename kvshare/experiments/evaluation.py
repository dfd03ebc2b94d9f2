"""Notebook 03 (03_evaluation.ipynb): the compression table, benchmark scores at each compression rate for each
search order, run through the core evaluation runner (`kvshare.evaluation.Evaluator`).

Figure and conclusion: `kvshare.experiments.reports.evaluation`.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

# one rate -> layers rule (notebook 03 had its own copy, rounding half up: the same C at 30 layers)
from ..accounting import num_shared_for
from ..adapter import num_layers
from ..evaluation import Evaluator, model_fingerprint, safe_name
from ..models import model_name
from ..pypi_files import kvshare_home
from ..strategy import Strategy

RATES = (0.0, 0.125, 0.25, 0.375)
ORDERS = ("dissimilar", "similar", "random")


def compression_strategies(
    model,
    tokenizer,
    rates=RATES,
    orders=ORDERS,
    threshold: float = 0.5,
    samples: int = 30,
    seed: int = 0,
    cache: bool = True,
    cache_dir=None,
    progress: bool = True,
) -> dict:
    """{order: Strategy} searched once per order to the largest rate; smaller rates are its prefixes.

    Searches are cached beside the evaluation results (same model fingerprint).
    """
    from ..data import calibration_texts
    from ..search import search

    c_max = max(num_shared_for(r, num_layers(model)) for r in rates)
    root = Path(cache_dir) if cache_dir else kvshare_home() / "eval_cache"
    root = root / f"{safe_name(model_name(model))}-{model_fingerprint(model, tokenizer)}" / "strategies"
    out = {}
    for order in orders:
        path = root / f"{order}-c{c_max}-t{threshold}-n{samples}-seed{seed}.json"
        if cache and path.is_file():
            out[order] = Strategy.load(path)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only k of C layers could be replaced": recorded in the metadata
            strategy, _ = search(
                model,
                tokenizer,
                calibration_texts(samples),
                c_max,
                threshold=threshold,
                order=order,
                seed=seed,
                progress=progress,
            )
        if cache:
            strategy.save(path)
        out[order] = strategy
    return out


def compression_runs(
    evaluator: Evaluator,
    strategies: dict,
    rates=RATES,
    suite: str = "offline",
    tasks=None,
    limit: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate every (order, rate); the unshared model (rate 0) once. Returns long rows (order, rate, ...)."""
    from tqdm.auto import tqdm

    L = num_layers(evaluator.model)
    cells = [(o, r) for o in strategies for r in rates]
    full = evaluator.evaluate(None, suite=suite, tasks=tasks, limit=limit, label="full")
    rows = []
    for order, rate in tqdm(cells, desc="compression table", disable=not progress):
        c = num_shared_for(rate, L)
        found = strategies[order].num_shared
        if c == 0:
            result = full
        elif c > found:
            print(
                f"kvshare: the {order} search found only {found} layers to share; no row at rate {rate}",
                file=sys.stderr,
            )
            continue
        else:
            result = evaluator.evaluate(
                strategies[order].prefix(c), suite=suite, tasks=tasks, limit=limit, label=f"{order} {rate:.1%}"
            )
        for r in result["rows"]:
            rows.append({"order": order, "rate": rate, "num_shared": c, **r, "seconds": result["compute_seconds"]})
    return rows


def mean_or_nan(xs):
    """The mean, NaN for no values."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(rows) -> list[dict]:
    """Per (order, rate): average of the primary higher-is-better scores, % of the full model's average kept,
    % of its margin above chance kept, perplexity, and the paired drop vs the full model with its stderr."""
    primary = [r for r in rows if r.get("primary") and r.get("higher_is_better", True)]
    cells = sorted(
        {(r["order"], r["rate"]) for r in rows}, key=lambda c: (ORDERS.index(c[0]) if c[0] in ORDERS else 9, c[1])
    )
    full = {r["task"]: r for r in primary if r["num_shared"] == 0}
    full_avg = mean_or_nan(r["value"] for r in full.values())
    chance_avg = mean_or_nan(r["chance"] for r in full.values() if r.get("chance") is not None)
    has_chance = all(r.get("chance") is not None for r in full.values())
    out = []
    for order, rate in cells:
        here = [r for r in primary if (r["order"], r["rate"]) == (order, rate)]
        if {r["task"] for r in here} != set(full):
            continue
        avg = mean_or_nan(r["value"] for r in here)
        # paired drop: per task the mean of per-example differences against the full model
        var = 0.0
        for r in here:
            f = full[r["task"]]
            if r.get("scores") and f.get("scores") and len(r["scores"]) == len(f["scores"]) > 1:
                d = [a - b for a, b in zip(r["scores"], f["scores"])]
                m = mean_or_nan(d)
                var += sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)
            else:
                var += (r["stderr"] or 0.0) ** 2 + (f["stderr"] or 0.0) ** 2
        ppl = [x for x in rows if (x["order"], x["rate"]) == (order, rate) and x["metric"] == "ppl"]
        out.append(
            {
                "order": order,
                "rate": rate,
                "num_shared": here[0]["num_shared"],
                "average": avg,
                "average_stderr": math.sqrt(sum((r["stderr"] or 0.0) ** 2 for r in here)) / len(here),
                "kept_pct": 100 * avg / full_avg,
                "above_chance_kept_pct": 100 * (avg - chance_avg) / (full_avg - chance_avg) if has_chance else None,
                "drop": full_avg - avg,
                "drop_stderr": math.sqrt(var) / len(here),
                "ppl": ppl[0]["value"] if ppl else None,
            }
        )
    return out


def wide_table(rows) -> list[dict]:
    """One row per task (primary metric, "value ± stderr"), then Average and % kept; one column per cell."""
    primary = [r for r in rows if r.get("primary")]
    cells = sorted(
        {(r["order"], r["rate"]) for r in primary}, key=lambda c: (ORDERS.index(c[0]) if c[0] in ORDERS else 9, c[1])
    )
    col = {c: f"{c[0]} {c[1] * 100:g}%" for c in cells}
    tasks = list(dict.fromkeys(r["task"] for r in primary))
    out = []
    for t in tasks:
        line = {"task": t}
        for r in primary:
            if r["task"] == t:
                line["metric"] = r["metric"]
                line["chance"] = r.get("chance")
                se = f" ± {r['stderr']:.3f}" if r.get("stderr") is not None else ""
                line[col[(r["order"], r["rate"])]] = f"{r['value']:.3f}{se}"
        out.append(line)
    summary = summarize(rows)
    for key, label in (
        ("average", "Average"),
        ("kept_pct", "% of full kept"),
        ("above_chance_kept_pct", "% of above-chance margin kept"),
    ):
        line = {"task": label, "metric": "", "chance": None}
        for s in summary:
            if s[key] is not None:
                line[col[(s["order"], s["rate"])]] = f"{s[key]:.1f}" if key != "average" else f"{s[key]:.3f}"
        out.append(line)
    return out


def without_scores(rows) -> list[dict]:
    """Rows without their per-example scores (for the committed JSON/CSV; the cache keeps them)."""
    return [{k: v for k, v in r.items() if k != "scores"} for r in rows]
