"""Notebook 05's logic (kvshare.experiments.intra_layer) on a tiny random model: quality through the evaluation
entry point (decoded perplexity, multiple choice, every cell scored by decoding), then the table,
the additivity check, and its report (the conclusion and the figure) on made-up costs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from test_evaluation import NUM_LAYERS, home, local_tasks, tiny_model  # noqa: E402,F401 (fixtures)

import kvshare  # noqa: E402
from kvshare.experiments import intra_layer as il  # noqa: E402
from kvshare.experiments.reports import intra_layer as report  # noqa: E402
from kvshare.tasks.offline import mc_parts  # noqa: E402

BIG = 10_000  # tokens per layer: more than any sequence here, so the method drops nothing


@pytest.fixture
def quality_rows(tiny_model, byte_tokenizer, local_tasks):
    cfg = il.settings(
        "tiny",
        quick=False,
        budgets=[6, BIG],
        methods=["streamingllm", "h2o"],
        window=40,
        context=20,
        eval_windows=2,
        eval_batch=2,
        mc_tasks=[local_tasks[0]],
    )
    strategy = kvshare.Strategy({3: 1}, NUM_LAYERS)
    return cfg, strategy, il.quality(tiny_model, byte_tokenizer, cfg, strategy, progress=False)


@pytest.mark.slow
def test_quality_goes_through_the_evaluation_entry_point(quality_rows, tiny_model):
    cfg, strategy, rows = quality_rows
    t = {r["label"]: r for r in rows}
    assert list(t) == [c.label for c in il.cells(cfg)]
    for r in rows:
        assert len(r["window_nll"]) == r["windows"] == 2
        assert len(r["mc_scores"]) == len(mc_parts(cfg.mc_tasks[0])["test"])  # the test part only
        assert 0 <= r["mc_acc"] <= 1 and r["mc_chance"] == pytest.approx(1 / 3)
        assert r["num_shared"] == (1 if r["shared"] else 0)
        assert {e["task"] for e in r["eval_rows"]} == {"kvshare_ppl", "kvshare_tiny_arith"}
    same = ("window_nll", "mc_scores")
    # a budget above every length is the full model, alone and with sharing
    for name in ("StreamingLLM", "H2O"):
        for key in same:
            assert t[f"{name} {BIG}"][key] == pytest.approx(t["full"][key], abs=1e-9)
            assert t[f"{name} {BIG} + sharing"][key] == pytest.approx(t["sharing"][key], abs=1e-9)
    assert t["sharing"]["ppl"] != t["full"]["ppl"]  # sharing changes the model
    assert t["StreamingLLM 6"]["ppl"] != t["full"]["ppl"]  # and a small budget evicts
    assert getattr(tiny_model, "_kvshare", None) is None


def _costs(rows, strategy):
    """Made-up costs: K/V bytes scale with what is kept, speed and peaks vary a little."""
    out = []
    for i, r in enumerate(rows):
        kv = 1000.0 * (0.75 if r["shared"] else 1.0) * (min(r["budget"], 40) / 40 if r["budget"] else 1.0)
        out.append(
            {
                "label": r["label"],
                "kv_bytes": kv,
                "kv_bytes_predicted": kv,
                "peak_bytes": 5e6 + kv,
                "baseline_bytes": 4e6,
                "decode_peak_bytes": 4.5e6 + kv,
                "decode_tps": 20.0 + i,
                "prefill_s": 0.1,
            }
        )
    return out


@pytest.mark.slow
def test_table_additivity_conclusion_and_figure(quality_rows):
    cfg, strategy, q = quality_rows
    rows = il.table(q, _costs(q, strategy))
    t = {r["label"]: r for r in rows}
    assert t["full"]["mc_acc_diff"] == 0 and t["full"]["kv_ratio"] == 1
    assert t[f"H2O {BIG}"]["mc_acc_diff"] == pytest.approx(0) and t[f"H2O {BIG}"]["nll_diff"] == pytest.approx(0)
    assert t["sharing"]["kv_ratio"] == pytest.approx(0.75)
    adds = il.additivity(rows, q)
    assert len(adds) == 4
    exact = next(a for a in adds if a["policy"] == "h2o" and a["budget"] == BIG)
    assert exact["interaction"] == pytest.approx(0, abs=1e-9)  # nothing evicted: sharing's cost alone
    assert exact["kv_ratio_combined"] == pytest.approx(exact["kv_ratio_product"])
    text = report.conclusion(rows, adds, il.pareto_front(rows), "tiny", strategy)
    assert "exactly the bytes sharing and the policy predict together" in text
    assert "Multiple-choice accuracy" in text
    md = report.markdown_table(rows)
    assert md.count("\n") == len(rows) + 1 and "MC acc" in md
    fig = report.pareto_figure(rows, title="tiny")
    assert fig.axes
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_pareto_labels_do_not_collide_and_bars_carry_the_rounds_spread():
    points = [(0.1, 0.30), (0.1, 0.31), (0.11, 0.305), (0.8, 0.30)]
    heights = report.spread_labels(points, gap=0.04, near=0.2)
    crowded = sorted(heights[:3])
    assert all(b - a >= 0.04 - 1e-9 for a, b in zip(crowded, crowded[1:]))  # a cluster's labels stand apart
    assert heights[3] == 0.30  # a point far away in x keeps its label level with it
    full = {"decode_tps": 40.0, "rounds": [{"decode_tps": 40.0}, {"decode_tps": 36.0}]}
    cell = {"decode_tps": 44.0, "rounds": [{"decode_tps": 44.0}, {"decode_tps": 38.0}]}
    spread = il.round_spread(cell, full, "decode_tps", "decode_tps_ratio")
    assert spread == {"decode_tps_ratio_lo": 38.0 / 40.0, "decode_tps_ratio_hi": 44.0 / 40.0}
    assert il.round_spread({"decode_tps": 1.0}, full, "decode_tps", "x") == {"x_lo": None, "x_hi": None}
    rows = [{"decode_tps_ratio": 1.1, **spread}, {"decode_tps_ratio": 1.0, "decode_tps_ratio_lo": None}]
    lo, hi = report.spread_errors(rows, "decode_tps_ratio")
    assert lo == pytest.approx([1.1 - 0.95, 0.0]) and hi == pytest.approx([0.0, 0.0])
