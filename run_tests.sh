#!/usr/bin/env bash
# The test suite: sets up .venv (reused when present), then runs pytest offline.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$root/.venv/bin/python" -m pytest -q "$@"
