"""Measure the embedded Gemma-3-270M's held-out perplexity (no sharing) and write heldout_baseline.json here.

Two numbers: the shared held-out protocol every notebook uses (kvshare.metrics.HELDOUT, 16k tokens) and the
smaller protocol tests/test_gemma.py re-measures and compares against (2,048 tokens). Plus a check of the
protocol's BOS handling: kvshare.metrics.window_nlls starts every window with BOS when the tokenizer starts a
text with it (Gemma needs it); `bos_check` scores windows 2-5 as the protocol does and with BOS prepended by
hand (same scored tokens), which must now agree.
Run from the repository root: `.venv/bin/python figures/gemma3-270m/heldout_baseline.py` (about 4 minutes on
2 CPU cores); `--bos-check-only` adds the check to an existing file.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import kvshare
from kvshare.metrics import HELDOUT, HeldOutProtocol, heldout_perplexity

MODEL = "gemma3-270m"
TEST_PROTOCOL = HeldOutProtocol(tokens=2048)
OUT = Path(__file__).resolve().parent / "heldout_baseline.json"


def measure(model, tokenizer, protocol: HeldOutProtocol) -> dict:
    t0 = time.perf_counter()
    out = heldout_perplexity(model, tokenizer, protocol)
    return {"protocol": asdict(protocol), "description": protocol.describe(), "ppl": out["ppl"],
            "ppl_se": out["ppl_se"], "nll": out["nll"], "tokens_scored": out["tokens"], "windows": out["windows"],
            "window_nll": out["window_nll"], "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def bos_check(model, tokenizer, windows=range(1, 5), window: int = HELDOUT.window) -> list[dict]:
    """Mean NLL of tokens 1.. of held-out windows `windows` (0-based), as the protocol scores them (no BOS at the
    window start) and with the BOS token prepended (the same tokens scored, each with one more token of context:
    BOS)."""
    import torch.nn.functional as F

    from kvshare.data import eval_text

    ids = tokenizer(eval_text(HELDOUT.source), return_tensors="pt")["input_ids"][0]
    bos = torch.tensor([tokenizer.bos_token_id])

    def nll(x, skip):
        logprobs = F.log_softmax(model(x[None]).logits[0, :-1].float(), dim=-1)
        return -logprobs.gather(-1, x[1:, None])[skip:, 0].mean().item()

    rows = []
    for k in windows:
        w = ids[k * window:(k + 1) * window]
        rows.append({"window": k, "nll_as_scored": nll(w, 0), "nll_with_bos": nll(torch.cat([bos, w]), 1)})
    return rows


def main() -> None:
    import sys

    model, tokenizer = kvshare.load_model(MODEL)
    if "--bos-check-only" in sys.argv[1:]:
        result = json.loads(OUT.read_text())
        result["bos_check"] = bos_check(model, tokenizer)
        OUT.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result["bos_check"], indent=1))
        return
    result = {
        "model": MODEL,
        "what": "held-out perplexity of the plain model (no sharing), kvshare.metrics.heldout_perplexity",
        "heldout_protocol": measure(model, tokenizer, HELDOUT),
        "test_protocol": measure(model, tokenizer, TEST_PROTOCOL),
        "bos_check": bos_check(model, tokenizer),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads(),
                        "dtype": str(next(model.parameters()).dtype)},
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "written_by": "figures/gemma3-270m/heldout_baseline.py",
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for key in ("heldout_protocol", "test_protocol"):
        r = result[key]
        print(f"{MODEL} {r['description']}: ppl {r['ppl']:.3f} +- {r['ppl_se']:.3f} ({r['seconds']} s)")


if __name__ == "__main__":
    main()
