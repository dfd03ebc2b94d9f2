"""The damage map and the best-first search (`order="best"`), on tiny random models with a character tokenizer."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LAYERS, SLIDING_WINDOW, make_tiny_model

import kvshare
from kvshare.calibration import METRICS, encode_calibration
from kvshare.damage import DamageMap
from kvshare.search import candidate_pairs, exhaustive_layer_forwards
from kvshare.sharing import active_strategy

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(1)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(rng.randint(30, 50))) for _ in range(5)]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def best(model, tok, texts, num_shared, threshold=-1.0, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    return quiet(kvshare.search, model, tok, texts, num_shared, threshold, order="best", progress=False, **kw)


def direct_scores(model, tok, texts, mapping, positions=None):
    """Hidden cosine and mean KL(full || shared) from two plain full forwards (sharing on for the second one)."""
    ids, _ = encode_calibration(tok, texts, MAX_TOKENS)
    with torch.no_grad():
        full = model.model(ids).last_hidden_state
        with kvshare.sharing(model, kvshare.Strategy(mapping, NUM_LAYERS)):
            shared = model.model(ids).last_hidden_state
        p, q = F.log_softmax(model.lm_head(full), -1), F.log_softmax(model.lm_head(shared), -1)
    cosine = F.cosine_similarity(shared.flatten(1), full.flatten(1), dim=1).mean()
    if positions is not None:
        p, q = p[:, positions], q[:, positions]
    kl = (p.exp() * (p - q)).sum(-1).mean()
    return cosine.item(), kl.item()


def silence_attention(model, layers):
    """Zero the attention output projection of `layers`: their K/V then change nothing, so replacing them is free."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
    return model


