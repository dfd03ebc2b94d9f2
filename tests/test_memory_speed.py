"""Notebook 04's long-prompt budget search (kvshare.bench.max_batch_within / budget_comparison): it finds the largest
batch whose peak fits in few probes from the accounting's guess, and stops within its bounds. Peaks are a fake
affine memory model (a real RSS is noise at tiny sizes); the runs themselves are real, on the tiny model."""

from __future__ import annotations

import inspect

import pytest

from kvshare import bench as B
from kvshare.experiments import intra_layer as il
from kvshare.experiments import memory_speed as ms

FIXED, PER_SEQ = 1000_000, 70_000  # the fake machine: peak = FIXED + batch x PER_SEQ


@pytest.fixture()
def fake_peaks(monkeypatch):
    """measure() runs for real, but reports the fake machine's peak; every call is logged."""
    calls = []
    real = B.measure

    def measure(config, model=None):
        row = real(config, model)
        row["peak_bytes"] = FIXED + config.batch * PER_SEQ
        calls.append(config)
        return row

    monkeypatch.setattr(B, "measure", measure)
    return calls


def test_budget_search_finds_the_largest_batch_in_few_probes(tiny_dir, fake_peaks):
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    budget = FIXED + 9 * PER_SEQ + PER_SEQ // 2  # batch 9 fits, 10 does not
    row = B.max_batch_within(tiny_dir, budget, 0.25, 16, 8, random_weights=True, model=model, max_probes=6)
    assert row["fits"] and row["batch"] == 9 and row["largest_proven"]
    assert row["peak_bytes"] <= budget
    # the accounting's bytes are not the fake machine's, yet two short probes (batch 1 and 2) give the line: the
    # first full run is the answer and the second proves it (b fits, b + 1 does not)
    assert len(row["probes"]) == 2 and [p["batch"] for p in row["probes"]] == [9, 10]
    assert [(c.batch, c.warmup) for c in fake_peaks[:2]] == [(1, 0), (2, 0)]  # the line probes
    assert row["fixed_bytes"] == FIXED and row["line_points"] == [(1, FIXED + PER_SEQ), (2, FIXED + 2 * PER_SEQ)]
    timed = fake_peaks[2:]
    assert all(c.new_tokens == 8 and c.warmup_prompt_len == min(16, B.BUDGET_WARMUP_PROMPT) for c in timed)
    assert row["num_shared"] == 2 and row["throughput_tps"] > 0 and len(row["decode_tps_quarters"]) == 4


def test_budget_search_stops_at_its_bounds(tiny_dir, fake_peaks, monkeypatch):
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    budget = FIXED + 40 * PER_SEQ
    # a bad first guess (far too many bytes per sequence) and one probe allowed: batch 1 only, not proven
    monkeypatch.setattr(B, "sequence_bytes", lambda *a: 50 * PER_SEQ)
    row = B.max_batch_within(tiny_dir, budget, 0.0, 8, 2, random_weights=True, model=model, max_probes=1)
    assert row["fits"] and len(row["probes"]) == 1 and not row["largest_proven"]
    # a time bound: a fake clock that advances 100 s per run; after the first full run, the next would pass 150 s
    clock = [0.0]

    def tick():
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr(B.time, "perf_counter", tick)
    real = B.measure

    def slow(config, model=None):
        clock[0] += 100.0
        return real(config, model)

    monkeypatch.setattr(B, "measure", slow)
    row = B.max_batch_within(tiny_dir, budget, 0.0, 8, 2, random_weights=True, model=model, time_limit_s=150)
    assert len(row["probes"]) == 1 and not row["largest_proven"]


def test_a_batch_fits_only_if_every_repeat_fits(tiny_dir, monkeypatch):
    """Each probe runs `probe_repeats` times; one repeat over the budget (a noisy peak) means it does not fit."""
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    budget = FIXED + 6 * PER_SEQ + PER_SEQ // 2  # batch 6 fits on a quiet machine
    real, count = B.measure, [0]

    def noisy(config, model=None):
        row = real(config, model)
        count[0] += 1
        spike = PER_SEQ if (config.batch == 6 and count[0] % 3 == 0) else 0  # every third run of batch 6 spikes
        row["peak_bytes"] = FIXED + config.batch * PER_SEQ + spike
        return row

    monkeypatch.setattr(B, "measure", noisy)
    row = B.max_batch_within(tiny_dir, budget, 0.0, 8, 2, random_weights=True, model=model, probe_repeats=3)
    assert all(len(p["peaks"]) == 3 for p in row["probes"])
    six = [p for p in row["probes"] if p["batch"] == 6]
    assert six and not any(p["fits"] for p in six) and row["batch"] < 6  # one spike in three: batch 6 is out
    assert all(p["fits"] == all(x <= budget for x in p["peaks"]) for p in row["probes"])


