"""One-pass log-likelihoods (kvshare.tasks.lmeval.onepass_loglikelihoods): the numbers lm-eval's HFLM computes, with
the output layer applied only where a continuation token is predicted. Tiny random models, no download."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_model
from lm_eval.models.huggingface import HFLM

import kvshare
from kvshare.tasks.lmeval import make_hflm, onepass_loglikelihoods


def requests(vocab: int, n: int = 11, seed: int = 0):
    """lm-eval's ((context, continuation), context ids, continuation ids), of mixed lengths; pairs share contexts."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ctx = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 14))]
        for _ in range(2):
            cont = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))]
            out.append(((f"c{i}", f"x{len(out)}"), ctx, cont))
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("batch_size", [3, 32])
def test_onepass_matches_hflm(arch, batch_size, byte_tokenizer):
    extra = {"final_logit_softcapping": 5.0} if arch == "gemma3" else {}
    model = make_tiny_model(arch, "sdpa", vocab_size=len(byte_tokenizer), **extra)
    lm = make_hflm(model, byte_tokenizer, batch_size=batch_size)
    reqs = requests(len(byte_tokenizer))
    theirs = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)  # lm-eval's own
    ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)  # KVShareLM: the one-pass path
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert torch.allclose(torch.tensor([x for x, _ in ours]), torch.tensor([x for x, _ in theirs]), atol=1e-4)
    # with sharing on, too (the decoder stack's hooks see the call)
    strategy = kvshare.Strategy({2: 0, 4: 3}, model.config.num_hidden_layers)
    with kvshare.compression(model, strategy):
        shared_theirs = HFLM._loglikelihood_tokens(lm, reqs, disable_tqdm=True)
        shared_ours = onepass_loglikelihoods(model, reqs, lm.max_length, batch_size)
    assert torch.allclose(
        torch.tensor([x for x, _ in shared_ours]), torch.tensor([x for x, _ in shared_theirs]), atol=1e-4
    )
    assert [x for x, _ in shared_ours] != [x for x, _ in ours]  # sharing changed the scores


def test_onepass_truncates_from_the_left_as_hflm():
    model = make_tiny_model("llama", "sdpa")
    ctx, cont = list(range(3, 40)), [50, 51]
    long = onepass_loglikelihoods(model, [(None, ctx, cont)], max_length=8, batch_size=4)
    short = onepass_loglikelihoods(model, [(None, ctx[-7:], cont)], max_length=64, batch_size=4)
    assert long == short  # the last max_length + 1 tokens, the last one not an input
    with pytest.raises(ValueError, match="empty continuation"):
        onepass_loglikelihoods(model, [(None, ctx, [])], max_length=8, batch_size=4)