# --------------------------------------------------------------------------------------------
# the damage map
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_damage_map_equals_one_shared_forward_per_pair(char_tokenizer, texts, arch):
    model = make_tiny_model(arch, "eager")
    dm = kvshare.damage_map(model, char_tokenizer, texts, max_tokens=MAX_TOKENS, progress=False, kl_stride=1)
    assert isinstance(dm, DamageMap)
    assert [(r["replaced"], r["source"]) for r in dm] == [(r, s) for r in range(NUM_LAYERS) for s in range(r)]
    distances = {
        m: kvshare.layer_distances(model, char_tokenizer, texts, metric=m, max_tokens=MAX_TOKENS) for m in METRICS
    }
    for row in dm:
        cosine, kl = direct_scores(model, char_tokenizer, texts, {row["replaced"]: row["source"]})
        assert row["hidden_cosine"] == pytest.approx(cosine, abs=1e-5)
        assert row["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        assert row["kl"] >= 0
        for m in METRICS:
            assert row[f"distance_{m}"] == pytest.approx(distances[m][row["replaced"]][row["source"]], abs=1e-9)
    n = len(dm)
    assert dm.metadata["pairs"] == n
    assert dm.metadata["layer_forwards"] == len(texts) * (NUM_LAYERS + sum(NUM_LAYERS - r["replaced"] for r in dm))
    m = dm.matrix("kl")
    assert m.shape == (NUM_LAYERS, NUM_LAYERS) and np.isnan(m[0, 1])
    assert m[3, 1] == next(r["kl"] for r in dm if (r["replaced"], r["source"]) == (3, 1))


def test_kl_stride_scores_every_kth_position_ending_at_the_last(tiny_llama, char_tokenizer, texts):
    dm = kvshare.damage_map(
        tiny_llama, char_tokenizer, texts, max_tokens=MAX_TOKENS, progress=False, kl_stride=5, pairs=[(4, 1), (5, 4)]
    )
    positions = list(range(MAX_TOKENS - 1, -1, -5))[::-1]
    assert dm.metadata["kl_positions_per_text"] == len(positions)
    for row in dm:
        _, kl = direct_scores(tiny_llama, char_tokenizer, texts, {row["replaced"]: row["source"]}, positions)
        assert row["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_damage_map_on_mixed_layer_types_keeps_same_type_pairs(char_tokenizer, texts):
    model = make_tiny_model(
        "qwen2", "sdpa", use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3
    )
    types = model.config.layer_types
    dm = kvshare.damage_map(model, char_tokenizer, texts, max_tokens=MAX_TOKENS, progress=False)
    pairs = [(r["replaced"], r["source"]) for r in dm]
    assert pairs == [(r, s) for r in range(NUM_LAYERS) for s in range(r) if types[r] == types[s]]
    row = dm[0]
    cosine, _ = direct_scores(model, char_tokenizer, texts, {row["replaced"]: row["source"]})
    assert row["hidden_cosine"] == pytest.approx(cosine, abs=1e-5)


def test_damage_map_leaves_the_model_as_it_was(tiny_llama, char_tokenizer, texts):
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    strategy = kvshare.Strategy({5: 2}, NUM_LAYERS)
    kvshare.enable_sharing(tiny_llama, strategy)
    with torch.no_grad():
        before = tiny_llama(ids).logits
    kvshare.damage_map(tiny_llama, char_tokenizer, texts, max_tokens=MAX_TOKENS, progress=False)
    assert active_strategy(tiny_llama) is strategy
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, before)  # sharing still on, exactly as before
    kvshare.disable_sharing(tiny_llama)
    for layer in tiny_llama.model.layers:
        assert not [k for k in layer.self_attn.__dict__ if k.startswith("_kvshare")]


def test_damage_map_round_trips_and_ranks(tiny_llama, char_tokenizer, texts):
    dm = kvshare.damage_map(tiny_llama, char_tokenizer, texts, max_tokens=MAX_TOKENS, progress=False)
    again = DamageMap.from_dict(json.loads(json.dumps(dm.to_dict())))
    assert list(again) == list(dm) and again.metadata == dm.metadata
    ranked = dm.ranked("kl")
    kls = {(r["replaced"], r["source"]): r["kl"] for r in dm}
    assert [kls[p] for p in ranked] == sorted(kls.values())
    by_cos = dm.ranked("hidden_cosine")
    cos = {(r["replaced"], r["source"]): r["hidden_cosine"] for r in dm}
    assert [cos[p] for p in by_cos] == sorted(cos.values(), reverse=True)


# --------------------------------------------------------------------------------------------
# the best-first search
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["kl", "hidden_cosine"])
def test_best_picks_the_pairs_that_cost_nothing(char_tokenizer, texts, criterion):
    # layers 2 and 4 add nothing from attention: whatever K/V they read, the model is unchanged
    model = silence_attention(make_tiny_model("llama", "sdpa"), [2, 4])
    strategy, trace = best(model, char_tokenizer, texts, 2, criterion=criterion)
    assert sorted(strategy.mapping) == [2, 4]
    accepted = [t for t in trace if t["accepted"]]
    assert [t["kl"] for t in accepted] == pytest.approx([0.0, 0.0], abs=1e-7)
    assert all(t["score"] == pytest.approx(1.0, abs=1e-6) for t in accepted)
    # the fixed dissimilar order, for contrast, does not know this
    dissimilar, _ = quiet(
        kvshare.search, model, char_tokenizer, texts, 2, -1.0, order="dissimilar", max_tokens=MAX_TOKENS, progress=False
    )
    assert sorted(dissimilar.mapping) != [2, 4]


