"""Evaluation: local tasks through lm-eval on a tiny random model, with and without sharing.

Everything here is offline and small: a byte-level tokenizer built in memory, a 4-layer Llama with
random weights, a 12-example multiple-choice task in BIG-bench's JSON format written to a temporary
folder, and stand-in text for the perplexity path. KVSHARE_HOME points at a
temporary folder, so the generated task configs and the results cache never touch the real cache.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import byte_llama, write_mc_task

import kvshare
from kvshare.evaluation import ROW_COLUMNS, Evaluator, resolve_tasks, write_results
from kvshare.experiments import evaluation as compression_table
from kvshare.experiments.reports import evaluation as compression_report
from kvshare.sharing import active_strategy
from kvshare.tasks import MCTask, PerplexityTask
from kvshare.tasks.offline import FEWSHOT_POOL, mc_parts

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_model(byte_tokenizer):
    return byte_llama(byte_tokenizer, NUM_LAYERS, max_positions=512, scale=4.0)  # larger weights: sharing shows


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    return tmp_path


TEXTS = [
    "The council approved a new bridge over the river. Work starts in May and ends next year.",
    "A local school won a national science prize for a robot that sorts waste.",
    "Heavy rain closed several roads in the north on Sunday, police said.",
]


@pytest.fixture
def local_tasks(home, monkeypatch):
    """A 12-example multiple-choice task file, plus perplexity on stand-in text."""
    pairs = [(1, 2), (2, 2), (3, 1), (4, 4), (5, 2), (6, 1), (2, 7), (3, 3), (8, 1), (9, 2), (4, 5), (6, 6)]
    questions = [(f"What is {a} plus {b}?", (str(a + b), str(a + b + 1), str(a * b + 7)), 0) for a, b in pairs]
    path = write_mc_task(home / "tiny_arith" / "task.jsonl", questions)
    monkeypatch.setattr("kvshare.data.eval_text", lambda source="offline": " ".join(TEXTS) * 3)
    return [
        MCTask(path, "reasoning", prompt="qa", num_fewshot=1),
        PerplexityTask(window=64, limit=None),
    ]


def _strip(rows):
    return [{k: v for k, v in r.items()} for r in rows]


def test_local_task_end_to_end_with_and_without_sharing(tiny_model, byte_tokenizer, local_tasks):
    seen = []
    hook = tiny_model.register_forward_pre_hook(lambda m, a: seen.append(active_strategy(m)))
    try:
        ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, cache=False, progress=False)
        full = ev.evaluate(None, tasks=local_tasks)
        assert all(s is None for s in seen) and seen
        seen.clear()
        strategy = kvshare.Strategy({2: 1, 3: 1}, NUM_LAYERS)
        shared = ev.evaluate(strategy, tasks=local_tasks)
        assert seen and all(s is strategy for s in seen)  # every scoring forward shared KV
    finally:
        hook.remove()
    assert getattr(tiny_model, "_kvshare", None) is None  # sharing is switched off again afterwards
    for result in (full, shared):
        by = {(r["task"], r["metric"]): r for r in result["rows"]}
        mc = by[("kvshare_tiny_arith", "acc")]
        # the evaluated examples are the test part only (kvshare.tasks.offline: the screen part is never evaluated)
        assert (
            mc["n"] == len(mc_parts(local_tasks[0])["test"]) <= 12 - FEWSHOT_POOL
            and 0 <= mc["value"] <= 1
            and mc["stderr"] is not None
        )
        assert mc["chance"] == pytest.approx(1 / 3) and mc["primary"]
        assert len(mc["scores"]) == mc["n"]
        assert ("kvshare_tiny_arith", "acc_norm") in by
        ppl = by[("kvshare_ppl", "ppl")]
        assert ppl["value"] > 1 and not ppl["higher_is_better"]
    assert shared["num_shared"] == 2 and full["num_shared"] == 0
    ppl_full = [r["value"] for r in full["rows"] if r["metric"] == "ppl"][0]
    ppl_shared = [r["value"] for r in shared["rows"] if r["metric"] == "ppl"][0]
    assert ppl_full != ppl_shared  # the strategy changed the model's outputs


def test_results_file_has_documented_columns(tiny_model, byte_tokenizer, local_tasks, home):
    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, cache=False, progress=False)
    result = ev.evaluate(None, tasks=local_tasks[:1], limit=4)
    json_path, csv_path = write_results(result, home / "out" / "results.json")
    data = json.loads(json_path.read_text())
    assert data["rows"] and all(set(ROW_COLUMNS) <= set(r) for r in data["rows"])
    assert {"task", "metric", "value", "stderr", "n"} <= set(ROW_COLUMNS)
    with open(csv_path) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ROW_COLUMNS
        assert len(list(reader)) == len(data["rows"])
    assert all(r["n"] == 4 for r in data["rows"])


def test_c0_strategy_equals_plain_model_exactly(tiny_model, byte_tokenizer, local_tasks):
    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, cache=False, progress=False)
    plain = ev.evaluate(None, tasks=local_tasks)
    empty = ev.evaluate(kvshare.Strategy({}, NUM_LAYERS), tasks=local_tasks)
    assert _strip(plain["rows"]) == _strip(empty["rows"])  # values, stderrs and per-example scores, bit for bit


def test_results_are_cached_per_strategy(tiny_model, byte_tokenizer, local_tasks):
    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, progress=False)
    spec = local_tasks[:1]
    first = ev.evaluate(None, tasks=spec, limit=5)
    assert first["cached_tasks"] == []
    again = ev.evaluate(None, tasks=spec, limit=5)
    assert again["cached_tasks"] == ["kvshare_tiny_arith"] and again["rows"] == first["rows"]
    other = ev.evaluate(kvshare.Strategy({3: 0}, NUM_LAYERS), tasks=spec, limit=5)
    assert other["cached_tasks"] == []  # another strategy is another cache entry
    assert ev.evaluate(None, tasks=spec, limit=6)["cached_tasks"] == []  # and so is another limit


def test_missing_task_lists_available_ones():
    with pytest.raises(ValueError, match="unknown offline task 'nope'; available: .*kvshare_sciq"):
        resolve_tasks("offline", "sciq,nope")
    with pytest.raises(ValueError, match="available: .*hellaswag"):
        resolve_tasks("online", ["not_a_task"])
    assert [t.name for t in resolve_tasks("offline", "sciq")] == ["kvshare_sciq"]


def test_cli_missing_task_is_one_line_exit_2(tmp_path, capsys):
    from kvshare.cli import main

    code = main(["eval", "--tasks", "nope", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kvshare eval: error: unknown offline task 'nope'; available: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_online_tasks_exist_in_lm_eval():
    from lm_eval.tasks import TaskManager

    from kvshare.tasks import ONLINE_DEFAULT, ONLINE_TASKS

    known = set(TaskManager().all_tasks)
    assert {t.name for t in ONLINE_TASKS} <= known
    assert set(ONLINE_DEFAULT) <= {t.name for t in ONLINE_TASKS}


def test_summary_and_conclusion_arithmetic():
    def row(order, rate, c, task, value, chance, scores):
        return {
            "order": order,
            "rate": rate,
            "num_shared": c,
            "task": task,
            "metric": "acc",
            "value": value,
            "stderr": 0.01,
            "n": len(scores),
            "chance": chance,
            "primary": True,
            "higher_is_better": True,
            "scores": scores,
        }

    rows = [
        row("dissimilar", 0.0, 0, "a", 0.6, 0.25, [1, 1, 1, 0, 0]),
        row("dissimilar", 0.0, 0, "b", 0.4, 0.25, [1, 1, 0, 0, 0]),
        row("dissimilar", 0.25, 8, "a", 0.4, 0.25, [1, 1, 0, 0, 0]),
        row("dissimilar", 0.25, 8, "b", 0.4, 0.25, [1, 1, 0, 0, 0]),
    ]
    s = {(x["order"], x["rate"]): x for x in compression_table.summarize(rows)}
    assert s[("dissimilar", 0.0)]["kept_pct"] == pytest.approx(100.0)
    assert s[("dissimilar", 0.25)]["kept_pct"] == pytest.approx(80.0)
    assert s[("dissimilar", 0.25)]["above_chance_kept_pct"] == pytest.approx(100 * 0.15 / 0.25)
    assert s[("dissimilar", 0.25)]["drop"] == pytest.approx(0.1)
    c = compression_report.conclusion(list(s.values()), rate=0.25)
    # 80% kept on 5 examples per task: the bootstrap interval contains 90%, so the verdict is undecided, not "fails"
    assert c["orders"]["dissimilar"]["verdict"] == "undecided" and "80.0%" in c["text"]
    assert compression_table.num_shared_for(0.125, 30) == 4
    assert compression_table.num_shared_for(0.25, 30) == 8
    assert compression_table.num_shared_for(0.375, 30) == 11


# --------------------------------------------------------------------------------------------
# cache methods (token eviction, quantized KV) through the evaluation entry point
# --------------------------------------------------------------------------------------------
def _requests(tokenizer):
    """lm-eval's ((context, continuation), context ids, continuation ids): shared contexts, uneven continuations."""
    out = []
    for ctx, conts in [
        ("The council approved a new bridge over the", [" river", " sea and the hills", " x"]),
        ("Q", [" a", " bb"]),
        ("Heavy rain closed several roads in the north on Sunday,", [" police"]),
    ]:
        ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        for c in conts:
            out.append(((ctx, c), ctx_ids, tokenizer(c, add_special_tokens=False)["input_ids"]))
    return out


