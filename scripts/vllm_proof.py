"""Proof on CPU that a kvshare strategy served by vLLM does what it should, with the default model.

Run in the serving environment (scripts/setup_vllm.sh), from the repository root:

    .venv-vllm/bin/python scripts/vllm_proof.py [--strategy S.json] [--quick]

It measures, and writes atomically to figures/10_serving_vllm.json (+ a short .md made from it):
  (a) KV capacity: the tokens vLLM's KV cache holds for one budget (VLLM_CPU_KVCACHE_SPACE=1 GiB), plain vs
      shared; expected ratio L/(L-C) up to block rounding;
  (b) greedy generations of the shared model in vLLM vs kvshare's own transformers path (main .venv, this script
      with --reference) with the same strategy, over the prompts below; the plain model is compared the same way,
      so a difference that sharing did not cause shows as one;
  (c) throughput of plain vs shared under `vllm bench throughput` at a load where the plain model's KV cache is the
      limit: many concurrent long requests on a small KV budget (--kv-cache-memory-bytes: VLLM_CPU_KVCACHE_SPACE
      only takes whole GiB).

Without --strategy it serves the best-first strategy at 8 of the model's 30 layers (kvshare's search with
--order best in the main environment, kept as runs/serving/best8.json and reused): the strategy worth serving. The
paper's dissimilar order at 8 layers generates unusable text on this model, so it is served only when asked for
(--strategy figures/02_search_strategy.json). The exports go under runs/serving/ (weights linked, not copied).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
RESULTS = ROOT / "figures" / "10_serving_vllm.json"
WORK = ROOT / "runs" / "serving"
MODEL = "smollm2-135m"

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a short story about a robot who learns to paint.",
    "Explain in simple terms why the sky is blue.",
    "Give three tips for staying focused while studying.",
    "What is photosynthesis?",
    "Describe a cat to someone who has never seen one.",
    "How do I boil an egg?",
    "Write a haiku about the ocean.",
    "What are the main differences between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Why do we have seasons on Earth?",
    "Suggest a name for a small bakery and explain the choice.",
    "What does a computer's CPU do?",
    "List four fruits that are rich in vitamin C.",
    "How can I make my houseplants grow better?",
    "Explain what a prime number is, with an example.",
    "Write a polite email declining a meeting invitation.",
    "What causes rain?",
    "Give me a simple recipe for pancakes.",
    "Why is exercise good for your health?",
    "Describe the water cycle.",
    "What is the difference between weather and climate?",
    "Write two sentences about the history of the bicycle.",
    "How does a refrigerator keep food cold?",
]


def sh(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, cwd=ROOT, **kwargs)


# -- (b), transformers side: runs in the main environment ------------------------------------------------------
def reference(strategy_path: str, out: str, max_tokens: int, count: int) -> None:
    """Greedy token ids of kvshare's transformers path, plain and shared, and the top-2 logit margin per step."""
    import torch

    import kvshare
    from kvshare.generation import format_prompt

    model, tokenizer = kvshare.load_model(MODEL, device="cpu", dtype="float32")
    strategy = kvshare.Strategy.load(strategy_path)
    prompts = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in PROMPTS[:count]]
    result = {"prompts": prompts, "eos_token_id": tokenizer.eos_token_id}
    for name, s in (("plain", None), ("shared", strategy)):
        runs = []
        with kvshare.sharing(model, s), torch.no_grad():
            for ids in prompts:
                x = torch.tensor([ids])
                gen = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id,
                )
                top2 = [torch.topk(s_.float().log_softmax(-1)[0], 2).values for s_ in gen.scores]
                runs.append(
                    {
                        "tokens": gen.sequences[0, len(ids) :].tolist(),
                        "margins": [round(float(t[0] - t[1]), 6) for t in top2],
                    }
                )
        result[name] = runs
    Path(out).write_text(json.dumps(result))


# -- vLLM side ---------------------------------------------------------------------------------------------------
def shown(path: Path) -> str:
    """A path as the results file shows it: relative to the checkout when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def trim(tokens: list[int], eos: int) -> list[int]:
    """Up to and including the first end-of-sequence token: both sides stop there."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def compare(vllm_gens: list[list[int]], ref: list[dict], eos: int) -> dict:
    rows = []
    for i, (v, r) in enumerate(zip(vllm_gens, ref)):
        v, t = trim(v, eos), trim(r["tokens"], eos)
        first = next((k for k, (a, b) in enumerate(zip(v, t)) if a != b), None)
        if first is None and len(v) != len(t):
            first = min(len(v), len(t))
        row = {"prompt": i, "match": first is None, "tokens": len(t)}
        if first is not None:
            margin = r["margins"][first] if first < len(r["margins"]) else None
            row.update(first_difference=first, transformers_margin=margin)
        rows.append(row)
    matches = sum(r["match"] for r in rows)
    return {"matches": matches, "prompts": len(rows), "match_rate": matches / len(rows), "rows": rows}


