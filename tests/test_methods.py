"""The shared test matrix: every method of the registry (kvshare.methods.REGISTRY) goes through the same checks.

A method added to the registry runs here without a line of new test code (it only has to give
`examples(config)` and, where it has one, `identity(config, length)`):

- compresses nothing (its `identity` settings): the plain model, bit for bit, prefill and decoding;
- causal methods: token-by-token decoding gives the logits of one full forward;
- the bytes a real cache holds after a prefill and decode steps equal `predicted_cache_bytes`;
- composes with layer sharing in either order of the arguments, with one result;
- beam search runs (the cache reorders whatever state the method keeps);
- it pickles, its classes live in source files, and `to_dict` / `from_dict` round-trip;
- the registry refuses unknown names and settings with one line naming what exists.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model
from transformers import DynamicCache

import kvshare
from kvshare import methods
from kvshare.strategy import Strategy

PROMPT, TOTAL = 10, 16  # a prefill of 10 tokens, then 6 decode steps
ARCHS = ("llama", "mistral_sliding", "qwen3", "gemma3")  # plain, sliding window, per-head query norm, Gemma-3


def cases():
    config = make_tiny_model("llama").config
    out = []
    for name, cls in methods.REGISTRY.items():
        for i in range(len(cls.examples(config))):
            out.append(pytest.param(name, i, id=f"{name}-{i}"))
    return out


def example(name: str, index: int, model):
    return methods.get(name).examples(model.config)[index]


@torch.no_grad()
def run(model, ids, *applied, prompt=PROMPT, mask=None):
    """Prefill `prompt` tokens, then decode one token at a time; logits of every position, and the cache."""
    outs = []
    with kvshare.compression(model, *applied):
        cache = DynamicCache(config=model.config)
        kw = {kvshare.adapter.model_cache_kwarg(model): cache}
        for s, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, ids.shape[1])]:
            extra = {} if mask is None else {"attention_mask": mask[:, :e]}
            outs.append(model(ids[:, s:e], use_cache=True, **kw, **extra).logits)
    return torch.cat(outs, dim=1), cache


def ids_for(seed: int = 3, batch: int = 2):
    return torch.randint(3, 100, (batch, TOTAL), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------
def test_registry_lists_the_methods_and_refuses_unknown_ones():
    assert {"kvsharer", "streamingllm", "h2o", "pyramidinfer", "quantized"} <= set(methods.available())
    for name, cls in methods.REGISTRY.items():
        assert cls.name == name and issubclass(cls, methods.KVMethod) and cls.role in methods.ROLES
    with pytest.raises(ValueError, match="available: kvsharer"):
        methods.make("snapkv")
    with pytest.raises(ValueError, match="its settings: budget, recent_ratio"):
        methods.make("h2o", budget=8, window=4)
    with pytest.raises(ValueError, match="budget"):
        methods.make("h2o")  # a required setting missing: one line naming the settings


def test_one_method_per_role():
    with pytest.raises(ValueError, match="two eviction methods"):
        methods.Composition(methods.make("h2o", budget=8), methods.make("streamingllm", budget=8))
    with pytest.raises(TypeError, match="kvshare method"):
        methods.Composition("h2o")


# --------------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(methods.REGISTRY))
def test_compressing_nothing_is_the_plain_model_bit_for_bit(name, arch):
    model = make_tiny_model(arch, "sdpa")
    method = methods.get(name).identity(model.config, TOTAL)
    if method is None:
        pytest.skip(f"{name} has no setting that compresses nothing")
    ids = ids_for()
    plain, _ = run(model, ids)
    same, _ = run(model, ids, method)
    assert torch.equal(plain, same)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,index", cases())
def test_decoding_equals_a_full_forward_where_causal(name, index, arch):
    model = make_tiny_model(arch, "sdpa")
    method = example(name, index, model)
    if not method.causal:
        pytest.skip(f"{name} changes the cache after each forward: decoding is its semantics, not a full forward")
    ids = ids_for()
    stepwise, _ = run(model, ids, method)
    one_pass, _ = run(model, ids, method, prompt=TOTAL)
    err = (stepwise - one_pass).abs().max() / one_pass.abs().max()
    assert err <= method.causal_tolerance, err


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,index", cases())
def test_measured_bytes_equal_the_prediction(name, index, arch):
    model = make_tiny_model(arch, "sdpa")
    method = example(name, index, model)
    _, cache = run(model, ids_for(), method)
    predicted = kvshare.predicted_cache_bytes(model.config, method, 2, [PROMPT] + [1] * (TOTAL - PROMPT), 4)
    assert kvshare.cache_bytes(cache) == predicted
    plain_bytes = kvshare.predicted_cache_bytes(model.config, None, 2, [PROMPT] + [1] * (TOTAL - PROMPT), 4)
    assert predicted < plain_bytes  # an example really compresses


@pytest.mark.parametrize("name,index", cases())
def test_composes_with_sharing_in_either_order(name, index):
    model = make_tiny_model("llama", "sdpa")
    method = example(name, index, model)
    # the partner: layer sharing, or (for the sharing method itself) a quantized cache
    other = Strategy({3: 1, 5: 2}, NUM_LAYERS) if method.role != "sharing" else methods.make("quantized", bits=8)
    ids = ids_for()
    a, cache_a = run(model, ids, method, other)
    b, cache_b = run(model, ids, other, method)
    assert torch.equal(a, b)
    assert kvshare.cache_bytes(cache_a) == kvshare.cache_bytes(cache_b)
    combined = methods.Composition(method, other)
    predicted = kvshare.predicted_cache_bytes(model.config, combined, 2, [PROMPT] + [1] * (TOTAL - PROMPT), 4)
    assert kvshare.cache_bytes(cache_a) == predicted
    alone, _ = run(model, ids, method)
    assert not torch.equal(a, alone)  # the partner did something


@pytest.mark.parametrize("name,index", cases())
def test_beam_search_runs(name, index):
    model = make_tiny_model("llama", "sdpa")
    method = example(name, index, model)
    ids = ids_for()[:, :PROMPT]
    with kvshare.compression(model, method):
        out = model.generate(ids, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, PROMPT + 4)


@pytest.mark.parametrize("name,index", cases())
def test_pickles_round_trips_and_lives_in_source(name, index):
    model = make_tiny_model("llama", "sdpa")
    method = example(name, index, model)
    assert pickle.loads(pickle.dumps(method)) == method
    assert methods.from_dict(method.to_dict()) == method
    assert type(method).__module__.startswith("kvshare.methods.")
    combined = methods.Composition(method, Strategy({4: 2}, NUM_LAYERS) if method.role != "sharing" else None)
    assert pickle.loads(pickle.dumps(combined)) == combined
    with kvshare.compression(model, method):  # applied once: hooks are not part of the pickled state
        assert pickle.loads(pickle.dumps(method)) == method
    # the slots it builds are instances of classes defined in kvshare's source files
    layer = combined.make_layer(0, model.config)
    if layer is not None:
        assert type(layer).__module__.startswith("kvshare.methods.")
        assert type(layer).__module__ != "abc"


def test_left_padded_batch_rows_match_rows_alone_for_identity_settings():
    model = make_tiny_model("llama", "sdpa")
    ids = ids_for()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for name, cls in methods.REGISTRY.items():
        method = cls.identity(model.config, TOTAL)
        if method is None:
            continue
        plain, _ = run(model, ids, mask=mask)
        same, _ = run(model, ids, method, mask=mask)
        assert torch.equal(plain, same), name


# --------------------------------------------------------------------------------------------
# the command line reads the registry
# --------------------------------------------------------------------------------------------
def test_cli_method_flags(monkeypatch, capsys, char_tokenizer):
    import json

    import kvshare.cli as cli
    import kvshare.data

    model = make_tiny_model("llama", "sdpa")
    monkeypatch.setattr(cli, "_load", lambda args: (model, char_tokenizer))
    monkeypatch.setattr(
        kvshare.data, "eval_text", lambda source="offline": "the quick brown fox jumps over the lazy dog " * 4
    )
    base = ["ppl", "--window", "32", "--stride", "32", "--limit-tokens", "128"]
    assert cli.main([*base, "--method", "quantized", "--bits", "8"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["method"] == {"method": "quantized", "bits": 8, "group_size": 32}
    assert cli.main([*base, "--method", "h2o", "--budget", "100", "--context", "16"]) == 0  # decoded automatically
    assert "decode" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"]
    for bad, says in (
        (["--method", "snapkv"], "available: kvsharer"),
        (["--bits", "4"], "--bits is a setting of quantized"),
        (["--method", "h2o"], "budget"),
        (["--method", "h2o,streamingllm", "--budget", "8"], "two eviction methods"),
        (["--method", "kvsharer"], "--strategy FILE"),
    ):
        assert cli.main([*base, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (bad, err)
