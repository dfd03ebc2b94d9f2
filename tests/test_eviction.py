"""Token eviction methods with a budget (StreamingLLM, H2O, PyramidInfer) alone and combined with KV sharing.

- each method keeps exactly the tokens its rule selects, on hand-checkable cases;
- with a budget above the sequence length each method is the full model, bit for bit;
- combined with C = 0 sharing each equals the method alone; with real sharing a replaced layer reads
  its source's kept tokens and the cache's bytes are what the two predict together;
- incremental decoding follows the method's own semantics (StreamingLLM: a one-pass forward with the
  mask the rule implies; H2O / PyramidInfer: a reference that tracks scores by token position);
- left-padded batches: each row keeps and computes what it would alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, make_tiny_model
from transformers import DynamicCache

import kvshare
from kvshare.accounting import predicted_cache_bytes
from kvshare.methods import H2O, REGISTRY, H2OSettings, PyramidInfer, PyramidInferSettings, StreamingLLM, make
from kvshare.methods.pyramidinfer import layer_budgets
from kvshare.sharing import active_method, active_strategy, source_kv
from kvshare.strategy import Strategy

# the registered eviction methods that keep a token budget
NAMES = [name for name, cls in REGISTRY.items() if cls.role == "eviction" and "budget" in cls.setting_names()]


@torch.no_grad()
def run(model, ids, method=None, strategy=None, prompt=None, mask=None, positions=False, on_step=None):
    """Prefill `prompt` tokens, then decode the rest one token at a time; last-token logits of each forward."""
    B, T = ids.shape
    prompt = prompt or T // 2
    mask = torch.ones(B, T, dtype=torch.long) if mask is None else mask
    outs = []
    with kvshare.compression(model, strategy, method):
        cache = DynamicCache(config=model.config)
        for s, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
            kw = {}
            if positions or mask.min() == 0:
                am = mask[:, :e]
                kw = dict(attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)[:, s:e])
            outs.append(model(input_ids=ids[:, s:e], cache=cache, use_cache=True, **kw).logits[:, -1])
            if on_step is not None:
                on_step(cache, s, e)
    return torch.stack(outs, 1), cache


def kept(cache, layer):
    """Kept stream positions of a layer: [batch][head] ascending lists (slots are not in stream order)."""
    return cache.layers[layer].positions.sort(dim=-1).values.tolist()


def tiny_config(**kw):
    return make_tiny_model("llama", "eager").config


# --------------------------------------------------------------------------------------------
# registry and settings
# --------------------------------------------------------------------------------------------
def test_registry_and_settings():
    assert set(NAMES) == {"streamingllm", "h2o", "pyramidinfer"}
    assert isinstance(make("H2O", budget=8), H2O)
    assert isinstance(make("streaming-llm", budget=8, sink=2), StreamingLLM)
    assert make("pyramidinfer", budget=8, window=4).settings == PyramidInferSettings(8, window=4)
    with pytest.raises(ValueError, match="unknown method"):
        make("snapkv", budget=8)
    with pytest.raises(ValueError, match="budget"):
        make("h2o", budget=0)
    with pytest.raises(ValueError, match="sink"):
        make("streamingllm", budget=4, sink=4)
    with pytest.raises(TypeError):
        H2O(H2OSettings(8), budget=4)


def test_pyramid_budgets_decay_and_average():
    # weights 1, .875, .75, .625, .5 -> 13.3, 11.7, 10, 8.3, 6.7 -> largest remainders round up layers 1 and 4
    assert layer_budgets(10, 5, 0.5) == [13, 12, 10, 8, 7]
    for budget, n, ratio in [(64, 30, 0.5), (128, 30, 0.3), (7, 6, 1.0), (33, 24, 0.25)]:
        b = layer_budgets(budget, n, ratio)
        assert sum(b) == budget * n and all(x >= y for x, y in zip(b, b[1:]))


# --------------------------------------------------------------------------------------------
# each rule on hand-checkable cases
# --------------------------------------------------------------------------------------------
def test_streamingllm_keeps_sinks_and_recent_window():
    model = make_tiny_model("llama", "sdpa")
    ids = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :3] = 0  # row 0: three pad tokens on the left
    steps = []
    run(
        model,
        ids,
        StreamingLLM(budget=6, sink=2),
        prompt=12,
        mask=mask,
        on_step=lambda c, s, e: steps.append([kept(c, i) for i in range(NUM_LAYERS)]),
    )
    # after the prefill of 12: sinks are each row's first 2 real tokens, then the last 4
    assert all(layer == [[[3, 4, 8, 9, 10, 11]], [[0, 1, 8, 9, 10, 11]]] for layer in steps[0])
    # after one decoded token (position 12) the window slides, the sinks stay
    assert all(layer == [[[3, 4, 9, 10, 11, 12]], [[0, 1, 9, 10, 11, 12]]] for layer in steps[1])


def _layer(method, heads=(4, 2), dim=4, layer_idx=0):
    cfg = tiny_config()
    layer = method.make_layer(layer_idx, cfg)
    layer.num_key_value_groups = heads[0] // heads[1]
    return layer


def _forward(layer, q, weights, heads=(4, 2), dim=4):
    """One forward through a slot by hand: begin, update with random K/V, end with given attention weights."""
    layer.begin(1, q, None, None, torch.device("cpu"), "eager")
    k = torch.randn(1, heads[1], q, dim)
    layer.update(k, k.clone())
    layer.end(weights=weights)


def test_h2o_keeps_heavy_hitters_and_recent_window():
    layer = _layer(H2O(budget=4, recent_ratio=0.5))  # 2 recent + 2 heavy hitters per KV head
    w = torch.zeros(1, 4, 6, 6)
    # query heads 0, 1 share KV head 0; heads 2, 3 share KV head 1
    w[0, 0, :, 1] = 0.5
    w[0, 1, :, 2] = 0.4
    w[0, 0, :, 0] = 0.1
    w[0, 2, :, 0] = 0.3
    w[0, 3, :, 3] = 0.35
    w[0, 2, :, 2] = 0.1
    _forward(layer, 6, w)
    assert kept_positions(layer) == [[1, 2, 4, 5], [0, 3, 4, 5]]
    # accumulated scores travel with their tokens: KV head 0 had 6 * (0.5, 0.4) on tokens 1, 2
    assert torch.allclose(layer.scores[0, 0, [slot(layer, 0, 1), slot(layer, 0, 2)]], torch.tensor([3.0, 2.4]))
    # one decoded token (position 6): token 4 leaves the recent window and competes on its score
    w = torch.zeros(1, 4, 1, 5)
    w[0, 0, 0, slot(layer, 0, 4)] = 2.5  # KV head 0: token 4 -> 2.5 beats token 2's 2.4
    _forward(layer, 1, w)
    assert kept_positions(layer) == [[1, 4, 5, 6], [0, 3, 5, 6]]


def slot(layer, head, position):
    """The slot holding stream `position` in KV head `head` of row 0 (slots are not in stream order)."""
    return int((layer.positions[0, head] == position).nonzero())


def kept_positions(layer):
    return layer.positions[0].sort(dim=-1).values.tolist()


def test_pyramidinfer_selects_by_the_most_recent_queries():
    layer = _layer(PyramidInfer(budget=4, window=2, interval=2, ratio=1.0))
    w = torch.zeros(1, 4, 6, 6)
    w[0, :, :4, 0] = 1.0  # early queries love token 0: ignored, only the last 2 queries count
    w[0, 0, 4:, 1] = 0.6
    w[0, 1, 4:, 2] = 0.3
    w[0, 2, 4:, 3] = 0.5
    w[0, 3, 4:, 0] = 0.2
    _forward(layer, 6, w)
    # recent window (4, 5) + the 2 tokens the last 2 queries attend to most, per KV head
    assert kept_positions(layer) == [[1, 2, 4, 5], [0, 3, 4, 5]]
    # decoding: the first generated token is appended (interval 2), the second triggers a selection
    w = torch.zeros(1, 4, 1, 5)
    w[0, :2, 0, slot(layer, 0, 2)] = 1.0  # KV head 0: token 2 now
    w[0, 2:, 0, slot(layer, 1, 3)] = 1.0  # KV head 1: token 3
    _forward(layer, 1, w)
    assert kept_positions(layer) == [[1, 2, 4, 5, 6], [0, 3, 4, 5, 6]]
    w = torch.zeros(1, 4, 1, 6)
    w[0, :2, 0, slot(layer, 0, 4)] = 0.3  # KV head 0: token 4 gets 0.6 in total (token 1: nothing), token 2 got 2.0
    w[0, 2:, 0, slot(layer, 1, 0)] = 1.5  # KV head 1: token 0 gets 3.0 vs token 3's 2.0
    _forward(layer, 1, w)
    assert kept_positions(layer) == [[2, 4, 6, 7], [0, 3, 6, 7]]


# --------------------------------------------------------------------------------------------
# budget above the length: the full model, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_budget_above_length_is_the_full_model(tiny_model, name):
    ids = torch.randint(3, 100, (1, 14), generator=torch.Generator().manual_seed(1))
    full, _ = run(tiny_model, ids, prompt=9)
    evicting, cache = run(tiny_model, ids, make(name, budget=64), prompt=9)
    assert torch.equal(full, evicting)
    assert all(getattr(layer, "kvshare_method_slot", False) for layer in cache.layers)


@pytest.mark.parametrize("name", NAMES)
def test_budget_above_length_left_padded(name):
    for arch, impl in [("llama", "sdpa"), ("qwen3", "eager"), ("mistral_sliding", "sdpa")]:
        model = make_tiny_model(arch, impl)
        ids = torch.randint(3, 100, (2, 14), generator=torch.Generator().manual_seed(2))
        mask = torch.ones(2, 14, dtype=torch.long)
        mask[1, :4] = 0
        full, _ = run(model, ids, prompt=9, mask=mask)
        evicting, _ = run(model, ids, make(name, budget=64), prompt=9, mask=mask)
        assert torch.equal(full, evicting), (arch, impl)


# --------------------------------------------------------------------------------------------
# composition with sharing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_c0_sharing_with_eviction_is_the_eviction_alone(name):
    model = make_tiny_model("qwen2", "sdpa")
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    alone, c1 = run(model, ids, make(name, budget=5), prompt=10)
    c0, c2 = run(model, ids, make(name, budget=5), Strategy({}, NUM_LAYERS), prompt=10)
    assert torch.equal(alone, c0)
    assert kvshare.cache_bytes(c1) == kvshare.cache_bytes(c2)


@pytest.mark.parametrize("name", NAMES)
def test_replaced_layer_reads_the_sources_kept_tokens(name):
    model = make_tiny_model("llama", "sdpa")
    strategy = Strategy({3: 1, 5: 2}, NUM_LAYERS)
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(4))
    seen = []

    def check(module, args, kwargs, output):
        cache = kwargs["cache"]
        keys, _ = source_kv(cache, module._kvshare_source)
        snap = snapshots[module._kvshare_source]
        seen.append(keys.shape[-2])
        if snap is not None:  # what the source held after the previous forward, then this forward's token
            assert torch.equal(keys[..., : snap.shape[-2], :], snap)
            assert keys.shape[-2] == snap.shape[-2] + 1
        mask = kwargs["attention_mask"]
        assert mask is None or mask.shape[-1] == keys.shape[-2]

    snapshots = {1: None, 2: None}

    def snap(cache, s, e):
        for src in snapshots:
            snapshots[src] = cache.layers[src].keys.clone()

    handles = [model.model.layers[r].self_attn.register_forward_hook(check, with_kwargs=True) for r in strategy.mapping]
    method = make(name, budget=6)
    try:
        _, cache = run(model, ids, method, strategy, prompt=10, on_step=snap)
    finally:
        for h in handles:
            h.remove()
    assert seen[:2] == [10, 10] and len(seen) == 2 * 7
    assert all(cache.layers[r].keys is None for r in strategy.mapping)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch", ["llama", "mistral_sliding"])
def test_combined_bytes_are_what_both_predict(name, arch):
    model = make_tiny_model(arch, "sdpa")
    strategy = Strategy({2: 0, 4: 3, 5: 1}, NUM_LAYERS)
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(5))
    for budget in (5, 8, 40):
        method = make(name, budget=budget)
        for strat in (None, strategy):
            _, cache = run(model, ids, method, strat, prompt=9)
            predicted = predicted_cache_bytes(model.config, method, 2, [9] + [1] * 11, 4, strategy=strat)
            assert kvshare.cache_bytes(cache) == predicted, (budget, strat)
    # and the two savings multiply for uniform budgets: kept layers x tokens kept
    _, shared_only = run(model, ids, None, strategy, prompt=9)
    assert kvshare.cache_bytes(shared_only) == predicted_cache_bytes(
        model.config, None, 2, [9] + [1] * 11, 4, strategy=strategy
    )


# --------------------------------------------------------------------------------------------
# incremental decoding follows each method's semantics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa")])
def test_streamingllm_decoding_equals_the_rule_as_a_mask(arch, impl):
    """Decoding with eviction == one forward whose mask shows each decoded token sinks + recent + itself."""
    model = make_tiny_model(arch, impl)
    T, prompt, budget, sink = 20, 8, 6, 2
    ids = torch.randint(3, 100, (1, T), generator=torch.Generator().manual_seed(6))
    decoded, _ = run(model, ids, StreamingLLM(budget=budget, sink=sink), prompt=prompt)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for t in range(prompt, T):  # token t sees what was kept after step t-1, and itself
        visible = set(range(sink)) | set(range(t - (budget - sink), t)) | {t}
        allowed[t] = torch.tensor([j in visible for j in range(T)])
    mask = (
        allowed[None, None]
        if impl == "sdpa"
        else torch.zeros(1, 1, T, T).masked_fill(~allowed, torch.finfo(torch.float32).min)
    )
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0]
    assert torch.allclose(decoded[0], ref[[prompt - 1] + list(range(prompt, T))], atol=1e-5)


class Reference:
    """H2O / PyramidInfer by token position, from the attention weights eager attention returns."""

    def __init__(self, model, method):
        self.method, self.cfg = method, model.config
        self.score = {}  # (layer, kv head, position) -> accumulated attention
        self.since = {}
        self.handles = [m.self_attn.register_forward_hook(self.hook, with_kwargs=True) for m in model.model.layers]
        self.expected = {}

    def hook(self, module, args, kwargs, output):
        layer = kwargs["cache"].layers[module.layer_idx]
        i, w = module.layer_idx, output[1][0]  # [q heads, q, held]
        pos = layer.positions[0].tolist() if layer.held() == w.shape[-1] else None
        assert pos is not None
        q, groups = w.shape[1], w.shape[0] // len(pos)
        s = self.method.settings
        budget = self.method.layer_budget(i, NUM_LAYERS)
        out = []
        if isinstance(self.method, PyramidInfer):
            self.since[i] = self.since.get(i, 0) + q
            select = q > 1 or self.since[i] >= s.interval
            rows = range(max(0, q - s.window), q)
        else:
            select, rows = True, range(q)
        for h, positions in enumerate(pos):
            sums = w[h * groups : (h + 1) * groups][:, list(rows)].sum(dim=(0, 1))
            for j, p in enumerate(positions):
                self.score[i, h, p] = self.score.get((i, h, p), 0.0) + float(sums[j])
            if not select or len(positions) <= budget:
                out.append(sorted(positions))
                continue
            recent = min(s.recent if isinstance(self.method, H2O) else s.window, budget)
            keep = set(sorted(positions)[len(positions) - recent :]) if recent else set()
            rest = sorted((p for p in positions if p not in keep), key=lambda p: (-self.score[i, h, p], p))
            keep |= set(rest[: budget - len(keep)])
            out.append(sorted(keep))
        if isinstance(self.method, PyramidInfer) and select:
            self.since[i] = 0
            self.score = {k: v for k, v in self.score.items() if k[0] != i}  # the next selection's queries start afresh
        self.expected[i] = out

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", ["h2o", "pyramidinfer"])
def test_attention_scored_methods_follow_their_rule_while_decoding(name):
    model = make_tiny_model("llama", "eager")
    ids = torch.randint(3, 100, (1, 22), generator=torch.Generator().manual_seed(7))
    method = make(name, budget=7) if name == "h2o" else make(name, budget=7, window=3, interval=3)
    ref = Reference(model, method)
    mismatches = []

    def compare(cache, s, e):
        for i in range(NUM_LAYERS):
            if kept(cache, i)[0] != ref.expected[i]:
                mismatches.append((s, i, kept(cache, i)[0], ref.expected[i]))

    try:
        run(model, ids, method, prompt=10, on_step=compare)
    finally:
        ref.remove()
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("name", ["h2o", "pyramidinfer"])
def test_sdpa_scores_match_eager_weights(name):
    """sdpa keeps its fast attention; the recomputed probabilities pick the same tokens as eager's weights."""
    ids = torch.randint(3, 100, (2, 18), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(2, 18, dtype=torch.long)
    mask[0, :3] = 0
    runs = {}
    for impl in ("sdpa", "eager"):
        steps = []
        logits, _ = run(
            make_tiny_model("qwen3", impl),
            ids,
            make(name, budget=6),
            prompt=9,
            mask=mask,
            on_step=lambda c, s, e: steps.append([kept(c, i) for i in range(NUM_LAYERS)]),
        )
        runs[impl] = (logits, steps)
    assert runs["sdpa"][1] == runs["eager"][1]
    assert torch.allclose(runs["sdpa"][0], runs["eager"][0], atol=1e-4)


# --------------------------------------------------------------------------------------------
# left-padded batches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("mistral_sliding", "eager"), ("qwen3", "sdpa")])
def test_left_padded_rows_match_rows_alone(name, arch, impl):
    model = make_tiny_model(arch, impl)
    T, pad, prompt = 20, 5, 11
    ids = torch.randint(3, 100, (2, T), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :pad] = 0
    method = make(name, budget=6) if name != "pyramidinfer" else make(name, budget=6, window=3, interval=3)
    for strategy in (None, Strategy({2: 1, 4: 0}, NUM_LAYERS)):
        batch, bc = run(model, ids, method, strategy, prompt=prompt, mask=mask)
        alone, ac = run(model, ids[:1, pad:], method, strategy, prompt=prompt - pad, positions=True)
        assert torch.allclose(batch[0], alone[0], atol=1e-5)
        for i in range(NUM_LAYERS):
            if i in (strategy.mapping if strategy else {}):
                continue
            window = bc.layers[i].sliding_window or 10**9
            seen = ac.layers[i].seen

            def visible(positions, valid):  # real tokens a query can still see (a window hides older ones)
                return [
                    sorted(p for p, v in zip(h.tolist(), vh.tolist()) if v and p > seen - window)
                    for h, vh in zip(positions, valid)
                ]

            assert visible(bc.layers[i].positions[0] - pad, bc.layers[i].valid[0]) == visible(
                ac.layers[i].positions[0], ac.layers[i].valid[0]
            )


# --------------------------------------------------------------------------------------------
# command line and benchmark
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,name",
    [
        (["--method", "pyramidinfer", "--budget", "5"], "pyramidinfer"),
        (["--method", "quantized", "--bits", "4"], "quantized"),
        (["--method", "h2o,quantized", "--budget", "4", "--bits", "8"], "h2o+quantized"),
    ],
)
def test_cli_bench_with_a_method(tiny_dir, tmp_path, monkeypatch, flags, name):
    """Every shared row carries the method (rate 0: the method alone) and holds exactly the bytes it predicts; a
    method without its settings, or on a static cache, is refused before anything is built."""
    import json

    import kvshare.bench
    from kvshare.cli import main

    in_process = kvshare.bench.bench  # spawning a process per row costs seconds each: measure here
    monkeypatch.setattr(kvshare.bench, "bench", lambda *a, **kw: in_process(*a, **{**kw, "isolate": False}))
    out = tmp_path / "b.json"
    command = ["bench", "--model", tiny_dir, "--random-weights", "--out", str(out)]
    sizes = ["--rates", "0,0.25", "--batch", "2", "--prompt-len", "12", "--new-tokens", "3", "--repeats", "1"]
    assert main(command + sizes + flags) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], (r["method"] or {}).get("method"), r["num_shared"]) for r in rows] == [
        ("plain", None, 0),
        ("shared", name, 0),
        ("shared", name, 2),
    ]
    for r in rows:
        assert r["kv_bytes"] == r["kv_bytes_predicted"]
        assert r["kv_bytes_ratio"] == pytest.approx(r["kv_bytes_expected_ratio"])
    assert rows[2]["kv_bytes"] < rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
    if name == "quantized":  # int4 with groups of 8 float32 channels: (0.5 + 8 / 8) / 4 of the bytes, x (L - C) / L
        assert rows[1]["kv_bytes_ratio"] == pytest.approx(0.375)
        assert rows[2]["kv_bytes_ratio"] == pytest.approx(0.375 * 6 / 8)
    assert main(command + flags + ["--cache", "static"]) == 2
    assert main(command + ["--method", "h2o"]) == 2  # its budget is missing


