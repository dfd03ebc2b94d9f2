"""The logic behind notebooks 01 and 02 (kvshare.experiments.common, .observation, .search) and their reports
(kvshare.experiments.reports.*), on tiny random models and synthetic numbers: fast, no download; and the layering
of the package (the core never imports notebook logic, computation never imports matplotlib)."""

from __future__ import annotations

import math
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from conftest import NUM_LAYERS

from kvshare.experiments import common
from kvshare.experiments import observation as obs
from kvshare.experiments import search as srch
from kvshare.experiments.reports import observation as obs_report
from kvshare.experiments.reports import search as search_report
from kvshare.experiments.reports.common import generations_markdown, save_figure
from kvshare.metrics import HELDOUT, paired_difference
from kvshare.progress import Progress
from kvshare.strategy import Strategy


def test_num_shared_for_rounds_half_up():
    from kvshare.accounting import num_shared_for

    assert num_shared_for(0.125, 30) == 4
    assert num_shared_for(0.25, 30) == 8
    assert num_shared_for(0.15, 30) == 5  # one rule everywhere (bench used to round half to even: 4)
    assert num_shared_for(0.25, 32) == 8
    assert num_shared_for(0.125, 24) == 3
    assert num_shared_for(0.125, 20) == 3


def test_c_grid_reaches_the_fraction():
    assert obs.c_grid(30, 0.4, 2) == [0, 2, 4, 6, 8, 10, 12]
    g = obs.c_grid(24, 0.4, 2)  # 40% of 24 = 9.6 layers: the grid must reach at least 10
    assert g[0] == 0 and g[-1] >= 9.6 and all(b - a == 2 for a, b in zip(g, g[1:]))
    assert obs.c_grid(30, 4 / 30, 2) == [0, 2, 4]
    assert obs.c_grid(3, 0.9, 2)[-1] <= 2  # never all layers


def test_settings_quick_and_overrides():
    full = common.settings("m", False, 3)
    quick = common.settings("m", True, 3)
    assert full.calibration_sets >= 3 and full.random_seeds >= 5 and full.max_fraction >= 0.4 and full.c_step <= 2
    assert quick.random_seeds >= 2 and full.random_c_values == [4, 8, 12]
    assert min(full.thresholds) <= 0.3 and max(full.thresholds) >= 0.9
    assert common.heldout_protocol(full) == HELDOUT  # the one held-out protocol; quick scores a slice of it
    assert quick.heldout_tokens < full.heldout_tokens and quick.samples < full.samples
    assert common.heldout_protocol(quick) == replace(HELDOUT, tokens=quick.heldout_tokens)
    assert common.settings("m", True, 0, heldout_tokens=None).heldout_tokens == quick.heldout_tokens
    assert common.settings("m", True, 0, heldout_tokens=77).heldout_tokens == 77
    with pytest.raises(ValueError):
        common.settings("m", False, 0, nonsense=1)


def test_resolve_out_dir_explicit(tmp_path):
    assert common.resolve_out_dir(str(tmp_path / "x"), quick=False) == (tmp_path / "x").resolve()
    assert (tmp_path / "x").is_dir()


def _result(window_nlls):
    w = np.asarray(window_nlls, dtype=float)
    nll = torch.tensor(np.repeat(w, 4))
    return common.summarize_nll(nll, 4)


def test_summarize_and_paired_difference():
    a = _result([2.0, 3.0, 2.5, 3.5])
    b = _result([2.1, 3.1, 2.6, 3.6])
    assert a["ppl"] == pytest.approx(math.exp(2.75))
    assert a["tokens"] == 16 and len(a["window_nll"]) == 4
    d = paired_difference(a, b)
    assert d["nll_diff"] == pytest.approx(-0.1)
    assert d["nll_diff_se"] == pytest.approx(0.0, abs=1e-12)  # a constant shift: the pairing removes all noise
    assert d["ppl_ratio"] == pytest.approx(math.exp(-0.1))
    with pytest.raises(ValueError):
        paired_difference(a, _result([1.0, 2.0]))


