"""The committed data (data/): checksums, disjoint calibration and held-out text, offline reading, one-line errors,
and the builder's deterministic pieces (kvshare.data_build)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvshare.data as data
from kvshare import data_build

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def test_manifest_checksums_and_counts_match_the_files():
    manifest = json.loads((DATA / "MANIFEST.json").read_text())
    assert manifest["files"], "the manifest lists no file"
    for name, entry in manifest["files"].items():
        raw = (DATA / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"], name
        rows = gzip.decompress(raw).decode().splitlines()
        assert len(rows) == entry["counts"]["items"], name
        for source in entry["sources"]:
            assert source["package"].count("==") == 1 and len(source["archive_sha256"]) == 64 and source["license"]


def test_data_weighs_under_25_mb():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 25e6


def test_every_suite_task_has_its_data_and_500_test_questions_where_it_can():
    from kvshare.tasks import OFFLINE_TASKS, SCREEN
    from kvshare.tasks.offline import MCTask, mc_parts

    for source, _ in SCREEN:
        assert data.task_rows(source), source
    for task in OFFLINE_TASKS:
        if task.kind == "multiple_choice":
            test = mc_parts(MCTask(task.source, task.category))["test"]
            assert len(test) >= min(500, task.limit or 500), task.source


def _sentences(text: str) -> set[str]:
    return data_build.sentences(text)


def test_calibration_sets_are_disjoint_and_never_in_the_held_out_text():
    held = set().union(*(_sentences(t) for t in data.heldout_texts()))
    held |= set().union(*(_sentences(d["text"]) for d in data.long_documents("heldout")))
    for domain in data.DOMAINS:
        sets = [data.calibration_texts(30, set_index=k, domain=domain) for k in range(10)]
        every = [t for s in sets for t in s]
        assert len(every) == len(set(every)) == 300, domain  # 10 disjoint sets of 30
        for text in every:
            assert not _sentences(text) & held
            assert text not in data.eval_text()
    for doc in data.long_documents("calibration"):
        assert not _sentences(doc["text"]) & held, doc["id"]
    with pytest.raises(ValueError, match="10 disjoint sets of 30"):
        data.calibration_texts(30, set_index=10)


def test_held_out_text_and_long_documents_are_large_enough():
    assert len(data.eval_text().split()) > 40_000  # over 16k tokens with any English tokenizer
    long_held = [d for d in data.long_documents("heldout") if d["words"] >= 6000]
    assert len(long_held) >= 20
    held_sources = {d["source"] for d in data.long_documents("heldout") if d["source"] != "enwiki"}
    cal_sources = {d["source"] for d in data.long_documents("calibration") if d["source"] != "enwiki"}
    assert not held_sources & cal_sources  # a book is wholly on one side
    held_titles = {d["title"] for d in data.long_documents("heldout")}
    assert not held_titles & {d["title"] for d in data.long_documents("calibration")}


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.slow
def test_loaders_read_only_data_with_no_package_index(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1", KVSHARE_HOME=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    code = (
        "import kvshare.data as d\n"
        "assert len(d.calibration_texts(30, set_index=9)) == 30\n"
        "assert len(d.calibration_texts(30, domain='wikipedia')) == 30\n"
        "assert d.eval_text() and d.long_documents() and d.task_rows('piqa')\n"
        "from kvshare.tasks import OFFLINE_TASKS\n"
        "from kvshare.tasks.offline import prepare\n"
        "prepare(OFFLINE_TASKS)\n"
    )
    proc = _run(code, env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "empty" / "data-sources").exists()  # nothing was downloaded


def _copy_data(tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(DATA, copy)
    return copy


def test_a_corrupt_file_gives_one_line_naming_it_and_the_rebuild(tmp_path, monkeypatch):
    copy = _copy_data(tmp_path)
    raw = bytearray((copy / "prose.jsonl.gz").read_bytes())
    raw[100] ^= 0xFF
    (copy / "prose.jsonl.gz").write_bytes(bytes(raw))
    (copy / "tasks" / "piqa.jsonl.gz").unlink()
    monkeypatch.setenv("KVSHARE_DATA", str(copy))  # another folder: read and checked afresh
    with pytest.raises(data.DataError) as corrupt:
        data.calibration_texts(30)
    with pytest.raises(data.DataError) as missing:
        data.task_rows("piqa")
    for err, name in ((corrupt, "prose.jsonl.gz"), (missing, "piqa.jsonl.gz")):
        line = str(err.value)
        assert "\n" not in line and name in line and "python -m kvshare data build" in line


def test_data_check_command_is_one_line_on_a_corrupt_file(tmp_path, capsys, monkeypatch):
    from kvshare.cli import main

    copy = _copy_data(tmp_path)
    (copy / "long.jsonl.gz").write_bytes(b"not gzip")
    monkeypatch.setenv("KVSHARE_DATA", str(copy))
    assert main(["data", "check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "long.jsonl.gz" in err and "data build" in err


def test_unknown_task_and_domain_say_what_exists():
    with pytest.raises(ValueError, match="arc_easy"):
        data.task_rows("nope")
    with pytest.raises(ValueError, match="news"):
        data.calibration_texts(30, domain="nope")


# ------------------------------------------------------------------------------------------------
# the builder's pieces (a full rebuild downloads the archives: `python -m kvshare data build`)
# ------------------------------------------------------------------------------------------------
def test_gzip_jsonl_is_deterministic():
    rows = [{"b": 1, "a": "é"}, {"a": "x"}]
    assert data_build.gzip_jsonl(rows) == data_build.gzip_jsonl([dict(reversed(list(r.items()))) for r in rows])
    assert gzip.decompress(data_build.gzip_jsonl(rows)).decode().splitlines()[0] == '{"a": "é", "b": 1}'


def test_mc_rows_take_one_row_per_question_and_skip_unconditioned_requests():
    def request(doc_id, idx, context, continuation, label):
        doc = {"query": context.split("PREFIX ")[-1]}
        return {"doc_id": doc_id, "idx": idx, "label": label, "native_id": f"q{doc_id}", "doc": doc,
                "request": {"context": context, "continuation": continuation}}  # fmt: skip

    lines = [request(0, i, "Q: sky?\nA:", c, 1) for i, c in enumerate([" green", " blue"])]
    lines += [request(1_000_000, i, "A:", c, 1) for i, c in enumerate([" green", " blue"])]
    raw = gzip.compress("".join(json.dumps(r) + "\n" for r in lines).encode())
    assert data_build.mc_rows(raw, zero_shot=True) == [
        {"id": "q0", "query": "Q: sky?\nA:", "choices": ["green", "blue"], "gold": 1}
    ]
    few = [request(0, i, "Q: 1+1?\nA: 2\n\nPREFIX Q: sky?\nA:", c, 0) for i, c in enumerate([" blue", " red"])]
    raw = gzip.compress("".join(json.dumps(r) + "\n" for r in few).encode())
    assert data_build.mc_rows(raw, zero_shot=False)[0]["query"] == "Q: sky?\nA:"  # the few-shot examples left out


def test_clean_wikitext_keeps_prose_and_drops_markup():
    raw = (
        "{{Infobox|name=X}}'''Anarchism''' is a [[political philosophy|philosophy]] that rejects "
        "[[hierarchy]].<ref>Some book</ref> See [http://example.org the site].\n"
        "== History ==\n* a list item\n[[Category:Philosophy]]\nIt began {{cite|x}} early."
    )
    assert data_build.clean_wikitext(raw) == (
        "Anarchism is a philosophy that rejects hierarchy. See the site.\nHistory\n\nIt began early."
    )


def test_book_parts_are_consecutive_and_cover_the_book(monkeypatch):
    monkeypatch.setattr(data_build, "LONG_WORDS", 10)
    text = "\n".join(f"line {i} has four words" if i % 5 else "" for i in range(60))
    parts = data_build.book_parts("b", text)
    assert len(parts) > 2
    assert " ".join(" ".join(parts).split()) == " ".join(text.split())
