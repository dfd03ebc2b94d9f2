"""KVSharer (Yang et al., 2024) as a kvshare method: some later layers read an earlier layer's K/V.

    kvshare.methods.make("kvsharer", strategy="s8.json")                  # a searched strategy file
    kvshare.methods.make("kvsharer", num_shared=8, order="similar")       # searched when first applied
    kvshare.methods.make("kvsharer", num_shared=8, order="random", seed=3)
    kvshare.methods.make("kvsharer", num_shared=8, order="spread")        # evenly spread, no search

A replaced layer neither computes nor stores K/V (kvshare.sharing does the work); its cache slot holds
nothing, so the cache is exactly (L - C) / L of the plain one. Without a strategy the search runs on the
model it is applied to (calibration set `calibration_set`, `samples` texts of `max_tokens` tokens) and its
result is kept per model, so orders and seeds are methods like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import layer_types
from ..strategy import Strategy, spread_strategy
from .base import KVMethod, MethodSettings, register

ORDERS = ("dissimilar", "similar", "random", "spread", "best")


@dataclass
class KVSharerSettings(MethodSettings):
    strategy: Any = None  # a Strategy, its to_dict(), or the path of a strategy JSON (`kvshare search --out`)
    num_shared: int | None = None  # without a strategy: replace this many layers, chosen by `order`
    order: str = "dissimilar"  # dissimilar (the paper), similar, random (by `seed`) or spread (no search)
    seed: int = 0
    threshold: float = 0.5
    samples: int = 30  # calibration texts of the search
    calibration_set: int = 0
    max_tokens: int = 64
    metric: str = "euclidean"

    def __post_init__(self):
        if isinstance(self.strategy, (str, Path)):
            self.strategy = Strategy.load(self.strategy)
        elif isinstance(self.strategy, dict):
            self.strategy = Strategy.from_dict(self.strategy)
        elif self.strategy is not None and not isinstance(self.strategy, Strategy):
            raise TypeError(f"strategy must be a Strategy, a dict or a JSON path, got {type(self.strategy).__name__}")
        if self.strategy is not None and self.num_shared is not None:
            raise ValueError("give either a strategy or num_shared (to search one), not both")
        if self.num_shared is not None and (not isinstance(self.num_shared, int) or self.num_shared < 0):
            raise ValueError(f"num_shared must be a non-negative number of layers, got {self.num_shared!r}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}; use one of {', '.join(ORDERS)}")

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if self.strategy is not None:
            out["strategy"] = self.strategy.to_dict()
        return out


@register
class KVSharer(KVMethod):
    """Layer-wise KV sharing (role `sharing`): `KVSharer(strategy=s)` or `KVSharer(num_shared=8, order=...)`."""

    name = "kvsharer"
    role = "sharing"
    settings_class = KVSharerSettings

    def __init__(self, settings=None, **kwargs):
        super().__init__(settings, **kwargs)
        self._searched: dict[tuple, Strategy] = {}

    @property
    def strategy(self) -> Strategy | None:
        if self.settings.strategy is not None:
            return self.settings.strategy
        return next(iter(self._searched.values()), None) if len(self._searched) == 1 else None

    def strategy_for(self, model) -> Strategy:
        s = self.settings
        if s.strategy is not None:
            return s.strategy
        num_layers = model.config.get_text_config().num_hidden_layers
        if s.num_shared is None or s.num_shared == 0:
            return Strategy({}, num_layers, {"order": s.order})
        if s.order == "spread":
            return spread_strategy(num_layers, s.num_shared, layer_types(model))
        from ..models import model_name

        key = (model_name(model), num_layers)
        if key not in self._searched:
            from ..data import calibration_texts
            from ..search import search

            tokenizer = getattr(model, "kvshare_tokenizer", None)  # set by kvshare.load_model
            if tokenizer is None:
                raise ValueError(
                    "kvsharer: searching a strategy needs the model's tokenizer; load the model with "
                    "kvshare.load_model, or pass strategy= (a file from `python -m kvshare search`)"
                )
            texts = calibration_texts(s.samples, set_index=s.calibration_set)
            self._searched[key], _ = search(
                model,
                tokenizer,
                texts,
                s.num_shared,
                s.threshold,
                s.order,
                s.metric,
                s.seed,
                s.max_tokens,
                progress=False,
            )
        return self._searched[key]

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.settings.strategy is None and self.strategy is not None:
            out["strategy"] = self.strategy.to_dict()  # what the search chose
        return out

    # -- the shared test matrix ----------------------------------------------------------------
    @classmethod
    def examples(cls, config) -> list["KVSharer"]:
        n = config.get_text_config().num_hidden_layers
        return [cls(strategy=spread_strategy(n, max(1, n // 3), layer_types(config)))]

    @classmethod
    def identity(cls, config, max_length: int) -> "KVSharer":
        return cls(strategy=Strategy({}, config.get_text_config().num_hidden_layers))
