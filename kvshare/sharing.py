"""KV sharing at inference: a replaced layer reads its source layer's cache.

How it plugs into transformers (no modeling file is copied):
- each replaced layer's attention module gets an instance-level `forward` that projects only
  queries (k_proj/v_proj are never run), applies the layer's own RoPE to them, and attends over
  the K/V its source layer attended over in the same forward pass;
- a forward pre-hook on the decoder stack makes sure a cache exists (the source's K/V must be
  somewhere, even for `use_cache=False`), marks the replaced layers' cache slots as holding
  nothing (transformers' own `DummyLayer` for shared-KV consumers), and taps `cache.update` so
  the replaced layer sees exactly what its source's cache layer returned (sliding windows,
  quantized or evicting layers included);
- a forward hook removes the tap again, so the cache handed back is a plain transformers cache
  whose replaced slots hold no tensors: its bytes are exactly (L - C) / L of the unshared ones.

This module is the mechanism; `kvshare.compression(model, *methods)` (kvshare.combine) is the one way
users apply sharing together with the other methods of kvshare.methods.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .accounting import cache_bytes, layer_bytes  # noqa: F401  (re-exported: kvshare.cache_bytes)
from .adapter import (
    SUPPORTED_MODEL_TYPES,  # noqa: F401  (re-exported)
    attention_function,
    attention_kwargs,
    base_model,
    cache_kwarg_name,
    check_supported,
    decoder_layers,
    layer_window,
    num_layers,
    rotary,
)
from .methods.base import KVMethod
from .strategy import Strategy

try:  # transformers >= 5.2x ships a cache slot type for shared-KV consumers
    from transformers.cache_utils import DummyLayer
except ImportError:  # older 5.x: an uninitialized slot holds no tensors either
    DummyLayer = None


# --------------------------------------------------------------------------------------------
# the replaced layer's attention
# --------------------------------------------------------------------------------------------
def source_kv(cache, source: int):
    """K/V that `source` attended over in the current forward pass."""
    latest = getattr(cache, "_kvshare_latest", None)
    if latest is not None and source in latest:
        return latest[source]
    layer = cache.layers[source]
    return layer.keys, layer.values


def _shared_attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None, **kwargs
):
    cache = cache if cache is not None else past_key_values
    if cache is None:
        raise RuntimeError(
            f"layer {self.layer_idx} shares layer {self._kvshare_source}'s K/V but got no cache: "
            "enable sharing with kvshare.enable_sharing(model, strategy) before calling the model"
        )
    input_shape = hidden_states.shape[:-1]
    query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim)
    if getattr(self, "q_norm", None) is not None:  # qwen3 normalizes queries per head before RoPE
        query = self.q_norm(query)
    query = query.transpose(1, 2)
    cos, sin = position_embeddings
    # the model's own RoPE on the queries only: an empty key tensor costs nothing
    query, _ = self._kvshare_rope(query, query[:, :0], cos, sin)

    keys, values = source_kv(cache, self._kvshare_source)
    attention = self._kvshare_attention_interface()
    attn_output, attn_weights = attention(
        self,
        query,
        keys,
        values,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **self._kvshare_attention_kwargs,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def replace_attention(attn, source: int) -> None:
    """Make attention module `attn` read layer `source`'s K/V instead of computing its own."""
    attn._kvshare_source = source
    attn._kvshare_rope = rotary(attn)
    attn._kvshare_attention_interface = attention_function(attn)
    attn._kvshare_attention_kwargs = attention_kwargs(attn)
    attn.forward = types.MethodType(_shared_attention_forward, attn)


def restore_attention(attn) -> None:
    """Undo `replace_attention` (no-op on an untouched module)."""
    for name in (
        "forward",
        "_kvshare_source",
        "_kvshare_rope",
        "_kvshare_attention_interface",
        "_kvshare_attention_kwargs",
    ):
        attn.__dict__.pop(name, None)


# --------------------------------------------------------------------------------------------
# the cache around a forward pass
# --------------------------------------------------------------------------------------------
def prepare_cache(cache, strategy: Strategy, method=None, config=None) -> None:
    """Get a cache ready for a shared forward pass.

    Replaced slots become empty (`DummyLayer`); with a cache method (eviction, quantization, ...),
    every fresh slot of a kept layer becomes `method.make_layer(i, config)`; `update` is tapped so a
    replaced layer sees exactly what its source's slot returned, as the source's method left it.
    """
    if method is not None and config is not None:
        for i in range(num_layers(config)):
            if i in strategy.mapping or (i < len(cache.layers) and not _fresh(cache.layers[i])):
                continue
            slot = method.make_layer(i, config)
            if slot is None:  # the method keeps transformers' own slot
                continue
            while len(cache.layers) < i:  # caches built without a config create their slots lazily
                j = len(cache.layers)
                cache.layers.append(
                    DummyLayer() if DummyLayer is not None and j in strategy.mapping else _default_slot(config, j)
                )
            if i < len(cache.layers):
                cache.layers[i] = slot
            else:
                cache.layers.append(slot)
    if DummyLayer is not None:
        for r in strategy.mapping:
            if r < len(cache.layers) and not isinstance(cache.layers[r], DummyLayer):
                if not _is_empty(cache.layers[r]):
                    raise ValueError(
                        f"the cache passed in holds K/V for layer {r}, which this strategy replaces: "
                        "use a cache made with the same strategy (or a fresh one)"
                    )
                cache.layers[r] = DummyLayer()
    if "_kvshare_latest" in cache.__dict__:
        cache._kvshare_latest.clear()
        return
    sources = set(strategy.sources)
    latest: dict = {}
    original_update = cache.update

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        out = original_update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in sources:
            latest[layer_idx] = out
        return out

    cache._kvshare_latest = latest
    cache.update = update


