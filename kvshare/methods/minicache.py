"""MiniCache (Liu et al., NeurIPS 2024, arXiv 2405.14366): adjacent layers share one K/V direction per token.

From `start_layer` (default: mid-depth) to the last layer, adjacent kept layers of the same attention type
form pairs (l, l+1). For every token and KV head, a pair stores

- one merged direction for K and one for V: SLERP at `slerp_t` (0.5: the midpoint) of the two layers'
  normalized vectors, `sin((1-t)W)/sin W * a + sin(tW)/sin W * b` with `W` the angle between them;
- each layer's own magnitudes (the norms of its K and of its V vector): a layer reads `direction x its norm`;
- for the tokens whose two vectors are too far apart, the originals of both layers instead (retention).

Retention rule. The paper ranks tokens by the angular distance `W / pi` of the two layers' vectors and keeps
unmerged those above `d_min + (d_max - d_min) * gamma`, a count that depends on the data. Here the same
ranking keeps a fixed fraction: of every merged chunk, the `ceil(retain x tokens)` tokens with the largest
distance (per sequence and KV head; a token's distance is the larger of its K and its V distance) stay
unmerged. A fixed count keeps the cache rectangular and makes its bytes exactly predictable from the
lengths alone. Left padding is never ranked: a padded row retains the share of its own real tokens (its
remaining retention slots hold padding, which attention never sees), so each row matches the row alone.

When merging happens. A pair's newest tokens wait unmerged (both layers' originals) in a buffer; the buffer is
merged at the end of every multi-token forward (the prefill) and whenever it reaches `merge_interval` tokens
while decoding. Merging token by token would make retention meaningless (a fraction of one token); a chunk
of `merge_interval` tokens ranks its tokens against each other, as the paper ranks a prompt's, and costs at
most `merge_interval - 1` unmerged tokens per pair.

Who reads what. Both layers of a pair attend over their own originals for the tokens of the forward that
produces them (and for buffered tokens); once merged, the first layer reads `direction x its norms` and the
second `direction x its norms` (retained tokens: their originals). So the prefill itself is the full model,
and decoding differs from a full forward by design: `causal = False`, `scored_by_decoding = True`.

Memory. A pair's storage holds merged directions (2 x head_dim per token and head), 4 magnitudes, the
retained tokens' 4 original vectors, a one-byte retained flag per token, and the buffer -- not the originals.
Its `nbytes()` (reported by the pair's first layer; the second reports 0) equals `predicted_layer_bytes`.
Sliding-window pairs merge in chunks of `merge_interval` tokens (retention ranks within each) and drop a whole
chunk once every token of it is out of the window (the buffer is trimmed to the window before it is merged),
so they hold at most `merge_interval - 1` tokens beyond the window; attention gets the last `window - 1`
tokens as transformers' sliding-window layer gives them. With `start_layer` = number of layers nothing is paired and
every slot is transformers' own: exactly the full model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..accounting import full_tokens, kv_token_bytes
from ..adapter import base_model, decoder_layers, head_dim, kv_heads, layer_types, layer_window, num_layers
from .base import KVMethod, MethodSettings, register


@dataclass
class MiniCacheSettings(MethodSettings):
    start_layer: int | None = None  # first layer merged; None: mid-depth (num_layers // 2)
    slerp_t: float = 0.5  # SLERP interpolation between the pair's first (0) and second (1) layer
    retain: float = 0.05  # fraction of every merged chunk kept unmerged (the most distant tokens)
    merge_interval: int = 16  # decoded tokens buffered unmerged before they are merged

    def __post_init__(self):
        if self.start_layer is not None and (
            not isinstance(self.start_layer, int) or isinstance(self.start_layer, bool) or self.start_layer < 0
        ):
            raise ValueError(f"start_layer must be a non-negative layer index, got {self.start_layer!r}")
        if not 0.0 <= self.slerp_t <= 1.0:
            raise ValueError(f"slerp_t must be in [0, 1], got {self.slerp_t}")
        if not 0.0 <= self.retain <= 1.0:
            raise ValueError(f"retain must be a fraction in [0, 1], got {self.retain}")
        if not isinstance(self.merge_interval, int) or isinstance(self.merge_interval, bool) or self.merge_interval < 1:
            raise ValueError(f"merge_interval must be a positive integer, got {self.merge_interval!r}")


def retained_count(tokens: int, retain: float) -> int:
    """Tokens of a merged chunk of `tokens` kept unmerged: ceil(retain x tokens) (float noise ignored)."""
    return min(tokens, math.ceil(retain * tokens - 1e-9)) if tokens > 0 else 0


def pairs(config, start_layer: int | None, replaced=()) -> list[tuple[int, int]]:
    """The merged pairs (l, l+1): adjacent kept layers of one attention type, from `start_layer` (None: mid-depth)."""
    n = num_layers(config)
    start = n // 2 if start_layer is None else start_layer
    kinds = layer_types(config)
    replaced = set(replaced)
    out, i = [], start
    while i + 1 < n:
        if i not in replaced and i + 1 not in replaced and kinds[i] == kinds[i + 1]:
            out.append((i, i + 1))
            i += 2
        else:
            i += 1
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float):
    """Merge the vectors `a`, `b` ([..., dim]): (unit SLERP direction, |a|, |b|, angular distance W/pi in [0, 1]),
    computed in float32."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    na, nb = a32.norm(dim=-1), b32.norm(dim=-1)
    ua = a32 / na.clamp_min(1e-12)[..., None]
    ub = b32 / nb.clamp_min(1e-12)[..., None]
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin > 1e-6
    s = torch.where(safe, sin, torch.ones_like(sin))
    wa = torch.where(safe, torch.sin((1 - t) * omega) / s, torch.full_like(sin, 1 - t))
    wb = torch.where(safe, torch.sin(t * omega) / s, torch.full_like(sin, t))
    direction = wa[..., None] * ua + wb[..., None] * ub
    norm = direction.norm(dim=-1, keepdim=True)
    direction = torch.where(norm > 1e-6, direction / norm.clamp_min(1e-12), ua)  # antipodal pairs: keep a's direction
    return direction, na, nb, omega / math.pi


