"""Perplexity: windowing covers every token once, and the numbers match a by-hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LAYERS, make_tiny_model

import kvshare
from kvshare.metrics import _windows, perplexity_with_error, token_nlls

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."


def scored_positions(n, window, stride):
    """Absolute positions scored by the windows (a window's position `first` onward)."""
    out = []
    for begin, end, first in _windows(n, window, stride):
        assert 0 <= begin < end <= n and end - begin <= window
        assert 1 <= first < end - begin  # position 0 of a window has no context
        out.extend(range(begin + first, end))
    return out


@pytest.mark.parametrize(
    "n, window, stride",
    [
        (10, 4, 2),
        (10, 4, 1),
        (10, 4, 3),
        (100, 16, 5),
        (17, 8, 7),
        (5, 8, 4),  # text shorter than the window
        (2, 8, 8),
        (9, 8, 8),  # stride == window (the default): non-overlapping windows
        (10, 4, 4),
        (64, 16, 16),
        (1024, 512, 512),
    ],
)
def test_windows_score_every_token_after_the_first_once(n, window, stride):
    scored = scored_positions(n, window, stride)
    missing = sorted(set(range(1, n)) - set(scored))
    twice = sorted({p for p in scored if scored.count(p) > 1})
    assert not missing, f"positions never scored: {missing[:10]} (windows {_windows(n, window, stride)[:3]}...)"
    assert not twice, f"positions scored more than once: {twice[:10]}"
    assert scored == list(range(1, n))  # and in order, as token_nlls promises


def test_windows_of_tiny_texts():
    assert _windows(0, 8, 8) == [] and _windows(1, 8, 8) == []


def tokenize(tok, text):
    return tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"]


def test_perplexity_matches_single_forward(tiny_llama, char_tokenizer):
    ids = tokenize(char_tokenizer, TEXT)
    assert ids.shape[1] < 512  # fits in one (default) window
    with torch.no_grad():
        logits = tiny_llama(ids).logits[0]
    nll = F.cross_entropy(logits[:-1].double(), ids[0, 1:], reduction="mean").item()
    ppl = kvshare.perplexity(tiny_llama, char_tokenizer, TEXT)
    assert ppl == pytest.approx(math.exp(nll), rel=1e-5)
    nlls = token_nlls(tiny_llama, char_tokenizer, TEXT)
    assert nlls.dtype == torch.float64 and nlls.shape == (ids.shape[1] - 1,)


def test_perplexity_uses_the_enabled_sharing(tiny_llama, char_tokenizer):
    plain = kvshare.perplexity(tiny_llama, char_tokenizer, TEXT)
    with kvshare.sharing(tiny_llama, kvshare.Strategy({2: 1, 3: 1, 5: 1}, NUM_LAYERS)):
        shared = kvshare.perplexity(tiny_llama, char_tokenizer, TEXT)
        ids = tokenize(char_tokenizer, TEXT)
        with torch.no_grad():
            logits = tiny_llama(ids).logits[0]
    assert shared != pytest.approx(plain, rel=1e-3)
    nll = F.cross_entropy(logits[:-1].double(), ids[0, 1:]).item()
    assert shared == pytest.approx(math.exp(nll), rel=1e-5)


def test_overlapping_windows_match_by_hand(tiny_llama, char_tokenizer):
    # stride < window: each token is scored once, with the context its window gives it; this tokenizer starts a
    # text with BOS, so every later window starts with BOS too (and the BOS is not scored)
    window, stride = 32, 16
    ids = tokenize(char_tokenizer, TEXT)[0]
    expected = []
    for begin, end, first in _windows(len(ids), window, stride):
        w = ids[begin:end] if begin == 0 else torch.cat([ids[:1], ids[begin:end]])
        first = first if begin == 0 else first + 1
        with torch.no_grad():
            logits = tiny_llama(w[None]).logits[0].double()
        lp = F.log_softmax(logits[:-1], -1).gather(-1, w[1:, None])[:, 0]
        expected.append(-lp[first - 1 :])
    expected = torch.cat(expected)
    got = token_nlls(tiny_llama, char_tokenizer, TEXT, window=window, stride=stride, batch_size=2)
    assert got.shape == (len(ids) - 1,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # batching windows of equal length does not change the numbers
    one_by_one = token_nlls(tiny_llama, char_tokenizer, TEXT, window=window, stride=stride, batch_size=1)
    torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)


def test_max_tokens_truncates(tiny_llama, char_tokenizer):
    ids = tokenize(char_tokenizer, TEXT)[0]
    nlls = token_nlls(tiny_llama, char_tokenizer, TEXT, max_tokens=20)
    assert nlls.shape == (19,)
    torch.testing.assert_close(nlls, token_nlls(tiny_llama, char_tokenizer, TEXT)[:19], atol=1e-5, rtol=1e-5)
    assert len(ids) > 20


def test_perplexity_with_error_keys(tiny_llama, char_tokenizer):
    result = perplexity_with_error(tiny_llama, char_tokenizer, TEXT * 3, window=32, stride=16)
    assert set(result) == {"ppl", "nll", "nll_se", "ppl_se", "tokens", "windows", "window_nll"}
    assert len(result["window_nll"]) == result["windows"]
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    assert result["ppl"] == pytest.approx(
        kvshare.perplexity(tiny_llama, char_tokenizer, TEXT * 3, window=32, stride=16)
    )
    assert result["tokens"] == len(tokenize(char_tokenizer, TEXT * 3)[0]) - 1
    assert result["windows"] > 1 and result["nll_se"] > 0
    assert result["ppl_se"] == pytest.approx(result["ppl"] * result["nll_se"])
    single = perplexity_with_error(tiny_llama, char_tokenizer, TEXT)  # one window: no spread to measure
    assert single["windows"] == 1 and math.isnan(single["nll_se"])


def test_perplexity_with_error_counts_real_windows(tiny_llama, char_tokenizer):
    # the standard error is documented as coming from per-window mean NLLs: "windows" should be the
    # number of windows actually scored, and each unit one window's tokens
    n = len(tokenize(char_tokenizer, TEXT * 3)[0])
    result = perplexity_with_error(tiny_llama, char_tokenizer, TEXT * 3, window=32, stride=16)
    assert result["windows"] == len(_windows(n, 32, 16))


@pytest.mark.parametrize("window, stride", [(1, 1), (8, 0), (8, 9)])
def test_invalid_windows(tiny_llama, char_tokenizer, window, stride):
    with pytest.raises(ValueError):
        kvshare.perplexity(tiny_llama, char_tokenizer, TEXT, window=window, stride=stride)


def test_text_too_short(tiny_llama, char_tokenizer):
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        kvshare.perplexity(tiny_llama, char_tokenizer, "")  # only BOS


# --------------------------------------------------------------------------------------------
# long-document perplexity: context prefilled and compressed once, the next tokens scored in one forward
# --------------------------------------------------------------------------------------------
def _doc(n: int = 96) -> torch.Tensor:
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(9))


