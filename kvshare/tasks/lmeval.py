"""Running tasks: lm-eval's `HFLM` around the (possibly sharing) model, and perplexity through kvshare.

Nothing in lm-eval or transformers is patched: `HFLM(pretrained=<model object>, tokenizer=...)`
calls the model's ordinary forward and `generate`, which `kvshare.compression` has already made
share KV (and evict or quantize it).

Two scoring protocols for log-likelihoods (multiple choice, perplexity):
- one pass (lm-eval's own): context and continuation in a single forward. Sharing and a quantized
  cache show in it; token eviction does not, since nothing is dropped before that forward ends.
  `onepass_loglikelihoods` computes it as HFLM does, with the output layer only where a continuation
  token is predicted (the same numbers, far less work on a large vocabulary).
- decoding (`KVShareLM(decode=True)`): the context but its last token is prefilled into the cache
  (and compressed by the method); its last token and the continuation are then fed one token at a
  time, and every continuation token is scored from the cache the method left, as in generation.
  The choices of one question share a prefill (a batch of identical rows, so no padding).
Generation tasks always decode (`generate`), so eviction shows in them under either protocol.

Two settings for generation tasks whose prompt is a context then a question (RULER):
- query-aware (lm-eval's own): the whole prompt is prefilled, then compressed; the question has read the context
  before anything is dropped.
- query-agnostic (`KVShareLM.question_start` set): the context alone is prefilled and compressed, as a cached
  document or an earlier turn would be; the question is then read, and the answer decoded, against the compressed
  cache (`answer_tokens`). For a causal method (KVSharer) the two are the same.
"""

from __future__ import annotations

import inspect
import logging
import math

LOGGERS = ("lm_eval", "lm-eval")


def quiet_lm_eval(level=logging.ERROR) -> None:
    """lm-eval logs a warning per call for a model passed as an object; keep errors only."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)


def make_hflm(model, tokenizer, batch_size: int = 32, decode: bool = False):
    """lm-eval's HFLM around `model`; `decode=True` scores log-likelihoods by decoding (module docstring)."""
    quiet_lm_eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.decode = decode
    return lm


_LM_CLASS = None


def _lm_class():
    """`KVShareLM`: HFLM whose log-likelihoods can be scored by decoding (built on first use: lm-eval is
    an optional dependency)."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    from lm_eval.models.huggingface import HFLM

    class KVShareLM(HFLM):
        decode = False
        question_start = None  # context string -> index where its question starts: query-agnostic generation

        def generate_until(self, requests, disable_tqdm: bool = False):
            if self.question_start is None:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            return query_agnostic_generations(self, requests, progress=not disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if not self.decode:
                if self.backend != "causal":
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
                return onepass_loglikelihoods(
                    self.model,
                    requests,
                    self.max_length,
                    int(self.batch_size),
                    progress=not disable_tqdm,
                    cache_hook=self.cache_hook,
                )
            return decode_loglikelihoods(
                self.model,
                requests,
                self.max_length,
                int(self.batch_size),
                self.tokenizer.pad_token_id or 0,
                progress=not disable_tqdm,
                cache_hook=self.cache_hook,
            )

    _LM_CLASS = KVShareLM
    return KVShareLM


def query_agnostic_generations(lm, requests, progress: bool = True) -> list[str]:
    """lm-eval's generate_until requests answered query-agnostically, one at a time: each context is cut where
    `lm.question_start` says its question starts, encoded as HFLM encodes it (left-truncated to leave room for the
    answer), and answered greedily by `answer_tokens`; the text is cut at the first stop sequence, as HFLM cuts it."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from tqdm.auto import tqdm

    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    out = []
    for request in tqdm(requests, desc="query-agnostic generation", disable=not progress):
        context, gen_kwargs = request.args
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        start = lm.question_start(context)
        if start is None:
            raise ValueError("query-agnostic generation: no question found in a prompt of this task")
        full = lm.tok_batch_encode([context])[0][0].tolist()
        prefix = lm.tok_batch_encode([context[:start]])[0][0].tolist()
        split = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(full), len(prefix)))
        keep = lm.max_length - max_gen_toks  # HFLM's left truncation: the oldest context tokens go first
        cut = max(0, len(full) - keep)
        ids, split = full[cut:], max(1, split - cut)
        tokens = answer_tokens(lm.model, ids, split, max_gen_toks, {lm.eot_token_id}, query_agnostic=True)
        text = postprocess_generated_text(generation=lm.tok_decode(tokens), stop=until, think_end_token=None)
        lm.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        out.append(text)
    return out


