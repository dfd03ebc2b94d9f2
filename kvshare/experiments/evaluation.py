"""Notebook 03 (03_evaluation.ipynb): the compression table, benchmark scores at each compression rate for each
search order, run through the core evaluation runner (`kvshare.evaluation.Evaluator`).

Statistics: the random order is a distribution (RANDOM_SEEDS independent orders, each its own search, at
RANDOM_RATES only, to keep the full run within ~35 minutes on 2 cores), "% of full kept" and its above-chance
version get paired bootstrap 95% intervals (examples resampled within each task, the same draw for the full
model and the method; for random the seeds are resampled too), and the claim's verdict reads the interval.
Rates are reported as the exact fraction of layers (`kvshare.accounting.num_shared_for`: 25% -> 8/30 = 26.7%).
The multiple-choice tasks evaluate only their `test` part, disjoint from the `screen` part that chose them
(`kvshare.tasks.offline`; `kvshare.tasks.screening.screen` reruns that choice on the screen part alone).

Figure and conclusion: `kvshare.experiments.reports.evaluation`.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# one rate -> layers rule (notebook 03 had its own copy, rounding half up: the same C at 30 layers)
from ..accounting import num_shared_for
from ..adapter import num_layers
from ..claims import interval_status
from ..evaluation import Evaluator, model_fingerprint, safe_name
from ..metrics import interval95
from ..models import model_name
from ..pypi_files import kvshare_home
from ..strategy import Strategy
from . import common

RATES = (0.0, 0.125, 0.25, 0.375)
ORDERS = ("dissimilar", "similar", "random")
RANDOM_SEEDS = 5  # independent random orders (quick: 2)
RANDOM_RATES = (0.25,)  # the rates at which the random orders are evaluated (the claim's rate)
BOOTSTRAP_ITERS = 2000
THRESHOLD_PCT = 90.0


CALIBRATION_SAMPLES = 30

# Model-aware full runs (see common.Settings.MODEL_FULL and kvshare.experiments.budget): {model: (plan values, why)}
FULL_PLANS: dict = {}  # gemma3-270m runs the default plan: its strategies are notebook 01's (held-out scores from
# the store) and its multiple-choice requests are scored by the one-pass scorer (kvshare.tasks.lmeval)


def plan(model: str, quick: bool, random_seeds: int | None = None) -> dict:
    """Notebook 03's run: rates, orders, random_rates, random_seeds, calibration_samples, limit (None: each task's
    size) and why a model's full run differs from the default's (`FULL_PLANS`; None when it does not). Quick: 0 and
    25%, dissimilar and 2 random seeds, 10 calibration texts, 5 examples per task. Random is a distribution: a full run
    refuses fewer than 5 seeds (quick: 2)."""
    p = {
        "rates": RATES,
        "orders": ORDERS,
        "random_rates": RANDOM_RATES,
        "random_seeds": RANDOM_SEEDS,
        "calibration_samples": CALIBRATION_SAMPLES,
        "limit": None,
        "model_plan": None,
    }
    if quick:
        p.update(rates=(0.0, 0.25), orders=("dissimilar", "random"), random_seeds=2, calibration_samples=10, limit=5)
    elif model in FULL_PLANS:
        values, why = FULL_PLANS[model]
        p.update(values, model_plan=why)
    if random_seeds is not None:
        p["random_seeds"] = random_seeds
    least = 2 if quick else 5
    if "random" in p["orders"] and p["random_seeds"] < least:
        raise ValueError(f"random_seeds={p['random_seeds']}: random is a distribution; use at least {least} seeds")
    return p


def layers_text(num_shared: int, layers: int) -> str:
    """A rate as the exact fraction of layers: '8/30 (26.7%)'."""
    return f"{num_shared}/{layers} ({100 * num_shared / layers:.1f}%)"


def arms(orders=ORDERS, seed: int = 0, random_seeds: int = RANDOM_SEEDS) -> list[tuple[str, str, int]]:
    """(label, order, seed) of every searched strategy: one per fixed order, `random_seeds` for random."""
    out = []
    for order in orders:
        if order == "random":
            seeds = common.random_seeds(SimpleNamespace(seed=seed, random_seeds=random_seeds), calibration_set=0)
            out += [(f"random seed {s}", "random", s) for s in seeds]
        else:
            out.append((order, order, seed))
    return out


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
    random_seeds: int = RANDOM_SEEDS,
    random_rates=RANDOM_RATES,
) -> dict:
    """{label: Strategy}: one search per fixed order to the largest rate (smaller rates are its prefixes), and
    `random_seeds` independent random orders (labels 'random seed S') to the largest of `random_rates`.

    Searches are cached beside the evaluation results (same model fingerprint).
    """
    from ..data import calibration_texts
    from ..search import search

    L = num_layers(model)
    root = Path(cache_dir) if cache_dir else kvshare_home() / "eval_cache"
    root = root / f"{safe_name(model_name(model))}-{model_fingerprint(model, tokenizer)}" / "strategies"
    out = {}
    for label, order, s in arms(orders, seed, random_seeds):
        c_max = max(num_shared_for(r, L) for r in (random_rates if order == "random" else rates))
        path = root / f"{order}-c{c_max}-t{threshold}-n{samples}-seed{s}.json"
        if cache and path.is_file():
            out[label] = Strategy.load(path)
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
                seed=s,
                progress=progress,
            )
        if cache:
            strategy.save(path)
        out[label] = strategy
    return out


def compression_runs(
    evaluator: Evaluator,
    strategies: dict,
    rates=RATES,
    suite: str = "offline",
    tasks=None,
    limit: int | None = None,
    progress: bool = True,
    random_rates=RANDOM_RATES,
    heldout=None,
) -> list[dict]:
    """Evaluate every (strategy, rate): fixed orders at `rates`, random orders at `random_rates`; the unshared model
    (rate 0) once, its rows repeated under each fixed order. Long rows (order, label, seed, rate, num_shared,
    num_layers, ...).

    `heldout`: a `common.HeldOutScorer`. The suite's perplexity task is then left out and each cell's perplexity row
    is the shared held-out protocol's (kvshare.metrics.HELDOUT, 16k tokens; the same baseline and the same stored
    scores as every other notebook), instead of the suite's own shorter one."""
    from tqdm.auto import tqdm

    L = num_layers(evaluator.model)
    if heldout is not None:
        from ..evaluation import resolve_tasks

        tasks = [t for t in resolve_tasks(suite, tasks, model=model_name(evaluator.model)) if t.kind != "perplexity"]
    cells = []
    for label, strategy in strategies.items():
        order = strategy.metadata.get("order", label)
        for rate in random_rates if order == "random" else rates:
            if order == "random" and num_shared_for(rate, L) == 0:
                continue
            cells.append((label, order, rate))
    full = evaluator.evaluate(None, suite=suite, tasks=tasks, limit=limit, label="full")
    rows = []
    for label, order, rate in tqdm(cells, desc="compression table", disable=not progress):
        c = num_shared_for(rate, L)
        found = strategies[label].num_shared
        if c == 0:
            result = full
        elif c > found:
            print(
                f"kvshare: the {label} search found only {found} layers to share; no row at {layers_text(c, L)}",
                file=sys.stderr,
            )
            continue
        else:
            result = evaluator.evaluate(
                strategies[label].prefix(c), suite=suite, tasks=tasks, limit=limit, label=f"{label} {c}/{L}"
            )
        seed = strategies[label].metadata.get("seed")
        extra = [] if heldout is None else [heldout_row(heldout(strategies[label].prefix(c) if c else None))]
        for r in result["rows"] + extra:
            rows.append(
                {
                    "order": order,
                    "label": label,
                    "seed": seed,
                    "rate": rate,
                    "num_shared": c,
                    "num_layers": L,
                    "fraction": c / L,
                    **r,
                    "seconds": result["compute_seconds"],
                }
            )
    return rows


