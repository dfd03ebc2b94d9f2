"""What every notebook's module shares (kvshare.experiments.scaffold): settings with a quick mode, the resumable
results cache, and saving a run's settings and rows. Fast: no model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from kvshare.experiments.scaffold import ResultCache, RunSettings, save_rows, save_settings


@dataclass
class Toy(RunSettings):
    samples: int = 30
    grid: list = field(default_factory=lambda: [1, 2, 3])
    model_plan: str | None = None

    QUICK = dict(samples=4)
    MODEL_FULL = {"big-model": (dict(grid=[2]), "a unit costs more on this model")}

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


def test_for_run_puts_quick_then_the_overrides_over_the_defaults():
    full, quick = Toy.for_run("m", False, 3), Toy.for_run("m", True, 3)
    assert (full.samples, quick.samples, quick.grid, quick.seed) == (30, 4, [1, 2, 3], 3)
    assert Toy.for_run("m", True, samples=None).samples == 4  # None: the default of the run
    assert Toy.for_run("m", True, samples=7).samples == 7
    assert Toy.for_run("m", False).to_dict() == {
        "model": "m",
        "quick": False,
        "seed": 0,
        "samples": 30,
        "grid": [1, 2, 3],
        "model_plan": None,
    }


def test_a_model_of_model_full_gets_its_full_run_with_the_reason():
    big = Toy.for_run("big-model", False)
    assert big.grid == [2] and big.model_plan == "a unit costs more on this model"
    assert Toy.for_run("big-model", True).grid == [1, 2, 3]  # quick runs ignore it


def test_bad_settings_are_one_line_that_says_what_to_do():
    with pytest.raises(ValueError, match="unknown setting 'sample' of Toy; use one of samples, grid, model_plan"):
        Toy.for_run("m", False, sample=3)
    with pytest.raises(ValueError, match="samples must be >= 1"):  # checked on the final values
        Toy.for_run("m", True, samples=0)


def test_the_results_cache_returns_a_unit_only_for_the_same_key(tmp_path):
    cache = ResultCache(tmp_path / "units.json")
    key = cache.key("m", 8, [1, 2])
    assert cache.get("search", key) is None
    cache.put("search", key, {"pairs": [[3, 1]]})
    again = ResultCache(tmp_path / "units.json")  # written after every put: a new run reads it back
    assert again.get("search", key) == {"pairs": [[3, 1]]}
    assert again.get("search", cache.key("m", 9, [1, 2])) is None


def test_a_run_saves_its_settings_with_the_environment_and_its_rows_twice(tmp_path):
    path = save_settings(tmp_path, "99_toy", Toy.for_run("m", True), num_layers=30)
    saved = json.loads(path.read_text())
    assert path.name == "99_toy_settings.json" and saved["samples"] == 4 and saved["num_layers"] == 30
    assert {"kvshare", "torch", "transformers", "python"} <= set(saved["environment"])
    assert json.loads(save_settings(tmp_path, "98_toy", {"a": 1}).read_text())["a"] == 1
    rows = [{"rate": 0.0, "ppl": 19.4}, {"rate": 0.25, "ppl": 21.0, "note": "x"}]
    assert save_rows(tmp_path, "99_toy_rates", rows) is rows
    assert json.loads((tmp_path / "99_toy_rates.json").read_text()) == rows
    assert (tmp_path / "99_toy_rates.csv").read_text().splitlines()[0] == "rate,ppl,note"


def test_save_rows_writes_the_numbers_and_the_figure_in_one_call(tmp_path):
    class Figure:  # what save_rows needs of a matplotlib figure
        def __init__(self):
            self.saved = []

        def savefig(self, path, **kwargs):
            self.saved.append(path.name)
            path.write_bytes(b"drawn")

    fig = Figure()
    save_rows(tmp_path, "99_toy_rates", [{"rate": 0.25, "ppl": 2.0}], figure=fig)
    assert fig.saved == ["99_toy_rates.png", "99_toy_rates.pdf"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"99_toy_rates.{e}" for e in ("csv", "json", "pdf", "png")]