def _rows(dis_better: bool, sets=(0, 1, 2), cs=(0, 2, 4), seeds=(0, 1, 2)):
    """Synthetic ppl-curve rows: 'dissimilar' below 'similar' (or above), random in between."""
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.3, size=8)
    rows = []
    for k in sets:
        for c in cs:
            gap = 0.05 * c
            for order, seed, shift in [
                ("dissimilar", 0, -gap if dis_better else gap),
                ("similar", 0, gap if dis_better else -gap),
            ] + [("random", s, 0.01 * s) for s in seeds]:
                shift = 0.0 if c == 0 else shift
                r = _result(base + shift + rng.normal(0, 0.001, size=8))
                source = {"similar": 0, "dissimilar": 9 + k}.get(order, 12 + 3 * k + seed)  # random: per (set, seed)
                mapping = {str(29 - i): source for i in range(c)}
                rows.append(
                    {"calibration_set": k, "order": order, "seed": seed, "num_shared": c, "mapping": mapping, **r}
                )
    return rows


@pytest.mark.parametrize("dis_better", [True, False])
def test_conclusion_is_computed_from_the_numbers(dis_better):
    rows = _rows(dis_better)
    text = obs_report.observation_conclusion(rows, 30, "tiny")
    if dis_better:
        assert "claim holds" in text and "does not hold" not in text
        assert "dissimilar clearly lower" in text
    else:
        assert "does not hold" in text
        assert "(set 0, similar clearly lower)" in text
    assert "C = 2" in text and "C = 4" in text and "C = 0 " not in text
    assert "| 4 (13%) |" in text
    # dissimilar chose a different strategy on each set: 3 sets x 2 C = 6 distinct pairs, none counted twice
    assert "all 6 distinct comparisons" in text
    assert "stable" not in text and "Stability" not in text  # identity is not presented as robustness
    # similar picked the same layers on every set, dissimilar a different source per set
    assert "Identical choices: the similar searches at C = 2, 4 (every C)" in text
    assert "the dissimilar searches at" not in text
    # the random order: a mean over every set's seeds with a 95% interval
    assert "dissimilar / random" in text and "over 9 distinct random strategies" in text


def _pair_rows(nll_dis, nll_sim, k, c=2, dis_source=9, sim_source=0):
    rows = []
    for order, w, source in (("dissimilar", nll_dis, dis_source), ("similar", nll_sim, sim_source)):
        r = _result(w)
        mapping = {str(29 - i): source for i in range(c)}
        rows.append({"calibration_set": k, "order": order, "seed": 0, "num_shared": c, "mapping": mapping, **r})
    return rows


def test_distinct_comparisons_count_a_shared_strategy_once():
    """Sets 0 and 1 chose the same dissimilar and the same similar strategy: one comparison, not two."""
    same_dis, same_sim = [3.0, 3.2, 3.1, 3.3], [2.8, 3.0, 2.95, 3.1]
    rows = (
        _pair_rows(same_dis, same_sim, 0)
        + _pair_rows(same_dis, same_sim, 1)
        + _pair_rows([3.4, 3.5, 3.3, 3.6], same_sim, 2, dis_source=11)
    )
    comps = obs.paired_comparisons(rows)
    assert len(comps) == 3  # one per (set, C)
    distinct = obs.distinct_comparisons(comps)
    assert len(distinct) == 2
    assert sorted(d["calibration_sets"] for d in distinct) == [[0, 1], [2]]
    assert all(obs.outcome(d) == "worse" for d in distinct)  # similar clearly lower in both
    text = obs_report.observation_conclusion(rows, 30, "tiny")
    assert "all 2 distinct comparisons" in text and "the 3 (set, C) points make 2 distinct pairs" in text
    assert "(sets 0, 1, similar clearly lower)" in text and "(set 2, similar clearly lower)" in text
    assert "Identical choices: the similar searches at C = 2 (every C)" in text


def test_curve_summary_random_spread():
    rows = _rows(True)
    summary = obs.curve_summary(rows)
    rnd = [r for r in summary if r["order"] == "random" and r["num_shared"] == 2 and r["calibration_set"] == 0][0]
    assert rnd["seeds"] == 3 and rnd["ppl_min"] <= rnd["ppl"] <= rnd["ppl_max"]
    assert rnd["ppl_lo"] < rnd["ppl"] < rnd["ppl_hi"] and "t-interval over 3 seeds" in rnd["interval"]
    seeds = [r for r in rows if r["order"] == "random" and r["num_shared"] == 2 and r["calibration_set"] == 0]
    want = common.ppl_ci95([r["nll"] for r in seeds])
    assert rnd["ppl"] == pytest.approx(want["ppl"]) and rnd["ppl_hi"] == pytest.approx(want["hi"])
    dis = [r for r in summary if r["order"] == "dissimilar" and r["num_shared"] == 2 and r["calibration_set"] == 0][0]
    assert dis["ppl_lo"] < dis["ppl"] < dis["ppl_hi"]
    comps = obs.paired_comparisons(rows)
    assert {c["versus"] for c in comps} == {"similar", "random"}
    assert all(c["num_shared"] > 0 for c in comps)
    assert len([c for c in comps if c["versus"] == "random"]) == 3 * 2 * 3
    rv = obs.random_versus(comps)
    assert [r["num_shared"] for r in rv] == [2, 4]
    assert all(r["strategies"] == 9 and r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] for r in rv)
    assert all(r["better"] + r["worse"] + r["unclear"] == 9 for r in rv)


