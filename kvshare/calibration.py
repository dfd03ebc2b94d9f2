"""Calibration: one reference forward over the calibration texts, and layer-to-layer KV distances.

Every sample is kept: texts are truncated to a common length, the smaller of `max_tokens` and the
shortest text's token count (the original release silently dropped every sample whose length
differed from the first). The description of what was done travels with the results.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from .adapter import cache_kwarg_name, decoder_layers, num_layers
from .sharing import paused

# euclidean: L2 between the layers' mean K (and V) vectors; cosine: 1 - cosine of the flattened means; normalized: the
# euclidean distance after dividing each layer's mean K (and V) by its RMS vector norm (`layer_norms`), so that the
# per-layer scale, which drives the plain euclidean distance on some models, drops out
METRICS = ("euclidean", "cosine", "normalized")


def encode_calibration(tokenizer, texts, max_tokens: int = 64):
    """Token ids [N, T] at a common length T, and a description of the truncation."""
    if not texts:
        raise ValueError("calibration needs at least one text")
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts]
    lengths = [len(e) for e in encoded]
    common = min(lengths)
    if common < 2:
        raise ValueError("a calibration text has fewer than 2 tokens: remove empty texts")
    if common < max_tokens:
        warnings.warn(
            f"the shortest calibration text has {common} tokens: all {len(texts)} texts are truncated to {common} "
            f"(max_tokens={max_tokens}); no sample is dropped",
            stacklevel=2,
        )
    ids = torch.tensor([e[:common] for e in encoded], dtype=torch.long)
    description = {
        "texts": len(texts),
        "tokens_per_text": common,
        "max_tokens": max_tokens,
        "alignment": f"every text truncated to the common length {common} (no sample dropped, no padding)",
    }
    return ids, description


@dataclass
class Reference:
    """What one unshared forward over the calibration batch leaves behind."""

    layer_inputs: list  # hidden states entering each decoder layer, [N, T, H]
    layer_kwargs: list  # per layer, what the decoder stack passes it (mask, RoPE, ...), cache removed
    cache_layers: list  # each layer's cache slot (K/V after RoPE)
    final_hidden: torch.Tensor  # after the last norm, [N, T, H]
    description: dict = field(default_factory=dict)


@torch.no_grad()
def reference_forward(model, input_ids: torch.Tensor) -> Reference:
    layers = decoder_layers(model)
    inputs: list = [None] * len(layers)
    captured: dict = {}  # layer -> kwargs; sliding and full layers get different masks
    hooks = []

    def capture(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
            captured[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(capture(i), with_kwargs=True))
    device = next(model.parameters()).device
    cache = DynamicCache()  # no config: sliding layers keep their full K/V for this one-shot forward
    try:
        with paused(model):  # calibration reads the plain model
            kwargs = {cache_kwarg_name(model.base_model.forward): cache}
            out = model.base_model(input_ids=input_ids.to(device), use_cache=True, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return Reference(inputs, [captured[i] for i in range(len(layers))], list(cache.layers), out.last_hidden_state)


def kv_means(reference: Reference):
    """Per-layer K and V averaged over samples: two tensors [L, kv_heads, T, head_dim] (float32)."""
    keys = torch.stack([layer.keys.float().mean(0) for layer in reference.cache_layers])
    values = torch.stack([layer.values.float().mean(0) for layer in reference.cache_layers])
    return keys, values


def layer_norms(means: torch.Tensor) -> torch.Tensor:
    """Per layer, the RMS over heads and positions of its mean vectors' L2 norms: [L, heads, T, head_dim] -> [L]."""
    return means.float().pow(2).sum(-1).mean(dim=(1, 2)).sqrt()


def distances_from_means(keys: torch.Tensor, values: torch.Tensor, metric: str = "euclidean") -> np.ndarray:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "normalized":
        keys = keys / layer_norms(keys).clamp_min(1e-12)[:, None, None, None]
        values = values / layer_norms(values).clamp_min(1e-12)[:, None, None, None]
    n = keys.shape[0]
    out = np.zeros((n, n))
    for a in range(n):
        if metric in ("euclidean", "normalized"):
            # L2 over head_dim, averaged over heads and positions; K and V averaged
            dk = (keys[a] - keys).norm(dim=-1).mean(dim=(1, 2))
            dv = (values[a] - values).norm(dim=-1).mean(dim=(1, 2))
        else:
            fk, fv = keys.flatten(1), values.flatten(1)
            dk = 1 - torch.nn.functional.cosine_similarity(fk[a : a + 1], fk, dim=1)
            dv = 1 - torch.nn.functional.cosine_similarity(fv[a : a + 1], fv, dim=1)
        out[a] = ((dk + dv) / 2).double().cpu().numpy()
    np.fill_diagonal(out, 0.0)
    return out


def layer_distances(model, tokenizer, texts, metric: str = "euclidean", max_tokens: int = 64) -> np.ndarray:
    """L x L distances between the layers' sample-averaged K/V caches."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    ids, _ = encode_calibration(tokenizer, texts, max_tokens)
    reference = reference_forward(model, ids)
    d = distances_from_means(*kv_means(reference), metric=metric)
    assert d.shape == (num_layers(model), num_layers(model))
    return d