def test_budget_comparison_against_the_limits_and_the_paper(tiny_dir, fake_peaks):
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    budget = FIXED + 6 * PER_SEQ
    rows = B.budget_comparison(tiny_dir, budget, (0.25, 0.5), 8, 2, random_weights=True, model=model)
    rows = ms.against_claims(rows)  # what ms.budget_sweep adds to the comparison
    assert [r["mode"] for r in rows] == ["plain", "shared", "shared"]
    # two short line probes for all three searches: the shared ones start from the plain model's measured peaks
    assert [c.batch for c in fake_peaks if c.warmup == 0] == [1, 2]
    assert [len(r["line_points"]) for r in rows] == [2, 4, 4]
    plain, s25, s50 = rows
    assert plain["batch"] == s25["batch"] == s50["batch"] == 6  # the fake machine's bytes do not shrink
    assert s25["ideal_ratio"] == pytest.approx(8 / 6) and s50["kv_limit_ratio"] == pytest.approx(4 / 8)
    assert s50["kv_per_sequence_ratio"] == pytest.approx(0.5)  # the real caches: exactly (L - C) / L
    assert s25["paper_min_speedup"] == 1.3 and s25["meets_paper_memory"] is False
    assert "largest_proven" in B.format_table(rows, budget=True).splitlines()[0]


def test_shared_search_starts_from_the_plain_peaks_less_the_kv_it_leaves_out(tiny_dir, monkeypatch):
    """A machine where the K/V is all that grows with the batch: the shared search's first guess, from the plain
    model's measured peaks less the K/V of its C replaced layers (exact), is already the largest batch."""
    from kvshare.accounting import kv_token_bytes

    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    cfg = model.config
    prompt, tokens = 8, 4
    kv_layer = kv_token_bytes(cfg, 4) * (prompt + tokens)  # one layer's K/V of one sequence (float32)
    L = cfg.num_hidden_layers
    real = B.measure

    def measure(config, model=None):
        row = real(config, model)
        kept = L - B.num_shared_for(config.rate, L)
        row["peak_bytes"] = FIXED + config.batch * (1 + kept) * kv_layer  # activations: one layer's K/V
        return row

    monkeypatch.setattr(B, "measure", measure)
    budget = FIXED + 5 * (1 + L) * kv_layer  # plain: batch 5
    rows = B.budget_comparison(tiny_dir, budget, (0.5,), prompt, tokens, random_weights=True, model=model)
    plain, shared = rows
    C = shared["num_shared"]
    expected = (budget - FIXED) // ((1 + L - C) * kv_layer)
    assert plain["batch"] == 5 and shared["batch"] == expected > 5
    assert shared["probes"][0]["batch"] == expected and shared["largest_proven"]


def test_settings_default_to_five_rounds_and_the_estimate_adds_up():
    assert inspect.signature(ms.cache_sweep).parameters["rounds"].default == B.SPEED_ROUNDS == 5
    assert il.Settings.__dataclass_fields__["bench_rounds"].default == B.SPEED_ROUNDS
    from transformers import LlamaConfig

    cfg = LlamaConfig(**B.PRESETS["llama2-7b"])
    s = dict(
        rates=(0.0, 0.25),
        batches=(1,),
        lengths=(8, 16),
        prompt_len=8,
        new_tokens=16,
        repeats=1,
        rounds=5,
        isolate=True,
        compile_rounds=0,
        budget_predicted_batches={0.0: 2, 0.25: 3},
        budget_prompt_len=64,
        budget_new_tokens=4,
        budget_time_limit_s=60,
    )
    est = ms.estimate_seconds(cfg, s)
    assert est["total"] == sum(v for k, v in est.items() if k != "total") and est["3_static_compile"] > 0
    assert ms.predicted_budget_batches(cfg, 20 * 2**30, (0.5,), 2048, 32, 2)[0.5] >= 1


@pytest.mark.slow
def test_figures_start_at_zero_and_carry_spreads(tiny_dir, fake_peaks):
    import matplotlib

    matplotlib.use("Agg")
    from kvshare.experiments.reports import memory_speed as report

    kw = dict(prompt_len=8, repeats=1, random_weights=True, isolate=False, rounds=2, progress=False)
    rates = ms.rate_sweep(tiny_dir, rates=(0.0, 0.25), batches=(1, 2), new_tokens=8, **kw)
    lengths = ms.length_sweep(tiny_dir, lengths=(4, 8), rate=0.25, batch=2, reuse=rates, **kw)
    assert [r.get("reused", False) for r in lengths] == [False, False, True, True]  # 8 tokens: the rate sweep's
    static = ms.cache_sweep(tiny_dir, rates=(0.0, 0.25), batch=2, new_tokens=8, compile_rounds=0, **kw)
    assert {(r["cache"], r["mode"]) for r in static} == {("static", "plain"), ("static", "shared")}
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    budget = ms.against_claims(
        B.budget_comparison(tiny_dir, FIXED + 3 * PER_SEQ, (0.25,), 8, 8, random_weights=True, model=model)
    )
    figs = [
        report.plot_rate_sweep(rates, "t"),
        report.plot_length_sweep(lengths, "t"),
        report.plot_cache(static, rates, "t"),
        report.plot_budget(budget, "t"),
    ]
    for fig in figs:
        for ax in fig.axes:
            assert ax.get_ylim()[0] == 0  # bytes, ratios and rates from zero
            assert ax.get_legend() is None  # one legend per figure, outside the panels
    assert any(c.__class__.__name__ == "ErrorbarContainer" for c in figs[0].axes[2].containers)
    text = report.conclusion(rates, budget, ms.paper_memory_check(), [], None, static)
    assert "Long prompts within a memory budget" in text and "static cache" in text
