"""KVSharer (Yang et al., 2024) as a kvshare method: some later layers read an earlier layer's K/V.

    kvshare.methods.make("kvsharer", strategy="s8.json")                  # a searched strategy file
    kvshare.methods.make("kvsharer", num_shared=8, order="similar")       # searched when first applied
    kvshare.methods.make("kvsharer", num_shared=8, order="random", seed=3)
    kvshare.methods.make("kvsharer", num_shared=8, order="spread")        # evenly spread, no search

A replaced layer neither computes nor stores K/V (kvshare.sharing does the work); its cache slot holds
nothing, so the cache is exactly (L - C) / L of the plain one. Without a strategy the strategy comes from the
one store (kvshare.strategies: searched on the model it is applied to the first time, calibration set
`calibration_set`, `samples` texts of `max_tokens` tokens, then read back), so orders and seeds are methods like
any other and every user of a setting gets the same layers.
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
        from ..strategies import get, key_for

        key = key_for(
            model,
            s.order,
            s.num_shared,
            calibration_set=s.calibration_set,
            samples=s.samples,
            max_tokens=s.max_tokens,
            threshold=s.threshold,
            metric=s.metric,
            seed=s.seed,
        )
        if key not in self._searched:  # the one store: the same strategy everywhere (searched there the first time)
            self._searched[key] = get(model, getattr(model, "kvshare_tokenizer", None), key)
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
