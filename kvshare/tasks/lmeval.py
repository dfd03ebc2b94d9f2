"""Running tasks: lm-eval's `HFLM` around the (possibly sharing) model, and perplexity through kvshare.

Nothing in lm-eval or transformers is patched: `HFLM(pretrained=<model object>, tokenizer=...)`
calls the model's ordinary forward and `generate`, which `kvshare.sharing` has already made share KV.
"""
from __future__ import annotations

import logging
import math

from .rouge import rouge_scores

LOGGERS = ("lm_eval", "lm-eval")


def quiet_lm_eval(level=logging.ERROR) -> None:
    """lm-eval logs a warning per call for a model passed as an object; keep errors only."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)


def make_hflm(model, tokenizer, batch_size: int = 32):
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _num(x):
    if x is None or isinstance(x, str):  # lm-eval writes "N/A" where it has no stderr
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _metrics(result: dict) -> list[str]:
    skip = {"alias", "name", "sample_len", "samples"}
    return [k.split(",")[0] for k in result if "," in k and "_stderr" not in k and k.split(",")[0] not in skip]


def _n(res: dict, name: str) -> int | None:
    counts = res.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    subtasks = res.get("group_subtasks", {}).get(name)
    if subtasks:
        parts = [_n(res, s) for s in subtasks]
        return sum(p for p in parts if p is not None)
    return None


def _scores(res: dict, name: str, metric: str) -> list[float] | None:
    samples = res.get("samples", {}).get(name)
    if not samples or metric not in samples[0]:
        return None
    return [float(s[metric]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def summary_chance(spec, n: int | None) -> dict[str, float]:
    """ROUGE of a wrong but fluent summary: each article scored against the next article's reference."""
    from .offline import summarization_rows

    refs = [r["summary"] for r in summarization_rows(spec)][: n or None]
    pairs = [rouge_scores(refs[i], refs[(i + 1) % len(refs)]) for i in range(len(refs))]
    return {m: sum(p[m] for p in pairs) / len(pairs) for m in pairs[0]}


def rows_from_results(res: dict, spec) -> list[dict]:
    from .offline import chance_level, mc_rows

    result = res["results"][spec.name]
    n = _n(res, spec.name)
    if spec.kind == "multiple_choice":
        test = mc_rows(spec)[1]
        chance = {m: chance_level(spec, test[: n or None]) for m in ("acc", "acc_norm")}
    elif spec.kind == "summarization":
        chance = summary_chance(spec, n)
    else:
        chance = {spec.metric: spec.chance}
    rows = []
    for metric in _metrics(result):
        rows.append({
            "task": spec.name,
            "metric": metric,
            "value": _num(result[f"{metric},none"]),
            "stderr": _num(result.get(f"{metric}_stderr,none")),
            "n": n,
            "category": spec.category,
            "chance": chance.get(metric),
            "primary": metric == spec.metric,
            "higher_is_better": True,
            "scores": _scores(res, spec.name, metric),
        })
    if not any(r["primary"] for r in rows):
        raise RuntimeError(f"lm-eval returned no '{spec.metric}' for {spec.name} (got {', '.join(_metrics(result))})")
    return rows


def run_lm_eval(lm, task_manager, specs, limit: int | None = None, samples: dict | None = None,
                chat: bool = False) -> dict:
    """One `simple_evaluate` over `specs` (their requests are batched together): {task: rows}.

    `limit` caps every task at its first examples; `samples` ({task: example indices}) sets them per task."""
    from lm_eval import simple_evaluate

    quiet_lm_eval()
    names = [s.name for s in specs]
    missing = [n for n in names if n not in task_manager.all_tasks]
    if missing:
        raise ValueError(f"lm-eval does not know the task(s) {', '.join(missing)}")
    res = simple_evaluate(
        model=lm,
        tasks=names,
        limit=limit,
        samples=samples,
        task_manager=task_manager,
        log_samples=True,  # per-example scores, for paired comparisons across strategies
        bootstrap_iters=1000,  # mean metrics get their closed-form stderr; ROUGE means too
        apply_chat_template=chat,
        verbosity="ERROR",
    )
    return {s.name: rows_from_results(res, s) for s in specs}


def run_perplexity(model, tokenizer, spec, limit: int | None, progress: bool = True) -> list[dict]:
    """Perplexity on the held-out BBC text with `kvshare.metrics.perplexity_with_error`."""
    from ..data import eval_text
    from ..metrics import perplexity_with_error

    # consecutive windows overlap by one token (each scores window - 1 tokens): this many tokens make exactly
    # `limit` full windows, with no short remnant window weighing as much as a full one in the stderr
    max_tokens = None if limit is None else 1 + limit * (spec.window - 1)
    r = perplexity_with_error(model, tokenizer, eval_text(), window=spec.window, stride=spec.window,
                              max_tokens=max_tokens, progress=progress)
    common = {"task": spec.name, "n": r["tokens"], "category": spec.category, "chance": None,
              "higher_is_better": False, "scores": None}
    return [
        {**common, "metric": "ppl", "value": r["ppl"], "stderr": _num(r["ppl_se"]), "primary": True},
        {**common, "metric": "nll", "value": r["nll"], "stderr": _num(r["nll_se"]), "primary": False},
    ]
