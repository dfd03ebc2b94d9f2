"""The cross-layer peers beside the shared matrix (tests/test_methods.py): SimLayerKV and MiniCache.

For each, a hand-checkable case of its rule (which layers are lazy; which tokens stay unmerged and what a
merged token reads back as), bytes predicted = measured where the prediction depends on the data, left-padded
batches whose rows match the rows alone, and the settings that are exactly the full model.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model
from test_methods import PROMPT, TOTAL, ids_for, run

import kvshare
from kvshare import methods
from kvshare.methods.minicache import MergedPair, MiniCacheSettings, pairs, retained_count, slerp
from kvshare.methods.simlayerkv import SimLayerKVLayer, SimLayerKVSettings
from kvshare.strategy import Strategy

LENGTHS = [PROMPT] + [1] * (TOTAL - PROMPT)


# --------------------------------------------------------------------------------------------
# SimLayerKV
# --------------------------------------------------------------------------------------------
def _slot(threshold: float, batch: int = 2, held: int = 12):
    """A SimLayerKV slot holding `held` tokens of a tiny llama layer (sink 2, recent 3, last 2 queries decide)."""
    config = make_tiny_model("llama").config
    settings = SimLayerKVSettings(threshold=threshold, sink=2, recent=3, query_window=2)
    record: dict = {}
    slot = SimLayerKVLayer(settings, 0, config, budget=settings.budget, record=record)
    slot.num_key_value_groups, slot.num_kv_heads = 2, 2
    keys = torch.randn(batch, 2, held, 16, generator=torch.Generator().manual_seed(0))
    slot.update(keys, keys.clone())
    return slot, record


def _weights(rows: list[str], held: int = 12, heads: int = 4, q: int = 12) -> torch.Tensor:
    """Attention probabilities [batch, heads, q, held]: 'edges' puts every query's weight on tokens 0, 1 (sink)
    and 9, 10, 11 (recent); 'uniform' spreads it evenly."""
    out = torch.zeros(len(rows), heads, q, held)
    for b, kind in enumerate(rows):
        if kind == "edges":
            out[b, :, :, [0, 1, 9, 10, 11]] = 0.2
        else:
            out[b] = 1.0 / held
    return out


def test_simlayerkv_lazy_rule_by_hand():
    # row 0: all attention on sink + recent (share 1) -> lazy; row 1: uniform, share 5/12 < 0.5 -> not lazy
    slot, record = _slot(threshold=0.5)
    slot.end(weights=_weights(["edges", "uniform"]), scaling=1.0)
    assert slot.lazy.tolist() == [True, False]
    assert slot.share.tolist() == pytest.approx([1.0, 5 / 12])
    assert record[0] == {"lazy": [True, False], "share": pytest.approx([1.0, 5 / 12])}
    # a batch with a non-lazy row keeps every token stored; the lazy row no longer sees tokens 2..8
    assert slot.held() == 12
    assert slot.hidden[0, 0].tolist() == [False, False] + [True] * 7 + [False] * 3
    assert not slot.hidden[1].any()
    # the threshold is a share: 5/12 >= 0.4 makes row 1 lazy too, and then tokens are really dropped
    slot, _ = _slot(threshold=0.4)
    slot.end(weights=_weights(["edges", "uniform"]), scaling=1.0)
    assert slot.lazy.tolist() == [True, True]
    assert slot.held() == 5 and slot.hidden is None
    assert slot.positions[:, 0].tolist() == [[0, 1, 9, 10, 11]] * 2


def test_simlayerkv_shares_are_the_models_own_attention():
    """The share each slot computes equals the one read off the model's own attention probabilities (eager)."""
    model = make_tiny_model("llama", "eager")
    method = methods.make("simlayerkv", threshold=0.5, sink=2, recent=3, query_window=4)
    ids = ids_for()[:, :PROMPT]
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
        with kvshare.compression(model, method):
            model(ids, use_cache=True)
    for layer, probs in enumerate(attentions):  # [batch, heads, q, keys]
        last = probs[:, :, -4:, :]
        share = (last[..., :2].sum(-1) + last[..., -3:].sum(-1)).mean(dim=(1, 2))
        assert method.decisions[layer]["share"] == pytest.approx(share.tolist(), abs=1e-5)
        assert method.decisions[layer]["lazy"] == (share >= 0.5).tolist()


