"""StreamingLLM (Xiao et al., 2024): attention sinks plus a recent window.

Each layer keeps the first `sink` real tokens of every sequence (left padding is not a sink) and the
most recent `budget - sink` tokens; everything between is dropped after each forward. The same
tokens are kept in every head, no attention weights are needed, and positions stay the tokens'
true positions (the original re-indexes positions inside the cache; with RoPE applied before
caching, kvshare keeps the true ones, like transformers' own sink caches did).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .eviction import EvictingLayer, EvictionMethod, EvictionSettings


@dataclass
class StreamingLLMSettings(EvictionSettings):
    budget: int
    sink: int = 4  # attention-sink tokens kept at the start of every sequence

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.sink < self.budget:
            raise ValueError(f"StreamingLLM needs 0 <= sink < budget, got sink={self.sink}, budget={self.budget}")


class StreamingLLMLayer(EvictingLayer):
    """`sink` [batch, 1, held] marks the slots holding a sequence's first `sink` real tokens; `real_seen` [batch]
    counts the real (non-padding) tokens seen, so a sink is known when its token arrives."""

    slot_names = EvictingLayer.slot_names + ("sink",)

    def __init__(self, settings, layer_idx, config, budget=None, storage=None):
        super().__init__(settings, layer_idx, config, budget, storage)
        self.sink = self.real_seen = None
        self.sinks_done = False

    def reset(self) -> None:
        super().reset()
        self.sink = self.real_seen = None
        self.sinks_done = False

    def appended(self, new_valid: torch.Tensor, first: bool) -> None:
        batch = new_valid.shape[0]
        if not first and self.sinks_done:  # every sequence has its sinks: no new token is one
            new = torch.zeros(batch, 1, new_valid.shape[1], dtype=torch.bool, device=new_valid.device)
            self.sink = torch.cat([self.sink, new], dim=-1)
            return
        before = 0 if first or self.real_seen is None else self.real_seen[:, None]
        rank = new_valid.to(torch.int64).cumsum(-1) + before  # [batch, q]: 1 for a sequence's first real token
        new = (new_valid & (rank <= self.settings.sink)).view(batch, 1, -1)
        self.sink = new if first or self.sink is None else torch.cat([self.sink, new], dim=-1)
        self.real_seen = rank[:, -1]
        self.sinks_done = bool((self.real_seen >= self.settings.sink).all())

    def _index_state(self, fn) -> None:
        super()._index_state(fn)
        if isinstance(self.real_seen, torch.Tensor):
            self.real_seen = fn(self.real_seen)

    def drop_one(self) -> torch.Tensor:
        # one token over the budget: the oldest that is not a sink (the recent window is the newest ones)
        return self.positions.masked_fill(self.sink, self.seen).argmin(dim=-1, keepdim=True)

    def priority(self) -> torch.Tensor:
        # sinks first, then the most recent tokens, then the rest by recency
        recent = self.recent_mask(self.budget - self.settings.sink)
        order = self.positions.to(torch.float64) / (self.seen + 1)  # in [0, 1): later is higher
        return order + 1.0 * recent + 2.0 * self.sink


@register
class StreamingLLM(EvictionMethod):
    """`StreamingLLM(budget=256, sink=4)`: sinks + recent window, `budget` tokens per layer."""

    name = "streamingllm"
    settings_class = StreamingLLMSettings
    layer_class = StreamingLLMLayer

    @classmethod
    def examples(cls, config) -> list["StreamingLLM"]:
        return [cls(budget=6, sink=2)]
