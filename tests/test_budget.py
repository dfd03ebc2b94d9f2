"""Model-aware full runs of notebooks 01-03 (kvshare.experiments.budget, common.Settings.MODEL_FULL,
evaluation.FULL_PLANS): the default model's plans are unchanged, Gemma's keep every statistical requirement and fit
the 90-minute budget by the measured unit costs, quick runs ignore them, and notebook 01's C points drive its curves.
No real model."""

from __future__ import annotations

import pytest
from conftest import NUM_LAYERS

from kvshare.experiments import budget, common
from kvshare.experiments import evaluation as ev
from kvshare.experiments import observation as obs
from kvshare.metrics import HELDOUT

GEMMA_LAYERS = 18
GEMMA_TYPES = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(GEMMA_LAYERS)]
DEFAULT = "smollm2-135m"
GEMMA = "gemma3-270m"


def gemma_estimate(**overrides):
    cfg = common.settings(GEMMA, False, 0, **overrides)
    return budget.estimate(GEMMA, GEMMA_LAYERS, cfg, cfg, ev.plan(GEMMA, False), layer_types=GEMMA_TYPES)


def test_the_default_models_full_runs_are_unchanged():
    cfg = common.settings(DEFAULT, False, 0)
    assert cfg.calibration_sets == 3 and cfg.random_seeds == 5 and cfg.random_c_values == [4, 8, 12]
    assert cfg.c_points is None and cfg.model_plan is None and len(cfg.thresholds) == 7
    assert obs.curve_grid(cfg, 30) == obs.c_grid(30, cfg.max_fraction, cfg.c_step) == [0, 2, 4, 6, 8, 10, 12]
    p = ev.plan(DEFAULT, False)
    assert p["rates"] == ev.RATES and p["orders"] == ev.ORDERS and p["random_seeds"] == ev.RANDOM_SEEDS
    assert p["random_rates"] == ev.RANDOM_RATES and p["calibration_samples"] == 30 and p["limit"] is None
    assert p["model_plan"] is None


@pytest.mark.parametrize("model", [DEFAULT, GEMMA])
def test_quick_runs_ignore_the_model_aware_plans(model):
    quick = common.settings(model, True, 0)
    assert quick.model_plan is None and quick.c_points is None
    assert {k: getattr(quick, k) for k in common.Settings.QUICK} == common.Settings.QUICK
    p = ev.plan(model, True)
    assert p["rates"] == (0.0, 0.25) and p["random_seeds"] == 2 and p["limit"] == 5 and p["model_plan"] is None


def test_gemma_full_runs_keep_every_statistical_requirement():
    cfg = common.settings(GEMMA, False, 0)
    assert cfg.model_plan and "16,384" in cfg.model_plan  # said why, in the settings the notebook records
    assert cfg.heldout_tokens == HELDOUT.tokens >= 16384 and cfg.heldout_window == HELDOUT.window
    assert cfg.random_seeds >= 5 and cfg.random_c_values  # random: at least 5 seeds, at a C point
    grid = obs.curve_grid(cfg, GEMMA_LAYERS)
    assert set(cfg.random_c_values) <= set(grid)  # compared with the fixed orders at a C they are scored at
    assert cfg.calibration_sets >= 2  # the curves on more than one calibration set
    assert cfg.threshold in cfg.thresholds and min(cfg.thresholds) < cfg.threshold < max(cfg.thresholds)
    p = ev.plan(GEMMA, False)
    assert p["random_seeds"] >= 5 and 0.25 in p["random_rates"] and 0.25 in p["rates"]  # the claim's rate
    with pytest.raises(ValueError, match="at least 5"):
        ev.plan(GEMMA, False, random_seeds=4)
    # notebook 03's strategies and notebook 02's are notebook 01's: their held-out scores come from the store
    est = gemma_estimate()
    assert est["counts"]["03"]["heldout_fresh"] == 0
    assert est["counts"]["02"]["heldout_fresh"] == len(set(cfg.thresholds) - {cfg.threshold})


def test_gemma_fits_the_budget_and_the_default_plan_would_not():
    est = gemma_estimate()
    assert est["measured"] and est["within_budget"] and est["total_minutes"] <= budget.BUDGET_MIN
    assert set(est["minutes"]) == {"01", "02", "03"}
    assert "of 90 min" in budget.estimate_line(est)
    # the default model's full settings on Gemma's unit costs: far over the budget, hence MODEL_FULL
    default = common.settings(DEFAULT, False, 0)
    over = budget.estimate(GEMMA, GEMMA_LAYERS, default, default, ev.plan(DEFAULT, False), layer_types=GEMMA_TYPES)
    assert over["total_minutes"] > budget.BUDGET_MIN + 60


def test_the_estimate_counts_distinct_strategies_and_the_store():
    cfg = common.settings(GEMMA, False, 0)
    a = budget.plan_01(cfg, GEMMA_LAYERS)
    sets, cs, seeds = cfg.calibration_sets, len(cfg.c_points), cfg.random_seeds
    assert len(a["searches"]) == sets * (2 + seeds)
    assert len(a["scored"]) == 1 + sets * (2 * cs + seeds * len(cfg.random_c_values))
    # another protocol for 02 (a slice): nothing of 01's is reused
    est = gemma_estimate()
    sliced = common.settings(GEMMA, False, 0, heldout_tokens=1024)
    other = budget.estimate(GEMMA, GEMMA_LAYERS, cfg, sliced, ev.plan(GEMMA, False), layer_types=GEMMA_TYPES)
    assert other["counts"]["02"]["heldout_fresh"] > est["counts"]["02"]["heldout_fresh"]
    # strict thresholds may walk every same-type pair (Gemma: 105 sliding + 3 full)
    assert budget.num_pairs(GEMMA_LAYERS, GEMMA_TYPES) == 108 and budget.num_pairs(30) == 435
    # a model without measured costs is priced at the dearest measured ones, and says so
    unknown = budget.estimate("some/model", 24, cfg, cfg, ev.plan("some/model", False))
    assert not unknown["measured"] and "not measured" in budget.estimate_line(unknown)


def test_c_points_drive_notebook_01s_curves(tiny_llama, char_tokenizer, tmp_path):
    assert obs.curve_grid(common.settings("x", False, 0, c_points=[5, 2, 7]), 18) == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="at most 17"):
        obs.curve_grid(common.settings("x", False, 0, c_points=[18]), 18)
    cfg = common.settings(
        "tiny",
        True,
        0,
        samples=3,
        max_tokens=16,
        calibration_sets=1,
        random_seeds=2,
        c_points=[1, 3],
        random_c_values=[3],
        heldout_tokens=96,
        heldout_window=32,
    )
    scorer = common.HeldOutScorer(tiny_llama, char_tokenizer, "tiny", common.heldout_protocol(cfg))
    rows, runs = obs.ppl_curves(tiny_llama, char_tokenizer, cfg, scorer, progress=False)
    assert NUM_LAYERS > 3
    assert {r["num_shared"] for r in rows if r["order"] != "random"} <= {0, 1, 3}  # the C points, nothing else
    assert {r["num_shared"] for r in rows if r["order"] == "random"} <= {0, 3}
    assert all(r.strategy.metadata["target_num_shared"] == 3 for r in runs)  # one search to the largest point