def _lazy_mix_threshold(model, ids, **settings):
    """A threshold between the smallest and the largest layer share on `ids` (so some layers are lazy, some not)."""
    probe = methods.make("simlayerkv", threshold=0.5, **settings)
    run(model, ids, probe)
    shares = sorted(min(d["share"]) for d in probe.decisions.values())
    return (shares[len(shares) // 2 - 1] + shares[len(shares) // 2]) / 2


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "qwen3"])
def test_simlayerkv_bytes_equal_the_prediction_for_the_decided_layers(arch):
    model = make_tiny_model(arch, "sdpa")
    ids = ids_for(batch=1)
    settings = dict(sink=1, recent=3, query_window=3)
    method = methods.make("simlayerkv", threshold=_lazy_mix_threshold(model, ids, **settings), **settings)
    with pytest.raises(ValueError, match="depends on the data"):
        kvshare.predicted_cache_bytes(model.config, method, 1, LENGTHS, 4)
    _, cache = run(model, ids, method)
    assert 0 < len(method.lazy_layers) < NUM_LAYERS
    predicted = kvshare.predicted_cache_bytes(model.config, method, 1, LENGTHS, 4)
    assert kvshare.cache_bytes(cache) == predicted < kvshare.predicted_cache_bytes(model.config, None, 1, LENGTHS, 4)
    for i in range(NUM_LAYERS):
        assert (cache.layers[i].held() < min(TOTAL, 7)) == (i in method.lazy_layers)


