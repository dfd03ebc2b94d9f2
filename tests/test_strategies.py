"""The one store of searched strategies (kvshare.strategies): searched once per key, then the same strategy for
every caller, KVSharer's settings included."""

from __future__ import annotations

import pytest
from conftest import make_tiny_model

from kvshare import methods, strategies
from kvshare.strategy import Strategy


@pytest.fixture()
def fake_search(monkeypatch, tmp_path):
    """An empty store, and search_for replaced by a counter that returns a strategy depending on the key (no model
    run)."""
    monkeypatch.setenv("KVSHARE_STRATEGIES", str(tmp_path / "strategies"))
    calls = []

    def search_for(model, tokenizer, key, progress=False):
        calls.append(key)
        return Strategy({5 - i: 0 for i in range(key.num_shared)}, 6, {"order": key.order})

    monkeypatch.setattr(strategies, "search_for", search_for)
    return calls


def test_a_key_is_searched_once_then_read_back(fake_search):
    model = make_tiny_model("llama", "sdpa")
    key = strategies.key_for(model, "best", 2)
    first = strategies.get(model, object(), key)
    again = strategies.get(model, None, key)  # read back: no tokenizer needed
    assert len(fake_search) == 1 and first.mapping == again.mapping == {5: 0, 4: 0}
    assert again.metadata["store_key"]["order"] == "best" and strategies.path_of(key).is_file()
    other = strategies.get(model, object(), strategies.key_for(model, "best", 2, calibration_set=1))
    assert len(fake_search) == 2 and other.mapping == first.mapping  # another set is another key


def test_two_models_of_one_name_never_share_a_strategy():
    a, b = make_tiny_model("llama", "sdpa"), make_tiny_model("llama", "sdpa", seed=1)
    assert strategies.key_for(a, "dissimilar", 2) != strategies.key_for(b, "dissimilar", 2)
    assert strategies.key_for(a, "dissimilar", 2) == strategies.key_for(
        make_tiny_model("llama", "sdpa"), "dissimilar", 2
    )


def test_kvsharer_settings_read_the_store(fake_search):
    model = make_tiny_model("llama", "sdpa")
    model.kvshare_tokenizer = object()  # kvshare.load_model sets it: the search needs it
    one = methods.make("kvsharer", num_shared=3, order="best").strategy_for(model)
    del model.kvshare_tokenizer
    two = methods.make("kvsharer", num_shared=3, order="best").strategy_for(model)  # stored: read, not searched
    assert one.mapping == two.mapping and len(fake_search) == 1
    with pytest.raises(ValueError, match="needs the model's tokenizer"):  # nothing stored at C = 2
        methods.make("kvsharer", num_shared=2, order="best").strategy_for(model)


def test_keys_are_checked():
    with pytest.raises(ValueError, match="searched strategies"):
        strategies.StrategyKey("m", "spread", 2)
    with pytest.raises(ValueError, match="positive"):
        strategies.StrategyKey("m", "best", 0)
