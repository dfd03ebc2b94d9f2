"""The long suite (lm-eval's generated RULER tasks, kvshare.tasks.long) and notebook 09's logic.

Offline and small: a byte-level tokenizer built in memory (so the generated prompts are long in tokens with little
text), a 4-layer random Llama with a 2k context, one needle-in-a-haystack task at 1,024 tokens, two examples.
KVSHARE_HOME points at a temporary folder, so generated data, configs and the results cache stay there.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import NUM_LAYERS, byte_llama, make_tiny_model

from kvshare.evaluation import Evaluator, resolve_tasks, write_results
from kvshare.strategy import Strategy
from kvshare.tasks import long as long_suite

LENGTH = 1024  # the smallest context RULER's NIAH generator fills with byte tokens (prompt + 128 generated)


@pytest.fixture(scope="module")
def tiny_model(byte_tokenizer):
    return byte_llama(byte_tokenizer, 4, max_positions=2048)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))  # calibration texts come from data/: nothing to copy
    return tmp_path


def test_long_tasks_cross_tasks_and_lengths():
    specs = resolve_tasks("long", "niah_single_1,ruler_vt", [1024, 2048])
    assert [s.name for s in specs] == ["niah_single_1_1024", "niah_single_1_2048", "ruler_vt_1024", "ruler_vt_2048"]
    assert {s.kind for s in specs} == {"ruler"} and {s.max_gen_toks for s in specs} == {128, 30}
    assert [s.length for s in resolve_tasks("long")[:3]] == list(long_suite.LONG_LENGTHS)
    with pytest.raises(ValueError, match="unknown long task"):
        resolve_tasks("long", "niah_single_9")
    with pytest.raises(ValueError, match="long suite"):
        resolve_tasks("offline", None, [1024])


def test_generation_settings_are_lm_evals():
    """The tokens each task generates are lm-eval's own RULER configs' (read from its YAML files)."""
    import re
    from pathlib import Path

    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "ruler"
    files = {"niah_single_1": "niah_single_1.yaml", "ruler_vt": "vt.yaml"}
    for task, name in files.items():
        text = (folder / name).read_text()
        assert int(re.search(r"max_gen_toks: (\d+)", text).group(1)) == long_suite.GENERATORS[task][2]
    for task in ("niah_multikey_2", "niah_multikey_3"):
        text = (folder / f"{task}.yaml").read_text()
        assert "include: niah_single_1.yaml" in text and f"niah_utils.{task}" in text


def test_score_is_rulers_string_match():
    doc = {"outputs": ["1234567", "7654321"]}
    assert long_suite.process_results(doc, [" 1234567 and 1111111."]) == {"acc": 0.5}
    assert long_suite.process_results({"outputs": ["ABCDE"]}, ["abcde"]) == {"acc": 1.0}


def test_missing_wonderwords_is_one_line(monkeypatch, capsys, tmp_path):
    from kvshare.cli import main

    monkeypatch.setitem(sys.modules, "wonderwords", None)  # importlib then finds no such package
    with pytest.raises(long_suite.MissingDependency, match=r"pip install 'wonderwords==3\.0\.1'"):
        long_suite.long_tasks()
    code = main(["eval", "--suite", "long", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "wonderwords" in err and "pip install" in err


def test_lengths_only_with_the_long_suite(capsys, tmp_path):
    from kvshare.cli import main

    assert main(["eval", "--lengths", "1024", "--out", str(tmp_path / "r.json")]) == 2
    assert "--lengths applies to --suite long" in capsys.readouterr().err


def test_variable_tracking_too_short_is_refused(byte_tokenizer):
    with pytest.raises(ValueError, match="ruler_vt"):
        long_suite.check_length("ruler_vt", LENGTH, byte_tokenizer)


@pytest.mark.slow
def test_long_suite_end_to_end(tiny_model, byte_tokenizer, home):
    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, progress=False)
    result = ev.evaluate(None, suite="long", tasks="niah_single_1", lengths=[LENGTH], limit=2)
    (row,) = result["rows"]
    assert row["task"] == f"niah_single_1_{LENGTH}" and row["metric"] == "acc" and row["primary"]
    assert row["n"] == 2 and row["stderr"] is not None and 0.0 <= row["value"] <= 1.0
    assert row["length"] == LENGTH and row["ruler_task"] == "niah_single_1" and len(row["scores"]) == 2
    # the data: lm-eval's generator in the model's own tokens, written once as local JSONL
    data = next((home / "home" / "lm_eval_long").glob(f"tasks-*/data/niah_single_1_{LENGTH}-v*.jsonl"))
    first = json.loads(data.read_text().splitlines()[0])
    assert first["max_length"] == LENGTH and first["outputs"][0] in first["input"]
    assert len(byte_tokenizer(first["input"])["input_ids"]) + 128 <= LENGTH
    # the results file has stderr and n; a second run comes from the cache
    path, csv_path = write_results(result, home / "long.json")
    assert "stderr" in csv_path.read_text().splitlines()[0]
    again = ev.evaluate(None, suite="long", tasks="niah_single_1", lengths=[LENGTH], limit=2)
    assert again["cached_tasks"] == [f"niah_single_1_{LENGTH}"] and again["rows"][0]["value"] == row["value"]
    # a sharing strategy and an evicting method go through the same path (generation decodes from their cache)
    shared = ev.evaluate(Strategy({3: 0}, 4), suite="long", tasks="niah_single_1", lengths=[LENGTH], limit=2)
    assert shared["num_shared"] == 1 and shared["rows"][0]["n"] == 2
    from kvshare import methods

    evicted = ev.evaluate(
        None, suite="long", tasks="niah_single_1", lengths=[LENGTH], limit=2, method=methods.make("h2o", budget=64)
    )
    assert evicted["method"]["method"] == "h2o" and evicted["rows"][0]["n"] == 2
    # the headline setting compresses each context before its question is read; the other, after
    aware = ev.evaluate(None, suite="long", tasks="niah_single_1", lengths=[LENGTH], limit=2, query_agnostic=False)
    assert result["query"] == "agnostic" and aware["query"] == "aware" and aware["cached_tasks"] == []
    assert aware["rows"][0]["n"] == 2


@pytest.mark.slow
def test_cli_long_suite(tiny_model, byte_tokenizer, home, capsys):
    from kvshare.cli import main

    folder = home / "tiny"
    tiny_model.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    out = home / "cli.json"
    args = ["eval", "--suite", "long", "--model", str(folder), "--tasks", "niah_single_1", "--lengths", str(LENGTH)]
    assert main([*args, "--limit", "1", "--method", "streamingllm", "--budget", "32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == "long" and result["rows"][0]["n"] == 1 and result["method"]["method"] == "streamingllm"
    assert main([*args, "--lengths", "4096", "--limit", "1", "--out", str(out)]) == 2  # beyond the model's context
    assert "exceeds the model's" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# notebook 09's logic (kvshare.experiments.long_context) and report
# ------------------------------------------------------------------------------------------------
def synthetic_rows():
    """Two lengths, one task, four examples each: the full model right everywhere, one method losing at 2k."""
    from kvshare.experiments import long_context as lc

    rows = []
    plan = {
        ("full", None): {1024: [1, 1, 1, 1], 2048: [1, 1, 1, 1]},
        ("kvsharer-dissimilar", 0.25): {1024: [1, 1, 1, 1], 2048: [1, 1, 1, 0]},
        ("streamingllm", None): {1024: [1, 0, 0, 0], 2048: [0, 0, 0, 0]},
    }
    for (family, rate), by_length in plan.items():
        label = lc.LABELS[family] + (f" {100 * rate:g}%" if rate else "")
        for length, scores in by_length.items():
            scores = [float(s) for s in scores]
            rows.append(
                {
                    "family": family,
                    "label": label,
                    "rate": rate,
                    "task": "niah_single_1",
                    "length": length,
                    "acc": sum(scores) / len(scores),
                    "n": len(scores),
                    "scores": scores,
                    **lc.interval(scores),
                }
            )
    return rows


def test_intervals():
    from kvshare.experiments import long_context as lc

    lo, hi = lc.wilson(4, 4)
    assert 0.5 < lo < 0.52 and hi == 1.0  # Wilson 95% of 4/4: [0.510, 1]
    assert lc.wilson(0, 4)[0] == 0.0
    assert lc.interval([1.0, 0.0])["interval"] == "wilson"
    b = lc.interval([0.2, 0.4, 0.2, 0.6])
    assert b["interval"] == "bootstrap" and 0.2 <= b["lo"] <= 0.35 <= b["hi"] <= 0.6


def test_curves_and_verdict_on_synthetic_rows():
    from kvshare.experiments import long_context as lc

    cfg = lc.settings("tiny", quick=False, lengths=[1024, 2048], samples=[4, 4])
    rows = synthetic_rows()
    curves = {(c["label"], c["length"]): c for c in lc.curves(rows)}
    assert curves[("StreamingLLM", 1024)]["diff"] == -0.75
    assert curves[("full model", 2048)]["diff"] == 0.0 and curves[("full model", 2048)]["lo"] > 0.5
    v = lc.verdict(rows, cfg)
    pooled = {p["label"]: p for p in v["pooled"]}
    assert pooled["StreamingLLM"]["significant_loss"] and pooled["StreamingLLM"]["trend"] == -0.25
    assert pooled["StreamingLLM"]["p"] == 2 / 2**7  # 7 worse, none better
    assert not pooled["KVSharer (dissimilar) 25%"]["significant_loss"]  # one miss in eight: p = 1
    assert v["best_at_target"] == "KVSharer (dissimilar) 25%"
    from kvshare.experiments.reports import long_context as report

    cost = [
        {
            "family": f,
            "label": lab,
            "rate": r,
            "length": n,
            "kv_bytes": b,
            "decode_tps": t,
            "kv_ratio": b / 100,
            "decode_tps_ratio": t / 10,
        }
        for f, lab, r, b, t in [
            ("full", "full model", None, 100, 10),
            ("kvsharer-dissimilar", "KVSharer (dissimilar) 25%", 0.25, 73, 10.5),
            ("streamingllm", "StreamingLLM", None, 73, 11),
        ]
        for n in (1024, 2048)
    ]
    screen = [{"ruler_task": "niah_single_1", "value": 1.0, "lo": 0.5, "hi": 1.0}]
    est = lc.estimate_seconds(cfg, 3, 3)
    assert est["total_s"] == est["sweep_s"] + est["screen_s"] + est["bench_s"] + est["setup_s"] > 0
    text = report.conclusion(
        v, list(curves.values()), screen, cost, cfg.to_dict(), {"kept_share_target": 0.733}, est, "tiny", 4
    )
    assert "Significant losses against the full model: StreamingLLM" in text and "73%" in text
    table = report.markdown_table(list(curves.values()), cost)
    assert table.count("\n") == 2 + len(curves) - 1 and "73.0%" in table
    fig = report.figure(list(curves.values()), cost)
    assert len(fig.axes) == 3


def test_sign_test():
    from kvshare.experiments import long_context as lc

    assert lc.sign_test(3, 0) == 0.25 and lc.sign_test(0, 0) == 1.0 and lc.sign_test(5, 5) == 1.0
    assert lc.paired([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])["z"] is None  # no spread: z undefined, the sign test decides


def test_budgets_and_rate_to_bytes():
    from kvshare.experiments import long_context as lc

    assert lc.kept_share(0.25, 30) == 1 - 8 / 30 and lc.kept_share(0.125, 30) == 1 - 4 / 30
    assert lc.eviction_budget(1024, 0.75) == round(0.75 * (1024 - 128))


@pytest.mark.slow
def test_notebook_logic_on_a_tiny_model(tiny_model, byte_tokenizer, home):
    """points -> screen -> accuracy -> cost -> verdict, at one length with one example (what the notebook runs)."""
    from kvshare.experiments import long_context as lc
    from kvshare.experiments.scaffold import ResultCache

    tiny_model.kvshare_tokenizer = byte_tokenizer  # what KVSharer's search encodes with
    cfg = lc.settings(
        "tiny",
        quick=True,
        lengths=[LENGTH],
        samples=[1],
        screen_tasks=["niah_single_1"],
        screen_length=LENGTH,
        orders=["dissimilar"],
        evictions=["streamingllm"],
        rates=[0.25],
        bench_new_tokens=2,
    )
    cache = ResultCache(home / "units.json")
    pts, record = lc.points(tiny_model, byte_tokenizer, cfg, cache=cache, progress=False)
    assert [p.family for p in pts] == ["full", "kvsharer-dissimilar", "streamingllm", "minicache", "simlayerkv"]
    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, progress=False)
    assert lc.screen(ev, cfg)[0]["n"] == 1
    rows = lc.accuracy(ev, pts, cfg, progress=False)
    assert len(rows) == len(pts) and all(r["n"] == 1 and r["length"] == LENGTH for r in rows)
    cost = lc.cost(tiny_model, pts, cfg, cache=cache, progress=False)
    full = next(r for r in cost if r["family"] == "full")
    assert full["kv_ratio"] == 1.0 and next(r for r in cost if r["family"] == "kvsharer-dissimilar")["kv_ratio"] < 1
    assert "cost_full model_1024" in json.loads((home / "units.json").read_text())
    v = lc.verdict(rows, cfg)
    assert {p["label"] for p in v["pooled"]} == {p.label for p in pts}


# --------------------------------------------------------------------------------------------
# query-agnostic (context compressed before the question) and query-aware generation
# --------------------------------------------------------------------------------------------
def _answer(model, method, agnostic: bool):
    import kvshare
    from kvshare.tasks.lmeval import answer_tokens

    ids = torch.randint(3, 100, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = []
    with kvshare.compression(model, method):
        tokens = answer_tokens(model, ids, 32, 6, query_agnostic=agnostic, logits=logits)
    return tokens, torch.stack(logits)


def test_query_agnostic_differs_from_query_aware_for_eviction():
    """StreamingLLM with a budget below the context: compressing before the question is read drops tokens the
    question then never sees; compressing after it, the question read them all in the prefill."""
    from kvshare import methods

    model = make_tiny_model("llama", "sdpa")
    method = methods.make("streamingllm", budget=8, sink=2)
    _, agnostic = _answer(model, method, True)
    _, aware = _answer(model, method, False)
    assert not torch.allclose(agnostic[0], aware[0], atol=1e-3)
    _, full_agnostic = _answer(model, None, True)
    _, full_aware = _answer(model, None, False)
    torch.testing.assert_close(full_agnostic, full_aware, rtol=1e-4, atol=1e-4)  # nothing compressed: the same


def test_query_agnostic_equals_query_aware_for_kvsharer():
    """KVSharer is causal: prefilling the context and then the question is prefilling them together."""
    from kvshare import methods
    from kvshare.strategy import spread_strategy

    model = make_tiny_model("llama", "sdpa")
    method = methods.make("kvsharer", strategy=spread_strategy(NUM_LAYERS, 2))
    tokens_a, agnostic = _answer(model, method, True)
    tokens_b, aware = _answer(model, method, False)
    assert tokens_a == tokens_b
    torch.testing.assert_close(agnostic, aware, rtol=1e-4, atol=1e-4)


def test_question_start_finds_rulers_question_lines():
    from kvshare.tasks.long import question_start

    niah = "Some special magic numbers are hidden...\nhaystack\nWhat are all the special magic numbers for x mentioned?"
    vt = "Memorize...\n\nVAR A = 1\nQuestion: Find all variables that are assigned the value 1 in the text above."
    assert niah[question_start(niah) :].startswith("\nWhat are all the special magic numbers for x")
    assert vt[question_start(vt) :].startswith("\nQuestion: Find all variables")
    single = "A special magic number is hidden...\nhaystack\nWhat is the special magic number for x mentioned?"
    assert single[question_start(single) :].startswith("\nWhat is the special magic number for x")
    assert question_start("no question here") is None
