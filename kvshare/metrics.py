"""Quality metrics: perplexity over held-out text (with whatever sharing or cache method is enabled on the model).

Two protocols. One pass (`perplexity`, `window_nlls`): every window in one forward, the usual
perplexity; sharing and a quantized cache show in it. By decoding (`decode_perplexity`): each window's
first `context` tokens are prefilled, the rest fed one at a time (generation with teacher forcing)
and scored. Token eviction only shows this way: a single forward attends over the whole window
before anything is dropped, so one-pass perplexity is the same with or without an eviction method.

Significance: one rule, here and nowhere else. Every interval is 95%, two-sided, from the normal approximation of a
(paired) mean: `interval95(estimate, se)` is estimate ± Z95·se. A difference is *clearly* different from 0 when
that interval excludes 0, i.e. when `z_score(diff, se)` lies beyond ±Z95: `clear_sign(z)` says which way (+1, -1,
or 0 for "not clearly different"), `clearly_lower`, `clearly_higher` and `clearly_different` read it as a yes or
no, and `verdict_of(diff, se)` names it for a difference where lower is better ("better" / "worse" / "same").
A z that is nan (no spread to test) is never clear; an infinite one always is.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: the half-width of a two-sided 95% interval, in se


def z_score(diff: float, se: float) -> float:
    """diff / se; nan when se is not positive or is nan (no spread, nothing to test)."""
    return diff / se if se > 0 else float("nan")


def interval95(estimate: float, se: float) -> tuple[float, float]:
    """The 95% interval estimate ± Z95·se (nan bounds when se is nan)."""
    return estimate - Z95 * se, estimate + Z95 * se


def clear_sign(z: float) -> int:
    """The one significance rule: +1 when z > Z95 (clearly above 0), -1 when z < -Z95 (clearly below), else 0.

    Strict inequalities, so a z exactly at the bound is not clear; nan compares false both ways and gives 0."""
    if z > Z95:
        return 1
    if z < -Z95:
        return -1
    return 0


def clearly_lower(z: float) -> bool:
    return clear_sign(z) < 0


def clearly_higher(z: float) -> bool:
    return clear_sign(z) > 0


def clearly_different(z: float) -> bool:
    return clear_sign(z) != 0


def verdict_of(diff: float, se: float, lower_is_better: bool = True) -> str:
    """'better' / 'worse' / 'same' for a paired difference (a - b) whose 95% interval does / does not exclude 0;
    with lower_is_better (NLL, perplexity) a clearly negative difference is 'better'."""
    sign = clear_sign(z_score(diff, se))
    if sign == 0:
        return "same"
    return "better" if (sign < 0) == lower_is_better else "worse"


def _windows(n_tokens: int, window: int, stride: int):
    """(begin, end, first scored position) of each window; every token after the first is scored once."""
    out, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1) - begin  # position 0 of the first window has no context
        if end - begin >= 2 and first < end - begin:
            out.append((begin, end, first))
        prev_end = end
        begin = min(begin + stride, end - 1)  # next window starts early enough to give its first scored token context
    return out


@torch.no_grad()
def window_nlls(
    model,
    tokenizer,
    text: str,
    window: int = 512,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> list:
    """Per-window NLLs of the scored tokens of `text`, windows in order (float64, CPU)."""
    if stride < 1 or window < 2 or stride > window:
        raise ValueError("need window >= 2 and 1 <= stride <= window")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    spans = _windows(len(ids), window, stride)
    # a tokenizer that starts every text with BOS (Gemma needs it) gets it at the start of every window too:
    # a later window then reads like the start of a text, as the first one does (tokenizers without BOS: as is)
    bos = tokenizer.bos_token_id if len(ids) and ids[0].item() == getattr(tokenizer, "bos_token_id", None) else None

    def window_ids(k):
        b, e, first = spans[k]
        if bos is None or b == 0:
            return ids[b:e], first
        return torch.cat([ids[:1], ids[b:e]]), first + 1

    nlls: list[torch.Tensor | None] = [None] * len(spans)
    # windows of equal length run as one batch
    by_length: dict[int, list[int]] = {}
    for k in range(len(spans)):
        by_length.setdefault(len(window_ids(k)[0]), []).append(k)
    batches = [
        (length, idx[i : i + batch_size]) for length, idx in by_length.items() for i in range(0, len(idx), batch_size)
    ]
    for _length, idx in tqdm(batches, desc="perplexity", disable=not progress):
        batch = torch.stack([window_ids(k)[0] for k in idx]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        # log-softmax of the whole (contiguous) logits, then the slice: the same numbers as log_softmax of the slice
        # (each position is normalised on its own), without first copying a strided [batch, window - 1, vocab]
        # view: on a 262,144-word vocabulary that copy took most of a window's scoring time
        logprobs = F.log_softmax(logits, dim=-1)[:, :-1]
        target_lp = logprobs.gather(-1, batch[:, 1:, None])[..., 0]
        for row, k in enumerate(idx):
            first = window_ids(k)[1]
            nlls[k] = -target_lp[row, first - 1 :].double().cpu()
    return nlls


def token_nlls(*args, **kwargs) -> torch.Tensor:
    """Negative log-likelihood of every scored token of `text`, in order (float64, CPU)."""
    nlls = window_nlls(*args, **kwargs)
    return torch.cat(nlls) if nlls else torch.zeros(0, dtype=torch.float64)


def perplexity(
    model,
    tokenizer,
    text: str,
    window: int = 512,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> float:
    """exp(mean NLL) of `text` under `model`, scored in windows of `window` tokens every `stride`."""
    nll = token_nlls(model, tokenizer, text, window, stride, max_tokens, batch_size, progress)
    if nll.numel() == 0:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    return math.exp(nll.mean().item())


def perplexity_with_error(
    model,
    tokenizer,
    text: str,
    window: int = 512,
    stride: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> dict:
    """Perplexity with a standard error from the spread of per-window mean NLLs (delta method)."""
    chunks = window_nlls(model, tokenizer, text, window, stride, max_tokens, batch_size, progress)
    if not chunks:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    nll = torch.cat(chunks)
    # windows are the independent units (per-token NLLs within a window are correlated); the mean
    # is token-weighted, so its standard error is the ratio-estimator one: a short last window
    # counts for its few tokens, not as much as a full window
    means = torch.stack([c.mean() for c in chunks])
    weights = torch.tensor([float(c.numel()) for c in chunks], dtype=torch.float64)
    mean = nll.mean().item()
    n = len(chunks)
    if n > 1:
        var = (weights**2 * (means - mean) ** 2).sum().item() / weights.sum().item() ** 2 * n / (n - 1)
        se_nll = math.sqrt(var)
    else:
        se_nll = float("nan")
    ppl = math.exp(mean)
    return {
        "ppl": ppl,
        "nll": mean,
        "nll_se": se_nll,
        "ppl_se": ppl * se_nll,
        "tokens": int(nll.numel()),
        "windows": len(means),
        "window_nll": means.tolist(),
    }


# ------------------------------------------------------------------------------------------------
# perplexity by decoding
# ------------------------------------------------------------------------------------------------
def decode_windows(n_tokens: int, window: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """Non-overlapping windows (begin, end) of exactly `window` tokens."""
    spans = [(b, b + window) for b in range(0, n_tokens - window + 1, window)]
    return spans if max_windows is None else spans[:max_windows]


@torch.no_grad()
def decode_nlls(
    model,
    tokenizer,
    text: str,
    window: int = 512,
    context: int = 256,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress=None,
) -> list[torch.Tensor]:
    """Per-window NLLs (float64, CPU) of tokens context+1 .. window-1 of each window, each predicted by a
    decoding step after `context` prefilled tokens, with whatever sharing/method is enabled on `model`."""
    from transformers import DynamicCache

    from .adapter import model_cache_kwarg

    if not 1 <= context <= window - 2:
        raise ValueError(f"need 1 <= context <= window - 2, got context={context}, window={window}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    spans = decode_windows(len(ids), window, max_windows)
    if not spans:
        raise ValueError(f"the text has fewer than {window} tokens")
    device = next(model.parameters()).device
    cache_kw = model_cache_kwarg(model)
    out: list[torch.Tensor] = []
    for i in range(0, len(spans), batch_size):
        batch = torch.stack([ids[b:e] for b, e in spans[i : i + batch_size]]).to(device)
        cache = DynamicCache(config=model.config)
        model(input_ids=batch[:, :context], use_cache=True, **{cache_kw: cache})
        nll = []
        for t in range(context, window - 1):
            logits = model(input_ids=batch[:, t : t + 1], use_cache=True, **{cache_kw: cache}).logits[:, -1].float()
            nll.append(-F.log_softmax(logits, dim=-1).gather(-1, batch[:, t + 1 : t + 2])[:, 0])
            if progress is not None:
                progress.update(batch.shape[0])
        del cache
        out.extend(torch.stack(nll, dim=1).double().cpu().unbind(0))
    return out


def summarize_windows(nlls: list[torch.Tensor]) -> dict:
    """Perplexity with a standard error from the spread of per-window mean NLLs."""
    means = np.array([w.mean().item() for w in nlls])
    mean = float(torch.cat(nlls).mean())
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "nll_se": se,
        "ppl_se": math.exp(mean) * se,
        "tokens": int(sum(w.numel() for w in nlls)),
        "window_nll": means.tolist(),
    }


def decode_perplexity(
    model,
    tokenizer,
    text: str,
    window: int = 512,
    context: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Perplexity of the decoded part of each window (see the module docstring), with its error."""
    from .progress import Progress

    context = window // 2 if context is None else context
    max_windows = None if max_tokens is None else max(1, max_tokens // window)
    ids_len = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    n = len(decode_windows(ids_len, window, max_windows))
    bar = Progress(n * (window - 1 - context), "decode perplexity", enabled=progress)
    nlls = decode_nlls(model, tokenizer, text, window, context, max_windows, batch_size, progress=bar)
    bar.close()
    return {**summarize_windows(nlls), "window": window, "context": context, "windows": n}


# ------------------------------------------------------------------------------------------------
# the held-out protocol every notebook shares
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldOutProtocol:
    """How held-out perplexity is measured, one way for every notebook: the first `tokens` tokens of the
    held-out text of `source` (never in any calibration pool: kvshare.data splits them), scored in
    non-overlapping windows of `window` tokens, one forward each; windows are the paired units."""

    source: str = "offline"
    tokens: int = 16384  # 32 windows of 512
    window: int = 512

    def windows(self) -> int:
        """How many windows the protocol scores: each window after the first starts one token before the previous one
        ended, so that its first scored token has context; 16,384 tokens make 32 windows of 512 and one of 32."""
        return len(_windows(self.tokens, self.window, self.window))

    def scored_tokens(self) -> int:
        """Every token after the first is scored once."""
        return self.tokens - 1

    def describe(self) -> str:
        return (
            f"{self.tokens:,} held-out {self.source} tokens (never in a calibration set), "
            f"{self.tokens // self.window} windows of {self.window}, paired per window"
        )


HELDOUT = HeldOutProtocol()


def heldout_perplexity(
    model, tokenizer, protocol: HeldOutProtocol = HELDOUT, batch_size: int = 4, progress: bool = False
) -> dict:
    """`perplexity_with_error` under `protocol` (with whatever methods are applied to `model`): ppl, its standard
    error, and the mean NLL of every window (`window_nll`) for paired comparisons."""
    from .data import eval_text

    out = perplexity_with_error(
        model,
        tokenizer,
        eval_text(protocol.source),
        window=protocol.window,
        stride=protocol.window,
        max_tokens=protocol.tokens,
        batch_size=batch_size,
        progress=progress,
    )
    out["protocol"] = asdict(protocol)
    return out


@dataclass(frozen=True)
class LongDocumentProtocol:
    """Long-document perplexity, the protocol of compression as a cached document would see it: the first
    `documents` held-out long documents (kvshare.data.long_documents: books and Wikipedia articles, never in a
    calibration set) that have at least max(contexts) + `scored` tokens; for each context length, the document's
    first `context` tokens are prefilled in one forward (a method compresses them at its end), then the next
    `scored` tokens are scored in one forward against that compressed cache. Documents are the paired units."""

    contexts: tuple = (2048, 4096, 7680)
    scored: int = 512
    documents: int = 12

    def describe(self) -> str:
        lengths = ", ".join(f"{c:,}" for c in self.contexts)
        return (
            f"{self.documents} held-out long documents; {lengths} tokens of context prefilled and compressed once, "
            f"then the next {self.scored} tokens scored in one forward; paired per document"
        )


LONG_DOCUMENTS = LongDocumentProtocol()


def long_document_ids(tokenizer, protocol: LongDocumentProtocol = LONG_DOCUMENTS) -> list[tuple[str, torch.Tensor]]:
    """(document id, its first max(contexts) + scored token ids) of the protocol's documents, in data order."""
    from .data import long_documents

    need = max(protocol.contexts) + protocol.scored
    out = []
    for doc in long_documents("heldout"):
        ids = tokenizer(doc["text"], return_tensors="pt")["input_ids"][0]
        if len(ids) >= need:
            out.append((doc["id"], ids[:need]))
        if len(out) == protocol.documents:
            break
    if len(out) < protocol.documents:
        raise ValueError(
            f"only {len(out)} held-out documents have {need} tokens; the protocol asks for {protocol.documents}"
        )
    return out


@torch.no_grad()
def long_document_nll(model, ids: torch.Tensor, context: int, scored: int) -> float:
    """Mean NLL of the `scored` tokens after the first `context` of `ids`: the context is prefilled in its own forward
    (whatever methods are applied to `model` compress it there; that forward's last position predicts the first
    scored token), then the scored tokens but the last are read in one forward against the compressed cache."""
    from transformers import DynamicCache

    from .adapter import model_cache_kwarg

    device = next(model.parameters()).device
    x = ids[: context + scored].unsqueeze(0).to(device)
    cache_kw = {model_cache_kwarg(model): DynamicCache(config=model.config), "use_cache": True}
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    first = model(input_ids=x[:, :context], **cache_kw, **last).logits[:, -1:].float()  # not context x vocabulary
    rest = model(input_ids=x[:, context : context + scored - 1], **cache_kw).logits.float()
    logits = torch.cat([first, rest], dim=1)
    return float(F.cross_entropy(logits[0], x[0, context : context + scored]))


def long_document_perplexity(
    model, tokenizer, protocol: LongDocumentProtocol = LONG_DOCUMENTS, docs=None, progress: bool = False
) -> dict:
    """{context: {"ppl", "nll", "nll_se", "window_nll": per-document NLLs, "documents"}} under `protocol` with the
    methods applied to `model`; `window_nll` makes `paired_difference` work per document."""
    docs = long_document_ids(tokenizer, protocol) if docs is None else docs
    out = {}
    for context in protocol.contexts:
        nlls = [
            long_document_nll(model, ids, context, protocol.scored)
            for _, ids in tqdm(docs, desc=f"long documents at {context}", disable=not progress)
        ]
        mean = float(np.mean(nlls))
        se = float(np.std(nlls, ddof=1) / math.sqrt(len(nlls))) if len(nlls) > 1 else float("nan")
        out[context] = {
            "ppl": math.exp(mean),
            "nll": mean,
            "nll_se": se,
            "window_nll": nlls,
            "documents": [d for d, _ in docs],
            "protocol": asdict(protocol),
        }
    return out


@torch.no_grad()
def window_cache_bytes(model, tokenizer, text: str, window: int, context: int | None = None, *applied) -> int:
    """Bytes the KV cache holds after the first `window`-token window of `text` (`window - 1` tokens fed, as
    when every token of the window is scored), with `applied` (Strategy / methods / None) on the model:
    `context` tokens prefilled and the rest decoded one at a time, or (context None) one forward (`kvshare ppl`'s
    kv_bytes)."""
    from transformers import DynamicCache

    from .accounting import cache_bytes
    from .adapter import model_cache_kwarg
    from .combine import compression

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, : window - 1]
    ids = ids.to(next(model.parameters()).device)
    with compression(model, *applied):
        cache = DynamicCache(config=model.config)
        kw = {model_cache_kwarg(model): cache}
        first = ids.shape[1] if context is None else min(context, ids.shape[1])
        model(input_ids=ids[:, :first], use_cache=True, logits_to_keep=1, **kw)
        for t in range(first, ids.shape[1]):
            model(input_ids=ids[:, t : t + 1], use_cache=True, **kw)
    return cache_bytes(cache)


def paired_difference(a: dict, b: dict) -> dict:
    """NLL(a) - NLL(b) on the same windows (results of `perplexity_with_error` / `heldout_perplexity`): the
    difference of the token-weighted mean NLLs, its paired standard error from the per-window differences,
    z, and the perplexity ratio ppl(a) / ppl(b) with its 95% interval."""
    wa, wb = np.asarray(a["window_nll"], dtype=float), np.asarray(b["window_nll"], dtype=float)
    if wa.shape != wb.shape:
        raise ValueError("paired differences need the same evaluation windows")
    d = wa - wb
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    diff = a["nll"] - b["nll"] if "nll" in a and "nll" in b else float(d.mean())
    lo, hi = interval95(diff, se)
    return {
        "nll_diff": diff,
        "nll_diff_se": se,
        "ppl_ratio": math.exp(diff),
        "z": z_score(diff, se),
        "ppl_ratio_ci95": [math.exp(lo), math.exp(hi)],
        "windows": len(d),
    }
