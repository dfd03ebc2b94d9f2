"""Strategy: validation, chain resolution, apply_pair, JSON io, model checks, prefixes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import kvshare
from kvshare.strategy import Strategy, apply_pair, resolve_chains


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def test_valid_strategy_views():
    s = Strategy({2: 0, 4: 1, 5: 1}, 6)
    assert s.mapping == {2: 0, 4: 1, 5: 1}
    assert s.num_shared == 3 and s.sources == [0, 1]
    assert s.kv_fraction() == pytest.approx(3 / 6)
    assert s.source_of(4) == 1 and s.source_of(3) == 3  # unreplaced layers read themselves
    assert "4->1" in repr(s)


def test_source_not_before_replaced_is_rejected():
    with pytest.raises(ValueError, match="source layer 4 must come before replaced layer 2"):
        Strategy({2: 4}, 6)


@pytest.mark.parametrize("mapping, bad", [({-1: 0}, -1), ({3: -1}, -1), ({6: 1}, 6), ({7: 2}, 7), ({3: 6}, 6)])
def test_index_out_of_range_is_rejected(mapping, bad):
    with pytest.raises(ValueError, match=rf"layer {bad} is out of range for a model with 6 layers"):
        Strategy(mapping, 6)


def test_self_map_is_rejected():
    with pytest.raises(ValueError, match="layer 3 cannot share with itself"):
        Strategy({3: 3}, 6)


@pytest.mark.parametrize("mapping", [{2: 1.5}, {2.5: 1}, {"two": 1}, {2: None}, {2: "x"}, {True: 0}, {2: [1]}])
def test_non_integer_entries_are_rejected(mapping):
    with pytest.raises(ValueError, match="layer indices"):
        Strategy(mapping, 6)


def test_integer_like_entries_are_accepted():
    # JSON keys are strings; numpy integers come out of distance matrices
    import numpy as np

    s = Strategy({"3": 1, np.int64(4): np.int64(2)}, 6)
    assert s.mapping == {3: 1, 4: 2}
    assert all(type(k) is int and type(v) is int for k, v in s.mapping.items())


@pytest.mark.parametrize("n", [0, -3, 2.0, True, "6"])
def test_bad_num_layers_is_rejected(n):
    with pytest.raises(ValueError, match="num_layers"):
        Strategy({}, n)


# --------------------------------------------------------------------------------------------
# chains and apply_pair
# --------------------------------------------------------------------------------------------
def test_chains_resolved_on_construction():
    assert Strategy({3: 1, 5: 3}, 6).mapping == {3: 1, 5: 1}
    assert Strategy({5: 4, 4: 2, 2: 0}, 6).mapping == {2: 0, 4: 0, 5: 0}
    assert resolve_chains({3: 1, 5: 3}) == {3: 1, 5: 1}


def test_apply_pair_repoints_dependants_of_a_replaced_source():
    # 3 was 5's source; once 3 reads 1 it holds no cache, so 5 must read 1 too
    m = {5: 3}
    assert apply_pair(m, 3, 1) == {3: 1, 5: 1}
    assert m == {5: 3}  # the input is not mutated


def test_apply_pair_resolves_to_root_of_a_replaced_source():
    assert apply_pair({3: 1}, 5, 3) == {3: 1, 5: 1}
    assert apply_pair({2: 0, 3: 2}, 4, 3) == {2: 0, 3: 2, 4: 2}  # applied on unresolved input, root of 3 is 2


def test_apply_pair_result_is_a_valid_resolved_strategy():
    m: dict = {}
    for r, s in [(5, 3), (3, 1), (4, 3), (1, 0)]:
        m = apply_pair(m, r, s)
        strategy = Strategy(m, 6)
        assert strategy.mapping == dict(sorted(m.items()))  # already resolved: construction changes nothing
        assert not set(m.values()) & set(m)  # no source is itself replaced
    assert m == {1: 0, 3: 0, 4: 0, 5: 0}


# --------------------------------------------------------------------------------------------
# io
# --------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path):
    meta = {"model": "tiny", "threshold": 0.5, "accepted_pairs": [[3, 1], [5, 3]], "nested": {"a": [1, 2]}}
    s = Strategy({3: 1, 5: 1}, 6, meta)
    path = s.save(tmp_path / "sub" / "strategy.json")
    assert path.is_file()
    loaded = Strategy.load(path)
    assert loaded.mapping == s.mapping and loaded.num_layers == 6 and loaded.metadata == meta
    assert all(type(k) is int for k in loaded.mapping)
    data = json.loads(path.read_text())
    assert data["num_shared"] == 2 and data["format"].startswith("kvshare-strategy")
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temporary file


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="strategy file not found"):
        Strategy.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        json.dumps({"num_layers": 6}),  # no mapping
        json.dumps({"mapping": {"3": 1}}),  # no num_layers
        json.dumps([1, 2, 3]),
        json.dumps({"mapping": [[3, 1]], "num_layers": 6}),
        json.dumps({"mapping": {"3": 5}, "num_layers": 6}),  # invalid content is validated too
    ],
)
def test_load_invalid_file(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError):
        Strategy.load(path)


# --------------------------------------------------------------------------------------------
# model checks
# --------------------------------------------------------------------------------------------
def test_enable_sharing_with_wrong_layer_count(tiny_llama):
    s = Strategy({3: 1}, NUM_LAYERS + 2, {"model": "bigger-model"})
    with pytest.raises(ValueError, match=rf"{NUM_LAYERS + 2} layers.*has {NUM_LAYERS}"):
        kvshare.enable_sharing(tiny_llama, s)
    assert getattr(tiny_llama, "_kvshare", None) is None  # nothing was patched


def test_enable_sharing_on_unsupported_architecture():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(NotImplementedError) as err:
        kvshare.enable_sharing(model, Strategy({2: 1}, 4))
    msg = str(err.value)
    assert "gpt2" in msg
    for name in kvshare.SUPPORTED_MODEL_TYPES:
        assert name in msg
    assert set(kvshare.SUPPORTED_MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"}


def test_mixed_layer_types_only_share_within_a_type():
    # qwen2 with sliding layers: a sliding layer cannot read a full-attention layer's cache
    model = make_tiny_model(
        "qwen2",
        "sdpa",
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=3,
    )
    types = model.config.layer_types
    assert types[:3] == ["full_attention"] * 3 and types[3:] == ["sliding_attention"] * 3
    with pytest.raises(ValueError, match="same attention type"):
        kvshare.enable_sharing(model, Strategy({4: 1}, NUM_LAYERS))
    kvshare.enable_sharing(model, Strategy({2: 1, 5: 3}, NUM_LAYERS))  # same types: fine
    kvshare.disable_sharing(model)


# --------------------------------------------------------------------------------------------
# prefixes of a search result
# --------------------------------------------------------------------------------------------
def test_prefix_replays_accepted_pairs():
    meta = {"accepted_pairs": [[5, 3], [3, 1], [4, 0]], "num_shared": 3}
    full = Strategy(apply_pair(apply_pair(apply_pair({}, 5, 3), 3, 1), 4, 0), 6, meta)
    assert full.mapping == {3: 1, 4: 0, 5: 1}
    assert full.prefix(0).mapping == {}
    assert full.prefix(1).mapping == {5: 3}
    p2 = full.prefix(2)
    assert p2.mapping == {3: 1, 5: 1} and p2.metadata["num_shared"] == 2
    assert p2.metadata["accepted_pairs"] == [[5, 3], [3, 1]]
    assert full.prefix(3).mapping == full.mapping
    with pytest.raises(ValueError, match="accepted only 3"):
        full.prefix(4)
    with pytest.raises(ValueError, match="accepted_pairs"):
        Strategy({3: 1}, 6).prefix(1)


def test_prefix_of_a_real_search_equals_a_shorter_search(tiny_llama, char_tokenizer):
    # the docstring's claim: the first c acceptances of a search to C are the search to c
    texts = ["the quick brown fox jumps", "over the lazy dog, again", "pack my box with five dozen"]
    big, _ = kvshare.search(tiny_llama, char_tokenizer, texts, 4, threshold=0.0, max_tokens=16, progress=False)
    assert big.num_shared == 4
    for c in range(4):
        small, _ = kvshare.search(tiny_llama, char_tokenizer, texts, c, threshold=0.0, max_tokens=16, progress=False)
        assert big.prefix(c).mapping == small.mapping
    # and a prefix survives a save/load roundtrip
    assert Strategy.from_dict(json.loads(json.dumps(big.to_dict()))).prefix(2).mapping == big.prefix(2).mapping
