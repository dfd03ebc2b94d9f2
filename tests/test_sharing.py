"""KV sharing at inference, on tiny random models of every supported architecture x {sdpa, eager}.

The central property: a model with sharing enabled is *one* consistent model, whichever way it is
run (full forward, token-by-token decoding with a cache, prefill + decode, generate), and it never
computes or stores K/V for the replaced layers.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import NUM_LAYERS, PAD_ID, SLIDING_WINDOW, VOCAB, make_tiny_model, random_strategies
from transformers import DynamicCache

import kvshare

TOL = 1e-4
SEQ = 16  # longer than the sliding window (8) of the mistral_sliding variant
assert SEQ > SLIDING_WINDOW

# a fixed strategy with a chain-resolved source (5 -> 3 -> 1 is stored as 5 -> 1) and two readers of layer 1
FIXED = {2: 1, 3: 1, 5: 3}


def strategies():
    """A few seeded random valid strategies, plus the fixed one."""
    return [kvshare.Strategy(m, NUM_LAYERS) for m in random_strategies(NUM_LAYERS, 3, seed=123)] + [
        kvshare.Strategy(FIXED, NUM_LAYERS)
    ]


def random_ids(batch=1, length=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded(length=SEQ, pads=(0, 3, 6), seed=1):
    """A left-padded batch: row i starts with pads[i] pad tokens (masked out)."""
    ids = random_ids(len(pads), length, seed)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        ids[i, :p] = PAD_ID
        mask[i, :p] = 0
    return ids, mask


def positions_from_mask(mask):
    """Position ids the way generate computes them for left padding: count real tokens only."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def full_logits(model, ids, mask=None, **kwargs):
    pos = None if mask is None else positions_from_mask(mask)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits


def incremental_logits(model, ids, mask=None, prefill=0):
    """Decode with a DynamicCache: `prefill` tokens in one call (if > 0), then one token per call."""
    cache = DynamicCache(config=model.config)
    pos_all = None if mask is None else positions_from_mask(mask)
    chunks = [(0, prefill)] if prefill else []
    chunks += [(t, t + 1) for t in range(prefill, ids.shape[1])]
    out = []
    with torch.no_grad():
        for a, b in chunks:
            kwargs = {}
            if mask is not None:  # the mask grows with the sequence; positions come from it
                kwargs = dict(attention_mask=mask[:, :b], position_ids=pos_all[:, a:b])
            o = model(input_ids=ids[:, a:b], cache=cache, use_cache=True, **kwargs)
            assert o.cache is cache  # the caller's cache is the one handed back (and filled)
            out.append(o.logits)
    return torch.cat(out, dim=1), cache


def max_diff_on(a, b, mask=None):
    if mask is not None:  # compare only real (non-pad) positions
        keep = mask.bool()
        a, b = a[keep], b[keep]
    return (a - b).abs().max().item()