def _one_forward_nll(model, ids, context, scored):
    with torch.no_grad():
        logits = model(input_ids=ids[None, : context + scored]).logits[0].float()
    return float(F.cross_entropy(logits[context - 1 : context + scored - 1], ids[context : context + scored]))


def test_long_document_nll_without_compression_is_one_forward(tiny_llama):
    from kvshare.metrics import long_document_nll

    ids = _doc()
    assert long_document_nll(tiny_llama, ids, 64, 32) == pytest.approx(
        _one_forward_nll(tiny_llama, ids, 64, 32), abs=1e-5
    )
    with kvshare.compression(tiny_llama, kvshare.methods.make("streamingllm", budget=1000)):  # nothing dropped
        same = long_document_nll(tiny_llama, ids, 64, 32)
    with kvshare.compression(tiny_llama, kvshare.methods.make("streamingllm", budget=16, sink=2)):
        dropped = long_document_nll(tiny_llama, ids, 64, 32)
    assert same == pytest.approx(_one_forward_nll(tiny_llama, ids, 64, 32), abs=1e-5)
    assert abs(dropped - same) > 1e-3  # the context was compressed before the scored tokens read it


def test_long_document_perplexity_pairs_documents():
    from kvshare.metrics import LongDocumentProtocol, long_document_perplexity, paired_difference

    model = make_tiny_model("llama", "sdpa")
    protocol = LongDocumentProtocol(contexts=(32, 64), scored=16, documents=3)
    docs = [(f"d{i}", _doc(80 + i)) for i in range(3)]
    full = long_document_perplexity(model, None, protocol, docs=docs)
    with kvshare.compression(model, kvshare.methods.make("h2o", budget=20)):
        h2o = long_document_perplexity(model, None, protocol, docs=docs)
    assert set(full) == {32, 64} and full[64]["documents"] == ["d0", "d1", "d2"] and len(full[64]["window_nll"]) == 3
    paired = paired_difference(h2o[64], full[64])
    assert paired["windows"] == 3 and paired["ppl_ratio"] == pytest.approx(h2o[64]["ppl"] / full[64]["ppl"])


def test_long_document_ids_come_from_held_out_books_and_articles(char_tokenizer):
    from kvshare.metrics import LongDocumentProtocol, long_document_ids

    docs = long_document_ids(char_tokenizer, LongDocumentProtocol(contexts=(2048, 7680), scored=512, documents=12))
    assert len(docs) == 12 and all(len(ids) == 8192 for _, ids in docs) and len({d for d, _ in docs}) == 12
    with pytest.raises(ValueError, match="held-out documents"):
        long_document_ids(char_tokenizer, LongDocumentProtocol(contexts=(10**7,), documents=1))
