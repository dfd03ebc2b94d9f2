"""Greedy strategy search and layer distances, on a tiny random llama with a character tokenizer."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LAYERS, SLIDING_WINDOW, make_tiny_model

import kvshare
from kvshare.calibration import encode_calibration

MAX_TOKENS = 24
TRACE_KEYS = {"rank", "replaced", "source", "distance", "score", "accepted"}


@pytest.fixture(scope="module")
def texts():
    """A handful of random character strings, all longer than MAX_TOKENS."""
    rng = random.Random(0)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(rng.randint(30, 50))) for _ in range(5)]


def run_search(model, tok, texts, num_shared=3, threshold=0.5, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation / "ran out" warnings are tested separately
        return kvshare.search(model, tok, texts, num_shared, threshold, progress=False, **kw)


def independent_score(model, tok, texts, strategy, max_tokens=MAX_TOKENS):
    """Mean over texts of the cosine similarity (all positions flattened) of the final normed hidden
    states with vs without sharing, from plain full forwards: no search machinery involved."""
    encoded = [tok(t)["input_ids"] for t in texts]
    common = min(max_tokens, *(len(e) for e in encoded))  # the search's common length
    ids = torch.tensor([e[:common] for e in encoded])
    with torch.no_grad():
        original = model.model(ids).last_hidden_state
        with kvshare.sharing(model, strategy):
            shared = model.model(ids).last_hidden_state
    return F.cosine_similarity(shared.flatten(1), original.flatten(1), dim=1).mean().item()


# --------------------------------------------------------------------------------------------
# determinism, C and T
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["dissimilar", "similar", "random"])
def test_search_is_deterministic(tiny_llama, char_tokenizer, texts, order):
    a, trace_a = run_search(tiny_llama, char_tokenizer, texts, order=order, seed=3)
    b, trace_b = run_search(tiny_llama, char_tokenizer, texts, order=order, seed=3)
    assert a.mapping == b.mapping and trace_a == trace_b
    assert a.metadata["accepted_pairs"] == b.metadata["accepted_pairs"]


def test_random_order_depends_on_seed(tiny_llama, char_tokenizer, texts):
    traces = [run_search(tiny_llama, char_tokenizer, texts, order="random", seed=s)[1] for s in range(3)]
    visits = [[(r["replaced"], r["source"]) for r in t] for t in traces]
    assert len({tuple(v) for v in visits}) > 1


@pytest.mark.parametrize("num_shared", [0, 1, 3, NUM_LAYERS - 1])
def test_exactly_c_accepted_with_threshold_minus_one(tiny_llama, char_tokenizer, texts, num_shared):
    strategy, trace = run_search(tiny_llama, char_tokenizer, texts, num_shared, threshold=-1.0)
    assert strategy.num_shared == num_shared
    assert sum(r["accepted"] for r in trace) == num_shared
    assert strategy.metadata["num_shared"] == num_shared
    assert strategy.metadata["target_num_shared"] == num_shared
    assert len(strategy.metadata["accepted_pairs"]) == num_shared
    if num_shared:
        assert trace[-1]["accepted"]  # the search stops right after reaching C


@pytest.mark.parametrize("threshold", [0.4, 0.6, 0.8])
def test_threshold_and_budget_respected(tiny_llama, char_tokenizer, texts, threshold):
    strategy, trace = run_search(tiny_llama, char_tokenizer, texts, 3, threshold=threshold)
    assert strategy.num_shared <= 3
    assert strategy.num_shared == sum(r["accepted"] for r in trace)
    for row in trace:
        assert TRACE_KEYS <= set(row)
        if row["accepted"]:
            assert row["score"] > threshold
        else:
            assert row["score"] <= threshold
    # the accepted rows, replayed, are the strategy
    assert strategy.prefix(strategy.num_shared).mapping == strategy.mapping


def test_mixed_accept_and_reject(tiny_llama, char_tokenizer, texts):
    # with this seed and threshold, the walk both accepts and rejects (so the T checks above bite)
    _, trace = run_search(tiny_llama, char_tokenizer, texts, 3, threshold=0.6)
    assert any(r["accepted"] for r in trace) and not all(r["accepted"] for r in trace)


def test_nothing_accepted_above_one_warns(tiny_llama, char_tokenizer, texts):
    with pytest.warns(UserWarning, match="only 0 of 2 layers"):
        strategy, trace = kvshare.search(
            tiny_llama, char_tokenizer, texts, 2, threshold=1.01, max_tokens=MAX_TOKENS, progress=False
        )
    assert strategy.num_shared == 0 and strategy.mapping == {}
    assert not any(r["accepted"] for r in trace)
    assert len(trace) == NUM_LAYERS * (NUM_LAYERS - 1) // 2  # every pair was tried


def test_trace_rows(tiny_llama, char_tokenizer, texts):
    strategy, trace = run_search(tiny_llama, char_tokenizer, texts, 3, threshold=0.5)
    ranks = [r["rank"] for r in trace]
    assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    seen_replaced = set()
    for row in trace:
        assert TRACE_KEYS <= set(row)
        assert 0 <= row["source"] < row["replaced"] < NUM_LAYERS
        assert isinstance(row["score"], float) and -1.0 <= row["score"] <= 1.0 + 1e-6
        assert isinstance(row["distance"], float) and row["distance"] >= 0
        assert row["replaced"] not in seen_replaced  # an already-replaced layer is never revisited
        if row["accepted"]:
            seen_replaced.add(row["replaced"])
    assert strategy.metadata["candidates_visited"] == len(trace)
    assert strategy.metadata["layer_forwards"] < strategy.metadata["naive_layer_forwards"]


# --------------------------------------------------------------------------------------------
# orders and metrics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_orders_follow_distances(tiny_llama, char_tokenizer, texts, metric):
    distances = kvshare.layer_distances(tiny_llama, char_tokenizer, texts, metric=metric, max_tokens=MAX_TOKENS)
    for order, sign in (("dissimilar", -1), ("similar", 1)):
        _, trace = run_search(
            tiny_llama, char_tokenizer, texts, NUM_LAYERS - 1, threshold=0.6, order=order, metric=metric
        )
        d = [r["distance"] for r in trace]
        assert len(d) > 2
        assert all(sign * (b - a) >= 0 for a, b in zip(d, d[1:])), f"{order}: {d}"
        for row in trace:  # the trace reports the calibration distance of the pair
            assert row["distance"] == pytest.approx(distances[row["replaced"]][row["source"]], abs=1e-9)


def test_invalid_arguments(tiny_llama, char_tokenizer, texts):
    with pytest.raises(ValueError, match="order"):
        run_search(tiny_llama, char_tokenizer, texts, order="closest")
    with pytest.raises(ValueError, match="metric"):
        run_search(tiny_llama, char_tokenizer, texts, metric="manhattan")
    for bad in (-1, NUM_LAYERS, NUM_LAYERS + 3, 1.5, "2", None):
        with pytest.raises(ValueError, match="num_shared"):
            run_search(tiny_llama, char_tokenizer, texts, num_shared=bad)
    with pytest.raises(ValueError, match="metric"):
        kvshare.layer_distances(tiny_llama, char_tokenizer, texts, metric="manhattan")
    with pytest.raises(ValueError):
        run_search(tiny_llama, char_tokenizer, [], 1)


# --------------------------------------------------------------------------------------------
# the search's incremental reuse is exact
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["dissimilar", "similar", "random"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_reported_score_equals_independent_score(tiny_llama, char_tokenizer, texts, order, metric):
    strategy, trace = run_search(tiny_llama, char_tokenizer, texts, 3, threshold=0.4, order=order, metric=metric)
    accepted = [r for r in trace if r["accepted"]]
    assert accepted
    expected = independent_score(tiny_llama, char_tokenizer, texts, strategy)
    assert accepted[-1]["score"] == pytest.approx(expected, abs=1e-4)
    # every intermediate accepted strategy too (prefixes of the search)
    for c, row in enumerate(accepted, start=1):
        assert row["score"] == pytest.approx(
            independent_score(tiny_llama, char_tokenizer, texts, strategy.prefix(c)), abs=1e-4
        )


def test_rejected_candidate_scores_are_exact(tiny_llama, char_tokenizer, texts):
    # a rejected row's score is the score of (accepted so far + that pair)
    strategy, trace = run_search(tiny_llama, char_tokenizer, texts, 3, threshold=0.6)
    mapping: dict = {}
    for row in trace[:8]:
        candidate = kvshare.strategy.apply_pair(mapping, row["replaced"], row["source"])
        expected = independent_score(tiny_llama, char_tokenizer, texts, kvshare.Strategy(candidate, NUM_LAYERS))
        assert row["score"] == pytest.approx(expected, abs=1e-4)
        if row["accepted"]:
            mapping = candidate


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_reported_score_exact_on_other_architectures(char_tokenizer, texts, arch):
    model = make_tiny_model(arch, "eager")
    strategy, trace = run_search(model, char_tokenizer, texts, 3, threshold=-1.0)
    assert strategy.num_shared == 3
    expected = independent_score(model, char_tokenizer, texts, strategy)
    assert trace[-1]["score"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_search_on_sliding_window_model_longer_than_window(char_tokenizer, texts, impl):
    # calibration texts (24 tokens) longer than mistral's sliding window (8): the search must still be
    # exact. Sliding cache layers keep only window-1 tokens, so K/V read back from cache slots are short.
    assert MAX_TOKENS > SLIDING_WINDOW
    model = make_tiny_model("mistral_sliding", impl)
    strategy, trace = run_search(model, char_tokenizer, texts, 3, threshold=-1.0)
    assert strategy.num_shared == 3
    expected = independent_score(model, char_tokenizer, texts, strategy)
    assert trace[-1]["score"] == pytest.approx(expected, abs=1e-4)


def test_search_on_mixed_layer_types_longer_than_window(char_tokenizer, texts):
    # qwen2 with 3 full-attention then 3 sliding layers (window 8), 24-token calibration texts
    model = make_tiny_model(
        "qwen2", "sdpa", use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3
    )
    distances = kvshare.layer_distances(model, char_tokenizer, texts, max_tokens=MAX_TOKENS)
    assert distances.shape == (NUM_LAYERS, NUM_LAYERS)
    strategy, trace = run_search(model, char_tokenizer, texts, 3, threshold=-1.0)
    types = model.config.layer_types
    for r, s in strategy.mapping.items():
        assert types[r] == types[s]
    expected = independent_score(model, char_tokenizer, texts, strategy)
    assert trace[-1]["score"] == pytest.approx(expected, abs=1e-4)


def test_search_leaves_the_model_pristine(tiny_llama, char_tokenizer, texts):
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    run_search(tiny_llama, char_tokenizer, texts, 3, threshold=0.4)
    for layer in tiny_llama.model.layers:
        assert "forward" not in layer.self_attn.__dict__
        assert not [k for k in layer.self_attn.__dict__ if k.startswith("_kvshare")]
    assert not tiny_llama.model._forward_hooks and not tiny_llama.model._forward_pre_hooks
    for layer in tiny_llama.model.layers:
        assert not layer._forward_pre_hooks  # the reference forward's capture hooks are gone
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, before)


# --------------------------------------------------------------------------------------------
# layer distances and calibration
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_layer_distances(tiny_llama, char_tokenizer, texts, metric):
    d = kvshare.layer_distances(tiny_llama, char_tokenizer, texts, metric=metric, max_tokens=MAX_TOKENS)
    assert isinstance(d, np.ndarray) and d.shape == (NUM_LAYERS, NUM_LAYERS)
    assert np.all(np.diag(d) == 0)
    np.testing.assert_allclose(d, d.T, atol=1e-6)
    off = d[~np.eye(NUM_LAYERS, dtype=bool)]
    assert np.all(np.isfinite(off)) and np.all(off > 0)  # random layers are all distinct
    if metric == "cosine":
        assert np.all(off <= 2.0 + 1e-6)


def test_unequal_calibration_lengths_keep_every_text(char_tokenizer):
    texts = ["a" * 10, "b" * 25, "c" * 40]  # 11, 26 and 41 tokens with BOS
    with pytest.warns(UserWarning, match="truncated to 11"):
        ids, description = encode_calibration(char_tokenizer, texts, max_tokens=32)
    assert ids.shape == (3, 11)
    assert description["texts"] == 3 and description["tokens_per_text"] == 11
    for row, text in zip(ids, texts):
        assert row.tolist() == char_tokenizer(text)["input_ids"][:11]


def test_search_keeps_unequal_texts(tiny_llama, char_tokenizer, texts):
    uneven = [t[: 12 + 5 * i] for i, t in enumerate(texts)]  # 13, 18, ... tokens
    with pytest.warns(UserWarning, match="no sample is dropped"):
        strategy, _ = kvshare.search(
            tiny_llama, char_tokenizer, uneven, 2, threshold=-1.0, max_tokens=64, progress=False
        )
    cal = strategy.metadata["calibration"]
    assert cal["texts"] == len(uneven) and cal["tokens_per_text"] == 13


def test_equal_length_texts_do_not_warn(char_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = encode_calibration(char_tokenizer, ["x" * 40, "y" * 50], max_tokens=16)
    assert ids.shape == (2, 16)


def test_too_short_calibration_text(char_tokenizer):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        encode_calibration(char_tokenizer, ["abc", ""], max_tokens=16)
