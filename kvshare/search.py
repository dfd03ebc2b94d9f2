"""Greedy strategy search (KVSharer, step 2).

Walk layer pairs (r, s), r > s, in the chosen order; tentatively let r read s's K/V; keep the pair
when the final hidden states of the shared model stay close to the original ones (mean cosine
similarity over calibration texts above the threshold); stop at `num_shared` replaced layers.

Cost: the unshared reference is one forward. A candidate changes nothing below its replaced layer,
so it restarts from the accepted strategy's hidden state at layer r and runs only layers r..L-1,
reading the accepted K/V of the layers below from their cache slots.
"""
from __future__ import annotations

import random
import time
import warnings

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from tqdm.auto import tqdm

from .calibration import METRICS, distances_from_means, encode_calibration, kv_means, reference_forward
from .models import model_name
from .sharing import (
    _replace_attention,
    _restore_attention,
    active_strategy,
    cache_kwarg_name,
    check_supported,
    decoder_layers,
    disable_sharing,
    enable_sharing,
    num_layers,
    prepare_cache,
    release_cache,
)
from .strategy import Strategy, apply_pair

ORDERS = ("dissimilar", "similar", "random")


def candidate_pairs(distances, order: str = "dissimilar", seed: int = 0, layer_types=None) -> list[tuple[int, int]]:
    """All (r, s) with r > s (same attention type when the model mixes types), in search order."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    n = len(distances)
    pairs = [(r, s) for r in range(n) for s in range(r) if layer_types is None or layer_types[r] == layer_types[s]]
    if order == "random":
        random.Random(seed).shuffle(pairs)
    else:  # stable sort: ties keep (r, s) order, so the walk is deterministic
        pairs.sort(key=lambda p: distances[p[0]][p[1]], reverse=(order == "dissimilar"))
    return pairs


def _run_from(model, layer_inputs, layer_kwargs, slots, start: int, mapping: dict[int, int]):
    """Run layers start..L-1 under `mapping` from the accepted hidden state at `start`.

    Returns the final normed hidden states, the inputs each layer saw and the cache slots.
    """
    layers = decoder_layers(model)
    for i in range(start, len(layers)):
        attn = layers[i].self_attn
        _restore_attention(attn)
        if i in mapping:
            _replace_attention(attn, mapping[i])
    cache = DynamicCache()  # full K/V in every slot: later candidates read sources from these slots
    cache.layers[:start] = slots[:start]  # read-only: the layers below `start` do not run
    prepare_cache(cache, Strategy(mapping, len(layers)))
    cache_kwarg = cache_kwarg_name(layers[start].forward)
    hidden = layer_inputs[start]
    inputs = {}
    try:
        for i in range(start, len(layers)):
            inputs[i] = hidden
            out = layers[i](hidden, **layer_kwargs[i], **{cache_kwarg: cache})
            hidden = out[0] if isinstance(out, tuple) else out
    finally:
        release_cache(cache)
    return model.base_model.norm(hidden), inputs, cache.layers


def similarity(shared: torch.Tensor, original: torch.Tensor) -> float:
    """Mean over texts of the cosine similarity of the final hidden states, all positions flattened."""
    return F.cosine_similarity(shared.float().flatten(1), original.float().flatten(1), dim=1).mean().item()


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
):
    """Return `(Strategy, trace)`; the trace has one row per candidate pair visited."""
    check_supported(model)
    L = num_layers(model)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if not isinstance(num_shared, int) or isinstance(num_shared, bool) or not 0 <= num_shared < L:
        raise ValueError(f"num_shared must be an integer in 0..{L - 1} for a model with {L} layers, got {num_shared!r}")
    previous = active_strategy(model)  # restored afterwards: the search works on the plain model
    disable_sharing(model)
    t0 = time.perf_counter()
    ids, description = encode_calibration(tokenizer, texts, max_tokens)
    reference = reference_forward(model, ids)
    distances = distances_from_means(*kv_means(reference), metric=metric)
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    pairs = candidate_pairs(distances, order, seed, layer_types)

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
            final, inputs, slots = _run_from(model, accepted_inputs, reference.layer_kwargs, accepted_slots, r, candidate)
            layer_forwards += (L - r) * n_texts
            score = similarity(final, reference.final_hidden)
            accepted = score > threshold
            trace.append({"rank": rank, "replaced": r, "source": s, "resolved_source": candidate[r],
                          "distance": float(distances[r][s]), "score": score, "accepted": accepted})
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
            _restore_attention(layer.self_attn)
        if previous is not None:
            enable_sharing(model, previous)
    if len(mapping) < num_shared:
        warnings.warn(
            f"only {len(mapping)} of {num_shared} layers could be replaced above threshold {threshold}: "
            "the candidate pairs ran out; returning what was found"
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