@contextlib.contextmanager
def count_kv_projections(model):
    """Count k_proj / v_proj calls per layer while the block runs."""
    counts = {i: 0 for i in range(NUM_LAYERS)}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):

            def hook(module, args, output, i=i):
                counts[i] += 1

            handles.append(proj.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def assert_only_sources_projected(counts, strategy):
    for i, n in counts.items():
        if i in strategy.mapping:
            assert n == 0, f"replaced layer {i} ran k_proj/v_proj {n} times under {strategy}"
        else:
            assert n > 0, f"layer {i} is not replaced but never ran k_proj/v_proj under {strategy}"


def gen_kwargs(**kw):
    return dict(max_new_tokens=10, pad_token_id=PAD_ID, eos_token_id=None, **kw)


# --------------------------------------------------------------------------------------------
# C = 0: no layer replaced must be the plain model, bit for bit
# --------------------------------------------------------------------------------------------
def test_zero_sharing_is_bit_identical(tiny_model):
    ids = random_ids(2)
    plain = full_logits(tiny_model, ids)
    empty = kvshare.Strategy({}, NUM_LAYERS)

    kvshare.enable_sharing(tiny_model, empty)
    try:
        assert torch.equal(full_logits(tiny_model, ids), plain)
    finally:
        kvshare.disable_sharing(tiny_model)

    with kvshare.sharing(tiny_model, empty):
        assert torch.equal(full_logits(tiny_model, ids), plain)
        shared_gen = tiny_model.generate(ids, **gen_kwargs(do_sample=False))
    plain_gen = tiny_model.generate(ids, **gen_kwargs(do_sample=False))
    assert torch.equal(shared_gen, plain_gen)


# --------------------------------------------------------------------------------------------
# decode with a cache == one full forward, with sharing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill", [0, 5], ids=["token-by-token", "prefill5-then-decode"])
def test_incremental_decode_matches_full_forward(tiny_model, prefill):
    ids = random_ids(2)
    for strategy in strategies():
        with kvshare.sharing(tiny_model, strategy):
            full = full_logits(tiny_model, ids)
            inc, _ = incremental_logits(tiny_model, ids, prefill=prefill)
        assert max_diff_on(full, inc) <= TOL, f"{strategy}: decode with cache differs from the full forward"
        # sanity: the strategy actually changes the model (else this test would prove nothing)
        assert max_diff_on(full, full_logits(tiny_model, ids)) > 1e-3


@pytest.mark.parametrize("prefill", [0, 5], ids=["token-by-token", "prefill5-then-decode"])
def test_incremental_decode_matches_full_forward_left_padded(tiny_model, prefill):
    ids, mask = left_padded(pads=(0, 3, 6))
    for strategy in strategies():
        with kvshare.sharing(tiny_model, strategy):
            full = full_logits(tiny_model, ids, mask)
            inc, _ = incremental_logits(tiny_model, ids, mask, prefill=prefill)
        assert max_diff_on(full, inc, mask) <= TOL, f"{strategy}: padded decode differs from the full forward"


def test_padded_rows_match_unpadded_rows(tiny_model):
    # left padding must not change a row's logits: the padded row equals the same tokens run alone
    ids, mask = left_padded(pads=(0, 4))
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy):
        batch = full_logits(tiny_model, ids, mask)
        alone = full_logits(tiny_model, ids[1:, 4:])
    assert max_diff_on(batch[1, 4:], alone[0]) <= TOL


# --------------------------------------------------------------------------------------------
# the cache: (L - C) / L of the bytes, nothing stored for replaced layers
# --------------------------------------------------------------------------------------------
def test_cache_bytes_and_empty_replaced_slots(tiny_model):
    ids = random_ids(2)
    with torch.no_grad():
        plain_cache = tiny_model(ids, use_cache=True).cache
    plain = kvshare.cache_bytes(plain_cache)
    assert plain > 0
    for strategy in strategies():
        with kvshare.sharing(tiny_model, strategy), torch.no_grad():
            out = tiny_model(ids, use_cache=True)
        shared = kvshare.cache_bytes(out.cache)
        L, C = NUM_LAYERS, strategy.num_shared
        assert shared * L == plain * (L - C), f"{strategy}: {shared} bytes vs {plain} unshared"
        for r in strategy.mapping:
            layer = out.cache.layers[r]
            assert getattr(layer, "keys", None) is None and getattr(layer, "values", None) is None
        for i in set(range(L)) - set(strategy.mapping):
            assert isinstance(out.cache.layers[i].keys, torch.Tensor)
        # the tap is removed: what is handed back is an ordinary transformers cache
        assert "update" not in out.cache.__dict__
        assert not any(k.startswith("_kvshare") for k in out.cache.__dict__)


def test_incremental_cache_bytes(tiny_model):
    ids = random_ids(2)
    _, plain_cache = incremental_logits(tiny_model, ids, prefill=5)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy):
        _, cache = incremental_logits(tiny_model, ids, prefill=5)
    L, C = NUM_LAYERS, strategy.num_shared
    assert kvshare.cache_bytes(cache) * L == kvshare.cache_bytes(plain_cache) * (L - C)


def test_cache_from_unshared_run_is_rejected(tiny_llama):
    # a cache that holds K/V for a replaced layer came from another strategy: refuse it clearly
    ids = random_ids(1)
    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(ids[:, :5], cache=cache, use_cache=True)
        with kvshare.sharing(tiny_llama, kvshare.Strategy(FIXED, NUM_LAYERS)):
            with pytest.raises(ValueError, match="holds K/V for layer"):
                tiny_llama(ids[:, 5:6], cache=cache, use_cache=True)


