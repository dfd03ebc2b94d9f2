"""Speed figures and the machine's load: every run records the load it ran under, a run above the line is flagged
(in its rows and its figure's title), and run_all.sh's full mode refuses the speed notebooks on a loaded machine
unless forced. The load is mocked: nothing here depends on how busy the test machine is."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
import pytest

from kvshare import bench as B
from kvshare.experiments import memory_speed as ms

ROOT = Path(__file__).resolve().parents[1]


def test_the_line_is_a_share_of_the_cores():
    line = B.LOAD_LIMIT_PER_CORE * 4
    assert B.is_under_load({"other_busy_cores": line + 0.01, "cpu_count": 4})
    assert not B.is_under_load({"other_busy_cores": line, "cpu_count": 4})
    assert not B.is_under_load({"other_busy_cores": 0.0, "cpu_count": 2})
    # no busy time readable (not Linux): the 1-minute load average before the run stands in
    assert B.is_under_load({"other_busy_cores": None, "load_avg_before": 1.5, "cpu_count": 2})
    assert B.is_under_load({"other_busy_cores": None, "load_avg_before": None, "cpu_count": 2}) is None


def test_load_meter_counts_other_processes_only(monkeypatch):
    """Busy time of the machine minus this process's own CPU time, over the wall time."""
    busy = iter([100.0, 106.0])  # the machine: 6 busy seconds
    own = iter([10.0, 12.0])  # this process: 2 of them
    clock = iter([0.0, 4.0])  # over 4 s: others kept 1 core busy
    monkeypatch.setattr(B, "_machine_busy_s", lambda: next(busy))
    monkeypatch.setattr(B, "_own_cpu_s", lambda: next(own))
    monkeypatch.setattr(B.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(B, "_load_avgs", lambda: (1.25, 1.0, 0.5))
    monkeypatch.setattr(B, "cpu_count", lambda: 2)
    with B.LoadMeter() as meter:
        pass
    row = meter.result()
    assert row == {
        "load_avg_before": 1.25,
        "load_avg_after": 1.25,
        "other_busy_cores": 1.0,
        "cpu_count": 2,
        "under_load": True,  # 1 core of other work > 0.25 x 2 cores
    }


def _run(load, rnd=0):
    return {
        "round": rnd,
        "decode_tps": 10.0 + rnd,
        "prefill_s": 1.0,
        "cpu_count": 2,
        "other_busy_cores": load,
        "under_load": load > B.LOAD_LIMIT_PER_CORE * 2,
    }


def test_rounds_keep_the_load_and_titles_flag_it():
    loads = {("a", 0): 0.02, ("a", 1): 1.8, ("b", 0): 0.03, ("b", 1): 0.01}
    seen = {"a": 0, "b": 0}

    def run(config):
        row = _run(loads[(config, seen[config])], seen[config])
        seen[config] += 1
        return row

    rows = B.measure_rounds(["a", "b"], run, rounds=2, progress=False)
    assert [r["runs_under_load"] for r in rows] == [1, 0]
    assert [x["other_busy_cores"] for x in rows[0]["rounds"]] == [0.02, 1.8]
    note = B.load_note(rows)
    assert "UNDER LOAD: other work up to 1.80 of 2 cores in 1/4 runs" in note and "2 rounds < 5" in note
    assert ms.figure_title("04", rows) == "04" + note
    quiet = [dict(_run(0.0), rounds=[_run(0.0, k) for k in range(B.SPEED_ROUNDS)])]
    assert B.load_note(quiet) == "" and ms.figure_title("04", quiet) == "04"
    assert "1 round < 5" in B.load_note([_run(0.0)])


def test_rows_record_the_load(tiny_dir, monkeypatch):
    monkeypatch.setattr(B, "_machine_busy_s", lambda: None)  # as where /proc/stat cannot be read
    monkeypatch.setattr(B, "_load_avgs", lambda: (9.0, 9.0, 9.0))
    rows = B.bench(
        tiny_dir,
        rates=(0.25,),
        batches=(1,),
        prompt_len=4,
        new_tokens=2,
        random_weights=True,
        repeats=1,
        warmup=0,
        isolate=False,
        progress=False,
    )
    for r in rows:
        assert r["load_avg_before"] == r["load_avg_after"] == 9.0 and r["other_busy_cores"] is None
        assert r["under_load"] is True and r["cpu_count"] >= 1
    assert "UNDER LOAD" in B.format_table(rows)


def test_sweeps_default_to_the_speed_rounds():
    import inspect

    for fn in (ms.rate_sweep, ms.length_sweep):
        assert inspect.signature(fn).parameters["rounds"].default == B.SPEED_ROUNDS == 5


def test_machine_load_samples_and_refusal_says_how_to_go_on():
    load = B.machine_load(0.05)
    assert set(load) >= {"load_avg_before", "other_busy_cores", "cpu_count", "under_load"}
    assert B.load_refusal({"other_busy_cores": 0.1, "cpu_count": 2}) is None
    msg = B.load_refusal({"other_busy_cores": 1.9, "cpu_count": 2, "load_avg_before": 2.5})
    assert "1.90 of 2 cores" in msg and "load average 2.50" in msg and "0.50" in msg and "\n" not in msg


# -- run_all.sh's guard ------------------------------------------------------------------------------------
def _notebook(path, source):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    nb.cells = [
        nbformat.v4.new_code_cell("model = 'x'\nquick = False\nout_dir = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(source),
    ]
    nbformat.write(nb, path)


@pytest.fixture
def speed_notebooks(tmp_path):
    """Notebooks 01 and 04 that leave a mark and then fail on purpose: a full run that gets past the guard stops
    there, before the end of a full run (which rebuilds the checkout's README from its figures)."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    for name in ("01_first", "04_speed"):
        mark = str(tmp_path / f"ran_{name[:2]}")
        _notebook(nbdir / f"{name}.ipynb", f"open({mark!r}, 'w').write('yes')\nraise RuntimeError('stop here')")
    env = dict(os.environ, RUN_ALL_NOTEBOOKS=str(nbdir), RUN_ALL_SKIP_SETUP="1", RUN_ALL_RUNS=str(tmp_path / "runs"))
    return tmp_path, env


@pytest.mark.slow
def test_run_all_refuses_speed_notebooks_on_a_loaded_machine(speed_notebooks):
    tmp_path, env = speed_notebooks
    env["RUN_ALL_LOAD"] = "1.9"
    proc = subprocess.run([str(ROOT / "run_all.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "loaded" in err[0] and "--force" in err[0] and "04_speed" in err[0], err
    assert not (tmp_path / "ran_01").exists() and not (tmp_path / "ran_04").exists()  # refused before any ran


@pytest.mark.slow
@pytest.mark.parametrize("args, ran", [(["--only", "01"], "ran_01"), (["--only", "04", "--force"], "ran_04")])
def test_run_all_guard_spares_other_notebooks_and_yields_to_force(speed_notebooks, args, ran):
    tmp_path, env = speed_notebooks
    env["RUN_ALL_LOAD"] = "1.9"
    proc = subprocess.run([str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, timeout=300, env=env)
    assert "loaded" not in proc.stderr, proc.stderr
    assert "FAILED in" in proc.stderr and "stop here" in proc.stderr, proc.stdout + proc.stderr  # it ran the notebook
    assert (tmp_path / ran).exists()
