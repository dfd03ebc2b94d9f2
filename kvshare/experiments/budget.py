"""How long full runs of notebooks 01, 02 and 03 take for a model, from measured unit costs; the budget they share.

A full run of 01-03 must fit in BUDGET_MIN minutes on 2 CPU cores for every model the project runs
(`./run_all.sh --model NAME --only 01,02,03`). What a run costs is counted in units whose price was measured per
model (`UNIT_COSTS`, seconds on the 2-core machine with 2 torch threads, quiet):

- `heldout_s`: one strategy scored under the held-out protocol (`kvshare.metrics.HELDOUT`: 16,384 tokens in windows
  of 512; scales with the protocol's tokens). Notebooks 01 and 02 share these through the store
  (`common.HeldOutStore`): a strategy 01 scored is free in 02;
- `search_reference_s`: a greedy search's reference forward over its calibration texts (30 x 64 tokens);
- `search_candidate_s`: one candidate that search visits (layers r..L-1 over the texts, r averaged). At the default
  T = 0.5 nearly every candidate passed on SmolLM2 (255 of 258 in notebook 01's 21 searches), so a search to C
  visits C; a strict T walks down the list: the estimate takes every same-type pair for T >= STRICT_T (SmolLM2
  visited 67 at T = 0.8 and 327 at 0.9). Gemma-3-270M rejects far more even at T = 0.5 (394 of the 464 candidates
  its first full run of notebook 01 visited; its fixed orders ran out of pairs before C = 7): there the estimate's
  search time is low, but searches are a small share of its run (01 took 29.5 min against 44 estimated, the held-out
  scores ~79 s per strategy against 105);
- `suite_s`: one evaluation of the offline suite at its default sizes, less its perplexity task (notebook 03 takes
  perplexity from the held-out store: its strategies are those of 01 and 02 where the C points and seeds agree);
- `screen_kept_s`: notebook 03's screen rerun on its kept tasks' screen parts;
- `generation_s`: one setting of a greedy case study (3 prompts);
- `setup_s`: model load, distances, figures and the rest of a notebook's fixed work.

`estimate(model, L, s01, s02, s03)` counts the units of three notebooks' settings (each distinct strategy scored
once, the store's reuse between 01 and 02 counted; every other strategy assumed distinct: an upper bound, as searches
on different data that choose the same strategy are scored once) and prices them. The notebooks print and record it.
"""

from __future__ import annotations

from math import comb

BUDGET_MIN = 90.0  # notebooks 01, 02 and 03 together, full run, 2 CPU cores
STRICT_T = 0.8  # from this threshold on a search may walk every candidate pair (upper bound)

# Seconds per unit (see the module docstring). smollm2-135m: from its committed full runs (figures/01-03 settings
# and rows: 39.5 s per held-out strategy, 82 s per suite evaluation, searches 13-33 s to C = 8-11). gemma3-270m:
# measured with short probes on the same machine (a 2,048-token slice of the held-out protocol in 12.6 s, x8 = ~101 s;
# a search to C = 2 in 5.8-6.7 s: reference ~3.2 s, 1.3-1.8 s per candidate; the suite's multiple-choice part at 5
# examples per task, 3,007 request tokens in 9.4 s, scaled to its 25,820; XSum, 3 articles in 14 s: ~35 s for 20),
# rounded up. The suite has no XSum any more (no shipped data source has article/summary pairs): both models'
# `suite_s` still count it, an upper bound until they are measured again.
UNIT_COSTS = {
    "smollm2-135m": {
        "heldout_s": 39.5,
        "search_reference_s": 3.0,
        "search_candidate_s": 1.6,
        "suite_s": 85.0,
        "screen_kept_s": 25.0,
        "generation_s": 8.0,
        "setup_s": 60.0,
    },
    "gemma3-270m": {
        "heldout_s": 105.0,
        "search_reference_s": 3.5,
        "search_candidate_s": 1.7,
        "suite_s": 120.0,
        "screen_kept_s": 50.0,
        "generation_s": 10.0,
        "setup_s": 60.0,
    },
}


def unit_costs(model: str) -> dict:
    """The measured unit costs of `model`; a model without its own: the dearest measured ones (an upper bound for
    models up to their size, said as such by `estimate`)."""
    if model in UNIT_COSTS:
        return dict(UNIT_COSTS[model])
    return {k: max(c[k] for c in UNIT_COSTS.values()) for k in next(iter(UNIT_COSTS.values()))}