def answer_tokens(
    model, ids: list[int], split: int, max_new_tokens: int, stop_ids=(), query_agnostic: bool = True, logits=None
):
    """Greedy answer (token ids) to the prompt `ids`, whose first `split` tokens are the context and the rest the
    question. Query-agnostic: the context is prefilled alone (a method compresses it at the end of that forward),
    then the question is read against the compressed cache; query-aware: the whole prompt in one forward, then
    compressed. Stops at a token of `stop_ids` (not returned) or after `max_new_tokens`; `logits` (a list) receives
    each step's next-token logits."""
    import torch
    from transformers import DynamicCache

    from ..adapter import model_cache_kwarg

    logits_out = logits
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    kw = {model_cache_kwarg(model): DynamicCache(config=model.config), "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # only the last position's logits are read
    with torch.no_grad():
        if query_agnostic and 0 < split < len(ids):
            model(input_ids=x[:, :split], **kw)
            logits = model(input_ids=x[:, split:], **kw).logits
        else:
            logits = model(input_ids=x, **kw).logits
        out = []
        for _ in range(max_new_tokens):
            if logits_out is not None:
                logits_out.append(logits[0, -1].float().clone())
            token = int(logits[0, -1].argmax())
            if token in stop_ids:
                break
            out.append(token)
            logits = model(input_ids=torch.tensor([[token]], device=device), **kw).logits
    return out


def onepass_loglikelihoods(
    model, requests, max_length: int, batch_size: int, progress: bool = False, cache_hook=None
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, greedy?) of each request's continuation, in one forward per batch: what lm-eval's
    HFLM computes (the same inputs, truncated and right-padded as it does them, longest first), with the output layer
    and its log-softmax applied only at the positions that predict a continuation token. HFLM applies them at every
    position of every request; on a large vocabulary (Gemma's 262,144) that is most of the cost of a multiple-choice
    request, for positions whose scores it throws away. Each position's scores are computed as before (the same
    hidden state through the same head), so the numbers agree with HFLM's to float rounding.

    `requests` are lm-eval's `((context, continuation), context_ids, continuation_ids)`."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from ..adapter import base_model

    device = next(model.parameters()).device
    decoder = base_model(model)  # the decoder stack, where kvshare's sharing hooks sit
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    inputs, spans = [], []
    for _, ctx, cont in requests:
        if not cont:
            raise ValueError("a log-likelihood request with an empty continuation")
        whole = (list(ctx) + list(cont))[-(max_length + 1) :][:-1]  # as HFLM cuts it: the last token is not input
        inputs.append(whole)
        spans.append((len(whole) - len(cont), len(whole)))  # the positions whose next token is a continuation token
    order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i]), tuple(inputs[i])))
    results: list = [None] * len(requests)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="log-likelihoods", disable=not progress):
            idx = order[start : start + batch_size]
            width = max(len(inputs[i]) for i in idx)
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)  # right-padded, as HFLM
            hidden = decoder(input_ids=batch.to(device)).last_hidden_state  # called as HFLM calls the model
            picked = torch.cat([hidden[row, spans[i][0] : spans[i][1]] for row, i in enumerate(idx)])
            logits = head(picked)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logprobs = F.log_softmax(logits.float(), dim=-1)
            at = 0
            for i in idx:
                cont = torch.tensor(list(requests[i][2]), dtype=torch.long, device=logprobs.device)
                lp = logprobs[at : at + len(cont)]
                at += len(cont)
                answer = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(dim=-1) == cont).all()))
                results[i] = answer
                if cache_hook is not None and requests[i][0] is not None:
                    cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    return results


