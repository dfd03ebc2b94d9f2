#!/usr/bin/env bash
# The CUDA benchmark for notebook 04, sized to finish within 8 minutes on one H100/H200.
# The paper's setting: Llama-2-7B and 13B shapes (random fp16 weights: speed and memory do not
# depend on weight values), 512 prompt + 2048 generated tokens, plain transformers next to 25%
# sharing, at batch 1 and at the largest batch that fits a memory budget.
# Usage (on the GPU machine, from the repo root):  OUT=/some/dir scripts/cuda_bench.sh
# Results: $OUT/04_memory_speed_cuda.json (copy to figures/ where notebook 04 reads it).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/cuda}"
mkdir -p "$out"
py="${PYTHON:-python3}"
# the GPU machine brings its own torch + transformers; install only what is missing, never torch
"$py" -c "import transformers, tqdm, accelerate" 2>/dev/null || "$py" -m pip install -q tqdm accelerate
"$py" -m pip install -q --no-deps -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
budget_gb="${BUDGET_GB:-60}"
for shape in llama2-7b llama2-13b; do
  timeout 230 "$py" -m kvshare bench --model "$shape" --random-weights --dtype float16 --device cuda \
    --rates 0,0.25 --batch 1 --prompt-len 512 --new-tokens 2048 --repeats 1 \
    --memory-budget-gb "$budget_gb" --out "$out/bench_$shape.json" || echo "$shape: did not finish in time"
done
"$py" - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
merged = {"gpu": (out / "gpu.txt").read_text().strip(), "runs": {}}
for f in sorted(out.glob("bench_*.json")):
    merged["runs"][f.stem.removeprefix("bench_")] = json.loads(f.read_text())
(out / "04_memory_speed_cuda.json").write_text(json.dumps(merged, indent=2))
print("wrote", out / "04_memory_speed_cuda.json")
PY
