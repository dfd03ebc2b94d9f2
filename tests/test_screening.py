"""The offline suite per model (kvshare.tasks.screening): the keep rule on the default model's committed screen, a
model's suite read back from its screen file (never typed in), the fallback for an unscreened model, and base
models never prompted through a chat template. Fast: no real model (a 4-layer random Llama for the screen's
round trip)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import byte_llama, write_mc_task

from kvshare import models
from kvshare.evaluation import Evaluator, resolve_tasks
from kvshare.tasks import EVAL_LIMIT, OFFLINE_TASKS, SCREEN, SCREEN_CATEGORIES, default_tasks, offline_tasks
from kvshare.tasks import screening as scr

DEFAULT_SCREEN = Path(__file__).resolve().parents[1] / "figures" / scr.SCREEN_FILE
DEFAULT_MC = [t for t in OFFLINE_TASKS if t.kind == "multiple_choice"]

# A screen of made-up numbers over the real candidates: source, prompt, n, chance, acc, acc_norm, request tokens
MADE_UP = [
    ("sciq", "raw", 100, 0.25, 0.68, 0.60, 376),
    ("arc_easy", "raw", 100, 0.25, 0.58, 0.50, 126),
    ("openbookqa", "raw", 100, 0.25, 0.50, 0.45, 77),
    ("piqa", "raw", 100, 0.50, 0.70, 0.68, 72),
    ("hellaswag", "raw", 100, 0.25, 0.35, 0.40, 320),
    ("socialiqa", "raw", 100, 0.33, 0.40, 0.44, 98),
    ("csqa", "raw", 100, 0.20, 0.45, 0.40, 107),
    ("boolq", "raw", 100, 0.50, 0.56, 0.56, 900),
    ("arc_challenge", "raw", 100, 0.25, 0.30, 0.34, 161),
]


def screen_rows(table=MADE_UP) -> list[dict]:
    """Rows as kvshare.tasks.screening.screen writes them (stderr of a mean of 0/1 scores, ddof 1)."""
    rows = []
    for source, prompt, n, chance, acc, acc_norm, _ in table:
        mine = []
        for metric, value in (("acc", acc), ("acc_norm", acc_norm)):
            se = math.sqrt(value * (1 - value) / (n - 1))
            z = (value - chance) / se if se else None
            mine.append(dict(source=source, prompt=prompt, metric=metric, value=value, stderr=se, chance=chance, n=n))
            mine[-1]["z"] = z
        best = max(mine, key=lambda x: -math.inf if x["z"] is None else x["z"])
        for x in mine:
            x["chosen"] = x is best
        rows += mine
    return rows


def costs(table=MADE_UP) -> dict:
    return {row[0]: float(row[-1]) for row in table}


def test_the_screen_candidates_all_have_a_category():
    assert {s for s, _ in SCREEN} == set(SCREEN_CATEGORIES)
    assert set(SCREEN_CATEGORIES.values()) <= {"reasoning", "language", "knowledge", "examination", "understanding"}
    for t in DEFAULT_MC:  # the default suite's categories are the screen's
        assert SCREEN_CATEGORIES[t.source] == t.category


def test_the_default_suite_is_what_the_rule_keeps_on_the_default_models_screen():
    record = scr.read_screen(DEFAULT_SCREEN)
    assert record["model"] == models.DEFAULT_MODEL and not record.get("smoke")
    assert {r["source"] for r in record["rows"]} == set(SCREEN_CATEGORIES)  # every candidate was screened
    assert scr.suite_from_screen(record) == OFFLINE_TASKS
    assert all(t.limit == EVAL_LIMIT and t.split == "test" for t in DEFAULT_MC)


def test_the_rule_on_a_made_up_screen():
    decisions = scr.decide(screen_rows(), costs(), SCREEN_CATEGORIES)
    kept = [d["source"] for d in decisions if d["kept"]]
    why = {d["source"]: d["reason"] for d in decisions}
    assert "examination already has 2" in why["openbookqa"]  # sciq and arc_easy came first (larger z)
    assert "request tokens" in why["boolq"] or "above chance" in why["boolq"]
    assert "above chance" in why["arc_challenge"]
    assert len(kept) <= scr.MAX_TASKS and "csqa" in kept and "piqa" in kept
    zs = [d["z"] for d in decisions if d["z"] is not None]  # in decreasing z, each with its chosen metric
    assert zs == sorted(zs, reverse=True)
    hs = next(d for d in decisions if d["source"] == "hellaswag")
    assert hs["metric"] == "acc_norm" and hs["category"] == "reasoning"


def test_each_condition_of_the_rule():
    table = [
        ("sciq", "raw", 40, 0.25, 0.97, 0.90, 50),  # saturated
        ("socialiqa", "raw", 40, 0.25, 0.60, 0.50, 2500),  # too costly
        ("boolq", "raw", 40, 0.50, 0.50, 0.50, 50),  # not above chance
        ("piqa", "raw", 40, 0.25, 0.70, 0.70, 50),  # kept
    ]
    decisions = {d["source"]: d for d in scr.decide(screen_rows(table), costs(table), SCREEN_CATEGORIES)}
    assert "saturated" in decisions["sciq"]["reason"]
    assert "request tokens" in decisions["socialiqa"]["reason"]
    assert "above chance" in decisions["boolq"]["reason"]
    assert decisions["piqa"]["kept"] and decisions["piqa"]["reason"] is None
    missing = scr.decide(screen_rows(table[3:]), {}, SCREEN_CATEGORIES)
    assert not missing[0]["kept"] and "not measured" in missing[0]["reason"]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout with figures/ and one screened model, `fake-model` (the made-up screen's numbers)."""
    (tmp_path / "figures" / "fake-model").mkdir(parents=True)
    record = scr.screen_record("fake-model", screen_rows(), costs(), chat_template=False)
    path = scr.screen_path("fake-model", tmp_path)
    path.write_text(json.dumps(record))
    monkeypatch.setattr(scr, "checkout_root", lambda: tmp_path)
    return tmp_path


