#!/usr/bin/env bash
# The long-context protocol of notebook 09 at kvpress's scale, for a user with a GPU: RULER at 4k, 8k and 16k tokens,
# 500 examples per (task, length), the full model and every method at 75%, 50% and 25% of the 16-bit cache's bytes,
# context compressed before the question is read (query-agnostic, the headline) and after it (query-aware).
# Nothing here has been run for the committed results; results from it are claimed only once it has run.
#
# Usage (on the GPU machine, from the repository root):
#   MODEL=meta-llama/Llama-3.1-8B-Instruct OUT=runs/long_gpu scripts/long_context_gpu.sh
# Optional: LENGTHS=4096,8192,16384  LIMIT=500  TASKS=niah_single_1,niah_multikey_2,ruler_vt  QUERY="agnostic aware"
# The model must hold the longest length in its context. Each (method, setting) writes $OUT/<name>.json (and .csv);
# a run stopped part way picks up where it stopped (kvshare's results cache skips what is already evaluated).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
model="${MODEL:-smollm2-135m}"
out="${OUT:-runs/long_gpu}"
lengths="${LENGTHS:-4096,8192,16384}"
limit="${LIMIT:-500}"
tasks="${TASKS:-niah_single_1,niah_multikey_2,ruler_vt}"
queries="${QUERY:-agnostic aware}"
mkdir -p "$out"
# the GPU machine brings its own torch + transformers; install only what is missing, never torch
"$py" -c "import transformers, lm_eval, wonderwords" 2>/dev/null || "$py" -m pip install -q "lm_eval==0.4.13" "wonderwords==3.0.1"
"$py" -m pip install -q --no-deps -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
layers=$("$py" -c "import sys, kvshare.bench as b; print(b.shape_config(sys.argv[1]).num_hidden_layers)" "$model")
longest="${lengths##*,}"

run() {  # run NAME QUERY ARGS...: one configuration at every length, in one setting
  local name="$1" query="$2"
  shift 2
  echo "== $name ($query)"
  "$py" -m kvshare eval --model "$model" --device cuda --suite long --lengths "$lengths" --tasks "$tasks" \
    --limit "$limit" --query "$query" "$@" --out "$out/${name}_${query}.json"
}

for query in $queries; do
  run full "$query"
  for share in 0.75 0.5 0.25; do
    c=$("$py" -c "import math, sys; print(math.ceil((1 - float(sys.argv[1])) * int(sys.argv[2])))" "$share" "$layers")
    budget=$("$py" -c "import sys; print(int(float(sys.argv[1]) * int(sys.argv[2])))" "$share" "$longest")
    for order in best dissimilar; do  # the best-first strategy and the paper's, searched once per C
      strategy="$out/strategy_${order}_C${c}.json"
      [ -f "$strategy" ] || "$py" -m kvshare search --model "$model" --device cuda --order "$order" \
        --num-shared "$c" --out "$strategy"
      run "kvsharer_${order}_${share}" "$query" --strategy "$strategy"
    done
    run "streamingllm_${share}" "$query" --method streamingllm --budget "$budget"
    run "h2o_${share}" "$query" --method h2o --budget "$budget"
    run "pyramidinfer_${share}" "$query" --method pyramidinfer --budget "$budget"
    run "simlayerkv_${share}" "$query" --method simlayerkv --threshold 0 --recent "$budget"
  done
  run minicache "$query" --method minicache
  run int8 "$query" --method quantized --bits 8
  run int4 "$query" --method quantized --bits 4
done
echo "results in $out"
