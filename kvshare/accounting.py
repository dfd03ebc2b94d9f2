"""One rule each for the numbers every layer of kvshare needs: how many layers a compression rate replaces,
and how many bytes a KV cache holds.

    num_shared_for(0.25, 30)  -> 8   (rate x layers, rounded half up)
    predicted_cache_bytes(config, method, batch=4, lengths=[512] + [1] * 128, dtype_bytes=4)

The prediction never runs the model: a replaced layer holds nothing; every kept layer holds what its
method predicts (`method.predicted_layer_bytes`: by default the tokens it keeps times its bytes per
token); without a method, every token seen (sliding-window layers at most `window - 1`) in full precision.
The tests compare it with the bytes a real cache holds after the same forwards (`cache_bytes`).
"""

from __future__ import annotations

import math

from .adapter import head_dim, kv_heads, layer_window, num_layers


def num_shared_for(rate: float, layers: int) -> int:
    """Layers replaced at compression rate `rate` (a fraction of the layers): rate x layers rounded half up
    (30 layers: 0.125 -> 4, 0.15 -> 5, 0.25 -> 8, 0.375 -> 11)."""
    if not 0 <= rate < 1:
        raise ValueError(f"compression rate must be in [0, 1), got {rate}")
    return int(math.floor(rate * layers + 0.5))


def rate_label(num_shared: int, layers: int) -> str:
    """The exact share of layers replaced, e.g. '8/30 = 26.7%'."""
    return f"{num_shared}/{layers} = {100 * num_shared / layers:.1f}%"


def kv_token_bytes(config, dtype_bytes: int) -> int:
    """Full-precision K + V bytes of one token in one layer of one sequence."""
    return 2 * kv_heads(config) * head_dim(config) * dtype_bytes


def full_tokens(config, layer_idx: int, lengths) -> int:
    """Tokens an unmodified layer holds per sequence after forwards adding `lengths` tokens each."""
    seen = sum(lengths)
    window = layer_window(config, layer_idx)
    return seen if window is None else min(seen, window - 1)


def predicted_cache_bytes(config, method=None, batch: int = 1, lengths=(), dtype_bytes: int = 4, strategy=None) -> int:
    """K/V bytes of a cache after forwards adding `lengths` tokens each (no padding).

    `method` is a `kvshare.methods.KVMethod` (or a composition of several); `strategy` a sharing
    `Strategy` applied beside it (a composition carries its own)."""
    lengths = list(lengths)
    if strategy is None and method is not None:
        strategy = method.strategy  # a sharing method's (or a composition's) strategy
    replaced = set(strategy.mapping) if strategy is not None else set()
    total = 0
    for i in range(num_layers(config)):
        if i in replaced:
            continue
        if method is None:
            total += full_tokens(config, i, lengths) * kv_token_bytes(config, dtype_bytes)
        else:
            total += method.predicted_layer_bytes(i, config, lengths, dtype_bytes)
    return total * batch


def layer_bytes(layer) -> int:
    """Bytes a cache slot holds: its own count when it stores K/V its own way (quantized, merged), else the
    sizes of its `keys` and `values` tensors (a replaced layer's empty slot holds none)."""
    nbytes = getattr(layer, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    total = 0
    for name in ("keys", "values"):
        t = getattr(layer, name, None)
        if t is not None and hasattr(t, "element_size"):
            total += t.numel() * t.element_size()
    return total


def cache_bytes(cache) -> int:
    """Bytes held by a cache's K/V (replaced layers hold none)."""
    return sum(layer_bytes(layer) for layer in cache.layers)