def test_a_models_suite_is_read_back_from_its_screen_file(checkout):
    assert scr.screen_path("fake-model", checkout) == checkout / "figures" / "fake-model" / scr.SCREEN_FILE
    tasks, source = scr.suite_for("fake-model")
    assert source == {
        "model": "fake-model",
        "source": "screen",
        "screened_on": "fake-model",
        "file": "figures/fake-model/03_evaluation_screen.json",
    }
    mc = {t.source: t for t in tasks if t.kind == "multiple_choice"}
    record = json.loads(scr.screen_path("fake-model", checkout).read_text())
    assert list(mc) == record["kept"]  # the file's decision, rebuilt from its numbers
    assert mc["hellaswag"].metric == "acc_norm" and mc["sciq"].metric == "acc"
    assert all(t.limit == EVAL_LIMIT for t in mc.values())
    assert all(t.split == "test" for t in mc.values())  # evaluated on the test part, never the screen part
    assert tasks[-1].kind == "perplexity"  # after the multiple-choice tasks
    # the whole package follows: default names, name lookup, the evaluator's resolution
    names = default_tasks("offline", "fake-model")
    assert "kvshare_csqa" in names and "kvshare_openbookqa" not in names
    assert [t.name for t in resolve_tasks("offline", None, model="fake-model")] == names
    assert resolve_tasks("offline", "sciq", model="fake-model")[0].source == "sciq"
    assert offline_tasks() == OFFLINE_TASKS and offline_tasks("smollm2-135m") == OFFLINE_TASKS


def test_a_screen_file_the_rule_no_longer_gives_is_refused(checkout):
    path = scr.screen_path("fake-model", checkout)
    record = json.loads(path.read_text())
    record["kept"] = ["openbookqa"]  # typed in by hand
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="rerun the screen"):
        scr.suite_for("fake-model")
    path.write_text(json.dumps({"kept": []}))
    with pytest.raises(ValueError, match="not a kvshare screen file"):
        scr.suite_for("fake-model")


def test_an_unscreened_model_gets_the_default_suite_and_is_told(checkout, monkeypatch):
    monkeypatch.setattr(scr, "_WARNED", set())
    with pytest.warns(UserWarning, match="no screen of its own"):
        tasks, source = scr.suite_for("other-model")
    assert tasks == OFFLINE_TASKS and source["source"] == "default" and source["screened_on"] == "smollm2-135m"


def test_model_folders_follow_run_all():
    assert scr.model_folder("smollm2-135m") == ""
    assert scr.model_folder("gemma3-270m") == "gemma3-270m"
    assert scr.model_folder("org/some-model") == "org--some-model"


def test_the_committed_screens_give_their_recorded_suites():
    """Every committed screen file (the default model's, Gemma's, ...) still gives the suite it recorded."""
    root = scr.checkout_root()
    files = sorted((root / "figures").glob(f"**/{scr.SCREEN_FILE}")) if root else []
    for path in files:
        record = scr.read_screen(path)
        assert not record.get("smoke"), f"{path} is a smoke screen"
        assert record["chat_template"] is False, f"{path}: screened through a chat template"
        mc = [t.source for t in scr.suite_from_screen(record) if t.kind == "multiple_choice"]
        assert mc == record["kept"]