def bench(
    model_dir: Path, kv_bytes: int, num_prompts: int, input_len: int, output_len: int, max_len: int, tag: str = ""
) -> dict:
    """`vllm bench throughput` on random prompts; its JSON plus the KV capacity it logged."""
    out = WORK / f"bench_{model_dir.name}{tag}.json"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # the byte budget below rules
    cmd = [
        sys.executable,  # = `vllm bench throughput`; vllm-cpu's own `vllm` command cannot start (see the module)
        "-m",
        "kvshare.serving.vllm_cli",
        "bench",
        "throughput",
        "--model",
        model_dir,
        "--dataset-name",
        "random",
        # the random dataset's own flags: vLLM 0.32's --input-len/--output-len lose to their defaults (1024/128)
        "--random-input-len",
        input_len,
        "--random-output-len",
        output_len,
        "--num-prompts",
        num_prompts,
        "--dtype",
        "float32",
        "--max-model-len",
        max_len,
        "--kv-cache-memory-bytes",
        kv_bytes,
        "--max-num-seqs",
        256,
        "--seed",
        0,
        "--output-json",
        out,
    ]
    print("$", " ".join(map(str, cmd)), flush=True)
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (WORK / f"bench_{model_dir.name}{tag}.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(
            f"vllm bench throughput failed for {model_dir.name} (log: {WORK}/bench_{model_dir.name}.log):"
            f"\n{log[-3000:]}"
        )
    capacity = re.search(r"KV cache size: ([\d,]+) tokens", log)
    preempted = re.findall(r"preempted", log, flags=re.IGNORECASE)
    result = json.loads(out.read_text())
    result.update(
        kv_tokens=int(capacity.group(1).replace(",", "")) if capacity else None,
        preemption_warnings=len(preempted),
        output_tokens_per_second=num_prompts * output_len / result["elapsed_time"],
    )
    return result