def num_pairs(num_layers: int, layer_types=None) -> int:
    """Candidate pairs (r > s) of a model; same-type pairs when it mixes attention types."""
    if not layer_types:
        return comb(num_layers, 2)
    return sum(comb(layer_types.count(t), 2) for t in set(layer_types))


def search_seconds(c: int, costs: dict, visited: int | None = None) -> float:
    """One fixed-order search to C (visiting `visited` candidates; None: C, nothing rejected)."""
    if c <= 0:
        return 0.0
    return costs["search_reference_s"] + (c if visited is None else visited) * costs["search_candidate_s"]


def heldout_seconds(costs: dict, tokens: int) -> float:
    return costs["heldout_s"] * tokens / 16384


# ------------------------------------------------------------------------------------------------
# what each notebook's settings make it do
# ------------------------------------------------------------------------------------------------
def plan_01(cfg, num_layers: int) -> dict:
    """Notebook 01's searches (order, set, seed, top C) and the held-out strategies it scores, as keys
    (set, order, seed, C), 'full' for C = 0."""
    from .observation import c_values, curve_grid, order_runs

    grid = curve_grid(cfg, num_layers)
    searches, scored = [], {"full"}
    for k in range(cfg.calibration_sets):
        for order, seed in order_runs(cfg, k):
            cs = c_values(order, grid, cfg)
            searches.append({"order": order, "set": k, "seed": seed, "c": cs[-1], "threshold": cfg.threshold})
            scored |= {(k, order, seed if order == "random" else None, c, cfg.threshold) for c in cs if c > 0}
    return {"searches": searches, "scored": scored}


def plan_02(cfg, num_layers: int) -> dict:
    """Notebook 02's searches and held-out strategies (keys as `plan_01`: set 0, the default order's seed)."""
    from ..accounting import num_shared_for
    from .common import random_seeds

    c_full = num_shared_for(cfg.sweep_fraction, num_layers)
    thresholds = sorted(set(cfg.thresholds) | {cfg.threshold})
    searches = [{"order": "dissimilar", "set": 0, "seed": cfg.seed, "c": c_full, "threshold": t} for t in thresholds]
    seeds = random_seeds(cfg, 0)
    searches += [{"order": "random", "set": 0, "seed": s, "c": c_full, "threshold": cfg.threshold} for s in seeds]
    scored = {"full"} | {(0, "dissimilar", None, c_full, t) for t in thresholds}
    scored |= {(0, "random", s, c_full, cfg.threshold) for s in seeds}
    return {"searches": searches, "scored": scored, "generations": 3}


def plan_03(p: dict, num_layers: int, seed: int = 0) -> dict:
    """Notebook 03's searches, suite evaluations and held-out strategies (its perplexity column: the shared protocol
    through the store; keys as `plan_01`: its searches are calibration set 0's, T = 0.5, the random seeds of set 0)
    for its plan `p` (`evaluation.plan`)."""
    from types import SimpleNamespace

    from ..accounting import num_shared_for
    from .common import random_seeds

    fixed = [o for o in p["orders"] if o != "random"]
    cs = sorted({num_shared_for(r, num_layers) for r in p["rates"]} - {0})
    c_random = max(num_shared_for(r, num_layers) for r in p["random_rates"])
    seeds = (
        random_seeds(SimpleNamespace(seed=seed, random_seeds=p["random_seeds"]), 0) if "random" in p["orders"] else []
    )
    searches = [{"order": o, "c": max(cs, default=0), "threshold": 0.5} for o in fixed]
    searches += [{"order": "random", "c": c_random, "threshold": 0.5} for _ in seeds]
    scored = {"full"} | {(0, o, None, c, 0.5) for o in fixed for c in cs}
    scored |= {(0, "random", s, num_shared_for(r, num_layers), 0.5) for s in seeds for r in p["random_rates"]}
    evaluations = 1 + len(fixed) * len(cs) + len(seeds) * len(p["random_rates"])
    return {"searches": searches, "evaluations": evaluations, "scored": scored, "generations": 1 + len(fixed)}


def _searches_s(searches, costs: dict, pairs: int) -> float:
    total = 0.0
    for s in searches:
        visited = pairs if s["threshold"] >= STRICT_T else None
        total += search_seconds(s["c"], costs, visited)
    return total


