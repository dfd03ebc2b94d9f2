"""The held-out store shared by notebooks 01, 02 and 11 (kvshare.experiments.common.HeldOutStore), the scorer that
reads it, the random-order seed rule they share, and the 95% interval helpers."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import NUM_LAYERS

from kvshare.experiments import best_search as bs
from kvshare.experiments import common
from kvshare.experiments import observation as obs
from kvshare.experiments.scaffold import ResultCache
from kvshare.metrics import HELDOUT, Z95
from kvshare.strategy import Strategy

PROTO = replace(HELDOUT, tokens=96, window=32)


def _result(ppl: float) -> dict:
    return {"ppl": ppl, "nll": math.log(ppl), "nll_se": 0.01, "window_nll": [math.log(ppl)] * 3, "seconds": 1.5}


# -- the store --------------------------------------------------------------------------------------------------
def test_store_hits_only_the_same_model_protocol_and_strategy(tmp_path):
    store = common.HeldOutStore.beside(tmp_path)
    assert store.path == tmp_path / "heldout_scores.json" and len(store) == 0
    store.put("m", PROTO, "3:1,5:2", _result(10.0))
    assert store.get("m", PROTO, "3:1,5:2")["ppl"] == 10.0
    assert store.get("m", replace(PROTO, tokens=64), "3:1,5:2") is None  # another protocol never hits
    assert store.get("m", replace(PROTO, window=16), "3:1,5:2") is None
    assert store.get("other", PROTO, "3:1,5:2") is None  # nor another model
    assert store.get("m", PROTO, "3:1") is None and store.get("m", PROTO, "full") is None
    # the protocol as a dict (as results record it) is the same key as the dataclass
    assert store.get("m", {"window": 32, "tokens": 96, "source": "offline"}, "3:1,5:2") is not None
    again = common.HeldOutStore(store.path)  # read back from the file
    assert again.get("m", PROTO, "3:1,5:2") == _result(10.0)


def test_store_writes_atomically_and_keeps_others_entries(tmp_path, monkeypatch):
    a = common.HeldOutStore.beside(tmp_path)
    b = common.HeldOutStore.beside(tmp_path)  # another notebook's process, opened before a wrote
    a.put("m", PROTO, "full", _result(5.0))
    b.put("m", PROTO, "3:1", _result(6.0))  # merged with a's entry, not written over it
    data = json.loads(a.path.read_text())
    assert len(data["entries"]) == 2 and "about" in data
    files = ["heldout_baseline.json", "heldout_scores.json"]  # the full model's entry is the recorded baseline
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no temporary file left
    before = a.path.read_text()

    import kvshare.io

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(kvshare.io.os, "replace", crash)
    with pytest.raises(OSError):
        a.put("m", PROTO, "4:0", _result(7.0))
    assert a.path.read_text() == before  # a failed write leaves the previous file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def test_mapping_key_is_canonical():
    assert common.mapping_key(None) == "full" and common.mapping_key(Strategy({}, 6)) == "full"
    assert common.mapping_key(Strategy({5: 2, 3: 1}, 6)) == "3:1,5:2"
    st = Strategy({5: 2, 3: 1}, 6)
    assert common.mapping_key(st) == bs.mapping_key(st)  # notebook 11's key: the store is shared


def test_the_full_models_entry_is_the_one_recorded_baseline(tmp_path):
    from dataclasses import asdict

    store = common.HeldOutStore.beside(tmp_path)
    store.put("m", PROTO, "3:1", _result(10.0))
    assert not (tmp_path / common.BASELINE_NAME).exists()  # a strategy is no baseline
    store.put("m", PROTO, "full", _result(7.0))
    store.put("m", replace(PROTO, tokens=64), "full", _result(8.0))  # another protocol: its own baseline
    recorded = json.loads((tmp_path / common.BASELINE_NAME).read_text())["baselines"]
    assert {(b["protocol"]["tokens"], b["ppl"]) for b in recorded} == {(96, 7.0), (64, 8.0)}
    assert all(b["model"] == "m" and set(b["protocol"]) == set(asdict(PROTO)) for b in recorded)


def test_committed_results_agree_with_the_recorded_baselines():
    """Every committed store's full-model entry is its baseline file's number: one baseline per protocol."""
    from pathlib import Path

    figures = Path(__file__).resolve().parents[1] / "figures"
    for path in figures.glob(f"**/{common.BASELINE_NAME}"):
        recorded = json.loads(path.read_text())["baselines"]
        keys = [(b["model"], json.dumps(b["protocol"], sort_keys=True)) for b in recorded]
        assert len(keys) == len(set(keys)), f"{path}: two baselines for one protocol"
        assert recorded == common.HeldOutStore(path.with_name(common.STORE_NAME)).baselines(), path


# -- the scorer, on a tiny model ---------------------------------------------------------------------------------
def test_two_scorers_share_the_store(tiny_llama, char_tokenizer, tmp_path):
    st = Strategy({3: 1, 5: 2}, NUM_LAYERS)
    first = common.HeldOutScorer(tiny_llama, char_tokenizer, "tiny", PROTO, common.HeldOutStore.beside(tmp_path))
    full, shared = first(None), first(st)
    assert first(Strategy({3: 1, 5: 2}, NUM_LAYERS)) is shared  # once per scorer
    assert (first.fresh, first.from_store, first.evaluations) == (2, 0, 2)
    assert shared["protocol"] == {"source": "offline", "tokens": 96, "window": 32} and shared["seconds"] >= 0
    assert full["ppl"] != shared["ppl"]

    # another notebook (a new process: a new store object on the same file) evaluates nothing again
    second = common.HeldOutScorer(tiny_llama, char_tokenizer, "tiny", PROTO, common.HeldOutStore.beside(tmp_path))
    assert second(st)["window_nll"] == shared["window_nll"] and second(None)["ppl"] == full["ppl"]
    assert (second.fresh, second.from_store) == (0, 2)
    acc = second.accounting()
    assert acc["fresh"] == 0 and acc["from_store"] == 2 and acc["store"] == "heldout_scores.json"
    assert acc["store_seconds_saved"] == pytest.approx(round(shared["seconds"] + full["seconds"], 1), abs=0.11)

    # a quick slice of the protocol is another key: scored afresh, never mixed with the full protocol's
    sliced = common.HeldOutScorer(
        tiny_llama, char_tokenizer, "tiny", replace(PROTO, tokens=64), common.HeldOutStore.beside(tmp_path)
    )
    sliced(st)
    assert sliced.fresh == 1 and len(common.HeldOutStore.beside(tmp_path)) == 3


def test_best_search_evaluate_reads_and_writes_the_shared_store(tiny_llama, char_tokenizer, tmp_path, monkeypatch):
    cfg = bs.settings("tiny", True, 0, c_values=[1, 2], random_c_values=[1], heldout_tokens=96)
    st = Strategy({3: 1, 5: 2}, NUM_LAYERS, {"accepted_pairs": [[5, 2], [3, 1]]})
    runs = [{"set": 0, "order": "dissimilar", "seed": 0, "strategy": st.to_dict()}]
    cache = ResultCache(tmp_path / "11_best_search_results.json")
    got = bs.evaluate(tiny_llama, char_tokenizer, runs, cfg, cache, progress=False)
    assert set(got) == {"full", "5:2", "3:1,5:2"}
    assert "heldout" not in cache.data  # no private copy any more
    proto = bs.protocol(cfg)
    store = common.HeldOutStore.beside(tmp_path)
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe (one window: no SE)
    assert all(same(store.get("tiny", proto, k), v) for k, v in got.items())

    # notebook 01's scorer finds them there
    scorer = common.HeldOutScorer(tiny_llama, char_tokenizer, "tiny", proto, store)
    assert scorer(st)["ppl"] == got["3:1,5:2"]["ppl"] and scorer.fresh == 0

    # a second evaluate computes nothing and returns the same thing
    import kvshare.experiments.best_search as module

    monkeypatch.setattr(module, "heldout_perplexity", lambda *a, **k: pytest.fail("evaluated again"))
    again = bs.evaluate(tiny_llama, char_tokenizer, runs, cfg, cache, progress=False)
    assert set(again) == set(got) and all(same(again[k], got[k]) for k in got)


# -- the random-order seed rule -----------------------------------------------------------------------------------
def test_random_seeds_are_drawn_per_set_and_shared_with_notebook_11():
    cfg = common.settings("m", False, 7)
    assert cfg.random_seeds >= 5 and common.settings("m", True, 7).random_seeds >= 2
    per_set = [common.random_seeds(cfg, k) for k in range(cfg.calibration_sets)]
    assert all(len(s) == cfg.random_seeds for s in per_set)
    assert len({s for seeds in per_set for s in seeds}) == cfg.random_seeds * cfg.calibration_sets  # independent
    assert per_set[0] == [7 + 1000 + k for k in range(cfg.random_seeds)]
    assert per_set[2][0] == 7 + 3000
    # notebooks 01 and 11 search the same random orders on each set
    best = bs.settings("m", False, 7)
    assert bs.random_seeds is common.random_seeds
    plan = bs.search_plan(best)
    for k in range(3):
        assert [s for i, o, s in plan if i == k and o == "random"] == common.random_seeds(cfg, k)
        assert [s for o, s in obs.order_runs(cfg, k) if o == "random"] == common.random_seeds(cfg, k)
    with pytest.raises(ValueError):
        common.random_seeds(replace(cfg, random_seeds=1001), 0)


# -- 95% intervals ---------------------------------------------------------------------------------------------------
def test_ci95_is_the_t_interval():
    c = common.ci95([1, 2, 3, 4, 5])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert c["n"] == 5 and c["mean"] == 3 and c["lo"] == pytest.approx(3 - half) and c["hi"] == pytest.approx(3 + half)
    assert common.t975(1) == pytest.approx(12.706) and common.t975(30) == pytest.approx(2.042)
    assert common.t975(40) == pytest.approx(2.021, abs=2e-3) and common.t975(120) == pytest.approx(1.980, abs=2e-3)
    assert common.t975(31) < common.t975(30) and math.isnan(common.t975(0))
    one = common.ci95([2.0])
    assert one["mean"] == 2.0 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    assert common.ci95([])["n"] == 0


def test_ppl_ci95_is_a_geometric_mean_with_its_interval():
    nlls = [math.log(10), math.log(20), math.log(40)]
    c = common.ppl_ci95(nlls)
    assert c["n"] == 3 and c["ppl"] == pytest.approx(20.0)  # exp(mean NLL): the geometric mean
    t = common.ci95(nlls)
    assert c["lo"] == pytest.approx(math.exp(t["lo"])) and c["hi"] == pytest.approx(math.exp(t["hi"]))
    lo, hi = common.result_ci95({"nll": 2.0, "nll_se": 0.1})
    assert lo == pytest.approx(math.exp(2 - Z95 * 0.1)) and hi == pytest.approx(math.exp(2 + Z95 * 0.1))
