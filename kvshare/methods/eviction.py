"""Token eviction as transformers cache layers that really drop tokens.

How eviction fits transformers (nothing in a modeling file is copied or changed):

- Positions. An evicting slot's `get_seq_length()` is the number of tokens it has *seen*, not the
  number it holds, so `position_ids` (and `q_offset` of the mask) stay the true positions. Keys are
  cached after RoPE, so an evicted cache keeps correct keys.
- Masks. `get_mask_sizes(q)` is `(seen + q, 0)`: the model builds its one mask (causal, padding,
  sliding window) over every position seen. Each slot records the stream position of every token it
  keeps, and a pre-hook on the layer's attention hands the attention call that mask's columns at
  the kept positions (followed by the new tokens): causality, left padding and sliding windows come
  out exactly as the model defines them, per layer and per head. While nothing has been evicted the
  model's mask is passed through untouched (and `None`, sdpa's all-visible/`is_causal` fast path,
  stays `None` where it is still right), so with a budget above the length an eviction method is the
  full model, bit for bit.
- Eviction. The attention of a forward runs over the kept tokens plus the new ones (`update`
  returns exactly those); a post-hook on the attention then lets the method score and drop tokens,
  so between forwards a slot holds at most its budget (PyramidInfer: see its module).
- Attention weights (H2O, PyramidInfer) come from the layer's own query and kept keys, computed in
  that post-hook only for the layers whose slot needs them: the query is taken from a hook on
  `q_proj` (normalized and rotated as the model does, kvshare.adapter.query_states), the
  probabilities are recomputed in chunks of queries, and the attention output itself still comes
  from sdpa. With eager attention the weights the layer returns are used instead (nothing recomputed).
- Sharing. A replaced layer reads its source's slot: its attention gets the K/V the source's
  `update` returned in the same forward (kvshare.sharing's tap) and the mask computed for them,
  i.e. the source's kept tokens as the source's method left them. Replaced layers do not score.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..adapter import base_model, cache_of, decoder_layers, layer_window, query_groups, query_states
from .base import KVMethod, MethodSettings

# (batch x query heads x queries) x keys entries per chunk when attention probabilities are recomputed:
# bounds the extra memory to two 8 MiB float32 temporaries
SCORE_CHUNK_ELEMENTS = 1 << 21

# seconds spent scoring (attention probabilities) and evicting, while `timing()` is on
TIMING = {"enabled": False, "score_s": 0.0, "evict_s": 0.0, "forwards": 0}


@contextlib.contextmanager
def timing():
    """`with timing() as t: ...` then t["score_s"], t["evict_s"]: where an eviction method's own time goes."""
    TIMING.update(enabled=True, score_s=0.0, evict_s=0.0, forwards=0)
    try:
        yield TIMING
    finally:
        TIMING["enabled"] = False


@dataclass
class EvictionSettings(MethodSettings):
    """Common settings: `budget` is the number of tokens a layer keeps (H2O, StreamingLLM) or the
    average over layers (PyramidInfer)."""

    budget: int

    def __post_init__(self):
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget!r}")


# below every priority a method gives (H2O's accumulated attention is at most the tokens seen); positions stay
# exact when added to it in float64
NEVER_VISIBLE = 1e15

layer_kind = layer_window  # the sliding window of a layer (None: full attention)