def _padded(pad: int = 3):
    ids = ids_for()
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _rows_alone(model, method_factory, pad: int = 3):
    ids, mask = _padded(pad)
    batch, _ = run(model, ids, method_factory(), mask=mask)
    alone0, _ = run(model, ids[:1, pad:], method_factory(), prompt=PROMPT - pad)
    alone1, _ = run(model, ids[1:], method_factory())
    return batch, alone0, alone1, pad


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_simlayerkv_left_padded_rows_match_rows_alone(arch):
    model = make_tiny_model(arch, "sdpa")
    settings = dict(sink=1, recent=3, query_window=3)
    ids, mask = _padded()
    # a threshold between the two rows' shares of the layer where they differ most: lazy for one row only
    probe = methods.make("simlayerkv", threshold=0.5, **settings)
    run(model, ids, probe, mask=mask)
    layer = max(probe.decisions, key=lambda i: abs(probe.decisions[i]["share"][0] - probe.decisions[i]["share"][1]))
    threshold = sum(probe.decisions[layer]["share"]) / 2
    method = methods.make("simlayerkv", threshold=threshold, **settings)
    batch, _ = run(model, ids, method, mask=mask)
    assert sorted(method.decisions[layer]["lazy"]) == [False, True]  # the mixed case: hidden, not dropped
    alone0, _ = run(model, ids[:1, 3:], method, prompt=PROMPT - 3)
    alone1, _ = run(model, ids[1:], method)
    torch.testing.assert_close(batch[0, 3:], alone0[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch[1], alone1[0], rtol=1e-4, atol=1e-4)


def test_simlayerkv_threshold_above_one_is_the_full_model_and_zero_makes_every_layer_lazy():
    model = make_tiny_model("llama", "sdpa")
    ids = ids_for()
    plain, _ = run(model, ids)
    same, _ = run(model, ids, methods.make("simlayerkv", threshold=1.01, recent=2))
    assert torch.equal(plain, same)
    every = methods.make("simlayerkv", threshold=0.0, sink=1, recent=2)
    _, cache = run(model, ids, every)
    assert every.lazy_layers == list(range(NUM_LAYERS))
    assert all(layer.held() == 3 for layer in cache.layers)


# --------------------------------------------------------------------------------------------
# MiniCache
# --------------------------------------------------------------------------------------------
def test_slerp_by_hand():
    a = torch.tensor([3.0, 0.0])
    b = torch.tensor([0.0, 4.0])
    direction, na, nb, distance = slerp(a, b, 0.5)
    torch.testing.assert_close(direction, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert (na.item(), nb.item(), distance.item()) == pytest.approx((3.0, 4.0, 0.5))
    direction, *_ = slerp(a, b, 0.0)  # t = 0: the first layer's direction
    torch.testing.assert_close(direction, torch.tensor([1.0, 0.0]))
    direction, _, _, distance = slerp(a, 2 * a, 0.3)  # parallel vectors: same direction, distance 0
    torch.testing.assert_close(direction, torch.tensor([1.0, 0.0]))
    assert distance.item() == pytest.approx(0.0, abs=1e-3)


def _pair_tokens(batch: int = 2, heads: int = 1, n: int = 8, dim: int = 4, far=(2, 5)):
    """K/V of two layers: identical up to a per-layer scale, except tokens `far`, where layer b is opposite."""
    g = torch.Generator().manual_seed(1)
    key_a = torch.randn(batch, heads, n, dim, generator=g)
    value_a = torch.randn(batch, heads, n, dim, generator=g)
    key_b, value_b = 2 * key_a, 3 * value_a
    for t in far:
        key_b[:, :, t] = -key_b[:, :, t]
    return key_a, value_a, key_b, value_b


def test_minicache_retains_the_most_distant_tokens_and_reads_back_magnitudes():
    key_a, value_a, key_b, value_b = _pair_tokens()
    pair = MergedPair(MiniCacheSettings(retain=0.25), None)
    pair.pending = (key_a, value_a)
    pair.commit(key_b, value_b, torch.ones(2, 8, dtype=torch.bool), due=True)
    # ceil(0.25 x 8) = 2 tokens stay unmerged: the two whose layers point opposite ways
    assert pair.chunks == [(8, 2)]
    assert pair.retained[0, 0].nonzero().flatten().tolist() == [2, 5]
    k0, v0 = pair.read(0)
    k1, v1 = pair.read(1)
    # retained tokens read back exactly; the others are direction x each layer's own norm (parallel: exact)
    for got, want in ((k0, key_a), (v0, value_a), (k1, key_b), (v1, value_b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # bytes: 6 merged x (2 x 4 directions + 4 norms) x 4 B + 2 retained x 4 x 4 x 4 B + 8 flags, per row
    assert pair.nbytes() == 2 * (6 * 12 * 4 + 2 * 16 * 4 + 8)
    assert pair.nbytes() == 2 * MergedPair.predicted_bytes(MiniCacheSettings(retain=0.25), [8], 1, 4, 4)


def test_minicache_merged_token_is_the_slerp_midpoint_scaled_by_each_layers_norm():
    a = torch.tensor([3.0, 0.0]).view(1, 1, 1, 2)
    b = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2)
    pair = MergedPair(MiniCacheSettings(retain=0.0), None)
    pair.pending = (a, a)
    pair.commit(b, b, torch.ones(1, 1, dtype=torch.bool), due=True)
    k0, _ = pair.read(0)
    k1, _ = pair.read(1)
    torch.testing.assert_close(k0.flatten(), torch.tensor([3.0, 3.0]) / math.sqrt(2))
    torch.testing.assert_close(k1.flatten(), torch.tensor([4.0, 4.0]) / math.sqrt(2))


def test_minicache_padding_is_never_ranked():
    key_a, value_a, key_b, value_b = _pair_tokens(far=(1, 5, 6))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :4] = False  # row 0: 4 padding tokens, 4 real ones (4..7)
    pair = MergedPair(MiniCacheSettings(retain=0.25), None)
    pair.pending = (key_a, value_a)
    pair.commit(key_b, value_b, valid, due=True)
    # row 1 (8 real): ceil(2) = 2 of its far tokens (1, 5, 6: the two most distant); row 0 (4 real): ceil(1) = 1
    # real token (5 or 6, the most distant) plus one padding token filling the rectangular slot
    kept0 = pair.retained[0, 0].nonzero().flatten().tolist()
    kept1 = pair.retained[1, 0].nonzero().flatten().tolist()
    assert len(kept0) == len(kept1) == 2
    assert len([t for t in kept0 if t >= 4]) == 1 and [t for t in kept0 if t >= 4][0] in (5, 6)
    assert set(kept1) <= {1, 5, 6}


def test_minicache_pairs():
    config = make_tiny_model("llama").config
    assert pairs(config, None) == [(3, 4)]
    assert pairs(config, 0) == [(0, 1), (2, 3), (4, 5)]
    assert pairs(config, 0, replaced={3}) == [(0, 1), (4, 5)]
    assert pairs(config, NUM_LAYERS) == []
    mixed = make_tiny_model(
        "qwen2", layer_types=["full_attention", "sliding_attention"] * 3, sliding_window=8, use_sliding_window=True
    ).config
    assert pairs(mixed, 0) == []  # only layers of one attention type merge
    assert retained_count(20, 0.05) == 1 and retained_count(21, 0.05) == 2 and retained_count(5, 0.0) == 0


def test_minicache_prefill_is_the_full_model_then_decoding_reads_merged_kv():
    model = make_tiny_model("llama", "sdpa")
    ids = ids_for()
    plain, _ = run(model, ids)
    merged, cache = run(model, ids, methods.make("minicache", start_layer=0, retain=0.0, merge_interval=4))
    assert torch.equal(plain[:, :PROMPT], merged[:, :PROMPT])  # both layers of a pair attend over their originals
    assert not torch.allclose(plain[:, PROMPT:], merged[:, PROMPT:])
    # 10 + 6 tokens: the prefill merged, then 4 decoded tokens merged, 2 still buffered
    assert cache.layers[0].pair.chunks == [(10, 0), (4, 0)] and cache.layers[0].pair.buffered() == 2
    assert cache.layers[1].nbytes() == 0 and cache.layers[0].nbytes() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_minicache_decode_reads_merged_directions_as_rebuilt_kv_would(arch, monkeypatch):
    """A decode step's attention over the stored directions and magnitudes (kvshare's split attention) gives the
    logits that rebuilding every merged token's K/V gives, and it is the path taken."""
    from kvshare.methods.minicache import MiniCacheLayer

    model = make_tiny_model(arch, "sdpa")
    ids = ids_for()[:1]
    method = methods.make("minicache", start_layer=0, retain=0.25, merge_interval=3)
    calls = []
    split_read = MiniCacheLayer._split_read
    monkeypatch.setattr(MiniCacheLayer, "_split_read", lambda self, k, v: calls.append(1) or split_read(self, k, v))
    fast, _ = run(model, ids, method)
    assert len(calls) == NUM_LAYERS * (TOTAL - PROMPT)
    monkeypatch.setattr(MiniCacheLayer, "_reads_split", lambda self, q: False)
    rebuilt, _ = run(model, ids, method)
    torch.testing.assert_close(fast, rebuilt, rtol=1e-5, atol=1e-5)
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)  # detach restored it


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "qwen3"])
@pytest.mark.parametrize("retain,interval", [(0.0, 1), (0.3, 4), (1.0, 3)])
def test_minicache_bytes_equal_the_prediction(arch, retain, interval):
    model = make_tiny_model(arch, "sdpa")
    method = methods.make("minicache", start_layer=1, retain=retain, merge_interval=interval)
    _, cache = run(model, ids_for(), method)
    assert kvshare.cache_bytes(cache) == kvshare.predicted_cache_bytes(model.config, method, 2, LENGTHS, 4)


