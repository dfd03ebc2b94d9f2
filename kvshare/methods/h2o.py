"""H2O (Zhang et al., 2023): heavy hitters by accumulated attention plus a recent window.

Every held token accumulates the attention it receives from every later query of its layer (summed
over the query heads that share its KV head). After each forward (the prefill and every decode
step) a layer keeps its `recent` most recent tokens and, of the others, the `budget - recent` with
the highest accumulated attention; the rest are dropped. Selection is per KV head, as in the
paper (per head; grouped-query models pool the heads that share a KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .eviction import EvictingLayer, EvictionMethod, EvictionSettings


@dataclass
class H2OSettings(EvictionSettings):
    budget: int
    recent_ratio: float = 0.5  # share of the budget kept as the recent window (the paper's 50/50)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")

    @property
    def recent(self) -> int:
        return int(round(self.budget * self.recent_ratio))


class H2OLayer(EvictingLayer):
    needs_attention = True
    per_head = True
    score_names = ("scores",)

    def observe(self, query, weights, scaling, new_pos, new_valid) -> None:
        self.scores = self.scores + self.attention_sums(query, weights, scaling, slice(None), new_pos, new_valid)

    def priority(self) -> torch.Tensor:
        recent = self.recent_mask(min(self.settings.recent, self.budget))
        return self.scores.to(torch.float64).masked_fill(recent, float("inf"))

    def drop_one(self) -> torch.Tensor:
        # one token over the budget: the least attended outside the recent window (accumulated in float32)
        recent = self.recent_mask(min(self.settings.recent, self.budget))
        return self.scores.masked_fill(recent, float("inf")).argmin(dim=-1, keepdim=True)


@register
class H2O(EvictionMethod):
    """`H2O(budget=256, recent_ratio=0.5)`: heavy hitters + recent window, `budget` tokens per layer."""

    name = "h2o"
    settings_class = H2OSettings
    layer_class = H2OLayer