def estimate(model: str, num_layers: int, s01, s02, p03: dict, layer_types=None, fresh_store: bool = True) -> dict:
    """Seconds of a full run of notebooks 01, 02 and 03 with settings `s01`, `s02` (`common.settings`) and plan
    `p03` (`evaluation.plan`), per notebook and part, and in minutes; `fresh_store`: no strategy of this model was
    scored before (else the store's earlier entries make it cheaper)."""
    from ..metrics import HELDOUT

    costs = unit_costs(model)
    pairs = num_pairs(num_layers, layer_types)
    a, b, c = plan_01(s01, num_layers), plan_02(s02, num_layers), plan_03(p03, num_layers, s01.seed)
    h01 = heldout_seconds(costs, s01.heldout_tokens)
    h02 = heldout_seconds(costs, s02.heldout_tokens)
    h03 = heldout_seconds(costs, HELDOUT.tokens)
    full_protocol = (HELDOUT.tokens, HELDOUT.window)
    same_protocol = (s01.heldout_tokens, s01.heldout_window) == (s02.heldout_tokens, s02.heldout_window)
    fresh02 = b["scored"] - a["scored"] if same_protocol else b["scored"]
    before03 = set()  # what 01 and 02 left in the store under notebook 03's protocol (the full one)
    if (s01.heldout_tokens, s01.heldout_window) == full_protocol:
        before03 |= a["scored"]
    if (s02.heldout_tokens, s02.heldout_window) == full_protocol:
        before03 |= b["scored"]
    fresh03 = c["scored"] - before03
    out = {
        "01": {
            "searches": _searches_s(a["searches"], costs, pairs),
            "heldout": (len(a["scored"]) if fresh_store else 0) * h01,
            "setup": costs["setup_s"],
        },
        "02": {
            "searches": _searches_s(b["searches"], costs, pairs),
            "heldout": len(fresh02) * h02,
            "generations": b["generations"] * costs["generation_s"],
            "setup": costs["setup_s"],
        },
        "03": {
            "searches": _searches_s(c["searches"], costs, pairs),
            "screen": costs["screen_kept_s"],
            "evaluations": c["evaluations"] * costs["suite_s"],
            "heldout": len(fresh03) * h03,
            "generations": c["generations"] * costs["generation_s"],
            "setup": costs["setup_s"],
        },
    }
    counts = {
        "01": {"searches": len(a["searches"]), "heldout_strategies": len(a["scored"])},
        "02": {"searches": len(b["searches"]), "heldout_strategies": len(b["scored"]), "heldout_fresh": len(fresh02)},
        "03": {
            "searches": len(c["searches"]),
            "suite_evaluations": c["evaluations"],
            "heldout_strategies": len(c["scored"]),
            "heldout_fresh": len(fresh03),
        },
    }
    minutes = {nb: round(sum(parts.values()) / 60, 1) for nb, parts in out.items()}
    total = round(sum(minutes.values()), 1)
    return {
        "model": model,
        "measured": model in UNIT_COSTS,
        "unit_costs": costs,
        "seconds": {nb: {k: round(v) for k, v in parts.items()} for nb, parts in out.items()},
        "counts": counts,
        "minutes": minutes,
        "total_minutes": total,
        "budget_minutes": BUDGET_MIN,
        "within_budget": total <= BUDGET_MIN,
    }


def estimate_line(est: dict) -> str:
    m = est["minutes"]
    return (
        f"estimated full run of 01-03 on {est['model']}: 01 {m['01']:.0f} min, 02 {m['02']:.0f} min, 03 "
        f"{m['03']:.0f} min, {est['total_minutes']:.0f} of {est['budget_minutes']:.0f} min"
        + ("" if est["measured"] else " (unit costs not measured for this model: the dearest measured ones)")
    )


def notebooks_estimate(model: str, lm, seed: int = 0) -> dict:
    """`estimate` of the full runs of 01, 02 and 03 for `model` (name) loaded as `lm`, with their full settings
    (`common.settings`, `evaluation.plan`: a model of MODEL_FULL / FULL_PLANS gets its own)."""
    from ..adapter import layer_types, num_layers
    from . import common
    from . import evaluation as ev

    cfg = common.settings(model, False, seed)
    types = layer_types(lm)
    mixed = types if types and len(set(types)) > 1 else None
    return estimate(model, num_layers(lm), cfg, cfg, ev.plan(model, False), layer_types=mixed)