def throughput_rounds(plain, shared, kv_bytes, n, inp, outp, rounds: int, reuse: bool) -> dict:
    """`rounds` benchmark runs of each model, alternating (plain, shared, shared, plain, ...); each model's row is
    its fastest run, with every run's tokens/s, and `ratio` is the median of the rounds' shared / plain ratios
    (`ratio_range` their spread), so a single lucky or unlucky run cannot make the verdict."""
    runs = {"plain": [], "shared": []}
    for r in range(rounds):
        order = (("plain", plain), ("shared", shared)) if r % 2 == 0 else (("shared", shared), ("plain", plain))
        for name, model_dir in order:
            done = WORK / f"bench_{name}.round{r}.result.json"
            if reuse and done.is_file():
                result = json.loads(done.read_text())
            else:
                # max model length with room: vLLM's random prompts can come out a few tokens longer than asked
                # once decoded and re-encoded, and a request longer than the limit stops the benchmark
                result = bench(model_dir, kv_bytes, n, inp, outp, inp + outp + 64, tag=f".round{r}")
                done.write_text(json.dumps(result))
            runs[name].append(result)
    ratios = sorted(s["tokens_per_second"] / p["tokens_per_second"] for p, s in zip(runs["plain"], runs["shared"]))
    out = {name: dict(max(rs, key=lambda x: x["tokens_per_second"])) for name, rs in runs.items()}
    for name, rs in runs.items():
        out[name]["rounds_tokens_per_second"] = [x["tokens_per_second"] for x in rs]
    out.update(rounds=rounds, ratio=ratios[len(ratios) // 2], ratio_range=[ratios[0], ratios[-1]], ratios=ratios)
    return out


def write_results(results: dict) -> None:
    tmp = RESULTS.with_name(RESULTS.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(RESULTS)
    from kvshare.serving.report import summary_markdown

    md = RESULTS.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(summary_markdown(results))
    tmp.replace(md)


def explain(gen: dict, near_tie: float = 0.05) -> str:
    """Why generations differ, from transformers' top-2 log-probability margin at the first differing token."""
    diffs = [row for name in ("plain", "shared") for row in gen[name]["rows"] if not row["match"]]
    if not diffs:
        return "Every generation, plain and shared, is token-for-token identical to kvshare's transformers path."
    margins = [row["transformers_margin"] for row in diffs if row.get("transformers_margin") is not None]
    ties = [m for m in margins if m < near_tie]
    text = (
        f"{len(diffs)} generation(s) differ (plain and shared together). {len(ties)} of them first differ where "
        f"transformers' top-2 log-probability margin was below {near_tie}: a near-tie, which float32 rounding in "
        "vLLM's CPU kernels (fused projections, paged attention) and torch's SDPA can break either way, after "
        "which the greedy continuations diverge."
    )
    clear = [m for m in margins if m >= near_tie]
    if clear:
        text += (
            f" {len(clear)} differ at a clear margin (up to {max(clear):.3g}), which rounding alone does not explain."
        )
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--strategy",
        default=None,
        help="strategy JSON (default: the best-first strategy at 8 layers, searched once into runs/serving/best8.json)",
    )
    p.add_argument("--quick", action="store_true", help="fewer prompts and a smaller throughput load (a smoke run)")
    p.add_argument("--reference", nargs=2, metavar=("STRATEGY", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt for (b)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument(
        "--reuse", action="store_true", help="reuse the reference, served and bench results already in runs/serving/"
    )
    args = p.parse_args()
    if args.reference:  # the transformers side, in the main environment
        reference(*args.reference, args.max_tokens, args.prompts)
        return 0

    start = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    count = 4 if args.quick else args.prompts
    strategy_path = Path(args.strategy) if args.strategy else WORK / "best8.json"
    if not strategy_path.is_file():  # the best-first search (a few minutes on 2 cores), once
        search = [MAIN_PYTHON, "-m", "kvshare", "search", "--model", MODEL, "--order", "best", "--num-shared", 8]
        sh([*search, "--out", strategy_path])
    strategy = json.loads(strategy_path.read_text())
    plain, shared = WORK / "plain", WORK / "shared"
    sh([MAIN_PYTHON, "-m", "kvshare", "export-vllm", "--model", MODEL, "--out", plain])
    sh(
        [
            MAIN_PYTHON,
            "-m",
            "kvshare",
            "export-vllm",
            "--model",
            MODEL,
            "--strategy",
            strategy_path,
            "--force",
            "--out",
            shared,
        ]
    )
    ref_path = WORK / "reference.json"
    if not (args.reuse and ref_path.is_file()):
        sh(
            [
                MAIN_PYTHON,
                __file__,
                "--reference",
                strategy_path,
                ref_path,
                "--max-tokens",
                args.max_tokens,
                "--prompts",
                count,
            ]
        )
    ref = json.loads(ref_path.read_text())

    # (a) and (b): one engine per model, the default 1 GiB budget
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # vllm_run.layer_report goes to the worker
    from vllm import __version__ as vllm_version

    from kvshare.serving.vllm_run import run

    spec = {
        "models": [str(plain), str(shared)],
        "prompts": ref["prompts"],
        "max_tokens": args.max_tokens,
        "ignore_eos": False,
        "engine": {"dtype": "float32", "max_model_len": 2048, "seed": 0},
    }
    served_path = WORK / "served.json"
    if args.reuse and served_path.is_file():
        served = json.loads(served_path.read_text())
    else:
        served = run(spec)
        served_path.write_text(json.dumps(served))
    vp, vs = served[str(plain)], served[str(shared)]
    L, C = strategy["num_layers"], len(strategy["mapping"])
    replaced = [i for i, layer in enumerate(vs["layers"]) if layer["kv_sharing_target"]]
    capacity = {
        "kvcache_space_gib": 1,
        "plain_tokens": vp["kv_tokens"],
        "shared_tokens": vs["kv_tokens"],
        "ratio": vs["kv_tokens"] / vp["kv_tokens"],
        "expected_ratio": L / (L - C),
        "block_size": vp["block_size"],
        "plain_blocks": vp["num_blocks"],
        "shared_blocks": vs["num_blocks"],
        "expected_shared_blocks": vp["num_blocks"] * L / (L - C),
        "replaced_layers_in_vllm": replaced,
        "replaced_layer_projection_outputs": sorted({vs["layers"][i]["projection_outputs"] for i in replaced}),
        "kept_layer_projection_outputs": vs["layers"][0]["projection_outputs"],
        "startup_seconds": {"plain": vp["startup_seconds"], "shared": vs["startup_seconds"]},
    }
    eos = ref["eos_token_id"]
    gen = {
        "max_tokens": args.max_tokens,
        "prompts": count,
        "chat_template": True,
        "plain": compare(vp["generations"], ref["plain"], eos),
        "shared": compare(vs["generations"], ref["shared"], eos),
        "sharing_changed_generations": sum(a["tokens"] != b["tokens"] for a, b in zip(ref["plain"], ref["shared"])),
    }
    gen["explanation"] = explain(gen)

    # (c): a load the plain model's KV cache limits: each request needs input + output tokens of cache
    n, inp, outp = (24, 256, 64) if args.quick else (48, 256, 128)
    kv_bytes = (64 if args.quick else 128) * 2**20
    thr = {"num_prompts": n, "input_len": inp, "output_len": outp, "kv_cache_bytes": kv_bytes}
    thr.update(throughput_rounds(plain, shared, kv_bytes, n, inp, outp, 1 if args.quick else 3, args.reuse))
    thr["expected_ratio"] = L / (L - C)
    per_request = inp + outp
    thr["max_concurrent_requests"] = {
        k: thr[k]["kv_tokens"] // per_request if thr[k]["kv_tokens"] else None for k in ("plain", "shared")
    }

    write_results(
        {
            "model": MODEL,
            "vllm": f"vllm-cpu {vllm_version}",
            "strategy_file": shown(strategy_path),
            "mapping": strategy["mapping"],
            "num_layers": L,
            "num_shared": C,
            "quick": args.quick,
            "capacity": capacity,
            "generations": gen,
            "throughput": thr,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": time.time() - start,
            "cpu_count": os.cpu_count(),
        }
    )
    print(RESULTS.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":  # vLLM spawns engine processes that re-import this file
    sys.exit(main())