def _one_pass(model, requests):
    out = []
    with torch.no_grad():
        for _, ctx, cont in requests:
            ids = torch.tensor([ctx + cont])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            target = ids[0, 1:]
            tok = lp.gather(-1, target[:, None])[:, 0][-len(cont) :]
            greedy = bool((lp.argmax(-1)[-len(cont) :] == target[-len(cont) :]).all())
            out.append((float(tok.sum()), greedy))
    return out


def test_decoding_protocol_equals_one_pass_without_eviction(tiny_model, byte_tokenizer):
    from kvshare.tasks.lmeval import decode_loglikelihoods

    requests = _requests(byte_tokenizer)
    ref = _one_pass(tiny_model, requests)
    for batch in (1, 2, 8):  # shared prefills, right-padded continuations
        got = decode_loglikelihoods(tiny_model, requests, max_length=512, batch_size=batch)
        assert [g[1] for g in got] == [r[1] for r in ref]
        assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], abs=1e-4)
    # a budget above every length: the method changes nothing; a small one changes the scores
    big = kvshare.methods.make("h2o", budget=200)
    small = kvshare.methods.make("streamingllm", budget=8)
    with kvshare.compression(tiny_model, None, big):
        same = decode_loglikelihoods(tiny_model, requests, max_length=512, batch_size=4)
    with kvshare.compression(tiny_model, None, small):
        evicted = decode_loglikelihoods(tiny_model, requests, max_length=512, batch_size=4)
    assert [g[0] for g in same] == pytest.approx([r[0] for r in ref], abs=1e-4)
    long_ctx = [i for i, r in enumerate(requests) if len(r[1]) > 9]
    assert any(abs(evicted[i][0] - ref[i][0]) > 1e-3 for i in long_ctx)


