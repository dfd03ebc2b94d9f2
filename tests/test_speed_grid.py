"""The speed-versus-context grid (kvshare.speed) on the tiny Llama: the rows' fields, ratios against the full row,
shares measured at or under their targets, the bytes bound, and `kvshare bench --context` (timings never asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from kvshare import methods, speed
from kvshare.cli import main

FIELDS = {
    "method",
    "settings",
    "target_share",
    "target_reached",
    "context",
    "prompt_len",
    "batch",
    "new_tokens",
    "decode_tps",
    "prefill_s",
    "kept_bytes",
    "full_bytes",
    "kept_share",
    "bytes16",
    "full_bytes16",
    "kept_share16",
    "kept_bytes_mid",
    "full_bytes_mid",
    "weight_bytes",
    "speed_ratio",
    "bytes_bound",
    "share_of_bound",
    "rounds",
    "runs_under_load",
    "under_load",
    "other_busy_cores",
}
CONTEXT, NEW = 48, 4


@pytest.fixture(scope="module")
def grid():
    model = make_tiny_model("llama", "sdpa")
    return speed.speed_grid(
        model, contexts=(CONTEXT,), batches=(1, 2), new_tokens=NEW, rounds=2, progress=False, estimate=False
    )


def test_rows_have_every_field_and_the_full_row_is_the_reference(grid):
    configs = 1 + len(methods.REGISTRY) * 2
    assert len(grid) == 2 * configs
    for r in grid:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r["context"], r["prompt_len"], r["new_tokens"]) == (CONTEXT, CONTEXT - NEW, NEW)
        # both alternating rounds, each with its load; the full model's rounds beside every method's
        expected = [0, 1] * (configs - 1 if r["method"] == "full" else 1)
        assert [x["round"] for x in r["rounds"]] == expected
        assert all("under_load" in x and "decode_tps" in x for x in r["rounds"])
        assert r["kept_bytes"] == r["kept_bytes_predicted"], r["method"]  # measured bytes = the accounting's
        assert r["share_of_bound"] == pytest.approx(r["speed_ratio"] / r["bytes_bound"])
    for batch in (1, 2):
        full = [r for r in grid if r["method"] == "full" and r["batch"] == batch]
        assert len(full) == 1
        assert full[0]["speed_ratio"] == 1.0 and full[0]["bytes_bound"] == 1.0 and full[0]["kept_share"] == 1.0
        assert full[0]["settings"] is None
        assert full[0]["bytes16"] * 2 == full[0]["kept_bytes"]  # the tiny model runs in float32


def test_measured_shares_at_or_under_their_targets(grid):
    unreached = set()
    for r in grid:
        if r["method"] == "full":
            continue
        if not r["target_reached"]:
            unreached.add((r["method"], r["target_share"]))
            continue
        assert r["kept_share"] <= r["target_share"] + 1e-6, r
        assert r["kept_share16"] <= r["target_share"] + 1e-6, r
    # merging every pair of layers still keeps over half the bytes (the merged direction plus two magnitudes)
    assert unreached == {("minicache", 0.5)}
    quantized = [r for r in grid if r["method"] == "quantized" and r["batch"] == 1]
    assert [r["settings"]["bits"] for r in quantized] == [8, 4]
    assert all(r["kept_share"] < r["kept_share16"] for r in quantized)  # codes weigh more against 16-bit floats


def test_bytes_bound_by_hand():
    # weights 100, a full cache of 300 bytes, a kept one of 100: (100 + 300) / (100 + 100)
    assert speed.bytes_bound(100, 300, 100) == 2.0
    assert speed.bytes_bound(100, 300, 300) == 1.0


def test_weight_bytes_count_tied_embeddings_once():
    untied = make_tiny_model("llama", "sdpa")
    tied = make_tiny_model("llama", "sdpa", tie_word_embeddings=True)
    params = sum(p.numel() * p.element_size() for p in untied.parameters())
    buffers = sum(b.numel() * b.element_size() for b in untied.buffers())
    assert speed.weight_bytes(untied) == params + buffers
    embedding = untied.config.vocab_size * untied.config.hidden_size * 4
    assert speed.weight_bytes(tied) == params + buffers - embedding


def test_method_at_rules():
    config = make_tiny_model("llama", "sdpa").config  # 6 layers
    assert speed.method_at("kvsharer", 0.5, config, 100).strategy.num_shared == 3
    assert speed.method_at("kvsharer", 0.75, config, 100).strategy.num_shared == 2  # ceil(1.5): at most 75%
    assert speed.method_at("h2o", 0.5, config, 100).settings.budget == 50
    assert speed.method_at("StreamingLLM", 0.75, config, 100).settings.budget == 75
    sim = speed.method_at("simlayerkv", 0.5, config, 100).settings
    assert (sim.threshold, sim.sink + sim.recent) == (0.0, 50)
    assert speed.method_at("quantized", 0.75, config, 100).settings.bits == 8
    assert speed.method_at("quantized", 0.5, config, 100).settings.bits == 4
    mini = speed.method_at("minicache", 0.75, config, 100)
    assert speed.share16(mini, config, 100) <= 0.75
    milder = methods.make("minicache", start_layer=mini.settings.start_layer + 1)
    assert speed.share16(milder, config, 100) > 0.75  # the latest start layer at or under the share


def test_method_at_refuses_an_unknown_name_in_one_line():
    config = make_tiny_model("llama", "sdpa").config
    with pytest.raises(ValueError, match="unknown method 'nope'; available: kvsharer") as e:
        speed.method_at("nope", 0.5, config, 100)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        speed.method_at("h2o", 1.0, config, 100)


def test_heldout_ids_without_a_tokenizer():
    ids = speed.heldout_ids(300, vocab=100)
    assert ids.shape == (300,) and ids.dtype == torch.long
    assert int(ids.min()) >= 3 and int(ids.max()) < 100
    assert torch.equal(ids, speed.heldout_ids(300, vocab=100))  # the same tokens every time


def test_estimate_seconds_scales_with_the_grid():
    model = make_tiny_model("llama", "sdpa")
    small = speed.GridSettings(contexts=(32,), batches=(1,), new_tokens=4, rounds=1)
    est = speed.estimate_seconds(model, small, unit_tokens=16, unit_steps=2)
    # one round each: every method's decode round beside one of the full model's
    assert est["runs"] == 2 * len(methods.REGISTRY) * 2 and est["seconds"] > 0
    assert "speed grid: about" in speed.format_estimate(est)
    per_point = speed.estimate_seconds(model, speed.GridSettings(contexts=(32, 128), batches=(1, 4), new_tokens=4))
    seconds = {(p["context"], p["batch"]): p["seconds"] for p in per_point["points"]}
    assert seconds[(128, 1)] > seconds[(32, 1)] and seconds[(32, 4)] > seconds[(32, 1)]


def test_context_above_the_limit_is_one_line():
    model = make_tiny_model("llama", "sdpa")  # 256 positions
    with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
        speed.speed_grid(model, contexts=(512,), progress=False, estimate=False)


def test_cli_parses_the_grid_flags(monkeypatch, tmp_path, capsys, grid):
    seen = {}

    def fake_grid(model, **kwargs):
        seen.update(kwargs, model=model)
        return grid

    monkeypatch.setattr(speed, "speed_grid", fake_grid)
    out = tmp_path / "grid.json"
    argv = ["bench", "--methods", "h2o,streamingllm", "--context", "1024,2048,4096,8192", "--batch", "1,4"]
    argv += ["--keep", "0.75,0.5", "--rounds", "5", "--new-tokens", "32", "--out", str(out)]
    assert main(argv) == 0
    assert seen["methods"] == ["h2o", "streamingllm"]
    assert seen["contexts"] == [1024, 2048, 4096, 8192]
    assert (seen["batches"], seen["keep"], seen["rounds"], seen["new_tokens"]) == ([1, 4], [0.75, 0.5], 5, 32)
    printed = capsys.readouterr().out
    assert "x full" in printed and "of bound" in printed and "best of 2 alternating rounds" in printed
    assert len(json.loads(out.read_text())["speed_grid"]) == len(grid)
    assert main(["bench", "--context", "1024", "--out", str(out)]) == 0
    assert seen["methods"] is None and seen["new_tokens"] == 32  # every method; the grid's default decode


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "h2o,nope"], "unknown method 'nope'; available:"),
        (["--context", "16384", "--methods", "h2o"], "exceed smollm2-135m's context of 8192 tokens"),
        (["--methods", "h2o", "--budget", "8"], "--context runs the speed grid: drop --budget"),
    ],
)
def test_cli_grid_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = ["bench", "--context", "1024", *argv] if "--context" not in argv else ["bench", *argv]
    assert main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_figure_has_a_panel_per_method(grid):
    import matplotlib

    matplotlib.use("Agg")
    from kvshare.experiments.reports.memory_speed import speed_vs_context_figure

    fig = speed_vs_context_figure(grid)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == sorted(methods.REGISTRY)
    assert "best of 2 alternating rounds" in fig._suptitle.get_text()


def test_kvsharer_takes_the_first_pairs_of_a_search_result():
    from kvshare.strategy import Strategy

    config = make_tiny_model("llama", "sdpa").config
    pairs = [[5, 4], [3, 2], [1, 0], [4, 2]]
    searched = Strategy({5: 4, 3: 2, 1: 0, 4: 2}, 6, {"accepted_pairs": pairs})
    method = speed.method_at("kvsharer", 0.5, config, 100, strategy=searched)
    assert method.strategy.mapping == {1: 0, 3: 2, 5: 4}  # its first three accepted pairs
    with pytest.raises(ValueError, match="accepted pairs"):
        speed.method_at("kvsharer", 0.5, config, 100, strategy=Strategy({5: 4}, 6))


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_decoding_from_a_copied_prefill_is_decoding_after_it(name):
    """The grid decodes every round from a copy of the prefilled cache's layers: the same logits as decoding right
    after the prefill (the slots still share what they share with their method: MiniCache's split reads)."""
    from transformers import DynamicCache

    import kvshare
    from kvshare.combine import copy_cache_layers

    model = make_tiny_model("llama", "sdpa")
    prompt = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(5))
    method = speed.method_at(name, 0.5, model.config, 20)

    def steps(cache, token):
        out = []
        for _ in range(4):
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            out.append(logits)
            token = logits.argmax(-1, keepdim=True)
        return torch.stack(out)

    with torch.no_grad(), kvshare.compression(model, method):
        cache = DynamicCache(config=model.config)
        token = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        copied = copy_cache_layers(cache.layers, method)
        direct = steps(cache, token)
        cache.layers = copy_cache_layers(copied, method)
        again = steps(cache, token)
    assert torch.equal(direct, again)