class MergedPair:
    """The shared storage of one pair of layers, [batch, kv_heads, tokens, ...] tensors in stream order:
    `dir_k`/`dir_v` and `mags` (|K_a|, |K_b|, |V_a|, |V_b|) of merged tokens, `orig` (K_a, V_a, K_b, V_b) of
    retained ones, `retained` (bool) over all merged-or-retained tokens, `chunks` [(tokens, retained)], and
    `buffer` (K_a, V_a, K_b, V_b) of tokens not merged yet with `buffer_valid` [batch, tokens]."""

    TENSORS = ("dir_k", "dir_v", "mags", "retained", "buffer_valid")

    def __init__(self, settings: MiniCacheSettings, sliding_window: int | None):
        self.settings = settings
        self.sliding_window = sliding_window
        self.reset()

    def reset(self) -> None:
        self.dir_k = self.dir_v = self.mags = self.retained = self.buffer_valid = None
        self.orig: list | None = None
        self.buffer: list | None = None
        self.chunks: list[tuple[int, int]] = []
        self.pending = None  # the first layer's new K/V of the current forward

    # -- reading ------------------------------------------------------------------------------
    def merged_tokens(self) -> int:
        return 0 if self.retained is None else self.retained.shape[-1]

    def buffered(self) -> int:
        return 0 if self.buffer is None else self.buffer[0].shape[-2]

    def held(self) -> int:
        return self.merged_tokens() + self.buffered()

    def read(self, which: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """K, V of every held token as layer `which` (0: first, 1: second) sees them, or (None, None)."""
        parts_k, parts_v = [], []
        if self.retained is not None and self.retained.shape[-1]:
            batch, heads, n = self.retained.shape
            dim = self.dir_k.shape[-1]
            shape = (batch, heads, n, dim)
            keep = self.retained[..., None].expand(shape)
            for direction, mag, orig, parts in (
                (self.dir_k, self.mags[..., which], self.orig[2 * which], parts_k),
                (self.dir_v, self.mags[..., 2 + which], self.orig[2 * which + 1], parts_v),
            ):
                out = torch.empty(shape, dtype=direction.dtype, device=direction.device)
                out.masked_scatter_(~keep, direction * mag[..., None])
                out.masked_scatter_(keep, orig)
                parts.append(out)
        if self.buffer is not None:
            parts_k.append(self.buffer[2 * which])
            parts_v.append(self.buffer[2 * which + 1])
        if not parts_k:
            return None, None
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)

    # -- writing ------------------------------------------------------------------------------
    def commit(self, key_b: torch.Tensor, value_b: torch.Tensor, valid: torch.Tensor, due: bool) -> None:
        """The second layer's new K/V (the first layer's are `pending`): buffer both, trim to the window, merge
        the buffer when `due`."""
        key_a, value_a = self.pending
        self.pending = None
        new = [key_a, value_a, key_b, value_b]
        if self.buffer is None:
            self.buffer, self.buffer_valid = new, valid
        else:
            self.buffer = [torch.cat([old, x], dim=-2) for old, x in zip(self.buffer, new)]
            self.buffer_valid = torch.cat([self.buffer_valid, valid], dim=-1)
        self.trim()
        if due and self.buffered():
            self.merge_buffer()
            self.trim()

    def trim(self) -> None:
        """Sliding window: drop merged chunks entirely out of the window, then buffered tokens (when no chunk is
        left) so that at least `window - 1` tokens stay held."""
        if self.sliding_window is None:
            return
        excess = self.held() - (self.sliding_window - 1)
        while self.chunks and excess >= self.chunks[0][0]:
            n, k = self.chunks.pop(0)
            self.dir_k, self.dir_v, self.mags = (t[:, :, n - k :] for t in (self.dir_k, self.dir_v, self.mags))
            self.orig = [t[:, :, k:] for t in self.orig]
            self.retained = self.retained[:, :, n:]
            excess -= n
        if not self.chunks and excess > 0 and self.buffer is not None:
            self.buffer = [t[:, :, excess:] for t in self.buffer]
            self.buffer_valid = self.buffer_valid[:, excess:]

    @torch.no_grad()
    def merge_buffer(self) -> None:
        """Merge the buffer: one chunk, or (sliding window) chunks of `merge_interval` tokens, so that whole chunks
        leave the window soon after their tokens do."""
        n = self.buffered()
        step = n if self.sliding_window is None else self.settings.merge_interval
        buffer, valid = self.buffer, self.buffer_valid
        for s in range(0, n, step):
            self.merge_chunk([t[:, :, s : s + step] for t in buffer], valid[:, s : s + step])
        self.buffer = self.buffer_valid = None

    def merge_chunk(self, buffer: list, valid: torch.Tensor) -> None:
        key_a, value_a, key_b, value_b = buffer
        batch, heads, n, dim = key_a.shape
        t = self.settings.slerp_t
        dk, nka, nkb, distance_k = slerp(key_a, key_b, t)
        dv, nva, nvb, distance_v = slerp(value_a, value_b, t)
        distance = torch.maximum(distance_k, distance_v)  # [batch, heads, n]
        # retention: each row keeps ceil(retain x its real tokens) by distance; padding fills the remaining slots
        real = valid.sum(-1).tolist()
        per_row = [retained_count(int(r), self.settings.retain) for r in real]
        k = max(per_row) if per_row else 0
        valid3 = valid[:, None, :].expand(batch, heads, n)
        by_distance = distance.masked_fill(~valid3, float("-inf"))
        rank = torch.empty_like(distance, dtype=torch.long)
        order = torch.sort(by_distance, dim=-1, descending=True, stable=True).indices
        rank.scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
        quota = torch.tensor(per_row, device=distance.device).view(batch, 1, 1)
        chosen = valid3 & (rank < quota)
        priority = torch.where(chosen, 2.0 + distance, torch.where(valid3, distance - 2.0, torch.ones_like(distance)))
        top = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :k]
        retained = torch.zeros(batch, heads, n, dtype=torch.bool, device=distance.device).scatter_(-1, top, True)
        merged = ~retained
        dtype = key_a.dtype

        def pick(x, mask, width):
            return x[mask].view(batch, heads, -1, width)

        new_dir_k = pick(dk.to(dtype), merged, dim)
        new_dir_v = pick(dv.to(dtype), merged, dim)
        new_mags = pick(torch.stack([nka, nkb, nva, nvb], dim=-1).to(dtype), merged, 4)
        new_orig = [pick(x, retained, dim) for x in (key_a, value_a, key_b, value_b)]
        if self.retained is None:
            self.dir_k, self.dir_v, self.mags, self.orig, self.retained = (
                new_dir_k,
                new_dir_v,
                new_mags,
                new_orig,
                retained,
            )
        else:
            self.dir_k = torch.cat([self.dir_k, new_dir_k], dim=-2)
            self.dir_v = torch.cat([self.dir_v, new_dir_v], dim=-2)
            self.mags = torch.cat([self.mags, new_mags], dim=-2)
            self.orig = [torch.cat([old, x], dim=-2) for old, x in zip(self.orig, new_orig)]
            self.retained = torch.cat([self.retained, retained], dim=-1)
        self.chunks.append((n, k))

    # -- bookkeeping --------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.dir_k, self.dir_v, self.mags, self.retained) if t is not None]
        return out + list(self.orig or []) + list(self.buffer or [])

    def nbytes(self) -> int:
        """Bytes stored: merged directions, magnitudes, retained originals and flags, the unmerged buffer."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn) -> None:
        """Apply `fn` to every per-sequence tensor (select, reorder, repeat rows)."""
        for name in ("dir_k", "dir_v", "mags", "retained", "buffer_valid"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        if self.orig is not None:
            self.orig = [fn(t) for t in self.orig]
        if self.buffer is not None:
            self.buffer = [fn(t) for t in self.buffer]

    @staticmethod
    def predicted_bytes(
        settings: MiniCacheSettings, lengths, heads: int, dim: int, dtype_bytes: int, sliding_window: int | None = None
    ) -> int:
        """Bytes of one sequence's pair storage after forwards adding `lengths` tokens each (no padding)."""
        chunks: list[tuple[int, int]] = []
        buffered = 0
        for q in lengths:
            buffered += q

            def trim():
                nonlocal buffered
                if sliding_window is None:
                    return
                excess = sum(n for n, _ in chunks) + buffered - (sliding_window - 1)
                while chunks and excess >= chunks[0][0]:
                    excess -= chunks.pop(0)[0]
                if not chunks and excess > 0:
                    buffered -= min(excess, buffered)

            trim()
            if (q > 1 or buffered >= settings.merge_interval) and buffered:
                step = buffered if sliding_window is None else settings.merge_interval
                for s in range(0, buffered, step):
                    size = min(step, buffered - s)
                    chunks.append((size, retained_count(size, settings.retain)))
                buffered = 0
                trim()
        merged = sum(n - k for n, k in chunks)
        retained = sum(k for _, k in chunks)
        per_head = (
            merged * (2 * dim + 4) * dtype_bytes
            + retained * 4 * dim * dtype_bytes
            + (merged + retained) * 1
            + buffered * 4 * dim * dtype_bytes
        )
        return heads * per_head


