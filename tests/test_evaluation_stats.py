"""Notebook 03's statistics (issue 14): the screen / test split of the multiple-choice tasks, the paired bootstrap
intervals of "% of full kept", the interval verdict and random as a distribution over seeds.

Fast: synthetic per-example scores, and a 4-layer random model on a 40-example local task for the one check that
evaluation only ever sees the test part.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import byte_llama, write_mc_task

from kvshare.evaluation import Evaluator
from kvshare.experiments import evaluation as ev
from kvshare.experiments.reports import evaluation as report
from kvshare.tasks import SCREEN, MCTask, screen_tasks
from kvshare.tasks.offline import FEWSHOT_POOL, SCREEN_FRACTION, in_screen, mc_parts, prepare, split_record


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture
def task_file(home):
    """A 40-example multiple-choice task (a local JSONL file)."""
    questions = [
        (f"What is {a} plus {b}?", (str(a + b), str(a + b + 100), str(a * b + 7)), 0)
        for a, b in [(a, b) for a in range(1, 9) for b in range(1, 6)]
    ]
    return write_mc_task(home / "tiny_sums" / "task.jsonl", questions)


# ------------------------------------------------------------------------------------------------
# the split
# ------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_disjoint(task_file):
    spec = MCTask(str(task_file), "reasoning")
    a, b = mc_parts(spec), mc_parts(spec)
    assert a == b  # the same on every call (a content hash, no state)
    ids = {part: [r["id"] for r in rows] for part, rows in a.items()}
    assert not set(ids["screen"]) & set(ids["test"])
    assert not set(ids["train"]) & (set(ids["screen"]) | set(ids["test"]))
    assert len(ids["train"]) == FEWSHOT_POOL and len(ids["screen"]) + len(ids["test"]) == 40 - FEWSHOT_POOL
    assert ids["screen"] and ids["test"]  # 35 examples at 30%: both parts are there
    assert all(in_screen(i) for i in ids["screen"]) and not any(in_screen(i) for i in ids["test"])
    # the rule is the recorded one, and the record names every screen example
    record = split_record(spec)
    assert record["fraction"] == SCREEN_FRACTION and record["screen_ids"] == ids["screen"]
    assert record["evaluated_ids"] == ids["test"] and not set(record["screen_ids"]) & set(record["evaluated_ids"])
    assert split_record(spec, limit=3)["evaluated_ids"] == ids["test"][:3]


def test_split_does_not_depend_on_the_prompt(task_file):
    """The screen compares prompts: every prompt of a task must screen the same examples."""
    parts = [mc_parts(MCTask(str(task_file), "reasoning", prompt=p)) for p in ("qa", "raw")]
    assert len({tuple(r["id"] for r in p["screen"]) for p in parts}) == 1


def test_screen_tasks_are_on_the_screen_part():
    specs = screen_tasks("all")
    assert len(specs) == len(SCREEN) == 9 and all(s.split == "screen" and s.name.endswith("_screen") for s in specs)
    kept = screen_tasks("kept")
    assert {s.source for s in kept} < {s.source for s in specs}
    with pytest.raises(ValueError, match="split"):
        MCTask("x", "reasoning", split="train")


def test_evaluation_never_sees_screen_examples(task_file, byte_tokenizer):
    spec = MCTask(str(task_file), "reasoning")
    parts = mc_parts(spec)
    root = prepare([spec, MCTask(str(task_file), "reasoning", split="screen")])
    written = [json.loads(line) for line in (root / "data" / spec.name / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [r["id"] for r in parts["test"]]
    screened = (root / "data" / (spec.name + "_screen") / "test.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in screened] == [r["id"] for r in parts["screen"]]

    model = byte_llama(byte_tokenizer, 4)
    evaluator = Evaluator(model, byte_tokenizer, batch_size=8, cache=False, progress=False)
    rows = evaluator.evaluate(None, tasks=[spec])["rows"]
    acc = next(r for r in rows if r["metric"] == "acc")
    assert acc["n"] == len(parts["test"]) == len(acc["scores"])
    screen_rows = evaluator.evaluate(None, tasks=[MCTask(str(task_file), "reasoning", split="screen")])["rows"]
    assert next(r for r in screen_rows if r["metric"] == "acc")["n"] == len(parts["screen"])


# ------------------------------------------------------------------------------------------------
# intervals and verdicts
# ------------------------------------------------------------------------------------------------
def test_bootstrap_has_the_known_width():
    """Full model right on all 400 examples, the method on half: kept = 50% with a binomial spread of the mean,
    sd = sqrt(0.25 / 400) = 2.5 points, so the 95% interval is about 50 ± 4.9."""
    full = {"t": [1.0] * 400}
    method = {"t": [1.0, 0.0] * 200}
    s = ev.paired_bootstrap(full, [method], {"t": 0.0}, iters=4000, seed=1)
    assert s["kept_pct"] == pytest.approx(50.0)
    assert s["kept_lo"] < 50.0 < s["kept_hi"]
    assert s["kept_hi"] - s["kept_lo"] == pytest.approx(2 * 1.96 * 2.5, abs=0.8)
    assert s["above_chance_kept_pct"] == pytest.approx(50.0)  # chance 0: the same ratio
    assert s["drop"] == pytest.approx(0.5) and s["drop_lo"] < 0.5 < s["drop_hi"]


def test_bootstrap_is_paired():
    """A method equal to the full model on every example keeps exactly 100% in every draw, however noisy the
    scores: the draws resample the same examples for both."""
    rng = np.random.default_rng(0)
    scores = {"a": list(rng.random(30)), "b": list(rng.integers(0, 2, 25).astype(float))}
    s = ev.paired_bootstrap(scores, [scores], None, iters=500)
    assert s["kept_lo"] == pytest.approx(100.0) and s["kept_hi"] == pytest.approx(100.0)
    assert s["above_chance_kept_pct"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_interval_contains_the_point_estimate(seed):
    rng = np.random.default_rng(seed)
    full = {t: list(rng.integers(0, 2, n).astype(float)) for t, n in (("a", 40), ("b", 25), ("c", 60))}
    arms = [{t: [x * float(rng.random() < 0.8) for x in v] for t, v in full.items()} for _ in range(3)]
    s = ev.paired_bootstrap(full, arms, {"a": 0.25, "b": 0.25, "c": 0.5}, iters=1000, seed=seed)
    assert s["kept_lo"] <= s["kept_pct"] <= s["kept_hi"]
    assert s["above_chance_lo"] <= s["above_chance_kept_pct"] <= s["above_chance_hi"]
    assert s["average_lo"] <= s["average"] <= s["average_hi"]


def test_bootstrap_refuses_unpaired_scores():
    with pytest.raises(ValueError, match="same examples"):
        ev.paired_bootstrap({"a": [1.0, 0.0, 1.0]}, [{"a": [1.0, 0.0]}])


def test_verdict_reads_the_interval():
    assert ev.verdict(91.0, 99.0) == "holds"
    assert ev.verdict(70.0, 89.9) == "fails"
    assert ev.verdict(85.0, 95.0) == "undecided"
    assert ev.verdict(90.0, 95.0) == "undecided"  # "over 90%": a bound at exactly 90 does not decide


def _rows(order, label, seed, c, scores_by_task, chance=0.25):
    return [
        {
            "order": order,
            "label": label,
            "seed": seed,
            "rate": {0: 0.0, 8: 0.25}[c],
            "num_shared": c,
            "num_layers": 30,
            "fraction": c / 30,
            "task": task,
            "metric": "acc",
            "value": float(np.mean(s)),
            "stderr": 0.05,
            "n": len(s),
            "chance": chance,
            "primary": True,
            "higher_is_better": True,
            "scores": s,
        }
        for task, s in scores_by_task.items()
    ]


def test_random_is_a_distribution_over_seeds_and_the_conclusion_uses_the_interval():
    n = 200
    full = {"a": [1.0] * n, "b": [1.0, 0.0] * (n // 2)}
    rows = _rows("dissimilar", "dissimilar", 0, 0, full)
    rows += _rows("dissimilar", "dissimilar", 0, 8, {"a": [1.0, 0.0] * (n // 2), "b": [0.0] * n})  # clearly < 90
    seeds = ev.arms(["random"], 0, 5)
    assert [s for _, _, s in seeds] == [1000, 1001, 1002, 1003, 1004]  # seed + 1000 * (set + 1) + k, set 0
    for k, (label, order, s) in enumerate(seeds):  # each seed a little different, all clearly above 90%
        a = [1.0] * (n - k) + [0.0] * k
        rows += _rows(order, label, s, 8, {"a": a, "b": full["b"]})
    summary = ev.summarize(rows, iters=1000)
    by = {(x["order"], x["num_shared"]): x for x in summary}
    rand = by[("random", 8)]
    assert rand["seeds"] == [1000, 1001, 1002, 1003, 1004] and len(rand["per_seed"]) == 5
    assert rand["kept_pct"] == pytest.approx(np.mean([p["kept_pct"] for p in rand["per_seed"]]))
    assert rand["layers"] == "8/30 (26.7%)" and rand["fraction"] == pytest.approx(8 / 30)
    assert by[("dissimilar", 0)]["kept_pct"] == pytest.approx(100.0)
    c = report.conclusion(summary, rate=0.25)
    assert c["orders"]["dissimilar"]["verdict"] == "fails" and c["orders"]["dissimilar"]["holds"] is False
    assert c["orders"]["random"]["verdict"] == "holds" and c["orders"]["random"]["holds"] is True
    assert "8/30 (26.7%)" in c["text"] and "mean of 5 independent orders" in c["text"] and "25%" not in c["text"]
    table = ev.wide_table(rows, summary)
    kept = next(line for line in table if line["task"] == "% of full kept")
    assert "random 8/30 (26.7%), mean of 5 seeds" in kept and "[" in kept["random 8/30 (26.7%), mean of 5 seeds"]


def test_layers_text_is_the_exact_fraction():
    assert ev.layers_text(ev.num_shared_for(0.25, 30), 30) == "8/30 (26.7%)"
    assert ev.layers_text(ev.num_shared_for(0.125, 30), 30) == "4/30 (13.3%)"
