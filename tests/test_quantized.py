"""Quantized runs: the KV quantizer, the quantized cache alone and with sharing, GPTQ weights.

- the quantize-dequantize error is within its documented bound (half a step of the element's group)
  on random data, for int8 / int4 / int2, and int4 really packs two codes per byte;
- the quantized cache is causal: one prefill and token-by-token decoding give the same logits;
- C = 0 sharing with a quantized cache equals the quantized cache alone, bit for bit;
- with real sharing a replaced layer reads exactly its source's dequantized slot, and the cache's
  bytes are what the two predict together: (L - C) layers of quantized tokens;
- GPTQ: the embedded default quantized with GPTQModel loads through transformers and scores close to
  the unquantized model (runs only where gptqmodel is installed; skipped with the reason otherwise).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import ARCHITECTURES, NUM_LAYERS, make_tiny_model

import kvshare
from kvshare.methods import Composition, make
from kvshare.methods.quantized import (
    QuantizedKV,
    QuantizedKVLayer,
    dequantize,
    error_bound,
    plain_cache_bytes,
    quantize,
)
from kvshare.strategy import Strategy

sharing_mod = importlib.import_module("kvshare.sharing")  # the module (kvshare.sharing is also a function)


@torch.no_grad()
def run(model, ids, method=None, strategy=None, prompt=None, cache=None):
    """Prefill `prompt` tokens, then decode the rest one at a time; logits of every position."""
    T = ids.shape[1]
    prompt = T if prompt is None else prompt
    outs = []
    with kvshare.compression(model, strategy, method):
        cache = cache if cache is not None else (method.make_cache(model.config) if method is not None else None)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        for s, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
            outs.append(model(input_ids=ids[:, s:e], cache=cache, use_cache=True).logits)
    return torch.cat(outs, 1), cache


# --------------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_error_within_bound(bits, group_size, dtype):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    # heavy-tailed, shifted data with an outlier channel: the bound must hold per group, not on average
    x = torch.randn(3, 4, 17, 64, generator=gen, dtype=dtype) ** 3 + 0.5
    x[..., 5] *= 40
    q = quantize(x, bits, group_size)
    err = (dequantize(q) - x).abs()
    bound = error_bound(x, bits, group_size)
    eps = torch.finfo(dtype).eps * 4 * x.abs().amax()  # the rounding of q * scale + zero in the dtype
    assert torch.all(err <= bound + eps), (err - bound).max()
    # the bound is tight: the worst element of a group is near half a step, not far below it
    assert (err / bound.clamp_min(1e-30)).max() > 0.4
    # storage: codes packed 8 // bits per byte, one scale and one zero per group
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (3, 4, 17, 64 * bits // 8)
    assert q.scale.shape == q.zero.shape == (3, 4, 17, 64 // group_size)
    assert q.nbytes() == 3 * 4 * 17 * (64 * bits // 8 + 2 * (64 // group_size) * x.element_size())


def test_quantizer_edge_cases():
    x = torch.full((1, 1, 3, 8), 2.5)  # constant groups are exact
    assert torch.equal(dequantize(quantize(x, 4, 8)), x)
    y = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 15.0]])  # on the int4 grid: exact
    assert torch.equal(dequantize(quantize(y, 4, 8)), y)
    with pytest.raises(ValueError, match="bits"):
        quantize(x, 3, 8)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(x, 8, 3)
    with pytest.raises(ValueError, match="bits"):
        QuantizedKV(bits=5)
    from kvshare.experiments.quantized import kv_method

    assert kv_method(None) is None and kv_method(4).bits == 4


def test_int8_is_closer_than_int4():
    x = torch.randn(2, 2, 50, 64, generator=torch.Generator().manual_seed(0))
    e8 = (dequantize(quantize(x, 8, 32)) - x).abs().mean()
    e4 = (dequantize(quantize(x, 4, 32)) - x).abs().mean()
    assert e8 * 10 < e4


# --------------------------------------------------------------------------------------------
# the quantized cache
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_is_causal_and_close(arch, bits):
    """One prefill == token-by-token decoding (the codes of a token depend on that token only);
    int8 stays close to the unquantized model (masks, sliding windows and GQA handled)."""
    model = make_tiny_model(arch, "sdpa")
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    method = QuantizedKV(bits=bits, group_size=8)
    one_pass, c1 = run(model, ids, method)
    stepwise, c2 = run(model, ids, method, prompt=6)
    # the same codes either way; float noise between a batched and a one-token projection can move a
    # value across a rounding boundary, so a rare code of layer 0 differs by one step (and deeper
    # layers then see slightly different inputs)
    a, b = c1.layers[0], c2.layers[0]
    for qa, qb in ((a.qkeys, b.qkeys), (a.qvalues, b.qvalues)):
        assert (qa.packed != qb.packed).float().mean() < 0.01
    assert (stepwise - one_pass).abs().max() / one_pass.abs().max() < 5e-3
    assert all(isinstance(layer, QuantizedKVLayer) for layer in c1.layers)
    assert (
        kvshare.cache_bytes(c1)
        == kvshare.cache_bytes(c2)
        == kvshare.predicted_cache_bytes(model.config, method, 2, [20], 4)
    )
    full, plain = run(model, ids)
    assert kvshare.cache_bytes(plain) == plain_cache_bytes(model.config, None, 2, 20, 4)
    if bits == 8:
        rel = (one_pass - full).abs().max() / full.abs().max()
        assert rel < 0.02, rel
    # bytes per element: bits / 8 for the code plus two float32 numbers per group of 8 channels
    assert kvshare.cache_bytes(c1) / kvshare.cache_bytes(plain) == method.compression_ratio(16, 4) == (bits / 8 + 1) / 4


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("bits", [8, 4])
def test_c0_sharing_with_quantized_cache_is_the_quantized_cache_alone(impl, bits):
    model = make_tiny_model("llama", impl)
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(2))
    method = QuantizedKV(bits=bits, group_size=16)
    # alone: the quantized cache handed to the untouched model, no kvshare hooks at all
    with torch.no_grad():
        cache = method.make_cache(model.config)
        alone = [model(input_ids=ids[:, :10], cache=cache, use_cache=True).logits]
        for t in range(10, 18):
            alone.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    alone = torch.cat(alone, 1)
    c0, c0_cache = run(model, ids, method, Strategy({}, NUM_LAYERS), prompt=10, cache=None)
    assert torch.equal(c0, alone)
    assert kvshare.cache_bytes(c0_cache) == kvshare.cache_bytes(cache)
    # and through a fresh DynamicCache, whose slots prepare_cache turns into method slots
    from transformers import DynamicCache

    fresh, fresh_cache = run(
        model, ids, method, Strategy({}, NUM_LAYERS), prompt=10, cache=DynamicCache(config=model.config)
    )
    assert torch.equal(fresh, alone)
    assert all(isinstance(layer, QuantizedKVLayer) for layer in fresh_cache.layers)


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "qwen3"])
@pytest.mark.parametrize("bits", [8, 4])
def test_replaced_layer_reads_its_sources_quantized_slot(arch, bits, monkeypatch):
    model = make_tiny_model(arch, "sdpa")
    strategy = Strategy({2: 0, 4: 1, 5: 3}, NUM_LAYERS)
    method = QuantizedKV(bits=bits, group_size=8)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    seen = []
    original = sharing_mod.source_kv

    def spy(cache, source):
        k, v = original(cache, source)
        layer = cache.layers[source]
        # the slot's stored codes, dequantized, are exactly what the replaced layer attends over
        # (a sliding slot may already have dropped its oldest tokens: compare the tail)
        dk, dv = layer.storage.read(layer.keys.dtype)
        n = dk.shape[-2]
        seen.append((source, torch.equal(k[..., -n:, :], dk) and torch.equal(v[..., -n:, :], dv), k.shape[-2]))
        return k, v

    monkeypatch.setattr(sharing_mod, "source_kv", spy)
    _, cache = run(model, ids, method, strategy, prompt=9)
    assert seen and all(ok for _, ok, _ in seen)
    assert {s for s, _, _ in seen} == set(strategy.mapping.values())
    # replaced slots hold nothing; bytes are what sharing and quantization predict together
    for r in strategy.mapping:
        assert sharing_mod.layer_bytes(cache.layers[r]) == 0
    L, C = NUM_LAYERS, strategy.num_shared
    alone_bytes = kvshare.predicted_cache_bytes(model.config, method, 2, [16], 4)
    together = kvshare.predicted_cache_bytes(model.config, method, 2, [16], 4, strategy=strategy)
    assert kvshare.cache_bytes(cache) == together
    if arch != "mistral_sliding":
        assert together * L == alone_bytes * (L - C)


def test_quantized_sharing_differs_from_plain_sharing_and_is_close():
    model = make_tiny_model("llama", "sdpa")
    strategy = Strategy({3: 1, 5: 2}, NUM_LAYERS)
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(4))
    shared, _ = run(model, ids, None, strategy)
    q8, _ = run(model, ids, QuantizedKV(8, 16), strategy)
    assert not torch.equal(shared, q8)
    assert (q8 - shared).abs().max() / shared.abs().max() < 0.02


def test_generate_with_quantized_sharing():
    model = make_tiny_model("llama", "sdpa")
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    with kvshare.compression(model, Strategy({4: 2}, NUM_LAYERS), QuantizedKV(4, 16)):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)


def test_perplexity_with_quantized_cache(char_tokenizer):
    from kvshare.metrics import perplexity

    model = make_tiny_model("llama", "sdpa")
    text = "the quick brown fox jumps over the lazy dog " * 4
    full = perplexity(model, char_tokenizer, text, window=32, stride=32)
    with kvshare.compression(model, None, QuantizedKV(8, 16)):
        q8 = perplexity(model, char_tokenizer, text, window=32, stride=32)
    with kvshare.compression(model, None, QuantizedKV(2, 16)):
        q2 = perplexity(model, char_tokenizer, text, window=32, stride=32)
    assert q8 != full and abs(q8 - full) / full < 0.02
    assert abs(q2 - full) > abs(q8 - full)


# --------------------------------------------------------------------------------------------
# GPTQ weights
# --------------------------------------------------------------------------------------------
def _gptq_skip_reason():
    from kvshare.gptq import gptq_status, is_ready

    ok, reason = gptq_status()
    if not ok:
        return f"GPTQ backend unavailable: {reason}"
    if not is_ready("smollm2-135m-gptq"):
        return (
            "the GPTQ checkpoint is not made yet (quantizing takes ~5-10 min on 2 CPU cores): run "
            "`python -c \"import kvshare; kvshare.load_model('smollm2-135m-gptq')\"` once"
        )
    return None


def test_gptq_status_reports():
    from kvshare.gptq import GPTQ_MODELS, gptq_status

    ok, reason = gptq_status()
    assert isinstance(ok, bool) and reason
    assert GPTQ_MODELS["smollm2-135m-gptq"]["bits"] == 4 and GPTQ_MODELS["smollm2-135m-gptq"]["group_size"] == 128


@pytest.mark.real_model
def test_gptq_default_model_loads_through_transformers_and_scores():
    reason = _gptq_skip_reason()
    if reason:
        pytest.skip(reason)
    from kvshare.gptq import gptq_config_of, is_gptq_model, quantized_dir, weight_bytes
    from kvshare.metrics import perplexity

    model, tokenizer = kvshare.load_model("smollm2-135m-gptq", device="cpu")
    assert is_gptq_model(model)
    qc = gptq_config_of(quantized_dir("smollm2-135m-gptq"))
    assert qc["bits"] == 4 and qc["group_size"] == 128
    proj = model.model.layers[0].self_attn.q_proj
    assert not isinstance(proj, torch.nn.Linear)  # a GPTQ kernel module, packed int32 codes
    assert any(b.dtype == torch.int32 for b in proj.buffers())
    base, _ = kvshare.load_model("smollm2-135m", device="cpu")
    assert weight_bytes(model) < 0.5 * weight_bytes(base)
    text = kvshare.eval_text()
    p_gptq = perplexity(model, tokenizer, text, max_tokens=512)
    p_base = perplexity(base, tokenizer, text, max_tokens=512)
    assert p_base < p_gptq < 2.0 * p_base
    # sharing and a quantized KV cache compose with GPTQ weights
    with kvshare.compression(model, Strategy({29: 28}, 30), QuantizedKV(8)):
        p_both = perplexity(model, tokenizer, text, max_tokens=512)
    assert abs(p_both - p_gptq) / p_gptq < 0.2


# --------------------------------------------------------------------------------------------
# the benchmark and the command line
# --------------------------------------------------------------------------------------------
def test_bench_measures_quantized_sharing_bytes():
    from kvshare.bench import Config, add_ratios, measure

    def q(bits):
        return make("quantized", bits=bits).to_dict()

    model = make_tiny_model("llama", "sdpa")
    common = dict(model="tiny", batch=2, prompt_len=12, new_tokens=3, repeats=1, warmup=1)
    plain = measure(Config(mode="plain", rate=0.0, **common), model)
    rows = [plain]
    for bits in (8, 4):
        row = measure(Config(mode="shared", rate=2 / NUM_LAYERS, method=q(bits), **common), model)
        assert row["num_shared"] == 2 and row["method"]["bits"] == bits
        assert row["kv_bytes"] == row["kv_bytes_predicted"]
        rows.append(row)
    add_ratios(rows)
    for row in rows[1:]:
        ratio = QuantizedKV(row["method"]["bits"]).compression_ratio(16, 4) * (NUM_LAYERS - 2) / NUM_LAYERS
        assert row["kv_bytes_expected_ratio"] == pytest.approx(ratio)
        assert row["kv_bytes_ratio"] == pytest.approx(ratio)
    # eviction and quantization together: the eviction method's kept tokens at the quantizer's bytes per token
    h2o8 = Composition(make("h2o", budget=4), make("quantized", bits=8)).to_dict()
    both = measure(Config(mode="shared", rate=2 / NUM_LAYERS, method=h2o8, **common), model)
    assert both["kv_bytes"] == both["kv_bytes_predicted"]
    per_token = QuantizedKV(8).token_bytes(2, 16, 4)  # tiny llama: 2 KV heads of 16 channels, float32
    assert both["kv_bytes"] == 2 * (NUM_LAYERS - 2) * 4 * per_token  # batch 2, 4 tokens kept in each kept layer
    with pytest.raises(ValueError, match="dynamic cache"):
        measure(Config(mode="shared", rate=0.0, method=q(8), cache="static", **common), model)


def test_cli_ppl_with_the_quantized_cache(cli_ppl):
    import kvshare.cli as cli

    ppl = cli_ppl
    q = ("--method", "quantized", "--bits")
    full, q8, q4 = (ppl("--stride", "32", *kv) for kv in ((), (*q, "8"), (*q, "4")))
    assert full["tokens"] == q8["tokens"] == q4["tokens"]
    assert q8["method"] == {"method": "quantized", "bits": 8, "group_size": 32} and "method" not in full
    assert full["ppl"] != q8["ppl"] and abs(q8["ppl"] - full["ppl"]) < abs(q4["ppl"] - full["ppl"])
    decoded = ppl(*q, "8", "--decode", "--context", "16")
    assert decoded["method"]["bits"] == 8 and decoded["tokens"] == 4 * 15
    both = ppl("--method", "h2o,quantized", "--bits", "8", "--budget", "8", "--context", "16")  # scored by decoding
    evicted = ppl("--method", "h2o", "--budget", "8", "--context", "16")
    assert both["method"]["method"] == "h2o+quantized" and both["tokens"] == evicted["tokens"] == 4 * 15
    assert both["ppl"] != evicted["ppl"] and abs(both["ppl"] - evicted["ppl"]) / evicted["ppl"] < 0.1
    assert cli.main(["ppl", *q, "3"]) == 2  # 2, 4 or 8 bits


# --------------------------------------------------------------------------------------------
# notebook 06's table logic (kvshare.experiments.quantized, its report) on made-up rows
# --------------------------------------------------------------------------------------------
def _rows():
    rows = []
    for w, base in (("fp32 weights", 2.0), ("GPTQ 4-bit weights", 2.2)):
        for c in (0, 4):
            for bits, extra in ((None, 0.0), (8, 0.001), (4, 0.05)):
                nll = base + 0.3 * c / 4 + extra
                q = 1.0 if bits is None else QuantizedKV(bits).compression_ratio(64, 4)
                kv = int(1000 * (30 - c) / 30 * q)
                rows.append(
                    {
                        "weights": w,
                        "model": "m",
                        "num_shared": c,
                        "num_layers": 30,
                        "kv_bits": bits,
                        "kv": {None: "unquantized", 8: "int8", 4: "int4"}[bits],
                        "kv_quant_ratio": q,
                        "weight_bytes": 100,
                        "ppl": float(torch.tensor(nll).exp()),
                        "ppl_se": 0.1,
                        "window_nll": [nll - 0.01, nll + 0.01, nll],
                        "kv_bytes": kv,
                        "kv_bytes_predicted": kv,
                        "decode_tps": 10.0,
                        "prefill_s": 1.0,
                        "tokens": 100,
                        "windows": 3,
                    }
                )
    return rows


def test_quantized_runs_tables_and_conclusion():
    from kvshare.experiments import quantized as qr
    from kvshare.experiments.reports import quantized as report

    rows = qr.add_ratios(_rows())
    r = next(r for r in rows if r["weights"] == "fp32 weights" and r["num_shared"] == 4 and r["kv_bits"] == 4)
    assert r["ppl_ratio"] == pytest.approx(float(torch.tensor(0.35).exp()))
    assert r["kv_ratio_predicted"] == pytest.approx(26 / 30 * 0.1875)  # int4, groups of 32 float32 channels
    assert r["nll_diff"] == pytest.approx(0.35)
    wide = qr.wide_table(rows)
    assert len(wide) == 6 and set(wide[0]) == {"weights", "kv cache", "C=0", "C=4"}
    md = report.wide_markdown(rows, [0, 4])
    assert "8.61" in md and "10.40" in md
    assert report.markdown_table(rows).count("\n") == len(rows) + 1
    text = report.conclusion(rows, [], "m")
    assert "rises with C" in text and "K/V bytes equal" in text and "GPTQ weights" in text
    assert "a slice of the shared held-out protocol" in text  # 3 windows: a quick-mode slice
    full = [dict(r, windows=33, tokens=16_383) for r in rows]  # what the full run scores: 32 x 511 + 31
    slice_ = [dict(r, windows=32, tokens=32 * 511) for r in rows]  # 16,352 tokens: short of the protocol
    assert "a slice of the shared held-out protocol" in report.protocol_line(slice_)
    assert "the shared held-out protocol (16,384 held-out" in report.protocol_line(full)
    assert f"perplexity {rows[0]['ppl']:.2f}" in report.protocol_line(full)  # the full model's baseline
    rows[0]["kv_bytes"] += 1
    assert "differ from the prediction" in report.conclusion(rows, [], "m")
    fig = report.figure(rows)
    assert len(fig.axes) == 2


def test_quantized_runs_settings_and_eval_prefix(char_tokenizer):
    from kvshare.experiments import quantized as qr

    cfg = qr.settings("smollm2-135m", quick=True, gptq="skip")
    assert cfg.num_shared == [0, 4] and cfg.kv_bits == [None, 8, 4]
    sets, notes = qr.weight_sets(cfg)
    assert sets == [("fp32 weights", "smollm2-135m")] and "skipped" in notes[0]
    full = qr.settings("x", quick=False)
    assert full.num_shared == [0, 4, 8, 12]
    assert (full.eval_tokens, full.window) == (16384, 512)  # the shared held-out protocol, kvshare.metrics.HELDOUT
    with pytest.raises(ValueError):
        qr.settings("x", quick=False, gptq="maybe")
    with pytest.raises(ValueError):
        qr.settings("x", quick=False, nope=1)
    text = "\n\n".join(f"paragraph {i} " + "word " * 5 for i in range(200))
    prefix = qr.eval_prefix(char_tokenizer, text, 300)
    ids = char_tokenizer(prefix)["input_ids"]
    assert len(ids) > 300 and ids[:300] == char_tokenizer(text)["input_ids"][:300] and len(prefix) < len(text)


# --------------------------------------------------------------------------------------------
# token eviction x KV quantization (x sharing)
# --------------------------------------------------------------------------------------------
EVICTION = ["streamingllm", "h2o", "pyramidinfer"]


@pytest.mark.parametrize("name", EVICTION)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_quantized_eviction_with_a_budget_above_the_length_is_the_quantized_cache(name, impl):
    from kvshare.methods.quantized import quantized

    model = make_tiny_model("llama", impl)
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(6))
    for strategy in (None, Strategy({3: 1, 5: 2}, NUM_LAYERS)):
        alone, alone_cache = run(model, ids, QuantizedKV(bits=4, group_size=16), strategy, prompt=10)
        combined = quantized(make(name, budget=1000), bits=4, group_size=16)
        both, both_cache = run(
            model,
            ids,
            combined,
            strategy,
            prompt=10,
            cache=__import__("transformers").DynamicCache(config=model.config),
        )
        assert torch.equal(both, alone)  # per-token codes: the same codes, the same attention
        assert kvshare.cache_bytes(both_cache) == kvshare.cache_bytes(alone_cache)


@pytest.mark.parametrize("name", EVICTION)
def test_quantized_eviction_keeps_the_eviction_methods_tokens_as_codes(name):
    from transformers import DynamicCache

    from kvshare.methods.quantized import quantized

    model = make_tiny_model("llama", "sdpa")
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(7))
    strategy = Strategy({3: 1, 5: 2}, NUM_LAYERS)
    eviction = make(name, budget=8)
    combined = quantized(make(name, budget=8), bits=8, group_size=16)
    assert combined.to_dict()["method"] == f"{name}+quantized"
    assert combined.member("storage").bits == 8 and combined.member("eviction").budget == 8
    evicted, evicted_cache = run(model, ids, eviction, strategy, prompt=12, cache=DynamicCache(config=model.config))
    both, both_cache = run(model, ids, combined, strategy, prompt=12, cache=DynamicCache(config=model.config))
    lengths = [12] + [1] * 12
    elem = 4
    predicted = kvshare.predicted_cache_bytes
    assert kvshare.cache_bytes(both_cache) == predicted(model.config, combined, 2, lengths, elem, strategy=strategy)
    assert kvshare.cache_bytes(evicted_cache) == predicted(model.config, eviction, 2, lengths, elem, strategy=strategy)
    ratio = combined.member("storage").token_bytes(1, 16, elem) / (2 * 16 * elem)
    assert kvshare.cache_bytes(both_cache) == pytest.approx(kvshare.cache_bytes(evicted_cache) * ratio)
    for i, layer in enumerate(both_cache.layers):
        if i in strategy.mapping:
            continue
        assert layer.keys.numel() == 0 and layer.storage.qkeys.packed.dtype == torch.uint8  # codes, no full tensors
        ref = evicted_cache.layers[i]
        assert layer.held() == ref.held()
        if name == "streamingllm":  # selection by position only: the very same tokens are kept
            assert torch.equal(layer.positions, ref.positions)
    assert (both - evicted).abs().max() / evicted.abs().max() < 0.05  # int8: close to the unquantized eviction
    with kvshare.compression(model, strategy, combined):  # beams reorder the codes with the rest of the state
        out = model.generate(ids[:, :12], max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)


def test_quantized_eviction_rejects_what_it_cannot_combine():
    from kvshare.methods.quantized import quantized_eviction

    with pytest.raises(TypeError, match="eviction method"):
        quantized_eviction(QuantizedKV(8), QuantizedKV(4))
    with pytest.raises(TypeError, match="QuantizedKV"):
        quantized_eviction(make("h2o", budget=8), 4)


@pytest.mark.parametrize("bits", [None, 8])
def test_quantized_runs_cost_cell_bytes_are_the_prediction(bits):
    """Notebook 06's cost cell: the bytes it measures are the bytes the accounting predicts."""
    from kvshare.experiments import quantized as qr

    model = make_tiny_model("llama", "sdpa")
    cfg = qr.settings("tiny", quick=True, bench_prompt=8, bench_new_tokens=3, bench_repeats=1)
    method = None if bits is None else QuantizedKV(bits=bits, group_size=16)
    for strategy in (None, Strategy({3: 1, 5: 2}, NUM_LAYERS)):
        cell = qr.cost_cell(model, strategy, method, cfg)
        assert cell["kv_bytes"] == cell["kv_bytes_predicted"]
