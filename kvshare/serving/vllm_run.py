"""Run exported models in vLLM and report what the checks need: KV capacity, greedy tokens, layer layout.

Used by tests/test_serving.py and scripts/vllm_proof.py from the main environment, as a subprocess of the
serving environment (vLLM and the main environment's transformers cannot share one):

    .venv-vllm/bin/python -m kvshare.serving.vllm_run SPEC.json OUT.json

SPEC: {"models": [DIR, ...], "prompts": [[token ids], ...], "max_tokens": N, "ignore_eos": true,
"engine": {LLM keyword arguments}}: greedy decoding.
OUT: {DIR: {"kv_tokens", "num_blocks", "block_size", "layers", "generations", "startup_seconds"}}, written
atomically once every model has run. Set VLLM_CPU_KVCACHE_SPACE (GiB) for the KV budget on CPU.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path


def layer_report(model) -> list[dict]:
    """Per decoder layer: the attention's sharing target (None: owns a cache) and its projection's output size.

    Runs inside vLLM's worker (LLM.apply_model), so it must be a module-level function.
    """
    report = []
    for layer in model.model.layers:
        attn = layer.self_attn
        report.append(
            {
                "kv_sharing_target": attn.attn.kv_sharing_target_layer_name,
                # the layer's logical output width: vLLM's CPU backend repacks linear weights after loading
                # (the Parameter left behind is empty), so the weight's shape does not say it
                "projection_outputs": int(attn.qkv_proj.output_size_per_partition),
                "module": type(attn).__name__,
            }
        )
    return report


def kv_tokens(llm) -> tuple[int, int, int]:
    """(tokens, blocks, block size) of the KV cache vLLM allocated: what the scheduler can hold at once."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size, cache.num_gpu_blocks, cache.block_size


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=int(spec.get("max_tokens", 16)), temperature=0.0, ignore_eos=bool(spec.get("ignore_eos", True))
    )
    prompts = [{"prompt_token_ids": list(map(int, p))} for p in spec.get("prompts", [])]
    results = {}
    for model_dir in spec["models"]:
        start = time.perf_counter()
        llm = LLM(model_dir, **spec.get("engine", {}))
        startup = time.perf_counter() - start
        tokens, blocks, block_size = kv_tokens(llm)
        # by its module's real name: run as `python -m`, this file is __main__, which vLLM's worker cannot import
        from kvshare.serving import vllm_run

        layers = llm.apply_model(vllm_run.layer_report)[0]
        outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        results[model_dir] = {
            "kv_tokens": tokens,
            "num_blocks": blocks,
            "block_size": block_size,
            "layers": layers,
            "generations": [list(o.outputs[0].token_ids) for o in outputs],
            "startup_seconds": round(startup, 1),
        }
        del llm  # shut the engine down before the next one claims its KV budget
        gc.collect()
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m kvshare.serving.vllm_run SPEC.json OUT.json", file=sys.stderr)
        return 2
    # layer_report travels to vLLM's worker process by reference; vLLM refuses that unless told it may
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    results = run(json.loads(Path(argv[0]).read_text()))
    out = Path(argv[1])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this module
    sys.exit(main())
