"""Notebook 08 (kvshare.experiments.ablations): every section end to end on a tiny model with a tiny held-out
protocol, the depth-matched source rules on a hand-made distance matrix, the normalized metric, and verdict text
computed from synthetic numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvshare.calibration import distances_from_means, layer_norms
from kvshare.experiments import ablations as ab
from kvshare.experiments.scaffold import ResultCache

TEXTS = [
    "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door " * 2,
    "a journey of a thousand miles begins with a single step and ends with a long rest at home " * 2,
    "she sells sea shells by the sea shore and the shells she sells are surely from the shore " * 2,
    "pack my box with five dozen liquor jugs and then carry the box all the way to the old barn " * 2,
    "how vexingly quick daft zebras jump when the wind blows hard across the open plain at dusk " * 2,
    "sphinx of black quartz judge my vow and listen to the river as it runs beneath the bridge " * 2,
]


@pytest.fixture
def tiny(monkeypatch, tiny_llama, char_tokenizer, tmp_path):
    """A tiny model, synthetic calibration texts for every domain and set, a held-out text, a quick config."""

    def texts_for(domain, n, set_index=0):
        shift = {"news": 0, "wikipedia": 3}[domain] + set_index
        return [TEXTS[(i + shift) % len(TEXTS)] + f" {domain} {i}" for i in range(n)]

    monkeypatch.setattr(ab, "texts_for", texts_for)
    monkeypatch.setattr("kvshare.data.eval_text", lambda source="offline": " ".join(TEXTS) * 3)
    cfg = ab.settings(
        "tiny",
        quick=True,
        samples=3,
        max_tokens=16,
        thresholds=[0.3, 0.9, 0.99],
        fixed_thresholds=[0.3, 0.9, 0.99],
        threshold_orders=["dissimilar", "similar", "best"],
        random_seeds=2,
        random_thresholds=[0.5, 0.99],
        threshold_c=2,
        screen_texts=2,
        metric_c_values=[1, 2],
        metric_sets=2,
        depth_c_values=[2],
        calibration_c=2,
        texts_grid=[2, 3],
        tokens_grid=[8, 16],
        heldout_tokens=64,
        heldout_window=16,
    )
    cache = ResultCache(tmp_path / "08_ablations_results.json")
    score = ab.scorer(tiny_llama, char_tokenizer, cfg, tmp_path)
    return tiny_llama, char_tokenizer, cfg, cache, score, tmp_path


def test_threshold_section_end_to_end(tiny):
    model, tok, cfg, cache, score, _ = tiny
    rows = ab.threshold_runs(model, tok, cfg, cache, progress=False)
    orders = {r["order"] for r in rows}
    assert orders == {"dissimilar", "similar", "best", "random"}
    assert len([r for r in rows if r["order"] == "random"]) == 2 * 2
    for r in rows:  # a reused row is exactly the search it stands for
        if r["reused"]:
            assert r["searched_at"] < r["threshold"]
            assert ab.same_walk(r["run"]["trace"], r["searched_at"], r["threshold"])
            direct = ab.run(
                model,
                tok,
                cfg,
                ResultCache(cache.path.with_name("fresh.json")),
                r["order"],
                cfg.threshold_c,
                r["threshold"],
                seed=r["seed"] if r["seed"] is not None else None,
                progress=False,
            )
            assert direct["strategy"]["mapping"] == r["run"]["strategy"]["mapping"]
    heldout = ab.score_all(score, ab.threshold_strategies(rows), "threshold", progress=False)
    table = ab.threshold_table(rows, heldout)
    assert all(("ppl" in r) == (r["layers_reached"] >= cfg.threshold_c) for r in table)
    v = ab.threshold_verdict(table, heldout["full"]["ppl"])
    assert set(v["per_order"]) == orders
    text = "\n".join(ab.threshold_sentences(v, cfg.threshold_c))
    assert "distinct strategies" in text
    # resumable: a second pass reads every search from the cache
    again = ab.threshold_runs(model, tok, cfg, ResultCache(cache.path), progress=False)
    assert [r["run"]["strategy"] for r in again] == [r["run"]["strategy"] for r in rows]


def test_metric_section_end_to_end(tiny):
    model, tok, cfg, cache, score, _ = tiny
    runs = ab.metric_runs(model, tok, cfg, cache, progress=False)
    assert len(runs) == len(cfg.metrics) * cfg.metric_sets
    heldout = ab.score_all(score, ab.metric_strategies(runs, cfg), "metric", progress=False)
    rows = ab.metric_table(runs, heldout, cfg)
    eu = [r for r in rows if r["metric"] == "euclidean"]
    assert all(r["jaccard_vs_euclidean"] == 1.0 and r["vs_euclidean_ratio"] == pytest.approx(1.0) for r in eu)
    norms = ab.layer_norm_rows(model, tok, cfg)
    assert len(norms) == model.config.num_hidden_layers and all(n["key_norm"] > 0 for n in norms)
    v = ab.metric_verdict(rows, norms, cfg)
    assert set(v["per_metric"]) == {"cosine", "normalized"}
    assert "norm" in "\n".join(ab.metric_sentences(v))


def test_depth_section_end_to_end(tiny):
    model, tok, cfg, cache, score, _ = tiny
    runs = ab.depth_runs(model, tok, cfg, cache, progress=False)
    cells = ab.depth_cells(model, tok, runs, cfg)
    assert len(cells) == 2 * 3 * len(cfg.depth_c_values)
    for cell in cells:  # every rule replaces exactly the search's layers
        assert sorted(cell["strategy"].mapping) == cell["replaced"]
    heldout = ab.score_all(score, [c["strategy"] for c in cells], "depth", progress=False)
    rows = ab.depth_table(cells, heldout)
    v = ab.depth_verdict(rows, heldout)
    assert v["per_C"][0]["C"] == cfg.depth_c_values[0]
    assert "Verdict (depth-matched)" in "\n".join(ab.depth_sentences(v))


def test_calibration_and_cost_sections_end_to_end(tiny):
    model, tok, cfg, cache, score, _ = tiny
    runs = ab.calibration_runs(model, tok, cfg, cache, progress=False)
    assert len(runs) == len(ab.calibration_conditions(cfg)) * len(cfg.calibration_orders)
    heldout = ab.score_all(score, ab.calibration_strategies(runs, cfg), "calibration", progress=False)
    rows = ab.calibration_table(runs, heldout, cfg)
    ref = [r for r in rows if r["domain"] == "news" and r["texts"] == cfg.samples and r["tokens"] == cfg.max_tokens]
    assert ref and all(r["jaccard_vs_reference"] == 1.0 for r in ref)
    v = ab.calibration_verdict(rows)
    assert "Verdict (calibration)" in "\n".join(ab.calibration_sentences(v, cfg))
    costs = ab.cost_rows(runs)
    assert len(costs) < len(runs)  # the reference condition appears under every factor, searched once
    by_c = ab.cost_vs_c(ab.depth_runs(model, tok, cfg, cache, progress=False).values())
    cv = ab.cost_verdict(costs, by_c, cfg)
    assert cv["texts"]["x_ratio"] == pytest.approx(3 / 2)
    assert cv["texts"]["forwards_ratio"] > 0 and cv["tokens"]["x_ratio"] == pytest.approx(2)
    assert "Verdict (cost)" in "\n".join(ab.cost_sentences(cv))


# ---- the rules, by hand --------------------------------------------------------------------------------------------
def test_depth_source_rules_on_a_hand_made_matrix():
    d = np.zeros((5, 5))
    d[3, :3] = [5.0, 1.0, 3.0]  # layer 3: farthest earlier layer 0, nearest 1, previous 2
    d[4, :4] = [2.0, 9.0, 0.5, 4.0]  # layer 4: farthest 1, nearest 2, previous 3
    d = d + d.T
    assert [ab.rule_source(d, 3, r) for r in ab.SOURCE_RULES] == [0, 1, 2]
    assert [ab.rule_source(d, 4, r) for r in ab.SOURCE_RULES] == [1, 2, 3]
    # chains: layer 4's previous layer 3 is itself replaced (by 2), so 4 reads 2
    st = ab.depth_strategy(d, [3, 4], "previous")
    assert st.mapping == {3: 2, 4: 2}
    assert ab.depth_strategy(d, [4, 3], "dissimilar").mapping == {3: 0, 4: 1}
    # attention types: only earlier layers of the same type
    assert ab.rule_source(d, 4, "dissimilar", types=["a", "b", "a", "b", "a"]) == 0
    with pytest.raises(ValueError, match="attention type"):
        ab.rule_source(d, 1, "previous", types=["a", "b", "a", "b", "a"])


def test_same_walk_and_overlaps():
    trace = [{"score": 0.95}, {"score": 0.72}, {"score": 0.4}]
    assert ab.same_walk(trace, 0.3, 0.35) and ab.same_walk(trace, 0.5, 0.7)
    assert not ab.same_walk(trace, 0.5, 0.8) and not ab.same_walk(trace, 0.3, 0.4)
    a = ab.Strategy({3: 1, 4: 1}, 6, {})
    b = ab.Strategy({3: 1, 5: 2}, 6, {})
    assert ab.jaccard(a, b) == pytest.approx(1 / 3) and ab.layer_jaccard(a, b) == pytest.approx(1 / 3)
    assert ab.jaccard(None, None) == 1.0


def test_normalized_metric_ignores_each_layers_scale():
    torch.manual_seed(0)
    keys, values = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None, None]
    plain = distances_from_means(keys, values, "normalized")
    assert np.allclose(distances_from_means(keys * scale, values * scale, "normalized"), plain, atol=1e-5)
    assert not np.allclose(distances_from_means(keys * scale, values * scale, "euclidean"), plain)
    unit_k, unit_v = keys / layer_norms(keys)[:, None, None, None], values / layer_norms(values)[:, None, None, None]
    assert np.allclose(distances_from_means(unit_k, unit_v, "euclidean"), plain, atol=1e-5)
    assert torch.allclose(layer_norms(unit_k), torch.ones(4))


# ---- verdicts from synthetic numbers -------------------------------------------------------------------------------
def _row(order, T, ppl, reached=8, seed=None, seconds=1.0, mapping=None):
    r = {
        "order": order,
        "seed": seed,
        "threshold": T,
        "layers_reached": reached,
        "rejected": 0,
        "search_seconds": seconds,
        "mapping": mapping or f"{order}{seed}{T}",
    }
    if ppl is not None:
        r["ppl"] = ppl
    return r


def test_threshold_verdict_text_is_computed():
    table = [
        _row("dissimilar", 0.5, 200.0, mapping="a"),
        _row("dissimilar", 0.8, 120.0, seconds=43.0, mapping="b"),
        _row("dissimilar", 0.9, None, reached=6, seconds=248.0),
        _row("best", 0.5, 36.0, seconds=150.0, mapping="c"),
        _row("best", 0.8, 36.0, seconds=150.0, mapping="c"),
    ]
    v = ab.threshold_verdict(table, 26.0)
    assert v["choice_order"] == "best" and v["choice"]["threshold"] == 0.5
    text = "\n".join(ab.threshold_sentences(v, 8))
    assert "use the **best** order at **T = 0.5**" in text and "1.38x the full" in text
    assert "T = 0.8 gives the lowest perplexity at C = 8, 120.00 (0.60x that of T = 0.5)" in text
    assert "from T = 0.9 the search no longer reaches C = 8 (it stops at 6 layers" in text
    assert "1 distinct strategies over 2 thresholds (T changed nothing" in text


def test_metric_verdict_against_the_rebuttal():
    rows = []
    for s in range(3):
        rows.append(
            {
                "order": "dissimilar",
                "metric": "cosine",
                "set": s,
                "C": 4,
                "jaccard_vs_euclidean": 0.5,
                "vs_euclidean_ratio": 0.9,
                "vs_euclidean_z": -3.0,
            }
        )
        rows.append(
            {
                "order": "dissimilar",
                "metric": "cosine",
                "set": s,
                "C": 12,
                "jaccard_vs_euclidean": 1.0,
                "vs_euclidean_ratio": 1.2,
                "vs_euclidean_z": 4.0 if s else 0.0,
            }
        )
    cfg = ab.settings("tiny", quick=False, metrics=["euclidean", "cosine"])
    v = ab.metric_verdict(rows, [], cfg)
    text = "\n".join(ab.metric_sentences(v))
    assert (
        "at C = 4 cosine/Euclidean = 0.90x here (rebuttal 0.96x on Llama-2-7B), clearly lower on 3 of 3 sets: holds"
        in text
    )
    assert "at C = 12 cosine/Euclidean = 1.20x" in text and "is contradicted" in text
    assert "differs at 3 of 6" in text


def test_depth_and_calibration_verdicts_from_synthetic_numbers():
    heldout = {}
    rows = []
    ppl = {
        ("dissimilar", "dissimilar"): 200.0,
        ("dissimilar", "similar"): 150.0,
        ("dissimilar", "previous"): 120.0,
        ("similar", "dissimilar"): 190.0,
        ("similar", "similar"): 90.0,
        ("similar", "previous"): 80.0,
    }
    for (ls, rule), p in ppl.items():
        k = f"{ls}-{rule}"
        heldout[k] = {"nll": math.log(p), "window_nll": [math.log(p) + d for d in (0.01, -0.01, 0.02, -0.02)]}
        rows.append({"C": 8, "layers_of": ls, "rule": rule, "mapping": k, "ppl": p})
    v = ab.depth_verdict(rows, heldout)
    p = v["per_C"][0]
    assert p["source_effect"]["similar"] == pytest.approx(190 / 80)
    assert p["layer_effect"]["dissimilar"] == pytest.approx(200 / 190)
    text = "\n".join(ab.depth_sentences(v))
    assert "**which source** matters more" in text and "At 1 of 1 C values **which source**" in text

    cal = [
        {
            "factor": "texts",
            "order": "dissimilar",
            "mapping": m,
            "jaccard_vs_reference": j,
            "vs_reference_ratio": r,
            "vs_reference_z": z,
        }
        for m, j, r, z in (("a", 1.0, 1.0, float("nan")), ("b", 0.6, 1.3, 5.0))
    ]
    cal += [
        {
            "factor": "tokens",
            "order": "dissimilar",
            "mapping": "a",
            "jaccard_vs_reference": 1.0,
            "vs_reference_ratio": 1.0,
            "vs_reference_z": float("nan"),
        }
    ]
    cv = ab.calibration_verdict(cal)
    text = "\n".join(ab.calibration_sentences(cv, ab.settings("tiny", quick=False)))
    assert "stays the same across a factor's conditions in 1 of 2 (order, factor) groups" in text
    assert (
        "dissimilar / texts: 2 distinct strategies over 2 conditions (lowest Jaccard against the reference 0.60)"
        in text
    )


def test_evaluation_plan_counts():
    full = ab.evaluation_plan(ab.settings("smollm2-135m", quick=False))
    assert full["points"]["threshold"] == 4 * 2 + 6 + 5 * 2  # fixed orders to 0.8, best to 0.95, random seeds
    assert full["expected_distinct_total"] < sum(full["points"].values())
    quick = ab.evaluation_plan(ab.settings("smollm2-135m", quick=True))
    assert quick["expected_distinct_total"] < full["expected_distinct_total"]


def test_cli_metric_choices_are_the_calibration_metrics():
    from kvshare.calibration import METRICS
    from kvshare.cli import build_parser

    search = build_parser()._subparsers._group_actions[0].choices["search"]
    metric = next(a for a in search._actions if a.dest == "metric")
    assert tuple(metric.choices) == METRICS
