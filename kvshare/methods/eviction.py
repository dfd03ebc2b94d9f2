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
import math
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


layer_kind = layer_window  # the sliding window of a layer (None: full attention)


# --------------------------------------------------------------------------------------------
# the cache layer
# --------------------------------------------------------------------------------------------
class EvictingLayer(DynamicLayer):
    """A dynamic cache layer whose eviction method drops tokens after each forward.

    State besides `keys`/`values` ([batch, kv_heads, kept, head_dim]):
    `positions` [batch, P, kept] (stream index of each kept token; P = kv_heads when the method
    keeps different tokens per head, else 1), `valid` [batch, P, kept] (False for padding),
    `seen` (tokens seen). Subclasses implement `priority` (and `observe` to collect attention).
    """

    kvshare_method_slot = True
    is_croppable = False
    needs_attention = False  # does the method need attention probabilities?
    per_head = False  # does the method keep different tokens in different KV heads?

    def __init__(self, settings, layer_idx: int, config, budget: int | None = None, storage=None):
        super().__init__()
        self.settings = settings
        # where the kept tokens live: None -> full-precision `keys` / `values` tensors; else a storage object
        # (kvshare.methods.quantized.QuantizedStorage: codes), while `keys` / `values` stay empty dtype/device stubs
        self.storage = storage
        self.layer_idx = layer_idx
        self.budget = int(settings.budget if budget is None else budget)
        self.sliding_window = layer_kind(config, layer_idx)
        self.is_sliding = self.sliding_window is not None
        self.seen = 0
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
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def nbytes(self) -> int:
        """K/V bytes held (what `kvshare.cache_bytes` counts; bookkeeping is in `overhead_bytes`)."""
        if self.storage is not None:
            return self.storage.nbytes()
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if isinstance(t, torch.Tensor))

    # -- storage: full-precision tensors, or the storage object's representation ----------------
    def store(self, key_states, value_states, first: bool):
        """Append the new tokens' K/V (`first`: nothing held yet); return the K/V of everything held."""
        if self.storage is not None:
            self.storage.append(key_states, value_states, first)
            return self.storage.read(self.keys.dtype)
        if first:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def held_keys(self) -> torch.Tensor:
        """[batch, kv_heads, held, head_dim]: the keys attention reads (scoring recomputes from them)."""
        return self.keys if self.storage is None else self.storage.read_keys(self.keys.dtype)

    def gather_kv(self, idx: torch.Tensor) -> None:
        """Keep the held K/V at `idx` ([batch, P, keep]) only."""
        if self.storage is not None:
            self.storage.gather(idx)
            return
        batch, kv_heads, _, dim = self.keys.shape
        kidx = idx[..., None].expand(batch, kv_heads, idx.shape[-1], dim)
        self.keys = self.keys.gather(2, kidx)
        self.values = self.values.gather(2, kidx)

    def reset(self) -> None:
        super().reset()
        if self.storage is not None:
            self.storage.reset()
        self.seen = 0
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
        tensors = ("keys", "values") if self.storage is None else ()  # with storage, keys/values are empty stubs
        for name in tensors + ("positions", "valid") + self.score_names:
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
        """Bookkeeping beside K/V (positions, padding flags, scores); `layer_bytes` counts K/V only."""
        total = 0
        for name in ("positions", "valid") + self.score_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total

    # -- one forward: begin (pre-hook) -> update (the model) -> end (post-hook) ---------------
    def begin(self, batch: int, q_len: int, mask, mask2d, device, impl: str):
        """Before the layer's attention: note the new tokens, return the mask for this layer."""
        start = self.seen
        new_pos = torch.arange(start, start + q_len, device=device)
        if mask2d is not None and mask2d.dim() == 2 and mask2d.shape[-1] >= start + q_len:
            new_valid = mask2d[:, start : start + q_len].to(device=device, dtype=torch.bool)
        else:
            new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        if new_valid.shape[0] != batch:
            new_valid = new_valid.expand(batch, q_len)
        self._pending = (new_pos, new_valid)
        self.current_mask = self._layer_mask(batch, q_len, new_pos, mask, impl)
        return self.current_mask

    def _layer_mask(self, batch, q_len, new_pos, mask, impl):
        if not self.evicted or self.positions is None:
            return mask  # every token seen is held: the model's own mask is exact
        kept = self.positions.shape[-1]
        heads = self.positions.shape[1]
        idx = torch.cat([self.positions, new_pos.view(1, 1, -1).expand(batch, heads, q_len)], dim=-1)
        if mask is None:
            # sdpa skipped the mask: no padding and, for one query, every past token visible
            if q_len == 1:
                return None
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
        if first:
            self.positions, self.valid = pos.contiguous(), val.contiguous()
        else:
            self.positions = torch.cat([self.positions, pos], dim=-1)
            self.valid = torch.cat([self.valid, val], dim=-1)
        self._grow_scores(batch, heads, q_len)
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
        priority = self.positions.to(torch.float64).masked_fill(self.out_of_window(), -math.inf)
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., : self.sliding_window - 1]
        self.gather(order.sort(dim=-1).values)

    def select(self, keep: int) -> None:
        priority = self.priority().to(torch.float64)
        priority = priority.masked_fill(~self.valid, float("-inf"))  # padding goes first
        oow = self.out_of_window()
        if oow is not None:
            priority = priority.masked_fill(oow, -math.inf)
        order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[..., :keep]
        self.gather(order.sort(dim=-1).values)

    def gather(self, idx: torch.Tensor) -> None:
        """Keep the held tokens at `idx` ([batch, P, keep], ascending) and nothing else."""
        self.gather_kv(idx)
        self.positions = self.positions.gather(-1, idx)
        self.valid = self.valid.gather(-1, idx)
        for name in self.score_names:
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                setattr(
                    self,
                    name,
                    t.gather(-1, idx if t.shape[1] == idx.shape[1] else idx.expand(t.shape[0], t.shape[1], -1)),
                )
        self.evicted = True

    def recent_mask(self, count: int) -> torch.Tensor:
        """[1, 1, held]: the `count` most recent held tokens (held tokens are in stream order)."""
        held = self.held()
        mask = torch.zeros(1, 1, held, dtype=torch.bool, device=self.keys.device)
        if count > 0:
            mask[..., max(0, held - count) :] = True
        return mask

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
        ctx: dict = {"mask2d": None, "queries": {}}
        handles = [base.register_forward_pre_hook(_record_padding(ctx), with_kwargs=True)]
        for decoder_layer in decoder_layers(model):
            attn = decoder_layer.self_attn
            replaced = getattr(attn, "_kvshare_source", None) is not None
            handles.append(attn.register_forward_pre_hook(_before_attention(ctx), with_kwargs=True))
            if not replaced:
                handles.append(attn.register_forward_hook(_after_attention(ctx), with_kwargs=True))
                if self.layer_class.needs_attention:
                    handles.append(attn.q_proj.register_forward_hook(_capture_query(ctx, attn.layer_idx)))
        self._handles[id(model)] = handles

    def detach(self, model) -> None:
        for h in self._handles.pop(id(model), []):
            h.remove()


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
            if impl not in ("sdpa", "eager"):
                raise NotImplementedError(f"token eviction supports sdpa and eager attention, not {impl!r}")
            mask = slot.begin(
                hidden.shape[0], hidden.shape[1], kwargs.get("attention_mask"), ctx["mask2d"], hidden.device, impl
            )
        else:  # a replaced layer attends over what its source's update returned: the source's mask
            mask = slot.current_mask
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


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