# --------------------------------------------------------------------------------------------
# replaced layers never project K/V
# --------------------------------------------------------------------------------------------
def test_replaced_layers_never_project_kv(tiny_model):
    ids, mask = left_padded(pads=(0, 3))
    for strategy in strategies():
        with kvshare.sharing(tiny_model, strategy):
            with count_kv_projections(tiny_model) as counts:
                full_logits(tiny_model, ids, mask)
            assert_only_sources_projected(counts, strategy)
            with count_kv_projections(tiny_model) as counts:
                incremental_logits(tiny_model, ids, mask, prefill=5)
            assert_only_sources_projected(counts, strategy)
            with count_kv_projections(tiny_model) as counts:
                tiny_model.generate(ids, attention_mask=mask, **gen_kwargs(do_sample=False))
            assert_only_sources_projected(counts, strategy)


# --------------------------------------------------------------------------------------------
# use_cache=False
# --------------------------------------------------------------------------------------------
def test_use_cache_false(tiny_model):
    ids = random_ids(2)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy), torch.no_grad():
        no_cache = tiny_model(ids, use_cache=False)
        with_cache = tiny_model(ids, use_cache=True)
    # sharing needs a cache internally, but the caller asked for none: none comes back
    assert getattr(no_cache, "cache", None) is None
    assert getattr(no_cache, "past_key_values", None) is None
    assert with_cache.cache is not None
    assert torch.equal(no_cache.logits, with_cache.logits)


def test_base_model_called_directly(tiny_model):
    # the hooks sit on the decoder stack, so calling model.model directly shares too
    ids = random_ids(2)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy), torch.no_grad():
        hidden = tiny_model.model(ids).last_hidden_state
        logits = tiny_model(ids).logits
    assert torch.allclose(tiny_model.lm_head(hidden), logits, atol=1e-5)


# --------------------------------------------------------------------------------------------
# generate: greedy, sampling, beam search
# --------------------------------------------------------------------------------------------
def manual_greedy(model, ids, mask, steps):
    """Greedy decoding with a full forward (no cache) per step: the reference for generate."""
    for _ in range(steps):
        logits = full_logits(model, ids, mask, use_cache=False)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def test_generate_greedy_equals_manual_full_forward_loop(tiny_model):
    ids, mask = left_padded(length=10, pads=(0, 3))
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy):
        generated = tiny_model.generate(ids, attention_mask=mask, **gen_kwargs(do_sample=False))
        manual = manual_greedy(tiny_model, ids, mask, steps=10)
    plain_manual = manual_greedy(tiny_model, ids, mask, steps=10)
    assert torch.equal(generated, manual)
    # and sharing did change the greedy continuation (this random model is sensitive to it)
    assert not torch.equal(manual, plain_manual)


def test_generate_sampling_and_beam_search(tiny_model):
    ids, mask = left_padded(length=10, pads=(0, 3))
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy):
        runs = []
        for _ in range(2):
            torch.manual_seed(7)
            runs.append(tiny_model.generate(ids, attention_mask=mask, **gen_kwargs(do_sample=True, top_k=0)))
        beams = tiny_model.generate(ids, attention_mask=mask, **gen_kwargs(do_sample=False, num_beams=2))
        one_beam = tiny_model.generate(ids, attention_mask=mask, **gen_kwargs(do_sample=False, num_beams=1))
        greedy = manual_greedy(tiny_model, ids, mask, steps=10)
    assert runs[0].shape == (2, 20) and torch.equal(runs[0], runs[1])  # seeded sampling is reproducible
    assert runs[0].min() >= 0 and runs[0].max() < VOCAB
    assert beams.shape == (2, 20) and torch.equal(beams[:, :10], ids)
    assert torch.equal(one_beam, greedy)