def _row(method, share, batch, context, ratio, bound=1.1, kept16=None):
    return {
        "method": method,
        "target_share": share,
        "batch": batch,
        "context": context,
        "speed_ratio": ratio,
        "bytes_bound": bound,
        "share_of_bound": ratio / bound,
        "kept_share16": share if kept16 is None else kept16,
    }


def test_speed_goals_read_the_grid():
    """Notebook 04's section 5: the lowest ratio at batch 1 from 2k tokens (goal >= 1.0) and the share of the bound
    at the largest batch and context (goal >= 0.8), per method and share; a method below is named in the text."""
    from kvshare.experiments import memory_speed as ms
    from kvshare.experiments.reports import memory_speed as report

    rows = [_row("full", 1.0, b, c, 1.0, 1.0) for b in (1, 4) for c in (1024, 2048, 8192)]
    rows += [_row("h2o", 0.75, 1, 1024, 0.5), _row("h2o", 0.75, 1, 2048, 0.95), _row("h2o", 0.75, 1, 8192, 1.2)]
    rows += [_row("h2o", 0.75, 4, 8192, 0.85, bound=1.2)]
    rows += [_row("kvsharer", 0.75, 1, c, 1.05) for c in (1024, 2048, 8192)] + [_row("kvsharer", 0.75, 4, 8192, 1.1)]
    goals = {g["method"]: g for g in ms.speed_goals(rows)}
    h2o, kvsharer = goals["h2o"], goals["kvsharer"]
    assert (h2o["min_ratio_batch1"], h2o["min_ratio_context"], h2o["at_or_above_full"]) == (0.95, 2048, False)
    assert h2o["largest"] == (4, 8192) and h2o["within_bound_goal"] is False  # 0.85 / 1.2 < 0.8
    assert kvsharer["at_or_above_full"] and kvsharer["within_bound_goal"]
    text = "\n".join(report.speed_goal_lines(list(goals.values())))
    assert "1 of 2 method settings decode at or above" in text and "h2o at 75% (x0.95 at 2048)" in text
    assert "1 of 2 method settings reach 80%" in text


def test_notebook_04_section_5_in_quick_mode_on_a_tiny_model(tmp_path):
    """What notebook 04's section 5 runs, in its quick settings (context shortened for the tiny model): the grid,
    the goals, the figure and the conclusion's lines."""
    import matplotlib

    matplotlib.use("Agg")
    from kvshare.experiments import memory_speed as ms
    from kvshare.experiments.reports import memory_speed as report

    cfg = ms.Settings.for_run("tiny", quick=True, speed_contexts=(40,))
    assert cfg.speed_methods == ("streamingllm", "kvsharer") and cfg.rounds == 1
    rows = ms.context_sweep(make_tiny_model("llama", "sdpa"), cfg, progress=False)
    assert [r["method"] for r in rows] == ["full", "streamingllm", "kvsharer"]
    goals = ms.speed_goals(rows)
    fig = report.speed_vs_context_figure(rows, title="tiny")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 2  # a panel per method
    assert [g["method"] for g in goals] == ["streamingllm", "kvsharer"]
    lines = report.speed_goal_lines(goals)  # no point from 2k tokens: only the bound at the one point measured
    assert len(lines) >= 1 and lines[0].startswith("- **Against the bytes bound** (batch 1, 40 tokens)")