@pytest.mark.slow
def test_evaluate_with_eviction_scores_by_decoding(tiny_model, byte_tokenizer, local_tasks):
    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, progress=False)
    tasks = local_tasks
    one_pass = ev.evaluate(None, tasks=tasks)
    decoded = ev.evaluate(None, tasks=tasks, decode=True)
    assert decoded["protocol"] == "decode" and one_pass["protocol"] == "one-pass" and decoded["cached_tasks"] == []
    by = lambda res: {(r["task"], r["metric"]): r for r in res["rows"]}  # noqa: E731
    # multiple choice: the same log-likelihoods, hence the same per-example scores
    assert by(decoded)[("kvshare_tiny_arith", "acc")]["scores"] == by(one_pass)[("kvshare_tiny_arith", "acc")]["scores"]
    wide = kvshare.methods.make("h2o", budget=10_000)
    same = ev.evaluate(None, tasks=tasks, method=wide)
    assert same["method"] == {"method": "h2o", "budget": 10_000, "recent_ratio": 0.5} and same["protocol"] == "decode"
    assert same["cached_tasks"] == []  # another method is another cache entry
    assert by(same)[("kvshare_ppl", "ppl")]["value"] == pytest.approx(
        by(decoded)[("kvshare_ppl", "ppl")]["value"], rel=1e-6
    )
    tight = ev.evaluate(
        kvshare.Strategy({3: 1}, NUM_LAYERS), tasks=tasks, method=kvshare.methods.make("streamingllm", budget=8)
    )
    assert tight["num_shared"] == 1
    assert by(tight)[("kvshare_ppl", "ppl")]["value"] != by(decoded)[("kvshare_ppl", "ppl")]["value"]
    assert getattr(tiny_model, "_kvshare", None) is None  # everything switched off afterwards
    with pytest.raises(ValueError, match="score by decoding"):
        ev.evaluate(None, tasks=tasks, method=wide, decode=False)


