"""A quantized KV cache (int8 / int4 / int2) as a kvshare cache policy, so it composes with sharing.

    policy = kvshare.quantized_kv.QuantizedKV(bits=4)
    with kvshare.compression(model, strategy, policy):   # sharing and a quantized cache together
        model.generate(...)

The quantizer
-------------
Per-token, asymmetric, group-wise: every token's key (and value) vector of every KV head is cut
into groups of `group_size` consecutive channels; each group stores `bits`-bit codes
`q = round((x - zero) / scale)` clamped to `[0, 2**bits - 1]`, with `zero = min(group)` and
`scale = (max(group) - min(group)) / (2**bits - 1)` kept in the cache's dtype. Codes are packed
`8 // bits` to a byte along the channels, so int4 really stores half a byte per element.

Error bound (documented, and tested): every element is reconstructed within half a step of its
group, `|x - dequantize(quantize(x))| <= scale / 2 = (max - min) / (2 * (2**bits - 1))`, up to the
rounding of the cache's dtype in `q * scale + zero` (for float16/bfloat16 also the rounding of
`scale` and `zero` themselves when they are stored).

Why per-token: a token's codes depend only on that token, so the cache is causal. A prefill in one
forward and token-by-token decoding store the same codes, and attention at every position reads
exactly what the cache holds -- which is what one-pass perplexity then measures. (KIVI's per-channel
keys group *tokens*; scored in one forward pass, a group's scale would carry information from tokens
after the query.) No full-precision residual is kept: the cache holds codes, scales and zeros only.

The cache layer
---------------
`QuantizedKVLayer.update` quantizes the new tokens, appends them, and returns the dequantized K/V of
everything held: attention (and, through kvshare's tap, every layer replaced by this one) reads the
quantized cache. `nbytes()` counts what is stored (packed codes + scales + zeros), which
`kvshare.sharing.layer_bytes` / `cache_bytes` report. Sliding-window layers keep their last
`window - 1` tokens, as transformers' `DynamicSlidingWindowLayer` does.

Composition with token eviction: `quantized_eviction(H2O(budget=64), QuantizedKV(bits=4))` (or
`quantized(policy, bits)`) is an eviction policy whose slots select and drop tokens exactly as the
policy does, but hold the kept tokens as codes (`EvictingCodes`): the bytes are the policy's kept
tokens times the quantizer's bytes per token. H2O/PyramidInfer score tokens with the keys as
attention reads them (dequantized). Since codes are per token, dropping tokens never re-quantizes
anything: the evicting cache holds exactly the codes the quantized cache alone would hold for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .sharing import layer_window

SUPPORTED_BITS = (2, 4, 8)


# --------------------------------------------------------------------------------------------
# the quantizer
# --------------------------------------------------------------------------------------------
@dataclass
class QTensor:
    """Packed codes [..., channels * bits / 8] (uint8), scale and zero [..., channels / group_size]."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    @property
    def channels(self) -> int:
        return self.packed.shape[-1] * 8 // self.bits

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


