"""Intra-layer KV compression by token eviction, as kvshare cache policies.

    policy = kvshare.policies.make_policy("h2o", budget=128)
    with kvshare.compression(model, strategy, policy):   # sharing and eviction together
        model.generate(...)

`POLICIES` maps a name to its policy class; each class has a settings dataclass (`settings_class`).
"""
from __future__ import annotations

from .base import EvictingLayer, EvictionPolicy, PolicySettings, layer_kind
from .h2o import H2O, H2OSettings
from .pyramidinfer import PyramidInfer, PyramidInferSettings, layer_budgets
from .streamingllm import StreamingLLM, StreamingLLMSettings

POLICIES = {cls.name: cls for cls in (StreamingLLM, H2O, PyramidInfer)}


def make_policy(name: str, budget: int, **settings) -> EvictionPolicy:
    """A policy by name (`streamingllm`, `h2o`, `pyramidinfer`) with `budget` tokens per layer
    (PyramidInfer: the average over layers) and any other settings of its dataclass."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")
    return POLICIES[key](budget=budget, **settings)


def predicted_cache_bytes(config, strategy, policy, batch: int, lengths, dtype_bytes: int) -> int:
    """K/V bytes of a cache after forwards adding `lengths` tokens each (no padding): replaced layers
    hold nothing, every other layer what its policy keeps (everything without a policy)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if hasattr(policy, "bytes_per_token"):  # a quantized cache (kvshare.quantized_kv): codes + scales + zeros
        per_token = policy.bytes_per_token(text.num_key_value_heads, head_dim, dtype_bytes) * batch
    else:
        per_token = 2 * text.num_key_value_heads * head_dim * dtype_bytes * batch
    replaced = set(strategy.mapping) if strategy is not None else set()
    lengths = list(lengths)
    total = 0
    for i in range(text.num_hidden_layers):
        if i in replaced:
            continue
        if policy is not None:
            tokens = policy.predicted_tokens(i, config, lengths)
        else:
            window = layer_kind(config, i)
            tokens = sum(lengths) if window is None else min(sum(lengths), window - 1)
        total += tokens * per_token
    return total


__all__ = [
    "EvictingLayer", "EvictionPolicy", "H2O", "H2OSettings", "POLICIES", "PolicySettings", "PyramidInfer",
    "PyramidInferSettings", "StreamingLLM", "StreamingLLMSettings", "layer_budgets", "make_policy",
    "predicted_cache_bytes",
]