def test_generate_static_cache(tiny_model):
    ids, mask = left_padded(length=10, pads=(0, 3))
    try:  # static caches are a transformers feature: skip only if it is broken without kvshare too
        tiny_model.generate(ids, attention_mask=mask, cache_implementation="static", **gen_kwargs(do_sample=False))
    except Exception as e:  # pragma: no cover - depends on the transformers release
        pytest.skip(f"static-cache generate fails without kvshare on this transformers: {type(e).__name__}: {e}")
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy):
        dynamic = tiny_model.generate(ids, attention_mask=mask, **gen_kwargs(do_sample=False))
        with count_kv_projections(tiny_model) as counts:
            static = tiny_model.generate(
                ids, attention_mask=mask, cache_implementation="static", **gen_kwargs(do_sample=False)
            )
    assert_only_sources_projected(counts, strategy)
    assert torch.equal(static, dynamic)


# --------------------------------------------------------------------------------------------
# enable / disable
# --------------------------------------------------------------------------------------------
def assert_pristine(model):
    for layer in model.model.layers:
        attn = layer.self_attn
        assert "forward" not in attn.__dict__
        assert not [k for k in attn.__dict__ if k.startswith("_kvshare")]
    assert not model.model._forward_hooks
    assert not model.model._forward_pre_hooks
    assert getattr(model, "_kvshare", None) is None


def test_disable_sharing_restores_the_model(tiny_model):
    ids = random_ids(2)
    before = full_logits(tiny_model, ids)
    for strategy in strategies():
        kvshare.enable_sharing(tiny_model, strategy)
        shared = full_logits(tiny_model, ids)
        assert not torch.equal(shared, before)
        incremental_logits(tiny_model, ids, prefill=5)
        tiny_model.generate(ids, **gen_kwargs(do_sample=False))
        kvshare.disable_sharing(tiny_model)
        assert_pristine(tiny_model)
        assert torch.equal(full_logits(tiny_model, ids), before)
    kvshare.disable_sharing(tiny_model)  # a second disable is a no-op
    assert_pristine(tiny_model)


def test_disable_after_an_exception_inside_forward(tiny_llama):
    # a forward that raises half way (bad input) must not leave the tap on the cache or break the model
    ids = random_ids(1)
    before = full_logits(tiny_llama, ids)
    cache = DynamicCache(config=tiny_llama.config)
    with kvshare.sharing(tiny_llama, kvshare.Strategy(FIXED, NUM_LAYERS)):
        with pytest.raises(Exception):
            tiny_llama(input_ids=torch.full((1, 4), VOCAB + 5), cache=cache)  # out-of-vocabulary ids
        assert "update" not in cache.__dict__
    assert_pristine(tiny_llama)
    assert torch.equal(full_logits(tiny_llama, ids), before)


def test_enable_twice_and_nested_context(tiny_llama):
    ids = random_ids(1)
    a = kvshare.Strategy({3: 1}, NUM_LAYERS)
    b = kvshare.Strategy({2: 0, 4: 0}, NUM_LAYERS)
    with kvshare.sharing(tiny_llama, a):
        logits_a = full_logits(tiny_llama, ids)
    with kvshare.sharing(tiny_llama, b):
        logits_b = full_logits(tiny_llama, ids)
    plain = full_logits(tiny_llama, ids)

    kvshare.enable_sharing(tiny_llama, a)
    kvshare.enable_sharing(tiny_llama, b)  # replaces a: layer 3 is no longer replaced
    assert torch.equal(full_logits(tiny_llama, ids), logits_b)
    with kvshare.sharing(tiny_llama, a):  # the context restores b afterwards
        assert torch.equal(full_logits(tiny_llama, ids), logits_a)
    assert torch.equal(full_logits(tiny_llama, ids), logits_b)
    with kvshare.sharing(tiny_llama, None):  # None: no sharing inside, b again afterwards
        assert torch.equal(full_logits(tiny_llama, ids), plain)
    assert torch.equal(full_logits(tiny_llama, ids), logits_b)
    kvshare.disable_sharing(tiny_llama)
    assert_pristine(tiny_llama)
    assert torch.equal(full_logits(tiny_llama, ids), plain)


def test_enable_sharing_rejects_non_strategy(tiny_llama):
    with pytest.raises(TypeError, match="Strategy"):
        kvshare.enable_sharing(tiny_llama, {2: 1})
    assert_pristine(tiny_llama)


