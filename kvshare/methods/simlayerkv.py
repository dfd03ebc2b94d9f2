"""SimLayerKV (Zhang et al., 2024, arXiv 2410.13846): "lazy" layers keep only the initial and the recent tokens.

The rule followed (the paper's prefill variant, SimLayerKV-prefill): at the end of the first forward of a
sequence (the prefill), each layer measures where its last `query_window` queries put their attention. The
share of that attention that lands on the initial `sink` tokens plus the `recent` most recent tokens --
averaged over those queries and over every query head -- is the layer's laziness score. A layer whose score
is at least `threshold` is lazy for that sequence: from then on it keeps only those tokens (sink + recent
window, StreamingLLM-style, re-selected after every decode step). Every other layer keeps everything.

Details and where they depart from the official code (github.com/sail-sg/SimLayerKV):
- The recent set scored is the set a lazy layer keeps (the last `recent` tokens of the prompt), as in
  kvpress's SimLayerKVPress; the official prefill code counts, per query, the 512 tokens before it. With
  `query_window` much smaller than `recent` the two differ only at the window's far edge.
- `threshold` > 1 never makes a layer lazy: the full model exactly (nothing is dropped, the model's own mask
  is passed through). `threshold` <= 0 makes every layer lazy without scoring anything.
- Per sequence: each row of a batch gets its own decision (left padding is neither a query nor a sink). The
  cache is rectangular, so a layer lazy for *every* row really drops tokens, while a layer lazy for some rows
  only hides the dropped tokens from those rows (they stay stored for the rows that need them): each row
  attends exactly as it would alone; bytes fall where a layer is lazy for the whole batch.
- Bytes: which layers are lazy depends on the data, so `SimLayerKV.lazy_layers` (and `decisions`) expose the
  decisions of the last prefill, and `predicted_tokens` is exact for them (or from the settings alone when
  `threshold` > 1 or <= 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..accounting import full_tokens
from ..adapter import kv_heads, query_groups
from .base import MethodSettings, register
from .eviction import EvictionMethod, layer_kind
from .streamingllm import StreamingLLMLayer


@dataclass
class SimLayerKVSettings(MethodSettings):
    threshold: float = 0.9  # lazy when at least this share of the last queries' attention is on sink + recent
    sink: int = 4  # initial tokens a lazy layer keeps
    recent: int = 1024  # most recent tokens a lazy layer keeps
    query_window: int = 32  # last prompt queries whose attention decides

    def __post_init__(self):
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or math.isnan(t):
            raise ValueError(f"threshold must be a number (a share of attention), got {self.threshold!r}")
        for name in ("sink", "recent", "query_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "sink" else 1):
                raise ValueError(
                    f"{name} must be a {'non-negative' if name == 'sink' else 'positive'} integer, got {value!r}"
                )

    @property
    def budget(self) -> int:
        """Tokens a lazy layer keeps: sink + recent."""
        return self.sink + self.recent


class SimLayerKVLayer(StreamingLLMLayer):
    """A layer's slot: everything until it is found lazy, then (per row) the sinks and the recent window.

    `lazy` [batch] (None before the decision) and `share` [batch] hold the decision; `hidden` [batch, 1, held]
    marks tokens stored for other rows but dropped for a lazy row (None when no row hides anything)."""

    needs_attention = True  # the prefill's attention decides; switched off per slot once decided

    def __init__(self, settings, layer_idx, config, budget=None, storage=None, record=None):
        super().__init__(settings, layer_idx, config, budget, storage)
        self.record = record  # the method's `decisions` dict: layer -> {"lazy": [...], "share": [...]}
        self.lazy = None
        self.share = None
        self.hidden = None
        self.needs_attention = 0 < settings.threshold <= 1

    def reset(self) -> None:
        super().reset()
        self.lazy = self.share = self.hidden = None
        self.needs_attention = 0 < self.settings.threshold <= 1

    # -- the decision ---------------------------------------------------------------------------
    def kept_set(self) -> torch.Tensor:
        """[batch, 1, held] bool: the tokens a lazy row keeps now (its sinks and its recent window)."""
        held = self.held()
        keep = self.keep_count()
        priority = self.ranked()
        out = torch.ones(priority.shape[0], 1, held, dtype=torch.bool, device=priority.device)
        return out.scatter_(-1, self.lowest(priority, held - keep), False) & self.valid

    def observe(self, query, weights, scaling, new_pos, new_valid) -> None:
        q_len = new_pos.shape[0]
        rows = slice(max(0, q_len - self.settings.query_window), q_len)
        received = self.attention_sums(query, weights, scaling, rows, new_pos, new_valid).sum(dim=1)  # [batch, held]
        on_kept = (received * self.kept_set()[:, 0].to(received.dtype)).sum(-1)
        total = received.sum(-1)
        share = torch.where(total > 0, on_kept / total.clamp_min(1e-30), torch.zeros_like(total)).clamp(0.0, 1.0)
        self.decide(share >= self.settings.threshold, share)
        self.needs_attention = False

    def decide(self, lazy: torch.Tensor, share: torch.Tensor | None = None) -> None:
        self.lazy = lazy.to(torch.bool)
        self.share = share
        if self.record is not None:
            self.record[self.layer_idx] = {
                "lazy": [bool(x) for x in self.lazy.tolist()],
                "share": None if share is None else [float(x) for x in share.tolist()],
            }

    # -- dropping -----------------------------------------------------------------------------------
    def evict(self) -> None:
        if self.lazy is None:
            batch = self.valid.shape[0]
            t = self.settings.threshold
            if t > 1 or t <= 0:  # decided by the settings alone, nothing scored
                self.decide(torch.full((batch,), t <= 0, dtype=torch.bool, device=self.valid.device))
            else:  # no attention was seen (a forward outside kvshare's hooks): keep everything
                self.drop_out_of_window()
                return
        if bool(self.lazy.all()):
            self.hidden = None
            keep = self.keep_count()
            if keep < self.held():
                self.select(keep)
            else:
                self.drop_out_of_window()
            return
        self.drop_out_of_window()
        if bool(self.lazy.any()):
            self.hidden = self.valid & ~self.kept_set() & self.lazy[:, None, None]
        else:
            self.hidden = None

    def _layer_mask(self, batch, q_len, new_pos, mask, impl):
        out = super()._layer_mask(batch, q_len, new_pos, mask, impl)
        if self.hidden is None or not bool(self.hidden.any()):
            return out
        hide = torch.cat([self.hidden, torch.zeros(batch, 1, q_len, dtype=torch.bool, device=self.hidden.device)], -1)
        hide = hide[:, :, None, :]  # [batch, 1, 1, held + q]
        if out is None:  # the model skipped the mask (sdpa, no padding): build the causal one over held + new
            idx = torch.cat([self.positions, new_pos.view(1, 1, -1).expand(batch, 1, q_len)], dim=-1)
            allowed = idx[:, :, None, :] <= new_pos.view(1, 1, -1, 1)
            if self.sliding_window is not None:
                allowed &= new_pos.view(1, 1, -1, 1) - idx[:, :, None, :] < self.sliding_window
            allowed = allowed & ~hide
            if impl != "eager":
                return allowed
            return torch.zeros(allowed.shape, dtype=self.keys.dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(self.keys.dtype).min
            )
        if out.dtype == torch.bool:
            return out & ~hide
        return out.masked_fill(hide, torch.finfo(out.dtype).min)

    def _index_state(self, fn) -> None:
        super()._index_state(fn)
        for name in ("lazy", "share", "hidden"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))

    def discard(self, idx: torch.Tensor) -> None:
        super().discard(idx)
        self.hidden = None  # recomputed by `evict` for the tokens now held


@register
class SimLayerKV(EvictionMethod):
    """`SimLayerKV(threshold=0.9, sink=4, recent=1024, query_window=32)`: lazy layers keep sink + recent tokens."""

    name = "simlayerkv"
    settings_class = SimLayerKVSettings
    layer_class = SimLayerKVLayer
    scored_by_decoding = True  # lazy layers drop tokens after the prefill: one-pass perplexity would not see it
    causal = False  # the decision is taken on the prefill's last queries: decoding is the semantics

    def __init__(self, settings=None, **kwargs):
        super().__init__(settings, **kwargs)
        self.decisions: dict[int, dict] = {}  # layer -> {"lazy": [per row], "share": [per row]}, last prefill

    def __getstate__(self):
        return {**super().__getstate__(), "decisions": {}}

    def shared_state(self) -> tuple:
        return (self.decisions,)  # the slots record their lazy decisions in it

    def make_layer(self, layer_idx: int, config, storage=None):
        n = config.get_text_config().num_hidden_layers
        layer = self.layer_class(
            self.settings,
            layer_idx,
            config,
            budget=self.layer_budget(layer_idx, n),
            storage=storage,
            record=self.decisions,
        )
        layer.num_key_value_groups = query_groups(config)
        layer.num_kv_heads = kv_heads(config)
        return layer

    @property
    def lazy_layers(self) -> list[int]:
        """Layers lazy for every sequence of the last prefill (those whose slots really dropped tokens)."""
        return sorted(i for i, d in self.decisions.items() if d["lazy"] and all(d["lazy"]))

    def is_lazy(self, layer_idx: int) -> bool:
        """Whether kept layer `layer_idx` holds only sink + recent tokens for every sequence: from the last
        prefill's decision, else from the settings (threshold > 1: never; <= 0: always)."""
        if layer_idx in self.decisions:
            return all(self.decisions[layer_idx]["lazy"])
        t = self.settings.threshold
        if t > 1 or t <= 0:
            return t <= 0
        raise ValueError(
            f"simlayerkv: whether layer {layer_idx} is lazy depends on the data (threshold {t}); "
            "run a prefill first (then `lazy_layers` holds the decisions)"
        )

    def predicted_tokens(self, layer_idx: int, config, lengths) -> int:
        if not self.is_lazy(layer_idx):
            return full_tokens(config, layer_idx, list(lengths))
        return self.layer_class.predicted_held(
            self.settings, self.settings.budget, list(lengths), layer_kind(config, layer_idx)
        )

    # -- the shared test matrix ----------------------------------------------------------------
    @classmethod
    def examples(cls, config) -> list["SimLayerKV"]:
        return [cls(threshold=0.0, sink=2, recent=4, query_window=4)]  # every layer lazy: bytes known from config

    @classmethod
    def identity(cls, config, max_length: int) -> "SimLayerKV":
        return cls(threshold=1.5)