# ------------------------------------------------------------------------------------------------
# the screen itself, end to end on a tiny model and a local task
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def local_candidates(tmp_path, monkeypatch):
    """Two local multiple-choice tasks as the screen's only candidates."""
    monkeypatch.setenv("KVSHARE_HOME", str(tmp_path / "home"))
    paths = []
    for name, offset in (("tiny_sums", 100), ("tiny_more", 7)):
        questions = [
            (f"What is {a} plus {b}?", (str(a + b), str(a + b + offset), "x"), 0)
            for a in range(1, 11)
            for b in range(1, 7)
        ]
        paths.append(write_mc_task(tmp_path / name / "task.jsonl", questions))
    from kvshare.tasks import suite

    monkeypatch.setattr(suite, "SCREEN", [(p, "qa") for p in paths])
    monkeypatch.setattr(suite, "SCREEN_CATEGORIES", {paths[0]: "reasoning", paths[1]: "reasoning"})
    return paths


def test_choose_suite_screens_on_the_screen_part_and_writes_the_file(local_candidates, byte_tokenizer, tmp_path):
    model = byte_llama(byte_tokenizer, 2)
    model.kvshare_name = "tiny-screened"
    out = tmp_path / "figures" / "tiny-screened" / scr.SCREEN_FILE
    evaluator = Evaluator(model, byte_tokenizer, batch_size=8, cache=False, progress=False)
    with pytest.raises(ValueError, match="smoke"):
        scr.choose_suite(evaluator, limit=3, progress=False)  # a smoke screen never lands in the model's file
    record = scr.choose_suite(evaluator, out=out, limit=5, progress=False)
    assert out.is_file() and record["smoke"] and record["chat_template"] is False
    assert {r["source"] for r in record["rows"]} == set(local_candidates)
    assert all(r["n"] == 5 for r in record["rows"])
    assert set(record["request_tokens"]) == set(local_candidates) and min(record["request_tokens"].values()) > 0
    # the decision is the rule's on the recorded numbers
    again = scr.decide(record["rows"], record["request_tokens"], {p: "reasoning" for p in local_candidates})
    assert [d["kept"] for d in again] == [d["kept"] for d in record["decisions"]]


# ------------------------------------------------------------------------------------------------
# base models: no chat template
# ------------------------------------------------------------------------------------------------
def test_gemma_is_registered_as_a_base_model():
    assert models.KIND["gemma3-270m"] == "base" and models.KIND["smollm2-135m"] == "instruct"
    assert set(models.KIND) == set(models.EMBEDDED)


def test_a_base_model_never_uses_a_chat_template():
    template = SimpleNamespace(chat_template="{{ messages }}")
    assert not Evaluator(SimpleNamespace(kvshare_kind="base"), template).chat()
    assert Evaluator(SimpleNamespace(kvshare_kind="instruct"), template).chat()
    assert Evaluator(SimpleNamespace(), template).chat()  # a model of unknown kind: its tokenizer decides
    assert not Evaluator(SimpleNamespace(kvshare_kind=None), SimpleNamespace(chat_template=None)).chat()


def test_generation_prompts_a_base_model_as_plain_text_with_bos(byte_tokenizer, monkeypatch):
    """A base model gets the prompt as it is, with the tokenizer's BOS, even if a template is there."""
    from kvshare import generation

    seen = {}

    class Model:
        kvshare_kind = "base"

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, **kwargs):
            seen["ids"] = input_ids
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 2), 5)], dim=1)

    monkeypatch.setattr(byte_tokenizer, "chat_template", "<s>user: {{ messages[0]['content'] }}", raising=False)
    generation.generate_text(Model(), byte_tokenizer, "Hi", max_new_tokens=2)
    plain = byte_tokenizer("Hi", add_special_tokens=True)["input_ids"]  # special tokens on: a BOS where there is one
    assert seen["ids"][0].tolist() == plain
    instruct = Model()
    instruct.kvshare_kind = "instruct"
    generation.generate_text(instruct, byte_tokenizer, "Hi", max_new_tokens=2)
    assert seen["ids"][0].tolist() != plain  # an instruct model's prompt goes through the template


@pytest.mark.real_model
def test_embedded_gemma_has_no_chat_template():
    import kvshare

    model, tokenizer = kvshare.load_model("gemma3-270m")
    assert model.kvshare_kind == "base" and not getattr(tokenizer, "chat_template", None)
    assert not Evaluator(model, tokenizer).chat()