def test_minicache_with_sharing_pairs_the_kept_layers_only():
    model = make_tiny_model("llama", "sdpa")
    method = methods.make("minicache", start_layer=0, retain=0.2)
    strategy = Strategy({3: 1}, NUM_LAYERS)
    _, cache = run(model, ids_for(), strategy, method)
    assert method.pairs(model.config) == [(0, 1), (4, 5)]
    predicted = kvshare.predicted_cache_bytes(model.config, methods.Composition(method, strategy), 2, LENGTHS, 4)
    assert kvshare.cache_bytes(cache) == predicted


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding"])
def test_minicache_left_padded_rows_match_rows_alone(arch):
    model = make_tiny_model(arch, "sdpa")
    batch, alone0, alone1, pad = _rows_alone(
        model, lambda: methods.make("minicache", start_layer=0, retain=0.25, merge_interval=3)
    )
    torch.testing.assert_close(batch[0, pad:], alone0[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch[1], alone1[0], rtol=1e-4, atol=1e-4)


def test_minicache_start_at_the_last_layer_is_the_full_model():
    model = make_tiny_model("qwen3", "sdpa")
    ids = ids_for()
    plain, _ = run(model, ids)
    for start in (NUM_LAYERS, NUM_LAYERS - 1):  # no pair (the last layer alone has no partner)
        same, cache = run(model, ids, methods.make("minicache", start_layer=start))
        assert torch.equal(plain, same)
        assert kvshare.cache_bytes(cache) == kvshare.predicted_cache_bytes(model.config, None, 2, LENGTHS, 4)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------
def test_cli_builds_the_peers_from_flags():
    from kvshare import cli

    parser = cli.build_parser()
    args = parser.parse_args(["ppl", "--method", "minicache", "--start-layer", "15", "--retain", "0.1"])
    built = cli._read_methods(args)
    assert built == [methods.make("minicache", start_layer=15, retain=0.1)]
    assert built[0].scored_by_decoding  # ppl scores it by decoding without --decode
    args = parser.parse_args(["ppl", "--method", "simlayerkv", "--threshold", "0.8", "--recent", "64", "--sink", "2"])
    assert cli._read_methods(args) == [methods.make("simlayerkv", threshold=0.8, recent=64, sink=2)]


# --------------------------------------------------------------------------------------------
# notebook 07's helpers
# --------------------------------------------------------------------------------------------
def test_simlayerkv_thresholds_aim_at_the_byte_ratios():
    from kvshare.experiments import peers

    cfg = peers.Settings(model="tiny", quick=True, seed=0, window=101, sink=0, recent=10, lazy_targets=[0.55, 1.0])
    # a lazy layer keeps 10 of 100 tokens: 55% of the bytes needs (1 - 0.55) / 0.9 = half the layers lazy, i.e. the
    # two with the largest shares; the threshold sits between the 2nd and 3rd largest share
    assert peers.simlayerkv_thresholds([0.6, 0.9, 0.7, 0.8], cfg) == [pytest.approx(0.75), pytest.approx(0.85)]


def test_sequence_bytes_count_what_each_row_keeps():
    from kvshare.experiments import peers

    model = make_tiny_model("llama", "sdpa")
    ids, mask = _padded()
    _, cache = run(model, ids, methods.make("streamingllm", budget=6), mask=mask)
    assert peers.sequence_bytes(cache, model.config, 4) == [kvshare.cache_bytes(cache) // 2] * 2
    probe = methods.make("simlayerkv", threshold=0.5, sink=1, recent=3, query_window=3)
    run(model, ids, probe)
    layer = max(probe.decisions, key=lambda i: abs(probe.decisions[i]["share"][0] - probe.decisions[i]["share"][1]))
    method = methods.make(
        "simlayerkv", threshold=sum(probe.decisions[layer]["share"]) / 2, sink=1, recent=3, query_window=3
    )
    _, cache = run(model, ids, method)
    rows = peers.sequence_bytes(cache, model.config, 4)
    token = kvshare.accounting.kv_token_bytes(model.config, 4)
    expected = [sum((4 if d["lazy"][r] else TOTAL) * token for d in method.decisions.values()) for r in range(2)]
    assert rows == expected and sum(rows) <= kvshare.cache_bytes(cache)


def _curve(family: str, value: float, kv_ratio: float, window_nll: list[float], seeds: int = 1) -> dict:
    """A family_curves row with the fields verdict reads."""
    import numpy as np

    from kvshare.experiments import peers

    wn = np.asarray(window_nll)
    se = float(wn.std(ddof=1) / math.sqrt(len(wn)))
    return {
        "family": family,
        "label": peers.LABELS[family],
        "knob": "" if family == "full" else "k",
        "value": value,
        "seeds": seeds,
        "nll": float(wn.mean()),
        "nll_se": se,
        "ppl": math.exp(float(wn.mean())),
        "ppl_se": math.exp(float(wn.mean())) * se,
        "kv_ratio": kv_ratio,
        "window_nll": list(window_nll),
    }


def test_full_settings_score_the_whole_heldout_protocol_and_say_how_many_tokens():
    from kvshare.experiments import peers
    from kvshare.metrics import HELDOUT

    cfg = peers.settings("smollm2-135m", quick=False)
    d = cfg.to_dict()
    assert cfg.windows * cfg.window == HELDOUT.tokens == d["heldout_tokens"]
    assert d["scored_per_window"] == cfg.window - 1 - cfg.context == 63
    assert d["scored_tokens"] == cfg.windows * 63


def test_verdict_names_the_lowest_nll_point_at_each_target_with_runner_up_and_full_statistics():
    from kvshare.experiments import peers

    full = _curve("full", 0, 1.0, [2.0, 2.1, 2.2, 2.3])
    curves = [
        full,
        _curve("minicache", 10, 0.74, [2.5, 2.6, 2.7, 2.8]),  # +0.5 per window
        _curve("simlayerkv", 0.8, 0.77, [2.1, 2.2, 2.25, 2.4]),  # the best at 75%: +0.1, +0.1, +0.05, +0.1
        _curve("streamingllm", 383, 0.86, [2.0, 2.1, 2.2, 2.3]),  # outside the tolerance of 75%
        _curve("kvsharer-dissimilar", 15, 0.5, [3.0, 3.1, 3.2, 3.4]),  # alone at 50%
    ]
    cfg = peers.Settings(model="tiny", quick=True, seed=0, targets=[0.75, 0.5, 0.25], tolerance=0.05)
    at75, at50, at25 = peers.verdict(curves, cfg)
    assert at75["best"]["family"] == "simlayerkv" and at75["runner_up"]["family"] == "minicache"
    assert [r["family"] for r in at75["ranking"]] == ["simlayerkv", "minicache"]
    runner = at75["runner_up"]
    assert runner["vs_best_nll_diff"] == pytest.approx(0.4125)  # mean of 0.4, 0.4, 0.45, 0.4
    assert runner["vs_best_se"] == pytest.approx(0.0125)  # std (ddof 1) 0.025 / sqrt(4)
    assert at75["best"]["vs_full_nll_diff"] == pytest.approx(0.0875)
    assert at75["best"]["vs_full_ppl_ratio"] == pytest.approx(math.exp(0.0875))
    assert "StreamingLLM" in at75["missing"]
    assert at50["best"]["family"] == "kvsharer-dissimilar" and at50["runner_up"] is None
    assert at25["best"] is None and at25["ranking"] == []
    text = report_conclusion(curves, cfg, [at75, at50, at25])
    assert "the best is **SimLayerKV k=0.8**" in text and "the runner-up, MiniCache k=10" in text
    assert "no method has a point there" in text  # 25%


def report_conclusion(curves, cfg, verdicts) -> str:
    from kvshare.experiments.reports import peers as report

    cfg_d = {**cfg.to_dict(), "window": 512, "windows": 32, "context": 448}
    for c in curves:
        c.update(ppl_min=c["ppl"], ppl_max=c["ppl"])
    return report.conclusion(verdicts, curves, [], cfg_d, {}, "tiny", NUM_LAYERS)


def test_suite_points_are_the_full_model_and_each_familys_point_nearest_each_target():
    from kvshare.experiments import peers

    pts = [peers.Point("full", "", 0, ())]
    ratios = {("minicache", 10): 0.70, ("minicache", 5): 0.62, ("minicache", 0): 0.54, ("simlayerkv", 0.9): 0.95}
    pts += [peers.Point(f, "k", v, ()) for f, v in ratios]
    pts += [peers.Point("kvsharer-random", "C", c, (), seed) for seed in range(3) for c in (8, 15)]
    rows = [{"family": "full", "value": 0, "kv_ratio": 1.0}]
    rows += [{"family": f, "value": v, "kv_ratio": r} for (f, v), r in ratios.items()]
    rows += [
        {"family": "kvsharer-random", "value": c, "kv_ratio": 1 - c / 30, "seed": s} for s in range(3) for c in (8, 15)
    ]
    cfg = peers.Settings(model="tiny", quick=True, seed=0, targets=[0.75, 0.5], tolerance=0.06, suite_seeds=2)
    chosen = peers.suite_points(rows, pts, cfg)
    # minicache 0.70 is nearest 75% (within 0.06), 0.54 nearest 50%; simlayerkv 0.95 is near neither
    assert [(p.family, p.value, p.seed) for p in chosen] == [
        ("full", 0, None),
        ("minicache", 10, None),
        ("minicache", 0, None),
        ("kvsharer-random", 8, 0),
        ("kvsharer-random", 15, 0),
        ("kvsharer-random", 8, 1),
        ("kvsharer-random", 15, 1),
    ]
    # the cost step measures one point per (family, value), KVSharer in its dissimilar order only
    assert [(p.family, p.value) for p in peers.cost_points(chosen)] == [
        ("full", 0),
        ("minicache", 10),
        ("minicache", 0),
    ]


def test_suite_summary_pairs_per_example_scores_against_the_full_model():
    from kvshare.experiments import peers

    def rows(acc_a, acc_b):
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return [
            {"task": "a", "metric": "acc", "value": mean(acc_a), "stderr": 0.1, "n": 4, "primary": True,
             "scores": acc_a},
            {"task": "a", "metric": "acc_norm", "value": 0.9, "stderr": 0.1, "n": 4, "primary": False},
            {"task": "b", "metric": "acc", "value": mean(acc_b), "stderr": 0.2, "n": 4, "primary": True,
             "scores": None},
        ]  # fmt: skip

    point = {"knob": "", "value": 0, "seed": None, "protocol": "one-pass"}
    records = [
        {**point, "family": "full", "label": "full model", "rows": rows([1, 1, 0, 1], [1, 0, 0, 0])},
        {**point, "family": "h2o", "label": "H2O", "rows": rows([1, 0, 0, 1], [0, 0, 0, 0])},
    ]
    full, h2o = peers.suite_summary(records)
    # primary metrics only: the non-primary acc_norm row is left out of the average
    assert full["average"] == pytest.approx((0.75 + 0.25) / 2) and full["average_n"] == 8
    # task a: per-example differences 0, -1, 0, 0 (mean -0.25, se 0.25); task b has no scores: -0.25 with stderrs
    assert h2o["average_diff_vs_full"] == pytest.approx(-0.25)
    assert h2o["average_diff_vs_full_se"] == pytest.approx(math.sqrt(0.25**2 + 0.2**2 + 0.2**2) / 2)
    from kvshare.experiments.reports import peers as report

    text = "\n".join(report.suite_lines([full, h2o], {"suite_limit": 4}))
    assert "**Offline suite** (2 multiple-choice tasks, the first 4 examples of each: 8 examples per point" in text
    assert "- H2O: average 0.250 ± " in text and "(Δ -0.250 ± " in text


def test_heldout_scores_are_cached_per_point_and_reused(tmp_path, monkeypatch):
    from kvshare.experiments import peers
    from kvshare.experiments.scaffold import ResultCache

    model = make_tiny_model("llama", "sdpa")

    class Tok:
        def __call__(self, text, return_tensors, add_special_tokens):
            return {"input_ids": torch.arange(200).remainder(50)[None]}

    monkeypatch.setattr(peers, "eval_text", lambda source: "")
    cfg = peers.Settings(model="tiny", quick=True, seed=0, window=24, windows=2, context=16, batch=2)
    pts = [
        peers.Point("full", "", 0, ()),
        peers.Point("streamingllm", "budget", 12, (methods.make("streamingllm", budget=12),)),
    ]
    cache = ResultCache(tmp_path / "07_peers_results.json")
    first = peers.evaluate(model, Tok(), pts, cfg, progress=False, cache=cache)
    assert first[1]["decoded"] and first[1]["scored_tokens"] == 2 * (24 - 1 - 16)
    assert first[1]["kv_ratio"] < 1 and first[0]["kv_ratio"] == 1

    def fail(*args, **kwargs):
        raise AssertionError("a cached point was scored again")

    monkeypatch.setattr(peers, "score", fail)
    again = peers.evaluate(model, Tok(), pts, cfg, progress=False, cache=ResultCache(cache.path))
    assert [r["window_nll"] for r in again] == [r["window_nll"] for r in first]
    # a changed protocol is a different unit
    with pytest.raises(AssertionError, match="scored again"):
        peers.evaluate(
            model, Tok(), pts, peers.Settings(**{**cfg.__dict__, "context": 12}), progress=False, cache=cache
        )


def test_error_bars_are_never_negative_when_a_point_lies_outside_its_span():
    """The decode speed is the median of the repeats and its bar spans the last repeat's quarters, so the point can
    lie outside them (CI's quick run of notebook 07 failed on matplotlib's 'yerr must not contain negative values')."""
    from kvshare.experiments.reports import peers as report
    from kvshare.experiments.reports.evaluation import _yerr

    lower, upper = report._bars([10.0, 5.0, 7.0], [11.0, 4.0, float("nan")], [12.0, 6.0, 8.0])
    assert lower == [0.0, 1.0, 0.0] and upper == [2.0, 1.0, 1.0]
    assert min(min(b) for b in _yerr([{"k": 5.0, "lo": 5.5, "hi": 4.0}], "k", "lo", "hi")) == 0.0
