"""Token eviction under its wave-1 name: the eviction methods now live in `kvshare.methods` (one file each);
this module keeps `kvshare.policies.make_policy("h2o", budget=128)` and the class names working.

    policy = kvshare.policies.make_policy("h2o", budget=128)     # = kvshare.methods.make("h2o", budget=128)
    with kvshare.compression(model, strategy, policy):
        model.generate(...)
"""

from __future__ import annotations

from . import accounting
from .methods import REGISTRY, EvictingLayer, EvictionPolicy, make
from .methods.eviction import PolicySettings, layer_kind
from .methods.h2o import H2O, H2OSettings
from .methods.pyramidinfer import PyramidInfer, PyramidInferSettings, layer_budgets
from .methods.streamingllm import StreamingLLM, StreamingLLMSettings

# the registered eviction methods that keep a token budget (wave 1's `--policy NAME --budget N`)
POLICIES = {name: cls for name, cls in REGISTRY.items() if cls.role == "eviction" and "budget" in cls.setting_names()}


def make_policy(name: str, budget: int, **settings) -> EvictionPolicy:
    """An eviction method by name (`streamingllm`, `h2o`, `pyramidinfer`) with `budget` tokens per layer
    (PyramidInfer: the average over layers) and any other settings of its dataclass."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")
    return make(key, budget=budget, **settings)


def predicted_cache_bytes(config, strategy, policy, batch: int, lengths, dtype_bytes: int) -> int:
    """`kvshare.accounting.predicted_cache_bytes` with the wave-1 argument order."""
    return accounting.predicted_cache_bytes(config, policy, batch, lengths, dtype_bytes, strategy=strategy)


__all__ = [
    "EvictingLayer",
    "EvictionPolicy",
    "H2O",
    "H2OSettings",
    "POLICIES",
    "PolicySettings",
    "PyramidInfer",
    "PyramidInferSettings",
    "StreamingLLM",
    "StreamingLLMSettings",
    "layer_budgets",
    "layer_kind",
    "make_policy",
    "predicted_cache_bytes",
]