def heldout_row(result: dict) -> dict:
    """A `kvshare.metrics.heldout_perplexity` result as a row of the suite's perplexity task."""
    from ..tasks.offline import PerplexityTask

    return {
        "task": PerplexityTask.name,
        "n": result["tokens"],
        "category": PerplexityTask.category,
        "chance": None,
        "higher_is_better": False,
        "metric": "ppl",
        "value": result["ppl"],
        "stderr": result["ppl_se"],
        "primary": True,
        "protocol": "heldout",
    }


def mean_or_nan(xs):
    """The mean, NaN for no values."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def paired_bootstrap(
    full: dict, arms_scores: list[dict], chance: dict | None = None, iters: int = BOOTSTRAP_ITERS, seed: int = 0
) -> dict:
    """Point estimates and percentile 95% intervals of the average score, "% of full kept", "% of the
    above-chance margin kept" and the drop, for a method against the full model.

    `full`: {task: per-example scores}; `arms_scores`: one such dict per strategy of the method (one for a fixed
    order, one per seed for random), the same examples in the same order as `full`; `chance`: {task: chance}.
    The average is over tasks of each task's mean. Each draw resamples the examples within every task (the same
    indices for the full model and every arm: paired) and, with more than one arm, the arms (seeds) too; the
    method's average is the mean over (drawn) arms.
    """
    tasks = list(full)
    if not tasks or not arms_scores:
        raise ValueError("paired_bootstrap needs at least one task and one arm")
    rng = np.random.default_rng(seed)
    n_arms = len(arms_scores)
    full_draws = np.zeros(iters)
    arm_draws = np.zeros((n_arms, iters))
    for t in tasks:
        f = np.asarray(full[t], dtype=float)
        a = np.asarray([arm[t] for arm in arms_scores], dtype=float)
        if f.ndim != 1 or f.size == 0 or a.shape != (n_arms, f.size):
            raise ValueError(f"task {t}: the full model and every arm need per-example scores on the same examples")
        idx = rng.integers(0, f.size, size=(iters, f.size))
        full_draws += f[idx].mean(axis=1)
        arm_draws += a[:, idx].mean(axis=2)
    full_draws /= len(tasks)
    arm_draws /= len(tasks)
    if n_arms > 1:
        pick = rng.integers(0, n_arms, size=(iters, n_arms))
        method_draws = arm_draws[pick, np.arange(iters)[:, None]].mean(axis=1)
    else:
        method_draws = arm_draws[0]
    full_avg = float(np.mean([np.mean(full[t]) for t in tasks]))
    arm_avgs = [float(np.mean([np.mean(arm[t]) for t in tasks])) for arm in arms_scores]
    avg = float(np.mean(arm_avgs))

    def ci(draws):
        lo, hi = np.nanpercentile(draws, [2.5, 97.5])  # NaN: a draw whose ratio is undefined (all-zero full)
        return float(lo), float(hi)

    def ratio(num, den):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)

    out = {"average": avg, "full_average": full_avg, "arm_averages": arm_avgs}
    out["average_lo"], out["average_hi"] = ci(method_draws)
    out["kept_pct"] = 100 * avg / full_avg
    out["kept_lo"], out["kept_hi"] = ci(100 * ratio(method_draws, full_draws))
    out["drop"] = full_avg - avg
    out["drop_lo"], out["drop_hi"] = ci(full_draws - method_draws)
    if chance is not None and all(chance.get(t) is not None for t in tasks):
        c = float(np.mean([chance[t] for t in tasks]))
        out["above_chance_kept_pct"] = 100 * (avg - c) / (full_avg - c)
        out["above_chance_lo"], out["above_chance_hi"] = ci(100 * ratio(method_draws - c, full_draws - c))
    else:
        out["above_chance_kept_pct"] = out["above_chance_lo"] = out["above_chance_hi"] = None
    return out


def verdict(lo: float, hi: float, threshold: float = THRESHOLD_PCT) -> str:
    """'holds' when the whole 95% interval is above `threshold`, 'fails' when it is below, else 'undecided'
    (`kvshare.claims.interval_status`, the rule every claim reads an interval by)."""
    return interval_status(lo, hi, threshold, "above")


def t_interval(values) -> tuple[float, float]:
    """95% t interval of a mean (over seeds); (v, v) for a single value."""
    values = [float(v) for v in values]
    m = mean_or_nan(values)
    if len(values) < 2:
        return m, m
    df = len(values) - 1
    t = common.t975(df)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / df)
    half = t * sd / math.sqrt(len(values))
    return m - half, m + half


def _cell_order(cell):
    return (ORDERS.index(cell[0]) if cell[0] in ORDERS else 9, cell[1])


def summarize(rows, iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> list[dict]:
    """Per (order, layers replaced), all seeds of an order pooled: the average of the primary higher-is-better
    scores, "% of full kept" and "% of the above-chance margin kept" with paired bootstrap 95% intervals
    (`paired_bootstrap`), the drop against the full model with its interval and paired stderr, perplexity
    (random: the mean over seeds with a t interval over seeds; else `interval95` of its stderr) and the per-seed
    values."""
    primary = [r for r in rows if r.get("primary") and r.get("higher_is_better", True)]
    full_rows = {r["task"]: r for r in primary if r["num_shared"] == 0}
    full = {t: r["scores"] for t, r in full_rows.items()}
    chance = {t: r.get("chance") for t, r in full_rows.items()}
    out = []
    for order, c in sorted({(r["order"], r["num_shared"]) for r in rows}, key=_cell_order):
        per_arm = _complete_arms([r for r in primary if (r["order"], r["num_shared"]) == (order, c)], order, full)
        if not per_arm:
            continue
        stats = paired_bootstrap(
            full, [{t: r["scores"] for t, r in m.items()} for _, m in per_arm], chance, iters, seed
        )
        entry = _cell_entry(order, c, per_arm, full, stats)
        arms = {label for label, _ in per_arm}
        ppl_rows = [
            x
            for x in rows
            if (x["order"], x["num_shared"]) == (order, c) and x["metric"] == "ppl" and x.get("label", order) in arms
        ]
        entry.update(_perplexity_interval(ppl_rows))
        if len(per_arm) > 1:
            entry["per_seed"] = [
                {"seed": m[next(iter(full))].get("seed"), "average": a, "kept_pct": 100 * a / stats["full_average"]}
                for (_, m), a in zip(per_arm, stats["arm_averages"])
            ]
        out.append(entry)
    return out


def _complete_arms(here: list[dict], order: str, full: dict) -> list[tuple[str, dict]]:
    """The arms (seeds) of one cell as (label, {task: row}), those scored on every task the full model was."""
    per_arm = []
    for label in dict.fromkeys(r.get("label", order) for r in here):
        mine = {r["task"]: r for r in here if r.get("label", order) == label}
        if set(mine) == set(full):
            per_arm.append((label, mine))
    return per_arm


def _paired_drop_stderr(full: dict, per_arm: list[tuple[str, dict]]) -> float:
    """Paired stderr of the drop, pooled over arms: per task, the per-example differences of the arms' mean."""
    var = 0.0
    for t, f in full.items():
        d = [np.mean([m[t]["scores"][i] for _, m in per_arm]) - f[i] for i in range(len(f))]
        if len(d) > 1:
            var += float(np.var(d, ddof=1)) / len(d)
    return math.sqrt(var) / len(full)