@pytest.mark.parametrize(
    "argv,line",
    [
        (["ppl", "--policy", "h2o", "--budget", "128"], "ppl: error: --policy is gone: use --method h2o --budget 128"),
        (["bench", "--kv-bits", "8", "--out", "b"], "bench: error: --kv-bits is gone: use --method quantized --bits 8"),
        (
            ["eval", "--policy=h2o", "--budget", "64", "--kv-bits", "4", "--out", "r.json"],
            "eval: error: --policy and --kv-bits are gone: use --method h2o,quantized --budget 64 --bits 4",
        ),
    ],
)
def test_policy_and_kv_bits_fail_with_one_line_naming_the_new_spelling(argv, line, capsys):
    from kvshare.cli import main

    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [f"kvshare {line}"] and out.out == ""


def test_cli_ppl_with_eviction(cli_ppl):
    import kvshare.cli as cli

    ppl = cli_ppl
    full = ppl("--decode", "--context", "16")
    big = ppl("--method", "h2o", "--budget", "100", "--context", "16")
    small = ppl("--method", "streamingllm", "--budget", "6", "--context", "16")
    assert full["tokens"] == big["tokens"] == small["tokens"] == 4 * 15
    assert big["ppl"] == full["ppl"] and small["ppl"] != full["ppl"]
    assert small["method"] == {"method": "streamingllm", "budget": 6, "sink": 4} and "method" not in full
    assert cli.main(["ppl", "--method", "h2o"]) == 2
    assert cli.main(["ppl", "--context", "8"]) == 2