def test_acceptance_by_decile():
    rows = [{"dissimilarity_rank": r, "accepted": r < 20} for r in range(0, 100, 2)]
    out = srch.acceptance_by_decile(rows, 100)
    assert [r["decile"] for r in out] == list(range(1, 11))
    assert out[0]["visited"] == 5 and out[0]["rate"] == 1.0
    assert out[1]["rate"] == 1.0 and out[2]["rate"] == 0.0
    assert sum(r["visited"] for r in out) == 50
    empty = srch.acceptance_by_decile([], 100)
    assert all(r["visited"] == 0 and math.isnan(r["rate"]) for r in empty)


def test_progress_prints_lines(capsys):
    bar = Progress(3, "work", every=0)
    for _ in range(3):
        bar.update(note="x")
    bar.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("work: 0/3") and out[-1].startswith("work: 3/3")


# -- on a tiny model: the real code paths --------------------------------------------------------------------
@pytest.fixture
def tiny_setup(tiny_llama, char_tokenizer, tmp_path):
    cfg = common.settings(
        "tiny",
        True,
        0,
        samples=3,
        max_tokens=16,
        calibration_sets=2,
        max_fraction=0.5,
        random_seeds=2,
        random_c_values=[2],
        heldout_tokens=96,
        heldout_window=32,
        thresholds=[0.3, 0.99],
    )
    store = common.HeldOutStore(tmp_path / common.STORE_NAME)
    scorer = common.HeldOutScorer(tiny_llama, char_tokenizer, "tiny", common.heldout_protocol(cfg), store)
    return tiny_llama, char_tokenizer, cfg, scorer


def test_ppl_curves_reuse_one_search_per_order(tiny_setup):
    model, tok, cfg, evaluator = tiny_setup
    rows, runs = obs.ppl_curves(model, tok, cfg, evaluator, progress=False)
    grid = obs.c_grid(NUM_LAYERS, cfg.max_fraction, cfg.c_step)
    assert len(runs) == cfg.calibration_sets * (2 + cfg.random_seeds)  # one search per (set, order, seed)
    assert all(r.strategy.metadata["target_num_shared"] == obs.c_values(r.order, grid, cfg)[-1] for r in runs)
    # random seeds drawn per set (notebook 11's rule): no two sets share one
    assert {r.seed for r in runs if r.order == "random" and r.calibration_set == 1} == set(common.random_seeds(cfg, 1))
    # identical strategies are scored once: every C = 0 point is the same unshared model
    zero = [r for r in rows if r["num_shared"] == 0]
    assert len({r["ppl"] for r in zero}) == 1
    assert evaluator.evaluations <= len(rows) - len(zero) + 1
    assert evaluator.fresh == evaluator.evaluations and evaluator.from_store == 0
    for run in runs:
        for c in obs.c_values(run.order, grid, cfg):
            row = [
                r
                for r in rows
                if r["calibration_set"] == run.calibration_set
                and r["order"] == run.order
                and r["seed"] == run.seed
                and r["num_shared"] == c
            ]
            if c > run.strategy.num_shared:  # the search ran out of candidates above T: the curve stops
                assert row == []
                continue
            assert len(row) == 1
            assert row[0]["mapping"] == {str(k): v for k, v in run.strategy.prefix(c).mapping.items()}
    text = obs_report.observation_conclusion(rows, NUM_LAYERS, "tiny", runs=runs, scoring=evaluator.accounting())
    assert "tiny" in text and "distinct strategies" in text
    visited = sum(len(r.trace) for r in runs)
    assert f"candidates the {len(runs)} searches visited" in text and f"of the {visited} candidates" in text
    short = [r for r in runs if r.strategy.num_shared < r.strategy.metadata["target_num_shared"]]
    assert (f"{len(short)} of the {len(runs)} searches ran out of candidates" in text) == bool(short)
    # a search that stops short is said, with where it stopped
    first = runs[0]
    stopped = replace(first, strategy=first.strategy.prefix(1))  # a fresh metadata dict: the run's is untouched
    stopped.strategy.metadata["target_num_shared"] = 2
    said = obs_report.observation_conclusion(rows, NUM_LAYERS, "tiny", runs=[stopped])
    assert "1 of the 1 searches ran out of candidates above the threshold before their target C = 2" in said
    assert "they stopped at C = 1" in said
    summary = obs.curve_summary(rows)
    comps = obs.paired_comparisons(rows)
    for fig in (
        obs_report.ppl_curve(summary, NUM_LAYERS),
        obs_report.ppl_curves_by_set(summary, NUM_LAYERS),
        obs_report.paired_differences(comps, NUM_LAYERS),
    ):
        assert fig.axes