class MiniCacheLayer(DynamicLayer):
    """The slot of one layer of a merged pair: `which` 0 (first) or 1 (second); both hold the same `MergedPair`.
    Batch operations and bytes go through the first layer only (the second would repeat them)."""

    kvshare_method_slot = True
    is_croppable = False

    def __init__(self, pair: MergedPair, which: int, layer_idx: int, sliding_window: int | None, context: dict):
        super().__init__()
        self.pair = pair
        self.which = which
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.context = context  # {"mask2d": the model's 2D padding mask of the current forward}
        self.seen = 0

    def __repr__(self):
        return f"MiniCacheLayer(layer {self.layer_idx}, {'first' if self.which == 0 else 'second'} of its pair)"

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self._reads_split(q):
            keys, values = self._split_read(key_states, value_states)
        else:
            keys, values = self._full_read(self.pair, key_states, value_states)
        if self.which == 0:
            self.pair.pending = (key_states, value_states)
        else:
            if self.pair.pending is None:
                raise RuntimeError(f"layer {self.layer_idx}: the first layer of its MiniCache pair did not run first")
            mask2d = self.context.get("mask2d")
            batch = key_states.shape[0]
            if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and mask2d.shape[-1] >= self.seen + q:
                valid = mask2d[:, self.seen : self.seen + q].to(device=key_states.device, dtype=torch.bool)
                valid = valid.expand(batch, q) if valid.shape[0] != batch else valid
            else:
                valid = torch.ones(batch, q, dtype=torch.bool, device=key_states.device)
            due = q > 1 or self.pair.buffered() + q >= self.pair.settings.merge_interval
            self.pair.commit(key_states, value_states, valid, due)
        self.seen += q
        return keys, values

    def _full_read(self, pair, key_states, value_states):
        """Every held token's K/V as this layer sees them, in stream order, then the new tokens'."""
        held_k, held_v = pair.read(self.which)
        if held_k is not None and self.is_sliding and held_k.shape[-2] > self.sliding_window - 1:
            held_k, held_v = held_k[:, :, -(self.sliding_window - 1) :], held_v[:, :, -(self.sliding_window - 1) :]
        keys = key_states if held_k is None else torch.cat([held_k, key_states], dim=-2)
        values = value_states if held_v is None else torch.cat([held_v, value_states], dim=-2)
        return keys, values

    def _reads_split(self, q: int) -> bool:
        """One decoded token, no padding, full attention, merged tokens held, and kvshare's attention function on
        this layer (sdpa models; not a layer whose K/V a replaced layer reads): attention reads the merged
        directions and this layer's magnitudes as stored, without rebuilding its K/V."""
        mask2d = self.context.get("mask2d")
        return (
            q == 1
            and not self.is_sliding
            and self.layer_idx in self.context.get("split_layers", ())
            and self.pair.dir_k is not None
            and self.pair.dir_k.shape[-2] > 0
            and (mask2d is None or bool(mask2d.all()))
        )

    def _split_read(self, key_states, value_states):
        """The unmerged tokens (retained originals, the buffer, the new token) as K/V for the attention call; the
        merged part goes to `_split_attention` through the context (with the state to rebuild everything in
        stream order, should the call come with a mask)."""
        pair, w = copy.copy(self.pair), self.which  # the state before this forward's commit
        rest_k = [pair.orig[2 * w]] + ([pair.buffer[2 * w]] if pair.buffer is not None else []) + [key_states]
        rest_v = [pair.orig[2 * w + 1]] + ([pair.buffer[2 * w + 1]] if pair.buffer is not None else []) + [value_states]
        self.context["split"][self.layer_idx] = SplitRead(
            pair.dir_k, pair.dir_v, pair.mags[..., w], pair.mags[..., 2 + w], self, pair, key_states, value_states
        )
        return torch.cat(rest_k, dim=-2), torch.cat(rest_v, dim=-2)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.seen + query_length, 0
        window = self.sliding_window
        offset = max(self.seen - window + 1, 0)
        length = window - 1 + query_length if self.seen >= window else self.seen + query_length
        return length, offset

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def held(self) -> int:
        return self.pair.held()

    def nbytes(self) -> int:
        """The pair's bytes, counted once (on its first layer)."""
        return self.pair.nbytes() if self.which == 0 else 0

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        if self.which == 0:
            self.pair.reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("MiniCache merges tokens for good: it cannot be cropped (assisted decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.which == 0:
            self.pair.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.which == 0:
            self.pair.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.which == 0:
            self.pair.map(lambda t: t[indices, ...])


def _use_split_attention(attn, context: dict) -> bool:
    """Give a paired layer's attention its own config naming `SPLIT_ATTENTION` (sdpa models only; the model's
    masks, built from the model's config, stay sdpa's); `MiniCache.detach` restores the shared config."""
    from transformers import AttentionInterface

    if attn.config._attn_implementation != "sdpa" or "_kvshare_config" in attn.__dict__:
        return False
    AttentionInterface.register(SPLIT_ATTENTION, _split_attention)
    own = copy.copy(attn.config)
    own._attn_implementation_internal = SPLIT_ATTENTION
    attn._kvshare_config, attn.config = attn.config, own
    attn._kvshare_minicache = context
    return True


@dataclass
class SplitRead:
    """A decode step's merged part for one layer: directions [batch, kv_heads, merged, dim] and this layer's
    magnitudes [batch, kv_heads, merged]; `layer`, `pair` (the state before the step's commit) and the new K/V
    rebuild everything in stream order when the attention call needs it (`full`)."""

    dir_k: torch.Tensor
    dir_v: torch.Tensor
    mag_k: torch.Tensor
    mag_v: torch.Tensor
    layer: "MiniCacheLayer"
    pair: MergedPair
    key_states: torch.Tensor
    value_states: torch.Tensor

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer._full_read(self.pair, self.key_states, self.value_states)


SPLIT_ATTENTION = "kvshare_minicache_split"


def _split_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, except where the layer's slot handed its merged part over (`MiniCacheLayer._split_read`): then
    softmax over [q . dir_k x |K|, q . k_rest] and the output (p x |V|) . dir_v + p_rest . v_rest, one read of the
    stored directions instead of a rebuilt K/V per step. With a mask (not expected in that case) K/V are rebuilt."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    split = module._kvshare_minicache["split"].pop(module.layer_idx, None)
    if split is not None and (attention_mask is not None or query.shape[2] != 1 or kwargs.get("softcap") is not None):
        key, value = split.full()
        split = None
    if split is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.view(batch, kv_heads, heads // kv_heads, dim)
    merged = torch.matmul(q, split.dir_k.transpose(-1, -2)).mul_(split.mag_k[:, :, None, :])
    rest = torch.matmul(q, key.transpose(-1, -2))
    logits = torch.cat([merged, rest], dim=-1).mul_(module.scaling if scaling is None else scaling)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    n = split.dir_k.shape[-2]
    out = torch.matmul(probs[..., :n] * split.mag_v[:, :, None, :], split.dir_v)
    out = out.add_(torch.matmul(probs[..., n:], value))
    return out.view(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


@register
class MiniCache(KVMethod):
    """`MiniCache(start_layer=None, slerp_t=0.5, retain=0.05, merge_interval=16)`: cross-layer merged K/V (role
    `cache`: it owns the kept layers' slots and combines with layer sharing only)."""

    name = "minicache"
    role = "cache"
    settings_class = MiniCacheSettings
    scored_by_decoding = True  # tokens are merged after the forward that produced them
    causal = False  # a decode step reads merged K/V where a full forward reads the originals

    def __init__(self, settings=None, **kwargs):
        super().__init__(settings, **kwargs)
        self._replaced: frozenset = frozenset()  # layers the applied sharing strategy replaces (set by attach)
        self._open: dict[int, MergedPair] = {}  # second layer -> the pair its first layer's slot just created
        self._context: dict = {"mask2d": None, "split": {}, "split_layers": frozenset()}
        self._handles: dict[int, list] = {}

    def __getstate__(self):
        return {
            **self.__dict__,
            "_open": {},
            "_handles": {},
            "_context": {"mask2d": None, "split": {}, "split_layers": frozenset()},
        }

    def shared_state(self) -> tuple:
        return (self._context,)  # the slots hand the attention function their merged part through it

    def pairs(self, config) -> list[tuple[int, int]]:
        """The pairs merged on a model with `config` (among the layers the last applied strategy keeps)."""
        return pairs(config, self.settings.start_layer, self._replaced)

    def make_layer(self, layer_idx: int, config, storage=None):
        for a, b in self.pairs(config):
            window = layer_window(config, a)
            if layer_idx == a:
                pair = MergedPair(self.settings, window)
                self._open[b] = pair
                return MiniCacheLayer(pair, 0, a, window, self._context)
            if layer_idx == b:
                pair = self._open.pop(b, None)
                if pair is None:
                    raise RuntimeError(f"minicache: layer {b}'s slot was made before its pair's first layer {a}")
                return MiniCacheLayer(pair, 1, b, window, self._context)
        return None  # an unpaired layer keeps transformers' own slot

    # -- hooks: the 2D padding mask of every forward (retention ranks real tokens only) --------------
    def attach(self, model) -> None:
        state = getattr(model, "_kvshare", None)
        strategy = getattr(state, "strategy", None)
        self._replaced = frozenset(strategy.mapping) if strategy is not None else frozenset()
        if not self.pairs(model.config):
            return
        context = self._context

        def record(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            context["mask2d"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        self.detach(model)
        self._handles[id(model)] = [base_model(model).register_forward_pre_hook(record, with_kwargs=True)]
        sources = frozenset(strategy.sources) if strategy is not None else frozenset()
        context["split_layers"] = frozenset(
            attn.layer_idx
            for attn in (layer.self_attn for layer in decoder_layers(model))
            if any(attn.layer_idx in p for p in self.pairs(model.config))
            and attn.layer_idx not in sources  # a replaced layer reads what this layer's update returns
            and _use_split_attention(attn, context)
        )

    def detach(self, model) -> None:
        for h in self._handles.pop(id(model), []):
            h.remove()
        for layer in decoder_layers(model):
            attn = layer.self_attn
            if attn.config._attn_implementation == SPLIT_ATTENTION:
                attn.config = attn.__dict__.pop("_kvshare_config")
                del attn._kvshare_minicache
        self._context.update(mask2d=None, split={}, split_layers=frozenset())

    # -- bytes ----------------------------------------------------------------------------------
    def predicted_layer_bytes(self, layer_idx: int, config, lengths, dtype_bytes: int) -> int:
        lengths = list(lengths)
        for a, b in self.pairs(config):
            if layer_idx == a:
                return MergedPair.predicted_bytes(
                    self.settings, lengths, kv_heads(config), head_dim(config), dtype_bytes, layer_window(config, a)
                )
            if layer_idx == b:
                return 0  # counted with its pair's first layer
        return full_tokens(config, layer_idx, lengths) * kv_token_bytes(config, dtype_bytes)

    # -- the shared test matrix ----------------------------------------------------------------
    @classmethod
    def examples(cls, config) -> list["MiniCache"]:
        return [cls(start_layer=0, retain=0.25, merge_interval=3), cls(retain=0.0, merge_interval=2)]

    @classmethod
    def identity(cls, config, max_length: int) -> "MiniCache":
        return cls(start_layer=num_layers(config))
