"""A static cache with sharing: the replaced layers' slots allocate nothing (bytes (L - C) / L of plain) and decoding
equals the dynamic cache's; `--compile` is wired to transformers' compiled call and refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model
from transformers import DynamicCache, StaticCache

import kvshare
from kvshare import bench as B
from kvshare.accounting import cache_bytes
from kvshare.adapter import model_cache_kwarg
from kvshare.strategy import Strategy


@torch.no_grad()
def greedy(model, ids, new_tokens, cache):
    kw = {model_cache_kwarg(model): cache}
    logits = model(input_ids=ids, use_cache=True, **kw).logits[:, -1:]
    steps = [logits]
    for _ in range(new_tokens - 1):
        logits = model(input_ids=logits.argmax(-1), use_cache=True, **kw).logits[:, -1:]
        steps.append(logits)
    logits = torch.cat(steps, 1)
    return logits.argmax(-1), logits, cache


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral_sliding"])
def test_static_cache_shared_decoding_equals_dynamic(arch):
    model = make_tiny_model(arch, "sdpa")
    strategy = Strategy({2: 1, 4: 1, 5: 3}, NUM_LAYERS)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    new = 6
    with kvshare.sharing(model, strategy):
        tok_d, logits_d, _ = greedy(model, ids, new, DynamicCache(config=model.config))
        tok_s, logits_s, cache_s = greedy(model, ids, new, StaticCache(config=model.config, max_cache_len=12 + new))
    assert torch.equal(tok_d, tok_s)
    torch.testing.assert_close(logits_s, logits_d, rtol=1e-4, atol=1e-4)
    _, _, plain = greedy(model, ids, new, StaticCache(config=model.config, max_cache_len=12 + new))
    L, C = NUM_LAYERS, strategy.num_shared
    assert cache_bytes(cache_s) * L == cache_bytes(plain) * (L - C)  # replaced slots allocate nothing
    for r in strategy.mapping:
        assert cache_s.layers[r].keys is None


def test_bench_static_rows_keep_exact_bytes(tiny_dir):
    rows = B.bench(
        tiny_dir,
        rates=(0.25, 0.5),
        batches=(1,),
        prompt_len=5,
        new_tokens=3,
        cache="static",
        random_weights=True,
        repeats=1,
        warmup=0,
        isolate=False,
        progress=False,
    )
    for r in rows:
        assert r["cache"] == "static" and r["kv_bytes_ratio"] == pytest.approx((8 - r["num_shared"]) / 8)


def test_compile_is_refused_where_transformers_does_not_compile(tiny_dir):
    with pytest.raises(ValueError, match="--cache static"):
        B.bench(tiny_dir, rates=(0.25,), batches=(1,), cache="dynamic", compile=True, random_weights=True)
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    B.check_compile(model, "static")  # Llama: transformers compiles it
    model._can_compile_fullgraph = False  # as for a model transformers does not compile
    with pytest.raises(ValueError, match="does not support torch.compile"):
        B.check_compile(model, "static")


def test_compile_wraps_the_decode_steps(tiny_dir, monkeypatch):
    """The decode steps go through transformers' compiled call (torch.compile mocked: compiling is minutes here);
    the prefill does not, as in generate."""
    compiled = []

    def fake_compile(fn, **options):
        def call(*args, **kwargs):
            compiled.append(kwargs["input_ids"].shape[1])
            return fn(*args, **kwargs)

        compiled.append(options)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    for mode in ("plain", "shared"):
        compiled.clear()
        row = B.measure(
            B.Config(tiny_dir, mode, 0.25, 1, 5, 3, "static", True, repeats=1, warmup=1, compile=True), model
        )
        assert row["compile"] is True and "compile_graph_breaks" in row
        options = [c for c in compiled if isinstance(c, dict)]
        assert options and options[0]["fullgraph"] is False and options[0]["dynamic"] is False
        assert set(c for c in compiled if isinstance(c, int)) == {1}  # decode steps only, one token each
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
