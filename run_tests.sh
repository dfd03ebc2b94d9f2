#!/usr/bin/env bash
# The test suite: sets up .venv (reused when present), then ruff (lint + format check) and pytest, offline.
# Arguments go to pytest (a file or -k EXPR); ruff runs when the whole suite does, and so do the vLLM serving
# tests (scripts/test_vllm.sh, in .venv-vllm, which scripts/setup_vllm.sh creates or reuses; KVSHARE_SKIP_VLLM=1
# leaves them out).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ $# -eq 0 ]; then  # the whole suite: style first (ruff, configured in pyproject.toml: 120 columns)
  "$root/.venv/bin/ruff" check kvshare tests scripts
  "$root/.venv/bin/ruff" format --check kvshare tests scripts
fi
"$root/.venv/bin/python" -m pytest -q "$@"
if [ $# -eq 0 ] && [ "${KVSHARE_SKIP_VLLM:-0}" != 1 ]; then
  "$root/scripts/setup_vllm.sh"
  "$root/scripts/test_vllm.sh"
fi