def test_best_rescores_against_the_accepted_strategy_exactly(tiny_llama, char_tokenizer, texts):
    strategy, trace = best(tiny_llama, char_tokenizer, texts, 3)
    assert strategy.num_shared == 3
    mapping: dict = {}
    for step in range(3):
        for row in (t for t in trace if t["step"] == step):
            candidate = kvshare.strategy.apply_pair(mapping, row["replaced"], row["source"])
            cosine, kl = direct_scores(
                tiny_llama, char_tokenizer, texts, candidate, positions=list(range(MAX_TOKENS - 1, -1, -4))[::-1]
            )
            assert row["score"] == pytest.approx(cosine, abs=1e-5)
            assert row["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
        chosen = [t for t in trace if t["step"] == step and t["accepted"]]
        assert len(chosen) == 1
        # the accepted candidate is the least damaging one re-scored at this step
        passed = [t["kl"] for t in trace if t["step"] == step and t["decision"] != "below threshold"]
        assert chosen[0]["kl"] == min(passed)
        mapping = kvshare.strategy.apply_pair(mapping, chosen[0]["replaced"], chosen[0]["source"])
    assert mapping == strategy.mapping
    assert (
        strategy.prefix(2).mapping
        == kvshare.Strategy(
            kvshare.strategy.apply_pair(
                kvshare.strategy.apply_pair({}, *strategy.metadata["accepted_pairs"][0]),
                *strategy.metadata["accepted_pairs"][1],
            ),
            NUM_LAYERS,
        ).mapping
    )


def test_best_is_deterministic(tiny_llama, char_tokenizer, texts):
    a, trace_a = best(tiny_llama, char_tokenizer, texts, 3)
    b, trace_b = best(tiny_llama, char_tokenizer, texts, 3)
    assert a.mapping == b.mapping and trace_a == trace_b
    assert a.metadata["accepted_pairs"] == b.metadata["accepted_pairs"]
    assert a.metadata["layer_forwards"] == b.metadata["layer_forwards"]


def test_best_with_c_zero_is_the_empty_strategy(tiny_llama, char_tokenizer, texts):
    strategy, trace = best(tiny_llama, char_tokenizer, texts, 0)
    assert strategy.mapping == {} and strategy.num_shared == 0 and trace == []
    assert strategy.metadata["order"] == "best" and strategy.metadata["accepted_pairs"] == []


def test_best_threshold_semantics(tiny_llama, char_tokenizer, texts):
    with pytest.warns(UserWarning, match="only 0 of 2 layers"):
        strategy, trace = kvshare.search(
            tiny_llama, char_tokenizer, texts, 2, 1.01, order="best", max_tokens=MAX_TOKENS, progress=False
        )
    assert strategy.mapping == {}
    assert trace and all(not t["accepted"] and t["decision"] == "below threshold" for t in trace)
    assert len(trace) == NUM_LAYERS * (NUM_LAYERS - 1) // 2  # every pair was tried once, then dropped
    # a threshold that bites: accepted rows are above it, rejected-for-threshold rows are not
    strategy, trace = best(tiny_llama, char_tokenizer, texts, 3, threshold=0.6)
    for t in trace:
        assert (t["score"] > 0.6) == (t["decision"] != "below threshold")
        if t["accepted"]:
            assert t["score"] > 0.6


def test_best_metadata_and_costs(tiny_llama, char_tokenizer, texts):
    strategy, trace = best(tiny_llama, char_tokenizer, texts, 3, screen_texts=2, shortlist=4)
    m = strategy.metadata
    n, L = len(texts), NUM_LAYERS
    pairs = [(r, s) for r in range(L) for s in range(r)]
    assert m["order"] == "best" and m["criterion"] == "kl" and m["screen_texts"] == 2 and m["shortlist"] == 4
    assert m["screen_layer_forwards"] == 2 * (L + sum(L - r for r, _ in pairs))
    assert m["rescore_layer_forwards"] == n * sum(L - t["replaced"] for t in trace)
    assert m["layer_forwards"] == n * L + m["screen_layer_forwards"] + m["rescore_layer_forwards"]
    assert m["exhaustive_layer_forwards"] == exhaustive_layer_forwards(pairs, m["accepted_pairs"], L, n, 3)
    assert m["candidates_visited"] == len(trace)
    for step in range(3):
        assert sum(t["step"] == step and t["decision"] != "below threshold" for t in trace) <= 4
    # the trace carries what the fixed orders' trace carries
    assert {"rank", "replaced", "source", "resolved_source", "distance", "score", "accepted"} <= set(trace[0])
    st = kvshare.Strategy.from_dict(json.loads(json.dumps(strategy.to_dict())))
    assert st.mapping == strategy.mapping


def test_best_without_lazy_rescores_the_whole_shortlist(tiny_llama, char_tokenizer, texts):
    lazy, lazy_trace = best(tiny_llama, char_tokenizer, texts, 2, shortlist=6)
    full, full_trace = best(tiny_llama, char_tokenizer, texts, 2, shortlist=6, lazy=False)
    assert sum(t["step"] == 0 for t in full_trace) == 6
    assert len(lazy_trace) <= len(full_trace)


def test_best_invalid_arguments(tiny_llama, char_tokenizer, texts):
    with pytest.raises(ValueError, match="criterion"):
        best(tiny_llama, char_tokenizer, texts, 2, criterion="ppl")
    with pytest.raises(ValueError, match="shortlist"):
        best(tiny_llama, char_tokenizer, texts, 2, shortlist=0)
    with pytest.raises(ValueError, match="not a fixed walk"):
        candidate_pairs(np.zeros((3, 3)), "best")


def test_best_on_mixed_layer_types(char_tokenizer, texts):
    model = make_tiny_model(
        "qwen2", "sdpa", use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=3
    )
    strategy, _ = best(model, char_tokenizer, texts, 3)
    types = model.config.layer_types
    assert strategy.num_shared == 3 and all(types[r] == types[s] for r, s in strategy.mapping.items())


def test_kvsharer_method_with_best_order(tiny_llama, char_tokenizer, texts, monkeypatch):
    import kvshare.data

    monkeypatch.setattr(kvshare.data, "calibration_texts", lambda n, source="offline", set_index=0: texts)
    tiny_llama.kvshare_tokenizer = char_tokenizer
    method = kvshare.methods.make("kvsharer", num_shared=2, order="best", max_tokens=MAX_TOKENS, threshold=-1.0)
    strategy = quiet(method.strategy_for, tiny_llama)
    assert strategy.num_shared == 2 and strategy.metadata["order"] == "best"


def test_cli_search_order_best(tiny_llama, char_tokenizer, texts, tmp_path, monkeypatch, capsys):
    import kvshare.data
    from kvshare import cli

    monkeypatch.setattr(cli, "_load", lambda args: (tiny_llama, char_tokenizer))
    monkeypatch.setattr(kvshare.data, "calibration_texts", lambda n, source="offline", set_index=0: texts)
    out = tmp_path / "s.json"
    code = quiet(
        cli.main,
        [
            "search",
            "--num-shared",
            "2",
            "--order",
            "best",
            "--max-tokens",
            str(MAX_TOKENS),
            "--threshold",
            "-1",
            "--out",
            str(out),
        ],
    )
    assert code in (0, None)
    saved = kvshare.Strategy.load(out)
    assert saved.num_shared == 2 and saved.metadata["order"] == "best"
    trace = json.loads(out.with_name("s.trace.json").read_text())
    assert sum(t["accepted"] for t in trace) == 2
    printed = capsys.readouterr().out
    assert "layer_forwards" in printed and "best-first search to C=2" in printed


def test_suite_paired_difference_by_hand():
    """Notebook 11's suite claim: per task the mean of per-example differences, averaged over tasks."""
    from kvshare.experiments.best_search import paired_average_difference
    from kvshare.experiments.reports.best_search import suite_lines

    a = {"t1": {"value": 0.75, "scores": [1, 1, 1, 0]}, "t2": {"value": 0.5, "scores": [1, 0]}}
    b = {"t1": {"value": 0.25, "scores": [0, 0, 1, 0]}, "t2": {"value": 0.5, "scores": [0, 1]}}
    diff, se = paired_average_difference(a, b)
    assert diff == pytest.approx(((0.75 - 0.25) + 0.0) / 2)
    # t1: d = [1, 1, 0, 0], var 1/3 over 4; t2: d = [1, -1], var 2 over 2
    assert se == pytest.approx(np.sqrt(1 / 3 / 4 + 2 / 2) / 2)
    # a task without per-example scores pairs nothing: its two stderrs add as if independent
    c = {"t1": {"value": 0.5, "stderr": 0.3}}
    d = {"t1": {"value": 0.25, "stderr": 0.4}}
    assert paired_average_difference(c, d) == pytest.approx((0.25, 0.5))
    with pytest.raises(ValueError, match="no task"):
        paired_average_difference(a, {"other": {"value": 1.0}})
    suite = {
        "C": 8,
        "num_layers": 30,
        "set": 0,
        "limit": None,
        "clear": False,
        "higher_than_all": True,
        "rows": [
            {"label": "full", "average": 0.5, "kept_pct": 100.0},
            {"label": "best", "average": 0.45, "kept_pct": 90.0},
            {
                "label": "similar",
                "average": 0.4,
                "kept_pct": 80.0,
                "best_minus_this": 0.05,
                "best_minus_this_se": 0.04,
                "best_vs_this_z": 1.25,
            },
        ],
    }
    text = "\n".join(suite_lines(suite))
    assert (
        "26.7% of the layers" in text and "HOLDS, not clearly" in text and "| similar | 0.400 | 80.0 | +0.050" in text
    )