def decode_loglikelihoods(
    model, requests, max_length: int, batch_size: int, pad_id: int = 0, progress: bool = False, cache_hook=None
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, greedy?) of each request's continuation, scored by decoding.

    `requests` are lm-eval's `((context, continuation), context_ids, continuation_ids)`. Requests with
    the same context are prefilled together; continuations of different lengths are right-padded
    (what follows a continuation's last token never changes its scores: attention is causal).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from ..adapter import model_cache_kwarg

    device = next(model.parameters()).device
    cache_kw = model_cache_kwarg(model)
    groups: dict[tuple, list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError("a log-likelihood request with an empty continuation")
        groups.setdefault(tuple(ctx), []).append(i)
    chunks = [(ctx, idx[k : k + batch_size]) for ctx, idx in groups.items() for k in range(0, len(idx), batch_size)]
    results: list = [None] * len(requests)
    with torch.no_grad():
        for ctx, idx in tqdm(chunks, desc="log-likelihoods by decoding", disable=not progress):
            conts = [list(requests[i][2]) for i in idx]
            longest = max(len(c) for c in conts)
            ctx = list(ctx)[-max(1, max_length + 1 - longest) :]  # the window the model can see, as lm-eval cuts it
            rows = len(idx)
            # fed one at a time: the context's last token, then every continuation token but the last
            steps = torch.tensor([[ctx[-1]] + c[:-1] + [pad_id] * (longest - len(c)) for c in conts], device=device)
            targets = torch.tensor([c + [pad_id] * (longest - len(c)) for c in conts], device=device)
            cache = DynamicCache(config=model.config)
            if len(ctx) > 1:
                prefix = torch.tensor([ctx[:-1]], device=device).expand(rows, -1)
                model(input_ids=prefix, use_cache=True, **{cache_kw: cache})
            logprobs, greedy = [], []
            for t in range(longest):
                logits = model(input_ids=steps[:, t : t + 1], use_cache=True, **{cache_kw: cache}).logits[:, -1].float()
                lp = F.log_softmax(logits, dim=-1)
                logprobs.append(lp.gather(-1, targets[:, t : t + 1])[:, 0])
                greedy.append(lp.argmax(dim=-1) == targets[:, t])
            del cache
            logprobs = torch.stack(logprobs, dim=1).double().cpu()
            greedy = torch.stack(greedy, dim=1).cpu()
            for row, i in enumerate(idx):
                n = len(conts[row])
                answer = (float(logprobs[row, :n].sum()), bool(greedy[row, :n].all()))
                results[i] = answer
                if cache_hook is not None and requests[i][0] is not None:
                    cache_hook.add_partial("loglikelihood", requests[i][0], answer)
    return results


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


def rows_from_results(res: dict, spec) -> list[dict]:
    from .offline import chance_level, mc_rows

    result = res["results"][spec.name]
    n = _n(res, spec.name)
    if spec.kind == "multiple_choice":
        test = mc_rows(spec)[1]
        chance = {m: chance_level(spec, test[: n or None]) for m in ("acc", "acc_norm")}
    else:
        chance = {spec.metric: spec.chance}
    rows = []
    for metric in _metrics(result):
        rows.append(
            {
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
            }
        )
    if not any(r["primary"] for r in rows):
        raise RuntimeError(f"lm-eval returned no '{spec.metric}' for {spec.name} (got {', '.join(_metrics(result))})")
    return rows


def run_lm_eval(
    lm, task_manager, specs, limit: int | None = None, samples: dict | None = None, chat: bool = False
) -> dict:
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
        bootstrap_iters=1000,  # mean metrics get their closed-form stderr
        apply_chat_template=chat,
        verbosity="ERROR",
    )
    return {s.name: rows_from_results(res, s) for s in specs}


def run_perplexity(
    model, tokenizer, spec, limit: int | None, progress: bool = True, decode: bool = False, batch_size: int = 8
) -> list[dict]:
    """Perplexity on the held-out BBC text with `kvshare.metrics.perplexity_with_error` (one pass), or with
    `kvshare.metrics.decode_perplexity` (`decode`: `spec.context` tokens of each window prefilled, the rest
    decoded and scored). The nll row's `scores` are the per-window mean NLLs (for paired comparisons)."""
    from ..data import eval_text
    from ..metrics import decode_perplexity, perplexity_with_error

    if decode:
        max_tokens = None if limit is None else limit * spec.window
        r = decode_perplexity(
            model,
            tokenizer,
            eval_text(),
            window=spec.window,
            context=spec.context,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
        )
    else:
        # consecutive windows overlap by one token (each scores window - 1 tokens): this many tokens make exactly
        # `limit` full windows, with no short remnant window weighing as much as a full one in the stderr
        max_tokens = None if limit is None else 1 + limit * (spec.window - 1)
        r = perplexity_with_error(
            model,
            tokenizer,
            eval_text(),
            window=spec.window,
            stride=spec.window,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
        )
    common = {
        "task": spec.name,
        "n": r["tokens"],
        "category": spec.category,
        "chance": None,
        "higher_is_better": False,
        "scores": None,
    }
    return [
        {**common, "metric": "ppl", "value": r["ppl"], "stderr": _num(r["ppl_se"]), "primary": True},
        {
            **common,
            "metric": "nll",
            "value": r["nll"],
            "stderr": _num(r["nll_se"]),
            "primary": False,
            "scores": r["window_nll"],
        },
    ]