def _default_slot(config, layer_idx: int):
    """The slot transformers' DynamicCache gives layer `layer_idx` (for caches that grow their slots lazily)."""
    window = layer_window(config, layer_idx)
    return DynamicSlidingWindowLayer(sliding_window=window) if window else DynamicLayer()


def _fresh(layer) -> bool:
    """A slot no method has claimed and no forward has filled yet."""
    return not getattr(layer, "kvshare_method_slot", False) and _is_empty(layer)


def _is_empty(layer) -> bool:
    return getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True)


def release_cache(cache) -> None:
    """Remove the tap: the cache handed back is an ordinary transformers cache."""
    if cache is not None:
        cache.__dict__.pop("update", None)
        cache.__dict__.pop("_kvshare_latest", None)


@dataclass
class _SharingState:
    strategy: Strategy
    method: object = None
    attentions: list = field(default_factory=list)
    handles: list = field(default_factory=list)
    cache_kwarg: str = "cache"
    active_cache: object = None
    drop_cache: bool = False


def _pre_forward(model):
    def hook(module, args, kwargs):
        state: _SharingState = model._kvshare
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.drop_cache = False
        if cache is None:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = module.config.use_cache
            cache = DynamicCache(config=module.config)
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)
            kwargs[state.cache_kwarg] = cache
            state.drop_cache = not use_cache
        prepare_cache(cache, state.strategy, state.method, module.config)
        state.active_cache = cache
        return args, kwargs

    return hook


def _post_forward(model):
    def hook(module, args, kwargs, output):
        state: _SharingState = model._kvshare
        release_cache(state.active_cache)
        state.active_cache = None
        if state.drop_cache and output is not None:
            for name in ("cache", "past_key_values"):  # the field's name differs across 5.x releases
                if name in output.keys():
                    output[name] = None
        return output

    return hook


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def enable_sharing(model, strategy: Strategy, method: KVMethod | None = None):
    """Make `model` share K/V across layers per `strategy` until `disable_sharing(model)`.

    `method` (a `kvshare.methods.KVMethod`, usually a `Composition`) optionally makes every kept layer's
    cache slot what that method makes of it (token eviction, quantized storage, both); its
    `attach(model)` / `detach(model)` add and remove what it needs around the model. A replaced layer
    reads its source's slot as the source's method left it.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"expected a kvshare.Strategy, got {type(strategy).__name__}")
    if method is not None and not isinstance(method, KVMethod):
        raise TypeError(f"expected a kvshare method (kvshare.methods.make(...)), got {type(method).__name__}")
    check_supported(model)
    strategy.check_model(model)
    if getattr(model, "_kvshare", None) is not None:
        disable_sharing(model)
    base = base_model(model)
    layers = decoder_layers(model)
    state = _SharingState(strategy=strategy, method=method, cache_kwarg=cache_kwarg_name(base.forward))
    model._kvshare = state
    if not strategy.mapping and method is None:  # nothing to change: leave the model untouched, bit for bit
        return model
    for r, s in strategy.mapping.items():
        attn = layers[r].self_attn
        replace_attention(attn, s)
        state.attentions.append(attn)
    if method is not None:
        method.attach(model)
    state.handles.append(base.register_forward_pre_hook(_pre_forward(model), with_kwargs=True))
    state.handles.append(base.register_forward_hook(_post_forward(model), with_kwargs=True, always_call=True))
    return model


def disable_sharing(model):
    """Restore the original model exactly (no-op when sharing is not enabled)."""
    state = getattr(model, "_kvshare", None)
    if state is None:
        return model
    for handle in state.handles:
        handle.remove()
    for attn in state.attentions:
        restore_attention(attn)
    if state.method is not None:
        state.method.detach(model)
    release_cache(state.active_cache)
    del model._kvshare
    return model


def active_strategy(model) -> Strategy | None:
    state = getattr(model, "_kvshare", None)
    return None if state is None else state.strategy


def active_method(model) -> KVMethod | None:
    """The cache method applied beside the strategy (eviction / storage), or None."""
    state = getattr(model, "_kvshare", None)
    return None if state is None else state.method


@contextlib.contextmanager
def paused(model):
    """Inside, the plain model (whatever sharing and cache methods were applied); afterwards they are back."""
    previous = active_strategy(model), active_method(model)
    disable_sharing(model)
    try:
        yield model
    finally:
        disable_sharing(model)
        if previous[0] is not None:
            enable_sharing(model, *previous)