def test_evaluator_matches_sharing_context(tiny_setup):
    from kvshare.combine import sharing
    from kvshare.data import eval_text
    from kvshare.metrics import perplexity

    model, tok, cfg, evaluator = tiny_setup
    st = Strategy({3: 1, 5: 2}, NUM_LAYERS)
    got = evaluator(st)["ppl"]
    with sharing(model, st):
        want = perplexity(
            model, tok, eval_text(), window=cfg.heldout_window, stride=cfg.heldout_window, max_tokens=cfg.heldout_tokens
        )
    assert got == pytest.approx(want, rel=1e-9)
    assert evaluator(Strategy({3: 1, 5: 2}, NUM_LAYERS)) is evaluator(st)  # cached
    assert evaluator(None)["ppl"] != got


def test_threshold_sweep_and_trace(tiny_setup, char_tokenizer):
    model, tok, cfg, evaluator = tiny_setup
    texts = ["alpha beta gamma delta epsilon zeta", "one two three four five six seven", "lorem ipsum dolor sit amet"]
    d = common.distance_matrices(model, tok, texts, cfg.max_tokens)
    assert set(d) == {"euclidean", "cosine"} and d["euclidean"].shape == (NUM_LAYERS, NUM_LAYERS)
    ranks = srch.dissimilarity_ranks(d[cfg.metric])
    assert sorted(ranks.values()) == list(range(NUM_LAYERS * (NUM_LAYERS - 1) // 2))
    main = common.run_search(model, tok, texts, 2, "dissimilar", 0, cfg, threshold=0.3)
    rows, runs = srch.threshold_sweep(model, tok, texts, cfg, evaluator, 2, reuse={0.3: main}, progress=False)
    paired = srch.sweep_rows(runs, evaluator, reference=main.strategy, progress=False)
    assert paired[0]["ppl_ratio_vs_default"] == pytest.approx(1.0)
    assert all("z_vs_default" in r for r in paired)
    assert runs[0] is main  # reused, not searched again
    assert [r["threshold"] for r in rows] == [0.3, 0.99]
    for r in rows:
        assert r["accepted"] + r["rejected"] == r["visited"] and r["num_shared"] <= 2
    trace = srch.trace_rows(runs[-1].trace, ranks)
    assert all("dissimilarity_rank" in t for t in trace)
    by = {"x": srch.acceptance_by_decile(trace, len(ranks))}
    summary = srch.search_summary(main)
    assert summary["layer_forwards"] <= summary["naive_layer_forwards"]
    text = search_report.search_conclusion(rows, by, summary, 0.3, control=srch.run_counts(main))
    assert "T = 0.99" in text and "decile" in text
    # the random-order control: one search per seed, summarised over seeds
    controls = srch.random_controls(model, tok, texts, cfg, 2, progress=False)
    assert [c.seed for c in controls] == common.random_seeds(cfg, 0) and len(controls) == cfg.random_seeds
    counts = srch.pooled_counts(controls)
    assert counts["searches"] == 2 and counts["visited"] == sum(len(c.trace) for c in controls)
    pooled = srch.pooled_acceptance(
        [srch.acceptance_by_decile(srch.trace_rows(c.trace, ranks), len(ranks)) for c in controls]
    )
    assert sum(r["visited"] for r in pooled) == counts["visited"]
    quality = srch.random_quality(controls, evaluator, 2, reference=main.strategy)
    assert quality["n"] == 2 and quality["ppl_lo"] <= quality["ppl"] <= quality["ppl_hi"]
    assert "reference_vs_random" in quality and len(quality["seeds"]) == 2
    text = search_report.search_conclusion(
        paired, by, summary, 0.3, control=counts, random=quality, scoring=evaluator.accounting()
    )
    assert "2 seeds" in text and "95% t-interval over seeds" in text and "Scoring" in text
    panels = {"T = 0.99": (trace, 0.99), "T = 0.3": (srch.trace_rows(main.trace, ranks), 0.3)}
    for fig in (
        search_report.trace_scatter(panels, num_pairs=len(ranks)),
        search_report.acceptance_deciles(by),
        search_report.strategy_arcs(main.strategy),
        search_report.threshold_sweep_plot(rows),
        search_report.threshold_sweep_plot(paired, random=quality, full=evaluator(None)),
        obs_report.distance_heatmaps(d),
    ):
        assert fig.axes


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig = search_report.strategy_arcs(Strategy({4: 1, 5: 1}, 6))
    paths = save_figure(fig, tmp_path, "02_search_x")
    assert [p.name for p in paths] == ["02_search_x.png", "02_search_x.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"


def test_generations_markdown_escapes():
    rows = [
        {"setting": "full", "prompt": "p|1", "completion": "a\nb"},
        {"setting": "C = 4", "prompt": "p|1", "completion": "c"},
    ]
    md = generations_markdown(rows)
    assert md.splitlines()[0] == "| prompt | full | C = 4 |"
    assert "p\\|1" in md and "a b" in md


def test_long_search_heartbeat(tiny_setup, capsys):
    import importlib

    search_module = importlib.import_module("kvshare.search")

    model, tok, cfg, _ = tiny_setup
    original = search_module.similarity
    watch = common._SearchWatch("search (test)", 0.5, every=0.01)
    with watch:
        common.run_search(
            model,
            tok,
            ["alpha beta gamma delta", "one two three four"],
            2,
            "dissimilar",
            0,
            cfg,
            threshold=0.5,
            progress=False,
        )
        import time

        time.sleep(0.05)
    assert search_module.similarity is original  # the counting wrapper is gone again
    assert watch.scored >= 2
    out = capsys.readouterr().out
    assert "search (test): still searching" in out and "candidates scored" in out


# -- the layers: core <- experiments <- reports ------------------------------------------------------------------
def _sources() -> dict:
    """{path: dotted module name} of every kvshare source file."""
    from pathlib import Path

    import kvshare

    root = Path(kvshare.__file__).parent
    return {
        p: ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in sorted(root.rglob("*.py"))
    }


def _imports(path, module: str) -> list[str]:
    """Absolute names of everything `module` (at `path`) imports, inside functions too (`from . import x` gives
    both the package and `package.x`, which may be a module)."""
    import ast

    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out += [name] + [f"{name}.{a.name}" for a in node.names]
    return out


def test_the_core_never_imports_notebook_logic():
    """Only kvshare.experiments (and the CLI) may import kvshare.experiments: notebook logic sits on top of the core."""
    offenders = [
        f"{module} imports {name}"
        for path, module in _sources().items()
        if not module.startswith("kvshare.experiments") and module != "kvshare.cli"
        for name in _imports(path, module)
        if name.startswith("kvshare.experiments")
    ]
    assert offenders == []


def test_computation_never_imports_matplotlib_and_reports_sit_on_top():
    modules = {m: p for p, m in _sources().items() if m.startswith("kvshare.experiments")}
    notebooks = ("observation", "search", "evaluation", "memory_speed", "intra_layer", "quantized")
    assert {f"kvshare.experiments.{n}" for n in notebooks} <= set(modules)
    assert {f"kvshare.experiments.reports.{n}" for n in notebooks} <= set(modules)
    for module, path in modules.items():
        if module.startswith("kvshare.experiments.reports"):
            continue
        names = _imports(path, module)
        assert not any(n.split(".")[0] == "matplotlib" for n in names), f"{module} imports matplotlib"
        assert not any(n.startswith("kvshare.experiments.reports") for n in names), f"{module} imports a report"


def test_no_import_cycle_among_the_notebook_modules():
    modules = {m: p for p, m in _sources().items() if m.startswith("kvshare.experiments")}
    graph = {m: {n for n in _imports(p, m) if n in modules and n != m} for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_one_class_named_evaluator():
    """kvshare.evaluation.Evaluator is the benchmark runner; notebooks 01/02's scorer is `HeldOutScorer`."""
    import ast

    found = [
        m
        for p, m in _sources().items()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "Evaluator"
    ]
    assert found == ["kvshare.evaluation"]