def test_evaluate_with_quantized_kv(tiny_model, byte_tokenizer, local_tasks):
    from kvshare.methods.quantized import QuantizedKV

    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, cache=False, progress=False)
    tasks = [local_tasks[1]]
    full = ev.evaluate(None, tasks=tasks)
    q4 = ev.evaluate(None, tasks=tasks, method=QuantizedKV(bits=4))
    q8 = ev.evaluate(kvshare.Strategy({}, NUM_LAYERS), tasks=tasks, method=QuantizedKV(bits=8))
    assert q4["protocol"] == "one-pass" and q4["method"]["bits"] == 4
    ppl = lambda res: [r["value"] for r in res["rows"] if r["metric"] == "ppl"][0]  # noqa: E731
    # the one-pass forward reads the quantized cache: int4 moves perplexity more than int8
    assert ppl(q4) != ppl(full)
    assert abs(ppl(q8) - ppl(full)) < abs(ppl(q4) - ppl(full))


def test_cli_eval_accepts_methods(tmp_path, capsys):
    from kvshare.cli import main

    p = tmp_path / "r.json"
    for extra in (["--method", "h2o"], ["--budget", "8"], ["--method", "h2o", "--budget", "0"]):
        assert main(["eval", "--tasks", "ppl", "--out", str(p), *extra]) == 2
        assert "error" in capsys.readouterr().err
    args = (
        __import__("kvshare.cli", fromlist=["build_parser"])
        .build_parser()
        .parse_args(["eval", "--tasks", "ppl", "--out", str(p), "--method", "quantized", "--bits", "8", "--decode"])
    )
    assert args.method == "quantized" and args.bits == 8 and args.decode


def test_compression_table_takes_perplexity_from_the_shared_heldout_scorer(tiny_model, byte_tokenizer, local_tasks):
    """Notebook 03's perplexity column is the shared held-out protocol's (one baseline in every notebook): with a
    scorer, the suite's own perplexity task is not run, and every cell's ppl row is the scorer's for its strategy."""
    scored = []

    def scorer(strategy):
        scored.append(None if strategy is None else dict(strategy.mapping))
        n = 0 if strategy is None else strategy.num_shared
        return {"ppl": 20.0 + n, "ppl_se": 0.5, "tokens": 16384}

    ev = Evaluator(tiny_model, byte_tokenizer, batch_size=4, cache=False, progress=False)
    meta = {"order": "dissimilar", "accepted_pairs": [[2, 1], [3, 1]]}
    strategy = kvshare.Strategy({2: 1, 3: 1}, NUM_LAYERS, metadata=meta)
    rows = compression_table.compression_runs(
        ev, {"dissimilar": strategy}, rates=(0.0, 0.5), tasks=local_tasks, progress=False, heldout=scorer
    )
    ppl = [r for r in rows if r["metric"] == "ppl"]
    assert [(r["num_shared"], r["value"], r["n"], r["protocol"]) for r in ppl] == [
        (0, 20.0, 16384, "heldout"),
        (2, 22.0, 16384, "heldout"),
    ]
    assert scored == [None, {2: 1, 3: 1}]
    assert {r["task"] for r in rows} == {"kvshare_tiny_arith", "kvshare_ppl"}