def _cell_entry(order: str, c: int, per_arm: list[tuple[str, dict]], full: dict, stats: dict) -> dict:
    """One summary row: the cell, its arms' seeds and the bootstrap's numbers (perplexity filled in later)."""
    first = per_arm[0][1][next(iter(full))]
    L = first.get("num_layers")
    return {
        "order": order,
        "rate": first["rate"],
        "num_shared": c,
        "num_layers": L,
        "fraction": c / L if L else None,
        "layers": layers_text(c, L) if L else str(c),
        "seeds": [m[next(iter(full))].get("seed") for _, m in per_arm],
        "average": stats["average"],
        "average_lo": stats["average_lo"],
        "average_hi": stats["average_hi"],
        "kept_pct": stats["kept_pct"],
        "kept_lo": stats["kept_lo"],
        "kept_hi": stats["kept_hi"],
        "above_chance_kept_pct": stats["above_chance_kept_pct"],
        "above_chance_lo": stats["above_chance_lo"],
        "above_chance_hi": stats["above_chance_hi"],
        "drop": stats["drop"],
        "drop_lo": stats["drop_lo"],
        "drop_hi": stats["drop_hi"],
        "drop_stderr": _paired_drop_stderr(full, per_arm),
        "ppl": None,
        "ppl_lo": None,
        "ppl_hi": None,
        "interval": "paired bootstrap 95%, examples resampled within each task"
        + (f", seeds resampled ({len(per_arm)} seeds)" if len(per_arm) > 1 else ""),
    }


