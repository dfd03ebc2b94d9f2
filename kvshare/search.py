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

import random
import time
import warnings

import torch
from tqdm.auto import tqdm

from .adapter import check_supported, decoder_layers, layer_types, num_layers
from .calibration import METRICS, distances_from_means, encode_calibration, kv_means, reference_forward
from .damage import DEFAULT_KL_STRIDE, PairScorer, map_rows, run_from, same_type_pairs, similarity
from .models import model_name
from .sharing import (
    active_policy,
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
    check_supported(model)
    L = num_layers(model)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not isinstance(num_shared, int) or isinstance(num_shared, bool) or not 0 <= num_shared < L:
        raise ValueError(f"num_shared must be an integer in 0..{L - 1} for a model with {L} layers, got {num_shared!r}")
    previous = active_strategy(model), active_policy(model)  # restored afterwards: the search uses the plain model
    disable_sharing(model)
    t0 = time.perf_counter()
    ids, description = encode_calibration(tokenizer, texts, max_tokens)
    if order == "best":
        try:
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
        finally:
            for layer in decoder_layers(model):
                restore_attention(layer.self_attn)
            if previous[0] is not None:
                enable_sharing(model, *previous)
    reference = reference_forward(model, ids)
    distances = distances_from_means(*kv_means(reference), metric=metric)
    pairs = candidate_pairs(distances, order, seed, layer_types(model))

    n_texts = ids.shape[0]
    layer_forwards = L * n_texts  # the reference forward
    mapping: dict[int, int] = {}
    accepted_pairs: list[list[int]] = []
    accepted_inputs = list(reference.layer_inputs)
    accepted_slots = list(reference.cache_layers)
    trace = []
    layers = decoder_layers(model)
    bar = tqdm(total=num_shared, desc=f"search ({order})", disable=not progress or num_shared == 0)
    try:
        for rank, (r, s) in enumerate(pairs):
            if len(mapping) >= num_shared:
                break
            if r in mapping:
                continue
            candidate = apply_pair(mapping, r, s)
            final, inputs, slots = run_from(
                model, accepted_inputs, reference.layer_kwargs, accepted_slots, r, candidate
            )
            layer_forwards += (L - r) * n_texts
            score = similarity(final, reference.final_hidden)
            accepted = score > threshold
            trace.append(
                {
                    "rank": rank,
                    "replaced": r,
                    "source": s,
                    "resolved_source": candidate[r],
                    "distance": float(distances[r][s]),
                    "score": score,
                    "accepted": accepted,
                }
            )
            if accepted:
                mapping = candidate
                accepted_pairs.append([r, s])
                for i, h in inputs.items():
                    accepted_inputs[i] = h
                accepted_slots[r:] = slots[r:]
                bar.update(1)
                bar.set_postfix(last=f"{r}->{candidate[r]}", score=f"{score:.3f}")
    finally:
        bar.close()
        for layer in layers:
            restore_attention(layer.self_attn)
        if previous[0] is not None:
            enable_sharing(model, *previous)
    if len(mapping) < num_shared:
        warnings.warn(
            f"only {len(mapping)} of {num_shared} layers could be replaced above threshold {threshold}: "
            "the candidate pairs ran out; returning what was found",
            stacklevel=2,
        )
    elapsed = time.perf_counter() - t0
    visited = len(trace)
    strategy = Strategy(
        mapping,
        L,
        {
            "model": model_name(model),
            "num_shared": len(mapping),
            "target_num_shared": num_shared,
            "threshold": threshold,
            "metric": metric,
            "order": order,
            "seed": seed,
            "calibration": description,
            "accepted_pairs": accepted_pairs,
            "candidates_visited": visited,
            "search_seconds": round(elapsed, 3),
            "layer_forwards": layer_forwards,
            "naive_layer_forwards": 2 * L * n_texts * visited,
        },
    )
    return strategy, trace


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
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if not isinstance(shortlist, int) or shortlist < 1:
        raise ValueError(f"shortlist must be a positive integer, got {shortlist!r}")
    if screen_texts is not None and (not isinstance(screen_texts, int) or screen_texts < 1):
        raise ValueError(f"screen_texts must be a positive integer or None, got {screen_texts!r}")
    t0 = time.perf_counter() if t0 is None else t0
    kl_stride = DEFAULT_KL_STRIDE if kl_stride is None else kl_stride
    L, n_texts = num_layers(model), ids.shape[0]
    settings = {"criterion": criterion, "shortlist": shortlist, "lazy": lazy, "kl_stride": kl_stride}
    mapping: dict[int, int] = {}
    accepted_pairs: list[list[int]] = []
    trace: list[dict] = []
    screen_forwards = rescore_forwards = 0
    screen_seconds = 0.0  # a damage map passed in: its time counts as the search's
    pairs = same_type_pairs(model)
    scorer = None
    if num_shared > 0:
        scorer = PairScorer(model, ids, kl_stride)
        distances = distances_from_means(*kv_means(scorer.reference), metric=metric)
        n_screen = n_texts if screen_texts is None else min(screen_texts, n_texts)
        if damage is None:
            screen = scorer if n_screen == n_texts else PairScorer(model, ids[:n_screen], kl_stride)
            before = screen.layer_forwards if screen is scorer else 0
            rows = map_rows(screen, pairs, progress)
            screen_forwards = screen.layer_forwards - before
        else:
            rows = _check_damage(damage, pairs, n_screen, ids.shape[1], kl_stride)
            screen_forwards = damage.metadata["layer_forwards"]
            screen_seconds = damage.metadata["seconds"]
        single = {(row["replaced"], row["source"]): _damage(row, criterion) for row in rows}
        rank = {p: i for i, p in enumerate(sorted(pairs, key=lambda p: (single[p], p)))}
        # latest known MARGINAL damage of each pair: what adding it adds to the strategy accepted when it was last
        # scored (its single-pair damage at first). Comparing increments, not totals, is what makes `lazy` sound:
        # a total includes the damage already accepted, so every fresh total exceeds every stale single-pair score.
        known = dict(single)
        current = 0.0  # damage of the accepted strategy
        rejected: set[tuple[int, int]] = set()
        accepted_inputs = list(scorer.reference.layer_inputs)
        accepted_slots = list(scorer.reference.cache_layers)
        settings["screen_texts"] = n_screen
        for step in range(num_shared):
            free = sorted(
                (p for p in pairs if p[0] not in mapping and p not in rejected), key=lambda p: (known[p], rank[p])
            )
            best = None  # (marginal damage, rank, pair, candidate mapping, inputs, slots, trace row, total damage)
            passed = 0
            for p in free:
                if passed >= shortlist or (lazy and best is not None and best[0] <= known[p]):
                    break
                r, s = p
                candidate = apply_pair(mapping, r, s)
                before = scorer.layer_forwards
                scores, inputs, slots = scorer.score(r, candidate, accepted_inputs, accepted_slots)
                rescore_forwards += scorer.layer_forwards - before
                row = {
                    "rank": rank[p],
                    "step": step,
                    "replaced": r,
                    "source": s,
                    "resolved_source": candidate[r],
                    "distance": float(distances[r][s]),
                    "score": scores["hidden_cosine"],
                    "kl": scores["kl"],
                    "single_pair_damage": single[p],
                    "accepted": False,
                }
                trace.append(row)
                if not scores["hidden_cosine"] > threshold:
                    rejected.add(p)
                    row["decision"] = "below threshold"
                    continue
                passed += 1
                total = _damage(scores, criterion)
                known[p] = total - current
                row.update(decision="re-scored", marginal_damage=known[p])
                if best is None or (known[p], rank[p]) < best[:2]:
                    best = (known[p], rank[p], p, candidate, inputs, slots, row, total)
            if best is None:
                break  # every free pair is below the threshold
            _, _, (r, s), candidate, inputs, slots, row, current = best
            row.update(accepted=True, decision="accepted")
            mapping = candidate
            accepted_pairs.append([r, s])
            for i, h in inputs.items():
                accepted_inputs[i] = h
            accepted_slots[r:] = slots[r:]
            if progress:
                scored = sum(t["step"] == step for t in trace)
                print(
                    f"best-first step {step + 1}/{num_shared}: {r}->{candidate[r]} (KL {row['kl']:.4f}, "
                    f"hidden cosine {row['score']:.4f}; {scored} candidates re-scored)",
                    flush=True,
                )
    if len(mapping) < num_shared:
        warnings.warn(
            f"only {len(mapping)} of {num_shared} layers could be replaced above threshold {threshold}: "
            "the candidate pairs ran out; returning what was found",
            stacklevel=2,
        )
    elapsed = time.perf_counter() - t0 + screen_seconds
    layer_forwards = L * n_texts + screen_forwards + rescore_forwards
    if scorer is None:
        layer_forwards = 0  # C = 0: nothing to score, not even the reference
    exhaustive = exhaustive_layer_forwards(pairs, accepted_pairs, L, n_texts, num_shared) if num_shared else 0
    visited = len(trace)
    n_screen = settings.get("screen_texts", 0)
    strategy = Strategy(
        mapping,
        L,
        {
            "model": model_name(model),
            "num_shared": len(mapping),
            "target_num_shared": num_shared,
            "threshold": threshold,
            "metric": metric,
            "order": "best",
            "seed": None,
            "calibration": description,
            "accepted_pairs": accepted_pairs,
            "candidates_visited": visited,
            "search_seconds": round(elapsed, 3),
            "layer_forwards": layer_forwards,
            "naive_layer_forwards": 2 * L * (n_texts * visited + n_screen * len(pairs)) if num_shared else 0,
            "screen_layer_forwards": screen_forwards,
            "rescore_layer_forwards": rescore_forwards,
            "exhaustive_layer_forwards": exhaustive,
            "damage_map_given": damage is not None,
            **settings,
        },
    )
    if progress and num_shared:
        print(
            f"best-first search to C={num_shared}: {elapsed:.1f} s, {layer_forwards:,} layer-forwards "
            f"({screen_forwards:,} for the damage map on {n_screen} texts, {rescore_forwards:,} re-scoring "
            f"{visited} candidates); the exhaustive greedy (every free pair re-scored at every step) needs "
            f"{exhaustive:,} ({exhaustive / max(1, layer_forwards):.1f}x)",
            flush=True,
        )
    return strategy, trace
