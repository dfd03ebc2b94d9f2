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
    def priority(self) -> torch.Tensor:
        # sinks first (the first `sink` real tokens), then the most recent tokens, then the rest by recency
        rank = self.valid.cumsum(-1)
        sink = self.valid & (rank <= self.settings.sink)
        recent = self.recent_mask(self.budget - self.settings.sink)
        order = self.positions.to(torch.float64) / (self.seen + 1)  # in [0, 1): later is higher
        return order + 1.0 * recent + 2.0 * sink


@register
class StreamingLLM(EvictionMethod):
    """`StreamingLLM(budget=256, sink=4)`: sinks + recent window, `budget` tokens per layer."""

    name = "streamingllm"
    settings_class = StreamingLLMSettings
    layer_class = StreamingLLMLayer

    @classmethod
    def examples(cls, config) -> list["StreamingLLM"]:
        return [cls(budget=6, sink=2)]