def _perplexity_interval(ppl_rows: list[dict]) -> dict:
    """The cell's perplexity: over several seeds their mean with a t interval, for one `interval95` of its stderr;
    {} if none."""
    if not ppl_rows:
        return {}
    values = [x["value"] for x in ppl_rows]
    if len(values) > 1:
        lo, hi = t_interval(values)
    else:
        se = ppl_rows[0].get("stderr") or 0.0
        lo, hi = interval95(values[0], se)
    return {"ppl": mean_or_nan(values), "ppl_lo": lo, "ppl_hi": hi}


def column_label(order: str, num_shared: int, layers: int | None, seeds: int = 1) -> str:
    base = f"{order} {layers_text(num_shared, layers)}" if layers else f"{order} {num_shared}"
    return base + (f", mean of {seeds} seeds" if seeds > 1 else "")


def wide_table(rows, summary=None) -> list[dict]:
    """One row per task (primary metric: "value ± stderr"; random: the mean over seeds [lowest–highest seed]), then
    Average, % kept and % of the above-chance margin kept with their 95% intervals; one column per (order,
    layers replaced), labelled by the exact fraction of layers."""
    primary = [r for r in rows if r.get("primary")]
    summary = summarize(rows) if summary is None else summary
    cells = [(s["order"], s["num_shared"]) for s in summary]
    col = {
        (s["order"], s["num_shared"]): column_label(s["order"], s["num_shared"], s["num_layers"], len(s["seeds"]))
        for s in summary
    }
    tasks = list(dict.fromkeys(r["task"] for r in primary))
    out = []
    for t in tasks:
        line = {"task": t}
        for cell in cells:
            mine = [r for r in primary if r["task"] == t and (r["order"], r["num_shared"]) == cell]
            if not mine:
                continue
            line["metric"] = mine[0]["metric"]
            line["chance"] = mine[0].get("chance")
            values = [r["value"] for r in mine]
            if len(mine) > 1:
                line[col[cell]] = f"{mean_or_nan(values):.3f} [{min(values):.3f}–{max(values):.3f}]"
            else:
                se = f" ± {mine[0]['stderr']:.3f}" if mine[0].get("stderr") is not None else ""
                line[col[cell]] = f"{values[0]:.3f}{se}"
        out.append(line)
    for key, lo, hi, label in (
        ("average", "average_lo", "average_hi", "Average"),
        ("kept_pct", "kept_lo", "kept_hi", "% of full kept"),
        ("above_chance_kept_pct", "above_chance_lo", "above_chance_hi", "% of above-chance margin kept"),
    ):
        line = {"task": label, "metric": "", "chance": None}
        fmt = "{:.3f}" if key == "average" else "{:.1f}"
        for s in summary:
            if s[key] is not None:
                line[col[(s["order"], s["num_shared"])]] = (
                    f"{fmt.format(s[key])} [{fmt.format(s[lo])}, {fmt.format(s[hi])}]"
                )
        out.append(line)
    return out


