"""The benchmark runs end to end on a tiny config and writes the documented columns (timings are never asserted)."""

import json

import pytest
from transformers import LlamaConfig

from kvshare import bench as B
from kvshare.cli import main

DOCUMENTED = {
    "rate",
    "batch",
    "prompt_len",
    "new_tokens",
    "kv_bytes",
    "peak_bytes",
    "prefill_s",
    "decode_tps",
    "kv_bytes_ratio",
    "peak_ratio",
    "decode_tps_ratio",
    "weights",
    "num_shared",
    "num_layers",
}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_bench_rows_and_exact_kv_ratio(tiny_dir, cache):
    rows = B.bench(
        tiny_dir,
        rates=(0.0, 0.25, 0.5),
        batches=(1, 2),
        prompt_len=6,
        new_tokens=3,
        cache=cache,
        random_weights=True,
        repeats=1,
        warmup=1,
        isolate=False,
        progress=False,
    )
    assert len(rows) == 2 * (1 + 3)
    for r in rows:
        assert DOCUMENTED <= set(r), DOCUMENTED - set(r)
        assert r["weights"] == "random"
        L, C = r["num_layers"], r["num_shared"]
        # exact: shared bytes * L == plain bytes * (L - C)
        plain = next(p for p in rows if p["mode"] == "plain" and p["batch"] == r["batch"])
        assert r["kv_bytes"] * L == plain["kv_bytes"] * (L - C)
    assert {r["num_shared"] for r in rows} == {0, 2, 4}


def test_bench_cache_bytes_match_shapes(tiny_dir):
    """The plain cache holds exactly L x (prompt + new) tokens of K and V (static: the preallocated length)."""
    row = B.bench(
        tiny_dir,
        rates=(),
        batches=(2,),
        prompt_len=5,
        new_tokens=4,
        random_weights=True,
        repeats=1,
        isolate=False,
        progress=False,
    )[0]
    # the last decoded token is not written back: prefill 5 + 4 decode steps = 9 cached tokens
    assert row["kv_bytes"] == 8 * 2 * 2 * 2 * 8 * 4 * 9  # layers * K,V * batch * kv_heads * head_dim * fp32 * tokens


def test_replaced_projections_not_called_in_bench(tiny_dir):
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    strategy = B.spread_strategy(8, 2)
    calls = {i: 0 for i in range(8)}
    for i, layer in enumerate(model.model.layers):
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    B.measure(B.Config(tiny_dir, "shared", 0.25, 1, 4, 2, random_weights=True, repeats=1, warmup=0), model)
    for r in strategy.mapping:
        assert calls[r] == 0
    assert all(calls[i] > 0 for i in range(8) if i not in strategy.mapping)


def test_spread_strategy_is_valid():
    for L in (8, 30, 32, 40, 80):
        for C in range(0, L // 2 + 1):
            s = B.spread_strategy(L, C)
            assert s.num_shared == C and 0 not in s.mapping


@pytest.mark.slow
def test_isolated_process_reports_peak(tiny_dir):
    row = B.measure_isolated(B.Config(tiny_dir, "plain", 0.0, 1, 4, 2, random_weights=True, repeats=1, warmup=0))
    assert row["peak_bytes"] >= row["baseline_bytes"] > 0


@pytest.mark.slow
def test_cli_bench_writes_json_and_csv(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--model",
            tiny_dir,
            "--random-weights",
            "--rates",
            "0,0.25",
            "--batch",
            "1",
            "--prompt-len",
            "4",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--rounds",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 3 and out.with_suffix(".csv").read_text().startswith("model,")
    assert "decode_tps_ratio" in capsys.readouterr().out


def test_cli_bench_bad_input(tmp_path, capsys):
    assert main(["bench", "--model", "llama2-7b", "--out", str(tmp_path / "x.json")]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert (
        main(
            ["bench", "--model", "llama2-7b", "--random-weights", "--rates", "0,1.5", "--out", str(tmp_path / "x.json")]
        )
        == 2
    )


def test_analysis_counts():
    cfg = LlamaConfig(**B.PRESETS["llama2-13b"])
    a = B.analysis(cfg, 10, 1, 512, 2048, "dynamic", 2)
    assert a["kv_token_bytes"] == 2 * 40 * 128 * 2
    s = B.analysis(cfg, 10, 1, 512, 2048, "static", 2)
    assert s["cache_copy_bytes"] == 30 * a["kv_token_bytes"] * 2048
    assert a["attn_read_bytes"] == s["attn_read_bytes"]  # sharing never shrinks what attention reads


def test_budget_comparison_finds_batches(tiny_dir):
    model = B.build_model(tiny_dir, random_weights=True, device="cpu")
    plain = B.max_batch_within(tiny_dir, 10**12, 0.0, 4, 2, random_weights=True, limit=3, model=model)
    assert plain["fits"] and plain["batch"] == 3  # an unlimited budget stops at `limit`
    tight = B.max_batch_within(tiny_dir, 1, 0.0, 4, 2, random_weights=True, model=model)
    assert not tight["fits"] and tight["batch"] == 0


def test_rounds_and_notebook_04_conclusion_on_a_tiny_run(tiny_dir):
    """bench(rounds=2) keeps every run and the fastest; notebook 04's conclusion reads the rows (numbers unasserted)."""
    import matplotlib

    matplotlib.use("Agg")
    from kvshare.experiments import memory_speed as ms
    from kvshare.experiments.reports import memory_speed as report

    rows = ms.rate_sweep(
        tiny_dir,
        rates=(0.0, 0.25),
        batches=(1,),
        prompt_len=8,
        new_tokens=3,
        repeats=1,
        random_weights=True,
        isolate=False,
        rounds=2,
        progress=False,
    )
    assert [(r["mode"], r["num_shared"]) for r in rows] == [("plain", 0), ("shared", 0), ("shared", 2)]
    for r in rows:
        assert [x["round"] for x in r["rounds"]] == [0, 1]
        assert r["decode_tps"] == max(x["decode_tps"] for x in r["rounds"])
        assert r["prefill_s"] == min(x["prefill_s"] for x in r["rounds"])
    assert rows[2]["kv_bytes_ratio"] == pytest.approx(6 / 8)
    check = ms.paper_memory_check()
    acc = ms.byte_accounting(
        LlamaConfig(**B.PRESETS["llama2-13b"]),
        rates=(0.0, 0.25),
        batch=check["max_batch_in_paper_peak"],
        prompt_len=512,
        new_tokens=64,
        elem=2,
    )
    text = report.conclusion(rows, [], check, acc, None)
    assert "exactly (L−C)/L = 0.7500" in text
    assert "C=0 overhead" in text and "measurement noise" in text and "the very same code runs" in text
    assert "no GPU results file" in text
    with pytest.raises(ValueError, match="rounds"):
        B.measure_rounds([1], lambda c: {}, rounds=0)