def _check(bits: int, group_size: int, channels: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if channels % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {channels} channels of a head")
    if (channels * bits) % 8:
        raise ValueError(f"{channels} channels of {bits} bits do not fill whole bytes")


def group_size_for(head_dim: int, group_size: int) -> int:
    """The group size used for heads of `head_dim` channels: `group_size`, capped at the head."""
    return min(group_size, head_dim)


def quantize(x: torch.Tensor, bits: int = 8, group_size: int = 32) -> QTensor:
    """Quantize the last dimension of `x` in groups of `group_size` channels (asymmetric, per group)."""
    channels = x.shape[-1]
    _check(bits, group_size, channels)
    levels = (1 << bits) - 1
    work = torch.promote_types(x.dtype, torch.float32)  # float32 arithmetic for half types, float64 kept
    g = x.reshape(*x.shape[:-1], channels // group_size, group_size).to(work)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    scale = (hi - lo) / levels
    # stored in x's dtype; the codes are computed against the stored values, so they dequantize exactly
    scale_s = scale.to(x.dtype)
    zero_s = lo.to(x.dtype)
    step = scale_s.to(work)
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: codes 0, value = zero
    q = torch.round((g - zero_s.to(work)[..., None]) / step[..., None]).clamp_(0, levels).to(torch.uint8)
    q = q.reshape(*x.shape[:-1], channels)
    return QTensor(_pack(q, bits), scale_s, zero_s, bits, group_size)


def dequantize(qt: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values `q * scale + zero` in the dtype of the scales (or `dtype`)."""
    dtype = dtype or qt.scale.dtype
    q = _unpack(qt.packed, qt.bits)
    groups = q.shape[-1] // qt.group_size
    q = q.reshape(*q.shape[:-1], groups, qt.group_size).to(dtype)
    out = q * qt.scale.to(dtype)[..., None] + qt.zero.to(dtype)[..., None]
    return out.reshape(*q.shape[:-2], groups * qt.group_size)


def error_bound(x: torch.Tensor, bits: int = 8, group_size: int = 32) -> torch.Tensor:
    """Per-element bound of the round-trip error: half a quantization step of the element's group."""
    channels = x.shape[-1]
    _check(bits, group_size, channels)
    g = x.reshape(*x.shape[:-1], channels // group_size, group_size).to(torch.promote_types(x.dtype, torch.float32))
    half_step = (g.amax(dim=-1) - g.amin(dim=-1)) / ((1 << bits) - 1) / 2
    return half_step[..., None].expand_as(g).reshape(x.shape)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q
    per = 8 // bits
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _cat(a: QTensor | None, b: QTensor, dim: int = -2) -> QTensor:
    if a is None:
        return b
    return QTensor(torch.cat([a.packed, b.packed], dim), torch.cat([a.scale, b.scale], dim),
                   torch.cat([a.zero, b.zero], dim), b.bits, b.group_size)


def _map(qt: QTensor | None, fn) -> QTensor | None:
    if qt is None:
        return None
    return QTensor(fn(qt.packed), fn(qt.scale), fn(qt.zero), qt.bits, qt.group_size)


# --------------------------------------------------------------------------------------------
# the cache layer
# --------------------------------------------------------------------------------------------
def _sliding_window(config, layer_idx: int) -> int | None:
    return None if config is None else layer_window(config, layer_idx)


class QuantizedStorage:
    """K/V held as packed codes (`qkeys` / `qvalues`, [batch, kv_heads, tokens, ...], see `QTensor`) by a
    cache layer whose `keys` / `values` stay empty tensors that give dtype and device."""

    bits = 8
    group_size = 32
    qkeys: QTensor | None = None
    qvalues: QTensor | None = None

    def _quantize(self, x: torch.Tensor) -> QTensor:
        return quantize(x, self.bits, group_size_for(x.shape[-1], self.group_size))

    def held(self) -> int:
        """Tokens held now (per sequence and head)."""
        return 0 if self.qkeys is None else self.qkeys.packed.shape[-2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V attention reads: the dequantized contents of the layer."""
        if self.qkeys is None:
            return self.keys, self.values
        dtype = self.keys.dtype
        return dequantize(self.qkeys, dtype), dequantize(self.qvalues, dtype)

    def nbytes(self) -> int:
        """Bytes stored: packed codes, scales and zeros of keys and values."""
        return sum(q.nbytes() for q in (self.qkeys, self.qvalues) if q is not None)


class QuantizedKVLayer(QuantizedStorage, DynamicLayer):
    """A dynamic cache layer that stores K and V as packed per-token group-wise codes.

    `keys` / `values` stay empty tensors (they give the dtype and device); the data is in
    `qkeys` / `qvalues` ([batch, kv_heads, tokens, ...], see `QTensor`).
    """

    kvshare_policy = True

    def __init__(self, bits: int = 8, group_size: int = 32, sliding_window: int | None = None, layer_idx=None):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
        self.bits = bits
        self.group_size = group_size
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.is_croppable = sliding_window is None
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.qkeys: QTensor | None = None
        self.qvalues: QTensor | None = None

    def __repr__(self):
        window = f", sliding_window={self.sliding_window}" if self.is_sliding else ""
        return f"QuantizedKVLayer(bits={self.bits}, group_size={self.group_size}{window})"

    # -- transformers' layer interface -----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.qkeys = _cat(self.qkeys, self._quantize(key_states))
        self.qvalues = _cat(self.qvalues, self._quantize(value_states))
        keys, values = self.dequantized()
        if self.is_sliding and self.held() > self.sliding_window - 1:
            # attention gets everything (the mask applies the window); the layer keeps what the next step needs
            keep = self.sliding_window - 1
            self.qkeys = _map(self.qkeys, lambda t: t[:, :, -keep:].contiguous())
            self.qvalues = _map(self.qvalues, lambda t: t[:, :, -keep:].contiguous())
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        window = self.sliding_window
        offset = max(self.cumulative_length - window + 1, 0)
        length = (window - 1 + query_length) if self.cumulative_length >= window else self.cumulative_length + query_length
        return length, offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.qkeys = self.qvalues = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop with a negative number of tokens to remove")
        if tokens_to_remove == 0 or self.qkeys is None:
            return
        if self.is_sliding:
            raise NotImplementedError("a sliding-window quantized layer cannot be cropped")
        n = abs(tokens_to_remove)
        self.qkeys = _map(self.qkeys, lambda t: t[:, :, :-n])
        self.qvalues = _map(self.qvalues, lambda t: t[:, :, :-n])
        self.cumulative_length -= n

    def _index(self, fn) -> None:
        self.qkeys = _map(self.qkeys, fn)
        self.qvalues = _map(self.qvalues, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index(lambda t: t[indices, ...])

    def offload(self):
        self._index(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.qkeys is not None and self.qkeys.packed.device != self.device:
            self._index(lambda t: t.to(self.device, non_blocking=True))


# --------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------
class QuantizedKV:
    """KV-cache quantization as a kvshare cache policy: every kept layer's slot stores its K/V as
    `bits`-bit per-token group-wise codes (see the module docstring)."""

    name = "quantized-kv"

    def __init__(self, bits: int = 8, group_size: int = 32):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.bits = bits
        self.group_size = group_size

    def __repr__(self):
        return f"QuantizedKV(bits={self.bits}, group_size={self.group_size})"

    def to_dict(self) -> dict:
        return {"policy": self.name, "bits": self.bits, "group_size": self.group_size}

    def make_layer(self, layer_idx: int, config) -> QuantizedKVLayer:
        if config is not None:
            _check(self.bits, group_size_for(_head_dim(config), self.group_size), _head_dim(config))
        return QuantizedKVLayer(self.bits, self.group_size, _sliding_window(config, layer_idx), layer_idx)

    def make_cache(self, config) -> DynamicCache:
        """A cache whose every slot is quantized: the quantized cache on its own, without kvshare's hooks."""
        cache = DynamicCache(config=config)
        cache.layers = [self.make_layer(i, config) for i in range(config.get_text_config().num_hidden_layers)]
        return cache

    # -- byte accounting -------------------------------------------------------------------
    def bytes_per_token(self, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """K+V bytes one token adds to one layer (batch 1): codes, plus a scale and a zero per group."""
        g = group_size_for(head_dim, self.group_size)
        _check(self.bits, g, head_dim)
        per_tensor = kv_heads * (head_dim * self.bits // 8 + 2 * (head_dim // g) * dtype_bytes)
        return 2 * per_tensor

    def predicted_cache_bytes(self, config, strategy=None, batch: int = 1, tokens: int = 0,
                              dtype_bytes: int | None = None) -> int:
        """Bytes of a cache holding `tokens` tokens per sequence: replaced layers hold nothing, every
        other layer `bytes_per_token` per token (sliding layers at most `window - 1` tokens)."""
        text = config.get_text_config()
        if dtype_bytes is None:
            dtype_bytes = torch.tensor([], dtype=getattr(text, "dtype", None) or torch.float32).element_size()
        per_token = self.bytes_per_token(text.num_key_value_heads, _head_dim(config), dtype_bytes)
        return batch * per_token * held_tokens(config, strategy, tokens)

    def compression_ratio(self, head_dim: int, dtype_bytes: int) -> float:
        """Quantized bytes over unquantized bytes of the same tokens."""
        return self.bytes_per_token(1, head_dim, dtype_bytes) / (2 * head_dim * dtype_bytes)


# --------------------------------------------------------------------------------------------
# quantization x token eviction
# --------------------------------------------------------------------------------------------
class EvictingCodes(QuantizedStorage):
    """Mixin for a kvshare.policies evicting layer: the storage hooks of `EvictingLayer` on codes."""

    def store(self, key_states, value_states, first: bool):
        qk, qv = self._quantize(key_states), self._quantize(value_states)
        self.qkeys = qk if first else _cat(self.qkeys, qk)
        self.qvalues = qv if first else _cat(self.qvalues, qv)
        return self.dequantized()

    def held_keys(self) -> torch.Tensor:
        return dequantize(self.qkeys, self.keys.dtype)

    def gather_kv(self, idx: torch.Tensor) -> None:
        def pick(t):
            return t.gather(2, idx[..., None].expand(t.shape[0], t.shape[1], idx.shape[-1], t.shape[-1]))

        self.qkeys, self.qvalues = _map(self.qkeys, pick), _map(self.qvalues, pick)

    def _index_state(self, fn) -> None:
        stubs = self.keys, self.values
        self.keys = self.values = None  # the empty stubs are not per-sequence state
        try:
            super()._index_state(fn)
        finally:
            self.keys, self.values = stubs
        self.qkeys, self.qvalues = _map(self.qkeys, fn), _map(self.qvalues, fn)

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None


_QUANTIZED_LAYER_CLASSES: dict = {}


def quantized_layer_class(layer_class):
    """`layer_class` (an evicting layer) with `EvictingCodes`: same selection, codes instead of tensors."""
    if layer_class not in _QUANTIZED_LAYER_CLASSES:
        _QUANTIZED_LAYER_CLASSES[layer_class] = type(f"Quantized{layer_class.__name__}", (EvictingCodes, layer_class), {})
    return _QUANTIZED_LAYER_CLASSES[layer_class]


def quantized_eviction(eviction, quantization: QuantizedKV):
    """Token eviction and KV quantization together: a copy of `eviction` (a kvshare.policies policy, so it
    attaches the same hooks and evaluation scores it by decoding) whose slots keep their tokens as codes."""
    from .policies import EvictionPolicy

    if not isinstance(eviction, EvictionPolicy):
        raise TypeError(f"quantized_eviction combines a kvshare.policies eviction policy with QuantizedKV, "
                        f"got {type(eviction).__name__}")
    if not isinstance(quantization, QuantizedKV):
        raise TypeError(f"the second argument must be a QuantizedKV, got {type(quantization).__name__}")
    combined = _combined_class(type(eviction))(settings=eviction.settings)
    combined.eviction, combined.quantization = eviction, quantization
    combined.layer_class = quantized_layer_class(type(eviction).layer_class)
    combined.name = f"{eviction.name}+kv{quantization.bits}"
    return combined


_COMBINED_CLASSES: dict = {}


def _combined_class(policy_class):
    if policy_class not in _COMBINED_CLASSES:
        def make_layer(self, layer_idx, config):
            layer = policy_class.make_layer(self, layer_idx, config)
            if config is not None:
                _check(self.quantization.bits, group_size_for(_head_dim(config), self.quantization.group_size),
                       _head_dim(config))
            layer.bits, layer.group_size = self.quantization.bits, self.quantization.group_size
            return layer

        def to_dict(self):
            return {**self.settings.to_dict(), "bits": self.quantization.bits, "group_size": self.quantization.group_size}

        def bytes_per_token(self, kv_heads, head_dim, dtype_bytes):
            return self.quantization.bytes_per_token(kv_heads, head_dim, dtype_bytes)

        def __repr__(self):
            return f"quantized_eviction({self.eviction!r}, {self.quantization!r})"

        _COMBINED_CLASSES[policy_class] = type(f"Quantized{policy_class.__name__}", (policy_class,), {
            "make_layer": make_layer, "to_dict": to_dict, "bytes_per_token": bytes_per_token, "__repr__": __repr__})
    return _COMBINED_CLASSES[policy_class]


def quantized(policy, bits: int, group_size: int = 32):
    """`policy` with a `bits`-bit KV cache: an eviction policy -> `quantized_eviction`; None -> QuantizedKV."""
    quantization = QuantizedKV(bits=bits, group_size=group_size)
    return quantization if policy is None else quantized_eviction(policy, quantization)


def _head_dim(config) -> int:
    text = config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def held_tokens(config, strategy, tokens: int) -> int:
    """Tokens held per sequence, summed over the layers, after `tokens` tokens: replaced layers hold
    nothing, sliding-window layers at most `window - 1`, every other layer all of them."""
    replaced = set(strategy.mapping) if strategy is not None else set()
    total = 0
    for i in range(config.get_text_config().num_hidden_layers):
        if i not in replaced:
            window = _sliding_window(config, i)
            total += tokens if window is None else min(tokens, window - 1)
    return total


def plain_cache_bytes(config, strategy=None, batch: int = 1, tokens: int = 0, dtype_bytes: int = 4) -> int:
    """Bytes of an unquantized dynamic cache with `tokens` tokens: (L - C) layers of full-precision K/V."""
    text = config.get_text_config()
    per_token = 2 * text.num_key_value_heads * _head_dim(config) * dtype_bytes
    return batch * per_token * held_tokens(config, strategy, tokens)


def make_policy(kv_bits: int | None, group_size: int = 32) -> QuantizedKV | None:
    """The policy for `--kv-bits` (None or 16/32: no quantization)."""
    if kv_bits in (None, 0, 16, 32):
        return None
    return QuantizedKV(bits=int(kv_bits), group_size=group_size)


__all__ = ["EvictingCodes", "QTensor", "QuantizedKV", "QuantizedKVLayer", "QuantizedStorage", "SUPPORTED_BITS",
           "dequantize", "error_bound", "make_policy", "plain_cache_bytes", "quantize", "quantized", "quantized_eviction"]