def without_scores(rows) -> list[dict]:
    """Rows without their per-example scores (for the committed JSON/CSV; the cache keeps them)."""
    return [{k: v for k, v in r.items() if k != "scores"} for r in rows]


# ------------------------------------------------------------------------------------------------
# the screen and the split
# ------------------------------------------------------------------------------------------------
def suite_specs(suite: str, tasks, model: str) -> tuple[list, dict]:
    """The tasks notebook 03 evaluates and where they come from: `model`'s own offline suite (the tasks its
    committed screen keeps, `kvshare.tasks.screening.suite_for`) or the `tasks` given."""
    from ..evaluation import resolve_tasks
    from ..tasks.screening import suite_for

    if suite == "offline" and tasks is None:
        return suite_for(model)
    return resolve_tasks(suite, tasks, model=model), {"model": model, "source": "given" if tasks else suite}


def needs_screen(suite: str, tasks, model: str, source: dict, quick: bool) -> bool:
    """Whether notebook 03 screens every candidate before it evaluates: a full run of the offline suite on a model
    that has no screen of its own (its results must not rest on another model's choice of tasks)."""
    from ..models import DEFAULT_MODEL

    return (
        suite == "offline" and tasks is None and not quick and model != DEFAULT_MODEL and source["source"] != "screen"
    )


def split_records(suite: str = "offline", tasks=None, limit: int | None = None) -> list[dict]:
    """Per task of the evaluated suite: the screen / test split (sizes, rule, ids; kvshare.tasks.offline)."""
    from ..evaluation import resolve_tasks
    from ..tasks.offline import split_record

    if suite != "offline":
        return []
    return [split_record(spec, limit) for spec in resolve_tasks(suite, tasks)]
