#!/usr/bin/env bash
# The test suite: sets up .venv (reused when present), then ruff (lint + format check) and pytest, offline.
# Arguments go to pytest (a file or -k EXPR); ruff runs when the whole suite does, and so do the vLLM serving
# tests (scripts/test_vllm.sh, in .venv-vllm, which scripts/setup_vllm.sh creates or reuses; KVSHARE_SKIP_VLLM=1
# leaves them out). --fast (first): ruff and the quick tier, pytest -m "not slow" (no subprocesses, notebooks,
# real models or vLLM; under 2 minutes on 2 cores), for iterating; the whole suite is the check before a push.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fast=0
if [ "${1:-}" = "--fast" ]; then
  fast=1
  shift
fi
"$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ $# -eq 0 ] || [ $fast = 1 ]; then  # style first (ruff, configured in pyproject.toml: 120 columns)
  "$root/.venv/bin/ruff" check kvshare tests scripts
  "$root/.venv/bin/ruff" format --check kvshare tests scripts
fi
if [ $fast = 1 ]; then
  "$root/.venv/bin/python" -m pytest -q -m "not slow" "$@"
  exit 0
fi
"$root/.venv/bin/python" -m pytest -q "$@"
if [ $# -eq 0 ] && [ "${KVSHARE_SKIP_VLLM:-0}" != 1 ]; then
  "$root/scripts/setup_vllm.sh"
  "$root/scripts/test_vllm.sh"
fi
