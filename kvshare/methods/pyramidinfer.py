"""PyramidInfer (Yang et al., 2024): per-layer retention that decays with depth, by recent attention.

Layer l keeps `b_l` tokens, falling linearly with depth from the first to the last layer
(`b_last / b_first = ratio`) and scaled so the average over all layers is `budget` (rounded by
largest remainder: the per-layer budgets sum to exactly `budget * num_layers`).

Which tokens (pivotal contexts): those the most recent queries attend to most. A layer selects at
the end of every multi-token forward (the prefill) and after every `interval` generated tokens;
at a selection it keeps the `window` most recent tokens and, of the others, those with the highest
attention from the queries since the previous selection (at most the last `window` queries of a
forward; summed over the query heads of each KV head). Between two selections new tokens are
simply appended, so a layer holds between `b_l` and `b_l + interval - 1` tokens in decoding; the
measured bytes show that (`interval=1` keeps exactly `b_l`, scoring with the newest query only).
When selections happen depends only on the forwards, never on padding, so each row of a
left-padded batch keeps what it would keep alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register
from .eviction import EvictingLayer, EvictionMethod, EvictionSettings


@dataclass
class PyramidInferSettings(EvictionSettings):
    budget: int  # average tokens kept per layer
    ratio: float = 0.5  # last layer's budget / first layer's
    window: int = 16  # recent queries whose attention ranks the prompt; recent tokens always kept
    interval: int = 8  # generated tokens between two selections in decoding

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio (last layer's budget / first layer's) must be in (0, 1], got {self.ratio}")
        if self.window < 1 or self.interval < 1:
            raise ValueError("window and interval must be >= 1")


def layer_budgets(budget: int, num_layers: int, ratio: float) -> list[int]:
    """Linearly decaying budgets (first / last = 1 / ratio) whose sum is exactly `budget * num_layers`."""
    if num_layers == 1:
        return [budget]
    weights = [1.0 - (1.0 - ratio) * depth / (num_layers - 1) for depth in range(num_layers)]
    total = budget * num_layers
    raw = [total * w / sum(weights) for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(num_layers), key=lambda i: (out[i] - raw[i], i))[: total - sum(out)]:
        out[i] += 1
    return [max(1, b) for b in out]


class PyramidInferLayer(EvictingLayer):
    needs_attention = True
    per_head = True
    score_names = ("recent_attention",)

    def __init__(self, settings, layer_idx, config, budget=None, storage=None):
        super().__init__(settings, layer_idx, config, budget, storage)
        self.spare = settings.interval  # tokens appended between two selections (the last one's slot included)
        self.since = 0  # tokens added since the last selection
        self.point = False  # does this forward end at a selection?

    def reset(self) -> None:
        super().reset()
        self.since = 0
        self.point = False

    def observe(self, query, weights, scaling, new_pos, new_valid) -> None:
        q_len = new_pos.shape[0]
        rows = slice(max(0, q_len - self.settings.window), q_len)  # the most recent queries
        self.recent_attention = self.recent_attention + self.attention_sums(
            query, weights, scaling, rows, new_pos, new_valid
        )
        self.since += q_len
        self.point = q_len > 1 or self.since >= self.settings.interval

    def should_select(self) -> bool:
        return self.point

    def selected(self) -> None:
        self.since = 0
        self.recent_attention = torch.zeros_like(self.recent_attention)

    def priority(self) -> torch.Tensor:
        recent = self.recent_mask(min(self.settings.window, self.budget))
        return self.recent_attention.to(torch.float64).masked_fill(recent, float("inf"))

    @classmethod
    def predicted_held(cls, settings, budget, lengths, sliding_window=None):
        keep_max = budget if sliding_window is None else min(budget, sliding_window - 1)
        held, since = 0, 0
        for n in lengths:
            held += n
            since += n
            if n > 1 or since >= settings.interval:
                held, since = min(held, keep_max), 0
            elif sliding_window is not None:
                held = min(held, sliding_window - 1)
        return held


@register
class PyramidInfer(EvictionMethod):
    """`PyramidInfer(budget=256, ratio=0.5, window=16, interval=8)`: `budget` is the average over layers."""

    name = "pyramidinfer"
    settings_class = PyramidInferSettings
    layer_class = PyramidInferLayer

    def layer_budget(self, layer_idx: int, num_layers: int) -> int:
        return layer_budgets(self.settings.budget, num_layers, self.settings.ratio)[layer_idx]

    @classmethod
    def examples(cls, config) -> list["PyramidInfer"]:
        return [cls(budget=4, window=2, interval=2)]
