#!/usr/bin/env bash
# The vLLM tests of tests/test_serving.py: a tiny random Llama served by vLLM on CPU (plain and shared) against
# kvshare's transformers path, and a strategy vLLM cannot serve refused at load. They run vLLM from .venv-vllm
# (scripts/setup_vllm.sh) in subprocesses and take a few minutes, so ./run_tests.sh skips them; CI runs this.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -x .venv-vllm/bin/python ] || { echo "test_vllm: no .venv-vllm: run scripts/setup_vllm.sh first" >&2; exit 2; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 KVSHARE_VLLM_TESTS=1
exec .venv/bin/python -m pytest -q tests/test_serving.py -k vllm "$@"
