"""Guards without timing: count the modules and the cache operations one decoded token runs, plain vs shared.

A replaced layer must run less than a plain one (no k_proj, no v_proj, no cache write) and nothing more;
every other module runs exactly as often as in the plain model. A change that adds work to the replaced
path (an extra projection, a second cache write, a copy per step) makes these counts move and fails here,
whatever the machine's speed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model
from transformers import DynamicCache

import kvshare
from kvshare.adapter import model_cache_kwarg
from kvshare.strategy import Strategy


@torch.no_grad()
def decode_step_counts(model, strategy=None, prompt=8):
    """Module calls (by module type and name suffix) and cache updates of one decode step after a prefill."""
    ids = torch.randint(3, 100, (2, prompt + 1), generator=torch.Generator().manual_seed(0))
    calls: Counter = Counter()
    handles = []
    for name, module in model.named_modules():
        if not list(module.children()):  # leaf modules: the work itself
            kind = name.rsplit(".", 1)[-1]
            handles.append(module.register_forward_hook(lambda m, a, o, kind=kind: calls.update([kind])))
    with kvshare.sharing(model, strategy):
        cache = DynamicCache(config=model.config)
        kw = {model_cache_kwarg(model): cache}
        model(ids[:, :prompt], use_cache=True, **kw)
        calls.clear()
        updates = Counter()
        original = cache.update

        def counting_update(k, v, layer_idx, *args, **kwargs):
            updates.update([layer_idx])
            return original(k, v, layer_idx, *args, **kwargs)

        cache.update = counting_update
        model(ids[:, prompt:], use_cache=True, **kw)
    for h in handles:
        h.remove()
    return calls, updates


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral_sliding"])
def test_a_replaced_layer_does_less_work_and_nothing_more(arch):
    model = make_tiny_model(arch, "sdpa")
    strategy = Strategy({2: 1, 4: 1, 5: 3}, NUM_LAYERS)
    C = strategy.num_shared
    plain, plain_updates = decode_step_counts(model)
    shared, shared_updates = decode_step_counts(model, strategy)
    assert plain["k_proj"] == plain["v_proj"] == plain["q_proj"] == NUM_LAYERS
    assert shared["k_proj"] == shared["v_proj"] == NUM_LAYERS - C  # replaced layers project no K/V
    assert shared["q_proj"] == NUM_LAYERS
    for kind in set(plain) | set(shared):
        if kind not in ("k_proj", "v_proj", "k_norm"):
            assert shared[kind] == plain[kind], kind  # every other module runs exactly as often
    if "k_norm" in plain:  # qwen3 normalizes keys: replaced layers skip that too
        assert shared["k_norm"] == NUM_LAYERS - C
    assert sorted(plain_updates) == list(range(NUM_LAYERS)) and set(plain_updates.values()) == {1}
    # one cache write per kept layer, none for a replaced one
    assert sorted(shared_updates) == [i for i in range(NUM_LAYERS) if i not in strategy.mapping]
    assert set(shared_updates.values()) == {1}


def test_c0_runs_exactly_the_plain_modules():
    model = make_tiny_model("llama", "sdpa")
    assert decode_step_counts(model) == decode_step_counts(model, Strategy({}, NUM_LAYERS))
