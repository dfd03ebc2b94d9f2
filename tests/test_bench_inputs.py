"""What the benchmark takes: a searched strategy instead of the evenly spread one, any registered method, and a
configuration that cannot fit refused before anything loads (timings are never asserted)."""

from __future__ import annotations

import json

import pytest

from kvshare import bench as B
from kvshare import methods
from kvshare.cli import main
from kvshare.strategy import Strategy


def test_bench_uses_a_searched_strategy(tiny_dir, tmp_path):
    strategy = Strategy({7: 1, 6: 1, 3: 2}, 8, {"model": "tiny"})
    path = strategy.save(tmp_path / "s.json")
    rows = B.bench(
        tiny_dir,
        rates=(0.0, 0.25),
        batches=(1,),
        prompt_len=6,
        new_tokens=3,
        random_weights=True,
        repeats=1,
        warmup=0,
        isolate=False,
        progress=False,
        strategy=path,
    )
    shared = [r for r in rows if r["mode"] == "shared"]
    assert [r["num_shared"] for r in shared] == [0, 3]  # rate 0: nothing shared; above 0: the file's strategy
    assert Strategy.from_dict(shared[1]["strategy"]).mapping == strategy.mapping
    plain = next(r for r in rows if r["mode"] == "plain")
    assert shared[1]["kv_bytes"] * 8 == plain["kv_bytes"] * 5


def test_bench_runs_any_registered_method(tiny_dir):
    method = methods.make("streamingllm", budget=4, sink=1)
    rows = B.bench(
        tiny_dir,
        rates=(0.25,),
        batches=(1,),
        prompt_len=6,
        new_tokens=3,
        random_weights=True,
        repeats=1,
        warmup=0,
        isolate=False,
        progress=False,
        method=method,
    )
    shared = next(r for r in rows if r["mode"] == "shared")
    assert shared["method"] == method.to_dict()
    assert shared["kv_bytes"] == shared["kv_bytes_predicted"]


@pytest.mark.slow  # the benchmark measures in a subprocess
def test_cli_bench_strategy_flag(tiny_dir, tmp_path, capsys):
    path = Strategy({7: 6}, 8).save(tmp_path / "s.json")
    out = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                "--model",
                tiny_dir,
                "--random-weights",
                "--rates",
                "0.5",
                "--batch",
                "1",
                "--prompt-len",
                "6",
                "--new-tokens",
                "2",
                "--repeats",
                "1",
                "--rounds",
                "1",
                "--strategy",
                str(path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert next(r for r in rows if r["mode"] == "shared")["num_shared"] == 1


def test_a_configuration_that_cannot_fit_fails_before_loading(capsys, monkeypatch):
    monkeypatch.setattr(B, "available_bytes", lambda device: 20 * 2**30)
    loaded = []
    monkeypatch.setattr(B, "build_model", lambda *a, **k: loaded.append(1))
    assert main(["bench", "--model", "llama2-7b", "--random-weights", "--out", "/tmp/never.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least" in err[0] and "--dtype bfloat16 would fit" in err[0]
    assert not loaded
    assert main(["bench", "--model", "llama2-70b", "--random-weights", "--out", "/tmp/never.json"]) == 2
    assert "no --dtype fits" in capsys.readouterr().err


def test_a_context_beyond_the_model_s_is_one_line_before_anything_runs(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    monkeypatch.setattr(B, "shape_config", lambda name, model=None: SimpleNamespace(max_position_embeddings=8192))
    monkeypatch.setattr(B, "bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    B.check_context("smollm2-135m", 8190, 2)  # exactly the context: fine
    B.check_context("llama2-7b", 100_000, 2)  # a preset's random weights: no limit to trust
    out = tmp_path / "b.json"
    assert main(["bench", "--prompt-len", "100000", "--new-tokens", "2", "--rates", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "context of 8192 tokens" in err and "at most 8190" in err
    assert not out.exists()


def test_a_memory_budget_that_fits_nothing_is_one_line_and_keeps_the_rows(tmp_path, capsys):
    from types import SimpleNamespace

    from kvshare.cli import CLIError, _check_budget_fits

    args = SimpleNamespace(memory_budget_gb=0.001, model="m")
    _check_budget_fits(args, {"fits": True}, tmp_path / "b.json")  # a fitting budget says nothing
    with pytest.raises(CLIError) as err:
        _check_budget_fits(args, {"fits": False, "line_points": [(1, 2**30), (2, 2**31)]}, tmp_path / "b.json")
    line = str(err.value)
    assert "\n" not in line and "0.001 GiB fits no batch" in line and "1.00 GiB" in line and "b.json" in line


def test_same_process_builds_the_model_once_and_an_isolated_run_says_what_it_starts(monkeypatch, tmp_path, capsys):
    """--same-process measures every configuration on one model (isolate=False); without it, a CPU run first says
    how many processes it starts, each building the model again, and why (peak memory)."""
    seen = {}

    def fake_bench(model, **kw):
        seen.update(kw)
        return [{"mode": "plain", "rate": 0.0, "batch": 1, "decode_tps": 1.0, "prefill_s": 1.0}]

    monkeypatch.setattr(B, "bench", fake_bench)
    monkeypatch.setattr(B, "format_table", lambda rows, budget=False: "")
    argv = ["bench", "--model", "llama2-7b", "--random-weights", "--rates", "0,0.25", "--batch", "1"]
    main([*argv, "--prompt-len", "16", "--new-tokens", "2", "--same-process", "--out", str(tmp_path / "b.json")])
    assert seen["isolate"] is False
    note = B.isolation_note("llama2-7b", True, 3, 5)
    assert "15 runs (3 configurations x 5 rounds)" in note and "6.74B parameters" in note and "--same-process" in note
