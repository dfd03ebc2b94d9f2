"""A quantized KV cache (int8 / int4 / int2) as a kvshare method (`quantized`), so it composes with sharing.

    q4 = kvshare.methods.make("quantized", bits=4)    # = kvshare.methods.quantized.QuantizedKV(bits=4)
    with kvshare.compression(model, strategy, q4):   # sharing and a quantized cache together
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
`kvshare.accounting.layer_bytes` / `cache_bytes` report. Sliding-window layers keep their last
`window - 1` tokens, as transformers' `DynamicSlidingWindowLayer` does.

Composition with token eviction: `kvshare.compression(model, H2O(budget=64), QuantizedKV(bits=4))` (or
`quantized(eviction, bits)`) gives every kept layer an evicting slot that selects and drops tokens exactly
as the eviction method does, but holds a `QuantizedStorage` object for the kept tokens: the bytes are the
eviction method's kept tokens times the quantizer's bytes per token. H2O/PyramidInfer score tokens with the keys as
attention reads them (dequantized). Since codes are per token, dropping tokens never re-quantizes
anything: the evicting cache holds exactly the codes the quantized cache alone would hold for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..accounting import full_tokens, predicted_cache_bytes
from ..adapter import head_dim, kv_heads, layer_window, num_layers
from .base import KVMethod, MethodSettings, register

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
    q = q.reshape(*q.shape[:-1], groups, qt.group_size)
    # uint8 codes times float scales: the conversion happens inside the multiplication (one pass, not two)
    out = torch.mul(q, qt.scale.to(dtype)[..., None]).add_(qt.zero.to(dtype)[..., None])
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


def _map(qt: QTensor | None, fn) -> QTensor | None:
    if qt is None:
        return None
    return QTensor(fn(qt.packed), fn(qt.scale), fn(qt.zero), qt.bits, qt.group_size)


# --------------------------------------------------------------------------------------------
# storage: K/V held as codes
# --------------------------------------------------------------------------------------------
class QuantizedStorage:
    """K/V of one cache slot held as packed per-token codes (`qkeys` / `qvalues`, [batch, kv_heads, tokens, ...],
    see `QTensor`). Held by `QuantizedKVLayer` and, for quantization x eviction, by an evicting slot.

    The codes, scales and zeros sit in buffers with room for more tokens: a decode step writes its token's codes
    in place instead of copying everything held (the buffers grow by `grow_slots` tokens at a time, counted in
    `spare_bytes`, not in `nbytes`)."""

    grow_slots = 64

    def __init__(self, bits: int = 8, group_size: int = 32):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")
        self.bits = bits
        self.group_size = group_size
        self._bk: QTensor | None = None  # buffers, tokens on dim -2 (capacity >= held)
        self._bv: QTensor | None = None
        self.n = 0  # tokens held

    def __repr__(self):
        return f"QuantizedStorage(bits={self.bits}, group_size={self.group_size}, held={self.held()})"

    @property
    def qkeys(self) -> QTensor | None:
        return _map(self._bk, lambda t: t[:, :, : self.n])

    @property
    def qvalues(self) -> QTensor | None:
        return _map(self._bv, lambda t: t[:, :, : self.n])

    def _quantize(self, x: torch.Tensor) -> QTensor:
        return quantize(x, self.bits, group_size_for(x.shape[-1], self.group_size))

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, first: bool = False) -> None:
        """Quantize the new tokens' K/V and append them (`first`: replace whatever is held)."""
        qk, qv = self._quantize(key_states), self._quantize(value_states)
        if first:
            self._bk = self._bv = None
            self.n = 0
        end = self.n + key_states.shape[-2]
        if self._bk is None or self._bk.packed.shape[-2] < end or self._bk.packed.shape[:2] != qk.packed.shape[:2]:
            size = end if self.n == 0 else end + self.grow_slots  # a prefill gets what it needs, decoding room
            self._bk, self._bv = (_grown(old, new, self.n, size) for old, new in ((self._bk, qk), (self._bv, qv)))
        for buf, new in ((self._bk, qk), (self._bv, qv)):
            for name in ("packed", "scale", "zero"):
                getattr(buf, name)[:, :, self.n : end] = getattr(new, name)
        self.n = end

    def held(self) -> int:
        """Tokens held now (per sequence and head)."""
        return self.n if self._bk is not None else 0

    def read(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V attention reads: the dequantized contents."""
        return dequantize(self.qkeys, dtype), dequantize(self.qvalues, dtype)

    def read_keys(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qkeys, dtype)

    def map(self, fn) -> None:
        """Apply `fn` to every per-token tensor (codes, scales, zeros): select, reorder, repeat, move."""
        keys, values = _map(self.qkeys, fn), _map(self.qvalues, fn)
        self._bk, self._bv = keys, values
        self.n = 0 if keys is None else keys.packed.shape[-2]

    def gather(self, idx: torch.Tensor) -> None:
        """Keep the tokens at `idx` ([batch, P, keep]) only."""

        def pick(t):
            return t.gather(2, idx[..., None].expand(t.shape[0], t.shape[1], idx.shape[-1], t.shape[-1]))

        self.map(pick)

    def nbytes(self) -> int:
        """Bytes stored for the tokens held: packed codes, scales and zeros of keys and values."""
        return sum(q.nbytes() for q in (self.qkeys, self.qvalues) if q is not None)

    def spare_bytes(self) -> int:
        """Bytes of the buffers' room for tokens not yet written."""
        return sum(q.nbytes() for q in (self._bk, self._bv) if q is not None) - self.nbytes()

    def reset(self) -> None:
        self._bk = self._bv = None
        self.n = 0


def _grown(old: QTensor | None, new: QTensor, held: int, size: int) -> QTensor:
    """Buffers shaped like `new` with room for `size` tokens, holding `old`'s first `held` tokens."""

    def buffer(t_new, t_old):
        out = t_new.new_empty(*t_new.shape[:2], size, t_new.shape[-1])
        if held:
            out[:, :, :held] = t_old[:, :, :held]
        return out

    parts = [buffer(getattr(new, n), getattr(old, n, None)) for n in ("packed", "scale", "zero")]
    return QTensor(*parts, new.bits, new.group_size)


# --------------------------------------------------------------------------------------------
# the cache layer
# --------------------------------------------------------------------------------------------
class QuantizedKVLayer(DynamicLayer):
    """A dynamic cache layer that stores K and V as packed per-token group-wise codes.

    `keys` / `values` stay empty tensors (they give the dtype and device); the data is in `storage`
    (a `QuantizedStorage`; `qkeys` / `qvalues` are its tensors).
    """

    kvshare_method_slot = True

    def __init__(self, bits: int = 8, group_size: int = 32, sliding_window: int | None = None, layer_idx=None):
        super().__init__()
        self.storage = QuantizedStorage(bits, group_size)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.is_croppable = sliding_window is None
        self.layer_idx = layer_idx
        self.cumulative_length = 0

    bits = property(lambda self: self.storage.bits)
    group_size = property(lambda self: self.storage.group_size)
    qkeys = property(lambda self: self.storage.qkeys)
    qvalues = property(lambda self: self.storage.qvalues)

    def __repr__(self):
        window = f", sliding_window={self.sliding_window}" if self.is_sliding else ""
        return f"QuantizedKVLayer(bits={self.bits}, group_size={self.group_size}{window})"

    def held(self) -> int:
        return self.storage.held()

    def nbytes(self) -> int:
        return self.storage.nbytes()

    # -- transformers' layer interface -----------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.storage.append(key_states, value_states)
        keys, values = self.storage.read(self.keys.dtype)
        if self.is_sliding and self.held() > self.sliding_window - 1:
            # attention gets everything (the mask applies the window); the layer keeps what the next step needs
            keep = self.sliding_window - 1
            self.storage.map(lambda t: t[:, :, -keep:].contiguous())
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        window = self.sliding_window
        offset = max(self.cumulative_length - window + 1, 0)
        length = (
            (window - 1 + query_length) if self.cumulative_length >= window else self.cumulative_length + query_length
        )
        return length, offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.storage.reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop with a negative number of tokens to remove")
        if tokens_to_remove == 0 or self.storage.qkeys is None:
            return
        if self.is_sliding:
            raise NotImplementedError("a sliding-window quantized layer cannot be cropped")
        n = abs(tokens_to_remove)
        self.storage.map(lambda t: t[:, :, :-n])
        self.cumulative_length -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.storage.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.storage.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.storage.map(lambda t: t[indices, ...])

    def offload(self):
        self.storage.map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.storage.qkeys is not None and self.storage.qkeys.packed.device != self.device:
            self.storage.map(lambda t: t.to(self.device, non_blocking=True))


# --------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------
@dataclass
class QuantizedSettings(MethodSettings):
    bits: int = 8  # 8, 4 or 2 bits per element
    group_size: int = 32  # channels per scale/zero pair (capped at the head width)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")


@register
class QuantizedKV(KVMethod):
    """KV-cache quantization: every kept layer's slot stores its K/V as `bits`-bit per-token group-wise codes
    (see the module docstring). `QuantizedKV(bits=4)`; positional `QuantizedKV(4)` works too."""

    name = "quantized"
    role = "storage"
    settings_class: ClassVar[type] = QuantizedSettings
    # codes are per token, so decoding stores what one forward stores; but float noise between a batched and a
    # one-token projection can move a value across a rounding boundary (one code step), hence the tolerance
    causal_tolerance: ClassVar[float] = 5e-3

    def __init__(self, bits=None, group_size=None, settings=None):
        if isinstance(bits, QuantizedSettings):  # QuantizedKV(settings) positionally
            bits, settings = None, bits
        given = {k: v for k, v in (("bits", bits), ("group_size", group_size)) if v is not None}
        super().__init__(settings, **given)

    bits = property(lambda self: self.settings.bits)
    group_size = property(lambda self: self.settings.group_size)

    def __repr__(self):
        return f"QuantizedKV(bits={self.bits}, group_size={self.group_size})"

    def _check_config(self, config) -> None:
        if config is not None:
            _check(self.bits, group_size_for(head_dim(config), self.group_size), head_dim(config))

    def make_layer(self, layer_idx: int, config, storage=None) -> QuantizedKVLayer:
        self._check_config(config)
        return QuantizedKVLayer(self.bits, self.group_size, _sliding_window(config, layer_idx), layer_idx)

    def make_storage(self, layer_idx: int, config) -> QuantizedStorage:
        self._check_config(config)
        return QuantizedStorage(self.bits, self.group_size)

    def make_cache(self, config) -> DynamicCache:
        """A cache whose every slot is quantized: the quantized cache on its own, without kvshare's hooks."""
        cache = DynamicCache(config=config)
        cache.layers = [self.make_layer(i, config) for i in range(num_layers(config))]
        return cache

    # -- byte accounting -------------------------------------------------------------------
    def bytes_per_token(self, config, dtype_bytes: int) -> int:
        """K+V bytes one token adds to one layer of one sequence: codes, plus a scale and a zero per group."""
        return self.token_bytes(kv_heads(config), head_dim(config), dtype_bytes)

    def token_bytes(self, heads: int, dim: int, dtype_bytes: int) -> int:
        g = group_size_for(dim, self.group_size)
        _check(self.bits, g, dim)
        return 2 * heads * (dim * self.bits // 8 + 2 * (dim // g) * dtype_bytes)

    def compression_ratio(self, head_dim: int, dtype_bytes: int) -> float:
        """Quantized bytes over unquantized bytes of the same tokens."""
        return self.token_bytes(1, head_dim, dtype_bytes) / (2 * head_dim * dtype_bytes)

    # -- the shared test matrix --------------------------------------------------------------
    @classmethod
    def examples(cls, config) -> list["QuantizedKV"]:
        return [cls(bits=8), cls(bits=4)]


def _sliding_window(config, layer_idx: int) -> int | None:
    return None if config is None else layer_window(config, layer_idx)


def quantized(eviction, bits: int, group_size: int = 32):
    """`eviction` with a `bits`-bit KV cache: an eviction method -> the composition of both (its slots keep the
    method's tokens as codes); None -> QuantizedKV."""
    quantization = QuantizedKV(bits=bits, group_size=group_size)
    if eviction is None:
        return quantization
    from .compose import Composition

    return Composition(eviction, quantization)


def quantized_eviction(eviction, quantization: QuantizedKV):
    """Token eviction and KV quantization together (`kvshare.compression(model, eviction, quantization)` does the
    same): the composition whose evicting slots hold their kept tokens as codes."""
    from .compose import Composition
    from .eviction import EvictionMethod

    if not isinstance(eviction, EvictionMethod):
        raise TypeError(
            f"quantized_eviction combines a kvshare eviction method with QuantizedKV, got {type(eviction).__name__}"
        )
    if not isinstance(quantization, QuantizedKV):
        raise TypeError(f"the second argument must be a QuantizedKV, got {type(quantization).__name__}")
    return Composition(eviction, quantization)


def held_tokens(config, strategy, tokens: int) -> int:
    """Tokens held per sequence, summed over the kept layers, after `tokens` tokens (no method)."""
    replaced = set(strategy.mapping) if strategy is not None else set()
    return sum(full_tokens(config, i, [tokens]) for i in range(num_layers(config)) if i not in replaced)


def plain_cache_bytes(config, strategy=None, batch: int = 1, tokens: int = 0, dtype_bytes: int = 4) -> int:
    """Bytes of an unquantized dynamic cache with `tokens` tokens: `kvshare.accounting.predicted_cache_bytes`
    without a method."""
    return predicted_cache_bytes(config, None, batch, [tokens], dtype_bytes, strategy=strategy)


__all__ = [
    "QTensor",
    "QuantizedKV",
    "QuantizedKVLayer",
    "QuantizedSettings",
    "QuantizedStorage",
    "SUPPORTED_BITS",
    "dequantize",
    "error_bound",
    "plain_cache_bytes",
    "quantize",
    "quantized",
    "quantized_eviction",
]