def test_decode_protocol_without_a_method_is_the_single_forward(char_tokenizer):
    """Perplexity by decoding scores the same tokens a single forward would, with the same numbers."""
    import torch.nn.functional as F

    from kvshare.metrics import decode_nlls

    model = make_tiny_model("qwen3", "sdpa")
    text = "a stitch in time saves nine; " * 5
    nlls = decode_nlls(model, char_tokenizer, text, window=40, context=20, batch_size=2)
    ids = char_tokenizer(text, return_tensors="pt")["input_ids"][0]
    assert len(nlls) == len(ids) // 40 and all(n.numel() == 19 for n in nlls)
    with torch.no_grad():
        for k, n in enumerate(nlls):
            w = ids[k * 40 : (k + 1) * 40][None]
            lp = F.log_softmax(model(input_ids=w).logits.float(), -1)[0, :-1].gather(-1, w[0, 1:, None])[:, 0]
            assert torch.allclose(n.float(), -lp[20:], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_order_of_construction_does_not_matter(name):
    """Method first or sharing first, nested or not: one semantics, and whatever was enabled before comes back."""
    model = make_tiny_model("llama", "sdpa")
    strategy = Strategy({2: 1, 5: 3}, NUM_LAYERS)
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(10))
    direct, _ = run(model, ids, make(name, budget=5), strategy, prompt=9)
    with kvshare.compression(model, None, make(name, budget=5)):  # a method on, then sharing + method
        nested, _ = run(model, ids, make(name, budget=5), strategy, prompt=9)
        assert active_strategy(model).mapping == {}
    with kvshare.compression(model, strategy):  # sharing on, then sharing + method
        nested2, _ = run(model, ids, make(name, budget=5), strategy, prompt=9)
        assert active_method(model) is None
    assert torch.equal(direct, nested) and torch.equal(direct, nested2)
    assert getattr(model, "_kvshare", None) is None