# --------------------------------------------------------------------------------------------
# the cache layer
# --------------------------------------------------------------------------------------------
def _moves(dropped: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, src) slot moves that drop the slots `dropped` ([..., k], ascending) of `n`, keeping the first `m`: each
    freed slot below m gets one kept slot from above it, both in ascending order; the other entries move a top slot
    onto itself (it is dropped with the top)."""
    k = dropped.shape[-1]
    j = torch.arange(k, device=dropped.device)
    above = torch.ones(*dropped.shape[:-1], k + 1, dtype=torch.bool, device=dropped.device)
    above.scatter_(-1, torch.where(dropped >= m, dropped - m, k), False)  # kept slots among the top k
    movers = torch.where(above[..., :k], m + j, n + j).sort(dim=-1).values
    pair = dropped < m  # as many freed slots below m as kept slots above it
    return torch.where(pair, dropped, m + j), torch.where(pair, movers, m + j)


class EvictingLayer(DynamicLayer):
    """A dynamic cache layer whose eviction method drops tokens after each forward.

    Where the kept tokens live. Full-precision K/V sit in buffers allocated for `capacity()` slots
    ([batch, kv_heads, capacity, head_dim]); `keys` / `values` are views of the first `held()` slots. A
    forward writes its new tokens into the free slots after those (nothing held is copied), and dropping
    k tokens moves at most k kept tokens from the end of the held region into the freed slots below it
    (`discard`): decoding past the budget costs a few token copies per step, not a copy of the cache, and
    a layer's buffer stays at its budget plus `spare` slots. The price is that slots are not in stream
    order: `positions` says which token each slot holds, and masks, causality and recency read positions,
    never slot order. The moves are applied when the model's forward ends (`settle`), because a layer
    replaced by this one (sharing) reads, later in the same forward, the K/V this slot's `update` returned.

    State besides K/V, per slot: `positions` [batch, P, held] (the token's stream index; P = kv_heads when
    the method keeps different tokens per head, else 1), `valid` [batch, P, held] (False for padding) and
    the method's scores (`score_names`); and `seen` (tokens seen). Subclasses implement `priority` (and
    `observe` to collect attention).
    """

    kvshare_method_slot = True
    is_croppable = False
    needs_attention = False  # does the method need attention probabilities?
    per_head = False  # does the method keep different tokens in different KV heads?
    spare = 1  # free slots kept beyond the most a layer holds after a selection (the next token's slot)
    grow_slots = 64  # slots added at once when a layer holds more than its budget (it keeps everything)
    slot_names: tuple = ("positions", "valid")  # per-slot state moved with the tokens (plus `score_names`)

    def __init__(self, settings, layer_idx: int, config, budget: int | None = None, storage=None):
        super().__init__()
        self.settings = settings
        # where the kept tokens live: None -> full-precision buffers; else a storage object
        # (kvshare.methods.quantized.QuantizedStorage: codes), while `keys` / `values` stay empty dtype/device stubs
        self.storage = storage
        self.layer_idx = layer_idx
        self.budget = int(settings.budget if budget is None else budget)
        self.sliding_window = layer_kind(config, layer_idx)
        self.is_sliding = self.sliding_window is not None
        self.seen = 0
        self.used = 0  # slots of the K/V buffers holding tokens
        self._kbuf = self._vbuf = None
        self._moves = None  # (src, dst) slot moves of the last selection, applied by `settle`
        self.in_order = True  # slots in stream order (nothing dropped yet, or only the oldest tokens)
        self.padded = False  # has a forward brought padding (then every selection takes the general path)
        self.positions = None
        self.valid = None
        self.evicted = False  # once True, masks are gathered at the kept positions
        self._pending = None
        self.current_mask = None
        self.last_kept: list[int] | None = None  # tokens held after each forward (tests, bytes)

    # -- transformers' layer interface -------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def held(self) -> int:
        """Tokens held now (per sequence and head)."""
        if self.storage is not None:
            return self.storage.held()
        return self.used

    def capacity(self) -> int:
        """Slots the K/V buffers have now (held + free)."""
        return 0 if self._kbuf is None else self._kbuf.shape[2]

    def nbytes(self) -> int:
        """K/V bytes of the tokens held (what `kvshare.cache_bytes` counts; free slots and bookkeeping are in
        `overhead_bytes`)."""
        if self.storage is not None:
            return self.storage.nbytes()
        if self._kbuf is None:
            return 0
        batch, heads, _, dim = self._kbuf.shape
        return 2 * batch * heads * self.used * dim * self._kbuf.element_size()

    # -- storage: full-precision buffers, or the storage object's representation ---------------
    def store(self, key_states, value_states, first: bool):
        """Append the new tokens' K/V (`first`: nothing held yet); return the K/V of everything held."""
        if self.storage is not None:
            self.storage.append(key_states, value_states, first)
            return self.storage.read(self.keys.dtype)
        self.settle()
        if first:
            self.used = 0
        end = self.used + key_states.shape[-2]
        self._reserve(end, key_states)
        self._kbuf[:, :, self.used : end] = key_states
        self._vbuf[:, :, self.used : end] = value_states
        self.used = end
        self._view()
        return self.keys, self.values

    def capacity_target(self) -> int:
        """Slots a buffer keeps between forwards: the most tokens held after a selection, plus `spare`."""
        keep = self.budget if self.sliding_window is None else min(self.budget, self.sliding_window - 1)
        return keep + self.spare

    def _reserve(self, slots: int, like: torch.Tensor) -> None:
        """Make the buffers hold at least `slots` tokens shaped like `like` (keeping what is held)."""
        buf = self._kbuf
        same = (
            buf is not None
            and buf.shape[:2] == like.shape[:2]
            and buf.shape[3] == like.shape[3]
            and (buf.dtype, buf.device) == (like.dtype, like.device)
        )
        if same and buf.shape[2] >= slots:
            return
        target = self.capacity_target()
        cap = 0 if buf is None else buf.shape[2]
        size = max(slots, min(target, 2 * cap)) if slots <= target else slots + self.grow_slots
        self._resize(size, like, keep=self.used if same else 0)

    def _resize(self, size: int, like: torch.Tensor, keep: int) -> None:
        batch, heads, _, dim = like.shape
        kbuf = like.new_empty(batch, heads, size, dim)
        vbuf = like.new_empty(batch, heads, size, dim)
        if keep:
            kbuf[:, :, :keep] = self._kbuf[:, :, :keep]
            vbuf[:, :, :keep] = self._vbuf[:, :, :keep]
        self._kbuf, self._vbuf = kbuf, vbuf

    def _view(self) -> None:
        self.keys = self._kbuf[:, :, : self.used]
        self.values = self._vbuf[:, :, : self.used]

    def settle(self) -> None:
        """Apply the last selection's slot moves and give back the slots beyond the capacity target (called
        when the model's forward ends, and before anything is written)."""
        if self._kbuf is None:
            return
        if self._moves is not None:
            src, dst = self._moves
            self._moves = None
            batch, heads, _, dim = self._kbuf.shape
            src = src.expand(batch, heads, -1)[..., None].expand(batch, heads, src.shape[-1], dim)
            dst = dst.expand(batch, heads, -1)[..., None].expand(batch, heads, dst.shape[-1], dim)
            for buf in (self._kbuf, self._vbuf):
                buf.scatter_(2, dst, buf.gather(2, src))
        target = self.capacity_target()
        allowed = target if self.used <= target - self.spare else self.used + self.grow_slots
        if self.capacity() > allowed:
            self._resize(allowed, self._kbuf, keep=self.used)
        self._view()

    def held_keys(self) -> torch.Tensor:
        """[batch, kv_heads, held, head_dim]: the keys attention reads (scoring recomputes from them)."""
        return self.keys if self.storage is None else self.storage.read_keys(self.keys.dtype)

    def discard(self, idx: torch.Tensor) -> None:
        """Drop the held tokens in slots `idx` ([batch, P, k], distinct in each row). The held region shrinks
        to its first `held - k` slots: each freed slot below that gets one kept token from the slots above it,
        in ascending order, so only those tokens move (the moves of K/V wait for `settle`)."""
        k = idx.shape[-1]
        if k == 0:
            return
        n = self.held()
        m = n - k
        if k == 1 and not self.in_order:  # a decode step: the last slot moves into the freed one (or onto itself)
            dst, src = idx, torch.full_like(idx, m)
        else:
            dropped = idx.sort(dim=-1).values
            if self.in_order and int(dropped[..., -1].max()) < k:  # the oldest tokens of slots in stream order
                self._drop_first(k)
                return
            self.in_order = False
            dst, src = _moves(dropped, n, m)
        for name in self.slot_names + self.score_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                s, d = src.expand(t.shape[0], t.shape[1], k), dst.expand(t.shape[0], t.shape[1], k)
                t.scatter_(-1, d, t.gather(-1, s))
                setattr(self, name, t[..., :m])
        if self.storage is not None:
            full = torch.arange(n, device=idx.device).expand(*idx.shape[:-1], n).clone()
            self.storage.gather(full.scatter_(-1, dst, src)[..., :m])
        else:
            if self._moves is not None:
                self.settle()
            self._moves = (src, dst)
            self.used = m
        self.evicted = True

    def _drop_first(self, k: int) -> None:
        """Drop the first `k` slots and keep stream order, as transformers' sliding-window layer does (a copy of
        what is kept, into new buffers: the old ones stay as this forward's `update` returned them)."""
        n = self.held()
        for name in self.slot_names + self.score_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                setattr(self, name, t[..., k:])
        if self.storage is not None:
            self.storage.map(lambda t: t[:, :, k:])
        else:
            self.settle()
            kept_k, kept_v = self._kbuf[:, :, k:n], self._vbuf[:, :, k:n]
            self._resize(max(n - k, self.capacity_target()), kept_k, keep=0)  # room for the next step's token
            self._kbuf[:, :, : n - k], self._vbuf[:, :, : n - k] = kept_k, kept_v
            self.used = n - k
            self._view()
        self.evicted = True

    def reset(self) -> None:
        super().reset()
        if self.storage is not None:
            self.storage.reset()
        self.in_order = True
        self.padded = False
        self.seen = self.used = 0
        self._kbuf = self._vbuf = self._moves = None
        self.positions = self.valid = None
        self.evicted = False
        self._pending = self.current_mask = None
        self._reset_scores()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            f"{type(self).__name__} drops tokens for good: it cannot be cropped (assisted decoding)"
        )

    def _index_state(self, fn) -> None:
        if self.storage is not None:
            self.storage.map(fn)
        else:
            self.settle()
            self._kbuf, self._vbuf = fn(self.keys), fn(self.values)
            self._view()
        for name in self.slot_names + self.score_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.held():
            self._index_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.held():
            self._index_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.held():
            self._index_state(lambda t: t[indices, ...])

    def overhead_bytes(self) -> int:
        """Bookkeeping beside the K/V of held tokens: free buffer slots, positions, padding flags, scores."""
        total = 0 if self.storage is None else self.storage.spare_bytes()
        if self._kbuf is not None:
            batch, heads, cap, dim = self._kbuf.shape
            total += 2 * batch * heads * (cap - self.used) * dim * self._kbuf.element_size()
        for name in self.slot_names + self.score_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total

    # -- one forward: begin (pre-hook) -> update (the model) -> end (post-hook) ---------------
    def begin(self, batch: int, q_len: int, mask, mask2d, device, impl: str, memo: dict | None = None):
        """Before the layer's attention: note the new tokens, return the mask for this layer. `memo` (one dict per
        forward) shares the new tokens' positions and padding flags between the layers of a forward."""
        start = self.seen
        key = (start, q_len, batch)
        if memo is not None and key in memo:
            new_pos, new_valid, padded = memo[key]
        else:
            new_pos = torch.arange(start, start + q_len, device=device)
            padded = False
            if mask2d is not None and mask2d.dim() == 2 and mask2d.shape[-1] >= start + q_len:
                new_valid = mask2d[:, start : start + q_len].to(device=device, dtype=torch.bool)
                padded = not bool(new_valid.all())
            else:
                new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
            if new_valid.shape[0] != batch:
                new_valid = new_valid.expand(batch, q_len)
            if memo is not None:
                memo[key] = (new_pos, new_valid, padded)
        self.padded = self.padded or padded
        self._pending = (new_pos, new_valid)
        self.current_mask = self._layer_mask(batch, q_len, new_pos, mask, impl)
        return self.current_mask

    def _layer_mask(self, batch, q_len, new_pos, mask, impl):
        if not self.evicted or self.positions is None:
            return mask  # every token seen is held: the model's own mask is exact
        if mask is None and q_len == 1:
            return None  # sdpa skipped the mask (no padding) and one query sees every token held
        kept = self.positions.shape[-1]
        heads = self.positions.shape[1]
        idx = torch.cat([self.positions, new_pos.view(1, 1, -1).expand(batch, heads, q_len)], dim=-1)
        if mask is None:  # sdpa skipped the mask: no padding
            allowed = idx[:, :, None, :] <= new_pos.view(1, 1, -1, 1)
            if self.sliding_window is not None:
                allowed &= new_pos.view(1, 1, -1, 1) - idx[:, :, None, :] < self.sliding_window
            out = (
                allowed
                if impl != "eager"
                else torch.zeros(allowed.shape, dtype=self.keys.dtype, device=allowed.device).masked_fill(
                    ~allowed, torch.finfo(self.keys.dtype).min
                )
            )
        else:
            if mask.dim() != 4 or mask.shape[-1] != self.seen + q_len:
                raise RuntimeError(
                    f"layer {self.layer_idx}: expected a mask over all {self.seen + q_len} positions seen, got shape "
                    f"{tuple(mask.shape)} (a custom 4D mask cannot be combined with token eviction)"
                )
            rows = mask.shape[-2]
            full = mask.expand(batch, heads, rows, mask.shape[-1])
            out = full.gather(-1, idx[:, :, None, :].expand(batch, heads, rows, kept + q_len))
        if heads > 1:  # per-head kept sets: one mask per query head
            out = out.repeat_interleave(self.num_key_value_groups, dim=1)
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.num_kv_heads = key_states.shape[1]
        batch, _, q_len, _ = key_states.shape
        if self._pending is None:  # called outside a hooked forward: every new token is valid
            self._pending = (
                torch.arange(self.seen, self.seen + q_len, device=key_states.device),
                torch.ones(batch, q_len, dtype=torch.bool, device=key_states.device),
            )
        new_pos, new_valid = self._pending
        heads = self.num_kv_heads if self.per_head else 1
        pos = new_pos.view(1, 1, -1).expand(batch, heads, q_len)
        val = new_valid.view(batch, 1, q_len).expand(batch, heads, q_len)
        first = self.positions is None or self.positions.numel() == 0
        keys, values = self.store(key_states, value_states, first)
        if first:  # own copies: slot state is moved in place (`discard`)
            self.positions, self.valid = pos.clone(), val.clone()
        else:
            self.positions = torch.cat([self.positions, pos], dim=-1)
            self.valid = torch.cat([self.valid, val], dim=-1)
        self._grow_scores(batch, heads, q_len)
        self.appended(new_valid, first)
        self.seen += q_len
        return keys, values

    @torch.no_grad()
    def end(self, query=None, weights=None, scaling: float | None = None) -> None:
        """After the layer's attention: let the method observe it, then drop tokens."""
        if self._pending is None:
            return
        new_pos, new_valid = self._pending
        self._pending = None
        timed = TIMING["enabled"]
        t0 = time.perf_counter() if timed else 0.0
        if self.needs_attention:
            self.observe(query, weights, scaling, new_pos, new_valid)
        t1 = time.perf_counter() if timed else 0.0
        self.evict()
        self.last_kept = self.held()
        if timed:
            TIMING["score_s"] += t1 - t0
            TIMING["evict_s"] += time.perf_counter() - t1
            TIMING["forwards"] += 1

    # -- attention probabilities -------------------------------------------------------------
    def allowed(self, q_pos: torch.Tensor) -> torch.Tensor:
        """[batch, P, q, kept]: which held tokens each query (at stream positions `q_pos`) may see."""
        ok = self.valid[:, :, None, :] & (self.positions[:, :, None, :] <= q_pos.view(1, 1, -1, 1))
        if self.sliding_window is not None:
            ok &= q_pos.view(1, 1, -1, 1) - self.positions[:, :, None, :] < self.sliding_window
        return ok

    def attention_sums(self, query, weights, scaling, rows: slice, new_pos, new_valid) -> torch.Tensor:
        """Attention received by every held token, summed over the query rows `rows` of this forward
        that are not padding and over the query heads of each KV head: [batch, kv_heads, held] (float32)."""
        keys = self.held_keys()
        batch, kv_heads, held, dim = keys.shape
        row_valid = new_valid[:, rows].to(torch.float32)  # [batch, r]
        q_pos = new_pos[rows]
        if weights is not None:  # eager: the probabilities the layer used
            w = weights[:, :, rows, :].to(torch.float32)
            w = w * row_valid[:, None, :, None]
            return w.sum(dim=2).view(batch, kv_heads, -1, held).sum(dim=2)
        q = query[:, :, rows, :]
        n_q_heads = q.shape[1]
        group = n_q_heads // kv_heads
        r = q.shape[2]
        q = q.reshape(batch, kv_heads, group * r, dim)  # query heads of one KV head are adjacent
        ok = self.allowed(q_pos)  # [batch, P, r, held]
        ok = ok.expand(batch, kv_heads, r, held)
        total = torch.zeros(batch, kv_heads, held, dtype=torch.float32, device=self.keys.device)
        step = max(1, SCORE_CHUNK_ELEMENTS // max(1, batch * n_q_heads * held))
        keys_t = keys.transpose(-1, -2)
        for s in range(0, r, step):
            e = min(r, s + step)
            qs = q.view(batch, kv_heads, group, r, dim)[:, :, :, s:e].reshape(batch, kv_heads, group * (e - s), dim)
            logits = (qs @ keys_t).to(torch.float32).mul_(scaling)
            logits = logits.view(batch, kv_heads, group, e - s, held)
            logits.masked_fill_(~ok[:, :, None, s:e, :], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            del logits
            probs.nan_to_num_(0.0).mul_(row_valid[:, None, None, s:e, None])  # fully masked (padding) rows: zeros
            total += probs.sum(dim=(2, 3))
            del probs
        return total

    # -- selection ---------------------------------------------------------------------------
    def keep_count(self) -> int:
        held = self.held()
        keep = min(self.budget, held)
        if self.sliding_window is not None:
            keep = min(keep, self.sliding_window - 1)  # older tokens are never visible again
        return keep

    def out_of_window(self) -> torch.Tensor | None:
        if self.sliding_window is None:
            return None
        return self.positions <= self.seen - self.sliding_window

    def evict(self) -> None:
        if not self.should_select():
            self.drop_out_of_window()
            return
        keep = self.keep_count()
        if keep < self.held():
            self.select(keep)
        self.selected()

    def drop_out_of_window(self) -> None:
        """Between selections, still drop what a sliding window will never show again (keeping a
        rectangular cache: a head with fewer visible tokens keeps the newest hidden ones as filler)."""
        if self.sliding_window is None or self.held() <= self.sliding_window - 1:
            return
        self.discard(self.lowest(self.positions, self.held() - (self.sliding_window - 1)))

    def select(self, keep: int) -> None:
        drop = self.held() - keep
        if drop == 1 and not self.padded and self.sliding_window is None:
            self.discard(self.drop_one())  # a decode step: nothing is padding or out of a window
            return
        self.discard(self.lowest(self.ranked(), drop))

    def drop_one(self) -> torch.Tensor:
        """[batch, P, 1]: the slot of the lowest priority, where no token is padding or out of a window (a method
        with a cheaper rule for one token overrides it)."""
        return self.lowest(self.priority(), 1)

    def ranked(self) -> torch.Tensor:
        """`priority()` with padding and tokens out of the window first, the oldest of them first (no ties among
        them, so slots in stream order drop a prefix and stay in order)."""
        priority = self.priority().to(torch.float64)
        gone = ~self.valid
        oow = self.out_of_window()
        if oow is not None:
            gone = gone | oow
        return torch.where(gone, self.positions.to(torch.float64) - NEVER_VISIBLE, priority)

    @staticmethod
    def lowest(priority: torch.Tensor, count: int) -> torch.Tensor:
        """[batch, P, count]: the slots of the `count` lowest priorities in each row (ties: any of them)."""
        return torch.topk(priority, count, dim=-1, largest=False, sorted=False).indices

    def recent_mask(self, count: int) -> torch.Tensor:
        """[batch, P, held]: the held tokens among the `count` most recent ones seen (by position: slots are not
        in stream order)."""
        return self.positions >= self.seen - count

    # -- what an eviction method defines -----------------------------------------------------
    score_names: tuple = ()

    def _reset_scores(self) -> None:
        for name in self.score_names:
            setattr(self, name, None)

    def _grow_scores(self, batch: int, heads: int, q_len: int) -> None:
        for name in self.score_names:
            t = getattr(self, name, None)
            zeros = torch.zeros(batch, self.num_kv_heads, q_len, dtype=torch.float32, device=self.keys.device)
            setattr(self, name, zeros if t is None else torch.cat([t, zeros], dim=-1))

    def appended(self, new_valid: torch.Tensor, first: bool) -> None:
        """Called after new tokens got their slots (`new_valid` [batch, q]): per-slot state of a method."""

    def observe(self, query, weights, scaling, new_pos, new_valid) -> None:
        raise NotImplementedError

    def should_select(self) -> bool:
        return True

    def selected(self) -> None:
        pass

    def priority(self) -> torch.Tensor:
        """[batch, P, held]: higher is kept first (padding and out-of-window tokens are handled here)."""
        raise NotImplementedError

    @classmethod
    def predicted_held(cls, settings, budget: int, lengths, sliding_window: int | None = None) -> int:
        """Tokens held after forwards that add `lengths` tokens each (no padding), without running anything."""
        held = 0
        for n in lengths:
            held = min(held + n, budget)
        if sliding_window is not None:
            held = min(held, sliding_window - 1)
        return held


# --------------------------------------------------------------------------------------------
# the eviction method (a kvshare.methods KVMethod) and its hooks
# --------------------------------------------------------------------------------------------
class EvictionMethod(KVMethod):
    """Token eviction as a kvshare method (role `eviction`): `make_layer(i, config)` gives kept layer i its
    evicting slot; `attach(model)` adds the hooks that feed masks, padding and attention to the slots;
    `detach(model)` removes them. With a storage method in the same composition, the slot holds that
    storage (e.g. codes) for its kept tokens."""

    name = "eviction"
    role = "eviction"
    settings_class = EvictionSettings
    layer_class = EvictingLayer
    scored_by_decoding = True  # tokens are dropped after each forward: one-pass perplexity would not see it
    causal = False  # what a decode step sees depends on what earlier forwards dropped: decoding is the semantics

    def __init__(self, settings=None, **kwargs):
        super().__init__(settings, **kwargs)
        self._handles: dict[int, list] = {}

    def __getstate__(self):  # hook handles belong to a live model, not to the method's description
        return {**self.__dict__, "_handles": {}}

    @property
    def budget(self) -> int:
        return self.settings.budget

    def layer_budget(self, layer_idx: int, num_layers: int) -> int:
        return self.settings.budget

    def make_layer(self, layer_idx: int, config, storage=None):
        n = config.get_text_config().num_hidden_layers
        layer = self.layer_class(
            self.settings, layer_idx, config, budget=self.layer_budget(layer_idx, n), storage=storage
        )
        layer.num_key_value_groups = query_groups(config)
        layer.num_kv_heads = config.get_text_config().num_key_value_heads
        return layer

    def predicted_tokens(self, layer_idx: int, config, lengths) -> int:
        """Tokens layer `layer_idx` holds per sequence after forwards adding `lengths` tokens (no padding)."""
        n = config.get_text_config().num_hidden_layers
        return self.layer_class.predicted_held(
            self.settings, self.layer_budget(layer_idx, n), list(lengths), layer_kind(config, layer_idx)
        )

    # -- the shared test matrix ----------------------------------------------------------------
    @classmethod
    def examples(cls, config) -> list["EvictionMethod"]:
        return [cls(budget=6)]

    @classmethod
    def identity(cls, config, max_length: int) -> "EvictionMethod":
        return cls(budget=max_length + 1)

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model) -> None:
        if id(model) in self._handles:
            self.detach(model)
        base = base_model(model)
        ctx: dict = {"mask2d": None, "queries": {}, "begin": {}}
        handles = [
            base.register_forward_pre_hook(_record_padding(ctx), with_kwargs=True),
            base.register_forward_hook(_settle_slots, with_kwargs=True),
        ]
        for decoder_layer in decoder_layers(model):
            attn = decoder_layer.self_attn
            replaced = getattr(attn, "_kvshare_source", None) is not None
            handles.append(attn.register_forward_pre_hook(_before_attention(ctx), with_kwargs=True))
            if not replaced:
                handles.append(attn.register_forward_hook(_after_attention(ctx), with_kwargs=True))
                if self.layer_class.needs_attention:
                    handles.append(attn.q_proj.register_forward_hook(_capture_query(ctx, attn.layer_idx)))
                _use_scored_attention(attn)
        self._handles[id(model)] = handles

    def detach(self, model) -> None:
        for h in self._handles.pop(id(model), []):
            h.remove()
        for decoder_layer in decoder_layers(model):
            attn = decoder_layer.self_attn
            if attn.config._attn_implementation == SCORED_ATTENTION:
                attn.config = attn.__dict__.pop("_kvshare_config")


def _slot(cache, idx):
    if cache is None or not hasattr(cache, "layers") or idx >= len(cache.layers):
        return None
    layer = cache.layers[idx]
    return layer if getattr(layer, "kvshare_method_slot", False) and isinstance(layer, EvictingLayer) else None


def _record_padding(ctx):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ctx["mask2d"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ctx["queries"].clear()
        ctx["begin"].clear()

    return hook


def _before_attention(ctx):
    def hook(module, args, kwargs):
        cache = cache_of(kwargs)
        source = getattr(module, "_kvshare_source", None)
        slot = _slot(cache, module.layer_idx if source is None else source)
        if slot is None:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if source is None:
            impl = module.config._attn_implementation or "eager"
            impl = "sdpa" if impl == SCORED_ATTENTION else impl
            # one decoded query of a scoring slot whose slots left stream order: the attention returns its
            # probabilities (until then sdpa runs as in the plain model: a budget above the length stays bit-exact)
            module._kvshare_weights = bool(not slot.in_order and hidden.shape[1] == 1)
            if impl not in ("sdpa", "eager"):
                raise NotImplementedError(f"token eviction supports sdpa and eager attention, not {impl!r}")
            mask = slot.begin(
                hidden.shape[0],
                hidden.shape[1],
                kwargs.get("attention_mask"),
                ctx["mask2d"],
                hidden.device,
                impl,
                memo=ctx["begin"],
            )
        else:  # a replaced layer attends over what its source's update returned: the source's mask
            mask = slot.current_mask
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


# --------------------------------------------------------------------------------------------
# attention that also returns its probabilities (H2O, PyramidInfer, SimLayerKV score with them)
# --------------------------------------------------------------------------------------------
SCORED_ATTENTION = "kvshare_sdpa_scored"


def _use_scored_attention(attn) -> None:
    """Give a scoring layer's attention its own config naming `SCORED_ATTENTION` (the model's masks, built from
    the model's config, stay sdpa's); `detach` restores the shared config."""
    from transformers import AttentionInterface

    if attn.config._attn_implementation != "sdpa" or "_kvshare_config" in attn.__dict__:
        return
    AttentionInterface.register(SCORED_ATTENTION, _scored_attention)
    own = copy.copy(attn.config)
    own._attn_implementation_internal = SCORED_ATTENTION
    attn._kvshare_config, attn.config = attn.config, own


def _scored_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, except for one decoded query of a slot that dropped tokens: there softmax(q k^T) v is computed here and
    the probabilities are returned, so the method scores with them instead of reading every key a second time."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not getattr(module, "_kvshare_weights", False) or kwargs.get("softcap") is not None or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads, held = key.shape[1], key.shape[2]
    group = heads // kv_heads
    logits = torch.matmul(query.view(batch, kv_heads, group, dim), key.transpose(-1, -2))  # [b, kv, group, held]
    logits.mul_(module.scaling if scaling is None else scaling)
    if attention_mask is not None:  # [b or 1, 1 or heads, 1, held]: per query head when heads keep different tokens
        mask = attention_mask.reshape(attention_mask.shape[0], -1, 1, held)
        mask = mask.view(mask.shape[0], kv_heads, group, held) if mask.shape[1] == heads else mask
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv, group, dim]
    return out.view(batch, heads, 1, dim).transpose(1, 2).contiguous(), probs.view(batch, heads, 1, held)


def _settle_slots(module, args, kwargs, output):
    """After the model's forward (no replaced layer still reads this forward's K/V): apply the slots' moves."""
    cache = cache_of(kwargs)
    if cache is None:
        cache = getattr(output, "past_key_values", None)
    for layer in getattr(cache, "layers", ()):
        if isinstance(layer, EvictingLayer):
            layer.settle()


def _capture_query(ctx, layer_idx):
    def hook(module, args, output):
        ctx["queries"][layer_idx] = output

    return hook


def _after_attention(ctx):
    def hook(module, args, kwargs, output):
        slot = _slot(cache_of(kwargs), module.layer_idx)
        if slot is None:
            return None
        query = weights = None
        if slot.needs_attention:
            out_w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if isinstance(out_w, torch.Tensor) and out_w.shape[-1] == slot.held():
                weights = out_w
            else:
                projected = ctx["queries"].pop(module.layer_idx, None)
                if projected is None:
                    raise RuntimeError(f"layer {module.layer_idx}: the method needs the query but q_proj was not seen")
                query = query_states(module, projected, kwargs["position_embeddings"])
        ctx["queries"].pop(module.layer_idx, None)
        slot.end(query=query, weights=weights, scaling=module.scaling)
        return None

    return hook