def test_bf16_model_shares_too():
    # dtype is not float32-specific: the shared path runs in the model's dtype
    model = make_tiny_model("qwen3", "sdpa").to(torch.bfloat16)
    ids = random_ids(1)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(model, strategy):
        full = full_logits(model, ids)
        inc, cache = incremental_logits(model, ids, prefill=5)
    assert full.dtype == torch.bfloat16
    assert max_diff_on(full.float(), inc.float()) <= 0.1  # bf16 rounding only
    for r in strategy.mapping:
        assert cache.layers[r].keys is None


# --------------------------------------------------------------------------------------------
# what sharing means, checked without kvshare's attention code
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kv_substituted(model, mapping):
    """Reference semantics on the *unshared* model: layer r's key/value projections (after qwen3's
    k_norm) output exactly what its source layer's produced in the same forward. RoPE uses the same
    positions in every layer, so r then attends over s's post-RoPE K/V."""
    recorded, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        key_module = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        for name, module in (("k", key_module), ("v", attn.v_proj)):

            def hook(mod, args, output, i=i, name=name):
                if i in mapping:
                    return recorded[(mapping[i], name)]
                recorded[(i, name)] = output

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def test_sharing_semantics_match_a_reference_without_kvshare(tiny_model):
    ids, mask = left_padded(pads=(0, 3, 6))
    for strategy in strategies():
        with kv_substituted(tiny_model, strategy.mapping):
            reference = full_logits(tiny_model, ids, mask, use_cache=False)
        with kvshare.sharing(tiny_model, strategy):
            shared = full_logits(tiny_model, ids, mask)
        assert max_diff_on(reference, shared, mask) <= TOL, f"{strategy}"


def test_output_attentions_and_hidden_states(tiny_llama):
    tiny_llama.set_attn_implementation("eager")
    ids = random_ids(2, length=10)
    with kvshare.sharing(tiny_llama, kvshare.Strategy(FIXED, NUM_LAYERS)), torch.no_grad():
        out = tiny_llama(ids, output_attentions=True, output_hidden_states=True)
        plain_out = tiny_llama(ids)
    assert torch.equal(out.logits, plain_out.logits)
    assert len(out.attentions) == NUM_LAYERS and len(out.hidden_states) == NUM_LAYERS + 1
    for a in out.attentions:  # replaced layers attend over their source's 10 positions too
        assert a.shape == (2, 4, 10, 10)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 10))


def test_switching_attention_implementation_while_shared(tiny_llama):
    # the shared layers look the implementation up at call time, like the model's own layers
    ids = random_ids(2)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_llama, strategy):
        sdpa = full_logits(tiny_llama, ids)
        tiny_llama.set_attn_implementation("eager")
        eager = full_logits(tiny_llama, ids)
    assert max_diff_on(sdpa, eager) <= TOL
    eager_model = make_tiny_model("llama", "eager")
    with kvshare.sharing(eager_model, strategy):
        assert torch.equal(full_logits(eager_model, ids), eager)


def test_bare_decoder_model():
    # enable_sharing also accepts the decoder stack itself (LlamaModel, no LM head)
    model = make_tiny_model("llama", "sdpa")
    ids = random_ids(1)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(model, strategy), torch.no_grad():
        via_lm = model.model(ids).last_hidden_state
    with kvshare.sharing(model.model, strategy), torch.no_grad():
        bare = model.model(ids)
    assert torch.equal(bare.last_hidden_state, via_lm)
    assert kvshare.cache_bytes(bare.cache) > 0
    assert all(bare.cache.layers[r].keys is None for r in strategy.mapping)
    assert_pristine(model)


def test_explicit_static_cache_decode_matches_full_forward(tiny_model):
    from transformers import StaticCache

    ids = random_ids(2)
    strategy = kvshare.Strategy(FIXED, NUM_LAYERS)
    with kvshare.sharing(tiny_model, strategy), torch.no_grad():
        full = full_logits(tiny_model, ids)
        cache = StaticCache(config=tiny_model.config, max_cache_len=32)
        steps = [tiny_model(ids[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, SEQ):
            steps.append(tiny_model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert max_diff_on(full, torch.cat(steps, 1)) <= TOL
    for r in strategy.mapping:  # no static buffer was allocated for replaced layers
        assert getattr(cache.layers[r], "keys", None) is None
