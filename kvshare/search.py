"""Greedy strategy search (KVSharer, step 2), and a best-first search beyond the paper.

Fixed orders (dissimilar: the paper's, similar, random): walk layer pairs (r, s), r > s, in that order;
tentatively let r read s's K/V; keep the pair when the final hidden states of the shared model stay close
to the original ones (mean cosine similarity over calibration texts above the threshold); stop at
`num_shared` replaced layers.

`order="best"` (`best_first`): rank the pairs by the damage map (`kvshare.damage`), then at each step
re-score the most promising ones against the strategy accepted so far and take the least damaging one,
under the same threshold.

Cost: the unshared reference is one forward. A candidate changes nothing below its replaced layer,
so it restarts from the accepted strategy's hidden state at layer r and runs only layers r..L-1,
reading the accepted K/V of the layers below from their cache slots (`kvshare.damage.run_from`).
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .adapter import check_supported, decoder_layers, layer_types, num_layers
from .calibration import METRICS, distances_from_means, encode_calibration, kv_means, reference_forward
from .damage import DEFAULT_KL_STRIDE, PairScorer, map_rows, run_from, same_type_pairs, similarity
from .models import model_name
from .sharing import (
    active_method,
    active_strategy,
    disable_sharing,
    enable_sharing,
    restore_attention,
)
from .strategy import Strategy, apply_pair

FIXED_ORDERS = ("dissimilar", "similar", "random")  # a walk through the pairs fixed before the search starts
ORDERS = (*FIXED_ORDERS, "best")  # best: best-first by damage, re-scored against the accepted strategy
CRITERIA = ("kl", "hidden_cosine")


def candidate_pairs(distances, order: str = "dissimilar", seed: int = 0, layer_types=None) -> list[tuple[int, int]]:
    """All (r, s) with r > s (same attention type when the model mixes types), in search order."""
    if order == "best":
        raise ValueError(
            "order 'best' is not a fixed walk through the distances: it ranks pairs by the damage map "
            "as it goes (kvshare.search(..., order='best'))"
        )
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    n = len(distances)
    pairs = [(r, s) for r in range(n) for s in range(r) if layer_types is None or layer_types[r] == layer_types[s]]
    if order == "random":
        random.Random(seed).shuffle(pairs)
    else:  # stable sort: ties keep (r, s) order, so the walk is deterministic
        pairs.sort(key=lambda p: distances[p[0]][p[1]], reverse=(order == "dissimilar"))
    return pairs


@contextlib.contextmanager
def plain_model(model):
    """Inside, the plain model: whatever sharing and cache methods were applied are off, so candidates are scored
    against the unshared model. Afterwards every attention module a candidate patched is restored and what was
    applied before is back."""
    previous = active_strategy(model), active_method(model)
    disable_sharing(model)
    try:
        yield model
    finally:
        for layer in decoder_layers(model):
            restore_attention(layer.self_attn)
        if previous[0] is not None:
            enable_sharing(model, *previous)


@dataclass
class _Accepted:
    """The strategy accepted so far, with the input hidden state and cache slot of every layer under it: a candidate
    restarts from these at its replaced layer instead of running the whole model."""

    mapping: dict[int, int] = field(default_factory=dict)
    pairs: list[list[int]] = field(default_factory=list)
    inputs: list = field(default_factory=list)
    slots: list = field(default_factory=list)

    @classmethod
    def from_reference(cls, reference) -> _Accepted:
        return cls(inputs=list(reference.layer_inputs), slots=list(reference.cache_layers))

    def accept(self, r: int, s: int, candidate: dict[int, int], inputs: dict, slots: list):
        """Take pair (r, s): its mapping, and what its run left in the layers from r on."""
        self.mapping = candidate
        self.pairs.append([r, s])
        for i, h in inputs.items():
            self.inputs[i] = h
        self.slots[r:] = slots[r:]


def _warn_if_short(accepted: _Accepted, num_shared: int, threshold: float):
    if len(accepted.mapping) < num_shared:
        warnings.warn(
            f"only {len(accepted.mapping)} of {num_shared} layers could be replaced above threshold {threshold}: "
            "the candidate pairs ran out; returning what was found",
            stacklevel=3,  # the search's caller, as seen through torch.no_grad
        )


def _strategy(model, accepted: _Accepted, num_shared: int, description: dict, asked: dict, costs: dict) -> Strategy:
    """The Strategy a search returns, its metadata laid out alike for every order: the model, what was asked
    (`asked`: threshold, metric, order, seed), the calibration, what was accepted, and what it cost."""
    metadata = {
        "model": model_name(model),
        "num_shared": len(accepted.mapping),
        "target_num_shared": num_shared,
        **asked,
        "calibration": description,
        "accepted_pairs": accepted.pairs,
        **costs,
    }
    return Strategy(accepted.mapping, num_layers(model), metadata)


def _check_arguments(model, num_shared: int, order: str, metric: str):
    check_supported(model)
    L = num_layers(model)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not isinstance(num_shared, int) or isinstance(num_shared, bool) or not 0 <= num_shared < L:
        raise ValueError(f"num_shared must be an integer in 0..{L - 1} for a model with {L} layers, got {num_shared!r}")


@torch.no_grad()
def search(
    model,
    tokenizer,
    texts,
    num_shared: int,
    threshold: float = 0.5,
    order: str = "dissimilar",
    metric: str = "euclidean",
    seed: int = 0,
    max_tokens: int = 64,
    progress: bool = True,
    *,
    criterion: str = "kl",
    shortlist: int = 24,
    screen_texts: int | None = 4,
    kl_stride: int | None = None,
    lazy: bool = True,
    damage=None,
):
    """Return `(Strategy, trace)`; the trace has one row per candidate pair visited (scored).

    The fixed orders walk the pairs by calibration distance (`dissimilar` is the paper's) and keep a pair
    when the mean cosine similarity of the final hidden states stays above `threshold`. `order="best"`
    builds the strategy best-first (`best_first` below); `criterion`, `shortlist`, `screen_texts`,
    `kl_stride`, `lazy` and `damage` only concern it.
    """
    _check_arguments(model, num_shared, order, metric)
    with plain_model(model):
        t0 = time.perf_counter()
        ids, description = encode_calibration(tokenizer, texts, max_tokens)
        if order == "best":
            return best_first(
                model,
                ids,
                description,
                num_shared,
                threshold,
                metric,
                criterion=criterion,
                shortlist=shortlist,
                screen_texts=screen_texts,
                kl_stride=kl_stride,
                lazy=lazy,
                damage=damage,
                progress=progress,
                t0=t0,
            )
        accepted, trace, layer_forwards = _fixed_order_walk(
            model, ids, num_shared, threshold, order, metric, seed, progress
        )
    _warn_if_short(accepted, num_shared, threshold)
    costs = {
        "candidates_visited": len(trace),
        "search_seconds": round(time.perf_counter() - t0, 3),
        "layer_forwards": layer_forwards,
        "naive_layer_forwards": 2 * num_layers(model) * ids.shape[0] * len(trace),
    }
    asked = {"threshold": threshold, "metric": metric, "order": order, "seed": seed}
    return _strategy(model, accepted, num_shared, description, asked, costs), trace


def _fixed_order_walk(model, ids, num_shared: int, threshold: float, order: str, metric: str, seed: int, progress):
    """Walk the pairs in `order` (`candidate_pairs`), keeping each whose final hidden states stay above `threshold`
    in mean cosine similarity, until `num_shared` layers are replaced. Returns (accepted, trace, layer_forwards)."""
    L, n_texts = num_layers(model), ids.shape[0]
    reference = reference_forward(model, ids)
    distances = distances_from_means(*kv_means(reference), metric=metric)
    pairs = candidate_pairs(distances, order, seed, layer_types(model))
    layer_forwards = L * n_texts  # the reference forward
    accepted = _Accepted.from_reference(reference)
    trace = []
    bar = tqdm(total=num_shared, desc=f"search ({order})", disable=not progress or num_shared == 0)
    try:
        for rank, (r, s) in enumerate(pairs):
            if len(accepted.mapping) >= num_shared:
                break
            if r in accepted.mapping:
                continue
            candidate = apply_pair(accepted.mapping, r, s)
            final, inputs, slots = run_from(
                model, accepted.inputs, reference.layer_kwargs, accepted.slots, r, candidate
            )
            layer_forwards += (L - r) * n_texts
            score = similarity(final, reference.final_hidden)
            passed = score > threshold
            trace.append(
                {
                    "rank": rank,
                    "replaced": r,
                    "source": s,
                    "resolved_source": candidate[r],
                    "distance": float(distances[r][s]),
                    "score": score,
                    "accepted": passed,
                }
            )
            if passed:
                accepted.accept(r, s, candidate, inputs, slots)
                bar.update(1)
                bar.set_postfix(last=f"{r}->{candidate[r]}", score=f"{score:.3f}")
    finally:
        bar.close()
    return accepted, trace, layer_forwards


# ------------------------------------------------------------------------------------------------
# best-first: the least harmful strategy for a memory target
# ------------------------------------------------------------------------------------------------
def _damage(scores: dict, criterion: str) -> float:
    """Lower is better: the KL in nats, or 1 - hidden cosine."""
    return scores["kl"] if criterion == "kl" else 1.0 - scores["hidden_cosine"]


def exhaustive_layer_forwards(pairs, accepted_pairs, num_layers_: int, n_texts: int, steps: int) -> int:
    """Layer-forwards of the exhaustive best-first greedy with the same incremental forward: the reference, then
    at each of `steps` steps every pair whose replaced layer is still free, re-scored on all texts."""
    total, replaced = num_layers_ * n_texts, set()
    for step in range(steps):
        total += sum((num_layers_ - r) * n_texts for r, _ in pairs if r not in replaced)
        if step < len(accepted_pairs):
            replaced.add(accepted_pairs[step][0])
    return total


def _check_damage(damage, pairs, n_screen: int, tokens: int, kl_stride: int) -> list[dict]:
    """The rows of a damage map passed to the search, after checking it was made the way the search would."""
    meta = damage.metadata
    made = (meta["calibration"]["texts"], meta["calibration"]["tokens_per_text"], meta["kl_stride"])
    if made != (n_screen, tokens, kl_stride) or sorted((r["replaced"], r["source"]) for r in damage) != sorted(pairs):
        raise ValueError(
            f"the damage map was made on {made[0]} texts x {made[1]} tokens with kl_stride {made[2]}; "
            f"this search screens on {n_screen} x {tokens} with kl_stride {kl_stride}, every pair"
        )
    return list(damage)


def _check_best_first_arguments(criterion: str, shortlist: int, screen_texts: int | None):
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if not isinstance(shortlist, int) or shortlist < 1:
        raise ValueError(f"shortlist must be a positive integer, got {shortlist!r}")
    if screen_texts is not None and (not isinstance(screen_texts, int) or screen_texts < 1):
        raise ValueError(f"screen_texts must be a positive integer or None, got {screen_texts!r}")


@torch.no_grad()
def best_first(
    model,
    ids,
    description: dict,
    num_shared: int,
    threshold: float = 0.5,
    metric: str = "euclidean",
    *,
    criterion: str = "kl",
    shortlist: int = 24,
    screen_texts: int | None = 4,
    kl_stride: int | None = None,
    lazy: bool = True,
    damage=None,
    progress: bool = True,
    t0: float | None = None,
):
    """Best-first greedy: at each step, take the candidate that keeps the shared model closest to the full one.

    1. Damage map (`kvshare.damage`): every single pair scored alone, on the first `screen_texts` calibration
       texts (None: all), ranks the pairs by `criterion` ('kl': mean KL(full || shared) of the next-token
       distributions; 'hidden_cosine': the paper's score).
    2. C steps. Each step walks the pairs whose replaced layer is still free, most promising first by their
       latest known marginal damage (what they add to the strategy accepted when they were last scored; at first
       their single-pair damage), and re-scores them on ALL calibration texts against the strategy accepted so
       far (layers r..L-1 only). A candidate whose hidden cosine is not above `threshold` is rejected for good (the
       threshold semantics of the fixed orders). At most `shortlist` candidates above the threshold are
       re-scored per step; with `lazy`, the walk also stops as soon as the best fresh marginal damage is no
       larger than the next candidate's known (stale) one: damage compounds as layers are shared, so a stale
       increment is an optimistic bound and the rest would not win (lazy greedy evaluation). The least
       damaging re-scored candidate is accepted; ties go to the better single-pair rank.

    `damage`: the damage map of exactly the screening texts (`kvshare.damage_map(model, tok, texts[:screen_texts],
    max_tokens, kl_stride=...)`), when the caller already has it; its time and layer-forwards are counted as the
    search's own.

    Deterministic: no sampling; every tie is broken by the single-pair rank, then (r, s).
    Returns `(Strategy, trace)` like `search`; trace rows add `step`, `kl`, `single_pair_damage`,
    `marginal_damage` and `decision`.
    """
    _check_best_first_arguments(criterion, shortlist, screen_texts)
    spent = _Spent(started=time.perf_counter() if t0 is None else t0)
    kl_stride = DEFAULT_KL_STRIDE if kl_stride is None else kl_stride
    settings = {"criterion": criterion, "shortlist": shortlist, "lazy": lazy, "kl_stride": kl_stride}
    pairs = same_type_pairs(model)
    accepted, trace = _Accepted(), []
    if num_shared > 0:
        scorer = PairScorer(model, ids, kl_stride)
        distances = distances_from_means(*kv_means(scorer.reference), metric=metric)
        settings["screen_texts"] = ids.shape[0] if screen_texts is None else min(screen_texts, ids.shape[0])
        rows, spent.screen_forwards, spent.screen_seconds = _screen(scorer, ids, pairs, settings, damage, progress)
        ranking = _Ranking.from_damage_map(rows, pairs, criterion, distances)
        before = scorer.layer_forwards
        accepted = _best_first_steps(scorer, ranking, num_shared, threshold, settings, trace, progress)
        spent.rescore_forwards = scorer.layer_forwards - before
    _warn_if_short(accepted, num_shared, threshold)
    n_screen = settings.get("screen_texts", 0)
    costs = _best_first_costs(model, ids, pairs, accepted, num_shared, trace, spent, n_screen)
    asked = {"threshold": threshold, "metric": metric, "order": "best", "seed": None}
    costs_and_settings = {**costs, "damage_map_given": damage is not None, **settings}
    strategy = _strategy(model, accepted, num_shared, description, asked, costs_and_settings)
    if progress and num_shared:
        _print_cost(num_shared, costs, n_screen)
    return strategy, trace


@dataclass
class _Spent:
    """What a best-first search spent besides its reference forward, from the time it `started`."""

    started: float
    screen_forwards: int = 0
    screen_seconds: float = 0.0  # a damage map passed in: its time counts as the search's
    rescore_forwards: int = 0


def _screen(scorer: PairScorer, ids, pairs, settings: dict, damage, progress: bool) -> tuple[list[dict], int, float]:
    """Phase 1: the damage map of every single pair on the first `screen_texts` texts, or the map passed in
    (checked); with its layer-forwards and, for a map passed in, its seconds."""
    n_screen, kl_stride = settings["screen_texts"], settings["kl_stride"]
    if damage is not None:
        rows = _check_damage(damage, pairs, n_screen, ids.shape[1], kl_stride)
        return rows, damage.metadata["layer_forwards"], damage.metadata["seconds"]
    screen = scorer if n_screen == ids.shape[0] else PairScorer(scorer.model, ids[:n_screen], kl_stride)
    before = screen.layer_forwards if screen is scorer else 0
    rows = map_rows(screen, pairs, progress)
    return rows, screen.layer_forwards - before, 0.0


@dataclass
class _Ranking:
    """What best-first knows of every pair: its single-pair damage and rank on the damage map, its latest known
    MARGINAL damage (what adding it adds to the strategy accepted when it was last scored; its single-pair damage
    at first), and whether the threshold rejected it for good. Comparing increments, not totals, is what makes
    `lazy` sound: a total includes the damage already accepted, so every fresh total exceeds every stale
    single-pair score."""

    pairs: list[tuple[int, int]]
    single: dict
    rank: dict
    known: dict
    distances: list
    rejected: set = field(default_factory=set)

    @classmethod
    def from_damage_map(cls, rows: list[dict], pairs, criterion: str, distances) -> _Ranking:
        single = {(row["replaced"], row["source"]): _damage(row, criterion) for row in rows}
        rank = {p: i for i, p in enumerate(sorted(pairs, key=lambda p: (single[p], p)))}
        return cls(pairs, single, rank, dict(single), distances)


class _Candidate(NamedTuple):
    """A re-scored pair above the threshold; candidates compare by (marginal damage, single-pair rank)."""

    marginal: float
    rank: int
    pair: tuple[int, int]
    mapping: dict[int, int]
    inputs: dict
    slots: list
    row: dict
    total: float  # damage of the whole strategy with it


def _best_first_steps(
    scorer: PairScorer,
    ranking: _Ranking,
    num_shared: int,
    threshold: float,
    settings: dict,
    trace: list,
    progress: bool,
) -> _Accepted:
    """Phase 2: up to `num_shared` steps, each accepting the least damaging re-scored candidate."""
    accepted = _Accepted.from_reference(scorer.reference)
    current = 0.0  # damage of the accepted strategy
    for step in range(num_shared):
        best = _best_candidate(scorer, step, accepted, ranking, current, threshold, settings, trace)
        if best is None:
            break  # every free pair is below the threshold
        (r, s), row, current = best.pair, best.row, best.total
        row.update(accepted=True, decision="accepted")
        accepted.accept(r, s, best.mapping, best.inputs, best.slots)
        if progress:
            scored = sum(t["step"] == step for t in trace)
            print(
                f"best-first step {step + 1}/{num_shared}: {r}->{best.mapping[r]} (KL {row['kl']:.4f}, "
                f"hidden cosine {row['score']:.4f}; {scored} candidates re-scored)",
                flush=True,
            )
    return accepted


def _best_candidate(
    scorer: PairScorer,
    step: int,
    accepted: _Accepted,
    ranking: _Ranking,
    current: float,
    threshold: float,
    settings: dict,
    trace: list,
) -> _Candidate | None:
    """One step's walk: the free pairs, most promising first by known marginal damage, re-scored against the
    accepted strategy until `shortlist` passed the threshold or (lazy) none left can win; the best of them."""
    free = sorted(
        (p for p in ranking.pairs if p[0] not in accepted.mapping and p not in ranking.rejected),
        key=lambda p: (ranking.known[p], ranking.rank[p]),
    )
    best = None
    passed = 0
    for p in free:
        if passed >= settings["shortlist"] or (
            settings["lazy"] and best is not None and best.marginal <= ranking.known[p]
        ):
            break
        r, s = p
        candidate = apply_pair(accepted.mapping, r, s)
        scores, inputs, slots = scorer.score(r, candidate, accepted.inputs, accepted.slots)
        row = {
            "rank": ranking.rank[p],
            "step": step,
            "replaced": r,
            "source": s,
            "resolved_source": candidate[r],
            "distance": float(ranking.distances[r][s]),
            "score": scores["hidden_cosine"],
            "kl": scores["kl"],
            "single_pair_damage": ranking.single[p],
            "accepted": False,
        }
        trace.append(row)
        if not scores["hidden_cosine"] > threshold:
            ranking.rejected.add(p)
            row["decision"] = "below threshold"
            continue
        passed += 1
        total = _damage(scores, settings["criterion"])
        ranking.known[p] = total - current
        row.update(decision="re-scored", marginal_damage=ranking.known[p])
        if best is None or (ranking.known[p], ranking.rank[p]) < best[:2]:
            best = _Candidate(ranking.known[p], ranking.rank[p], p, candidate, inputs, slots, row, total)
    return best


def _best_first_costs(model, ids, pairs, accepted: _Accepted, num_shared: int, trace, spent: _Spent, n_screen: int):
    """Seconds and layer-forwards, beside what the naive search (the whole model for every candidate and for the
    reference) and the exhaustive best-first greedy (every free pair re-scored at every step) would need."""
    L, n_texts, visited = num_layers(model), ids.shape[0], len(trace)
    scored = num_shared > 0  # C = 0: nothing to score, not even the reference
    exhaustive = exhaustive_layer_forwards(pairs, accepted.pairs, L, n_texts, num_shared) if scored else 0
    return {
        "candidates_visited": visited,
        "search_seconds": round(time.perf_counter() - spent.started + spent.screen_seconds, 3),
        "layer_forwards": L * n_texts + spent.screen_forwards + spent.rescore_forwards if scored else 0,
        "naive_layer_forwards": 2 * L * (n_texts * visited + n_screen * len(pairs)) if scored else 0,
        "screen_layer_forwards": spent.screen_forwards,
        "rescore_layer_forwards": spent.rescore_forwards,
        "exhaustive_layer_forwards": exhaustive,
    }


def _print_cost(num_shared: int, costs: dict, n_screen: int):
    layer_forwards, exhaustive = costs["layer_forwards"], costs["exhaustive_layer_forwards"]
    print(
        f"best-first search to C={num_shared}: {costs['search_seconds']:.1f} s, {layer_forwards:,} layer-forwards "
        f"({costs['screen_layer_forwards']:,} for the damage map on {n_screen} texts, "
        f"{costs['rescore_layer_forwards']:,} re-scoring {costs['candidates_visited']} candidates); the exhaustive "
        f"greedy (every free pair re-scored at every step) needs {exhaustive:,} "
        f"({exhaustive / max(1, layer_forwards):.1f}x)",
        flush=True,
    )