# --------------------------------------------------------------------------------------------
# the fast decode path: slots in place, probabilities from the attention itself
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["h2o", "pyramidinfer"])
def test_scored_attention_under_sdpa_keeps_what_eager_weights_keep(name):
    """Under sdpa a scoring layer's decode attention returns its own probabilities (kvshare's attention function);
    under eager the model's weights are used: the same tokens are kept and the logits agree."""
    ids = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(11))
    method = make(name, budget=7) if name == "h2o" else make(name, budget=7, window=3, interval=3)
    outs, kept_sets = {}, {}
    for impl in ("sdpa", "eager"):
        steps = []
        outs[impl], _ = run(
            make_tiny_model("llama", impl),
            ids,
            method,
            prompt=10,
            on_step=lambda c, s, e, steps=steps: steps.append([kept(c, i) for i in range(NUM_LAYERS)]),
        )
        kept_sets[impl] = steps
    assert kept_sets["sdpa"] == kept_sets["eager"]
    assert torch.allclose(outs["sdpa"], outs["eager"], atol=1e-4)
    model = make_tiny_model("llama", "sdpa")
    assert all(layer.self_attn.config is model.config for layer in model.model.layers)  # detach restored it


def test_decoding_past_the_budget_reuses_one_buffer():
    """Past the budget a decode step writes the new token into the free slot and moves at most one kept token (per
    row and head) into the slot it frees: after the prefill, every step uses the same budget + 1 slots."""
    model = make_tiny_model("llama", "sdpa")
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    buffers, sizes = [], []

    def record(cache, s, e):
        layer = cache.layers[0]
        buffers.append(layer._kbuf.data_ptr())
        sizes.append((layer.capacity(), layer.held()))

    run(model, ids, StreamingLLM(budget=6, sink=2), prompt=10, on_step=record)
    assert len(set(buffers[1:])) == 1
    assert set(sizes) == {(7, 6)}


@pytest.mark.parametrize(
    "flags",
    [
        ("--method", "minicache", "--start-layer", str(NUM_LAYERS)),  # no pair: nothing merged
        ("--method", "h2o", "--budget", "1000", "--context", "16"),  # a budget above every window
        ("--method", "simlayerkv", "--threshold", "1.5"),  # no layer lazy
    ],
)
def test_cli_ppl_of_a_method_that_compresses_nothing_is_the_full_models(cli_ppl, flags):
    """`kvshare ppl` with a method names its protocol and gives the full model's perplexity under that same
    protocol beside it: a method that compresses nothing gives exactly the full number, ratio 1."""
    line = cli_ppl(*flags)
    assert line["protocol"].startswith("decoded windows")
    assert line["ppl"] == line["ppl_full"] and line["ppl_ratio"] == 1.0
    plain = cli_ppl("--decode", *(f for f in flags if f in ("--context", "16")))
    assert plain["ppl"] == line["ppl"] and plain["protocol"] == line["protocol"] and "ppl_full" not in plain
