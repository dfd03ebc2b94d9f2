"""The registry of KV-cache methods: one file per method, one line here.

    import kvshare
    kvshare.methods.available()                       # ['kvsharer', 'streamingllm', 'h2o', 'pyramidinfer', 'quantized']
    h2o = kvshare.methods.make("h2o", budget=128)
    q4 = kvshare.methods.make("quantized", bits=4)
    with kvshare.compression(model, strategy, h2o, q4):  # sharing x eviction x quantization
        model.generate(...)

Every method is a `KVMethod` (kvshare.methods.base: the interface, documented once) with a settings
dataclass. The CLI (`--method NAME` and its settings as flags), the evaluator, the benchmark, the
notebooks and the shared test matrix (tests/test_methods.py) all read `REGISTRY`; adding a method is
one file plus one line below (see CONTRIBUTING.md).
"""

from __future__ import annotations

from .base import ROLES, KVMethod, MethodSettings
from .compose import Composition
from .eviction import EvictingLayer, EvictionPolicy, PolicySettings
from .h2o import H2O, H2OSettings
from .kvsharer import KVSharer, KVSharerSettings
from .minicache import MiniCache, MiniCacheSettings
from .pyramidinfer import PyramidInfer, PyramidInferSettings
from .quantized import QuantizedKV, QuantizedSettings
from .simlayerkv import SimLayerKV, SimLayerKVSettings
from .streamingllm import StreamingLLM, StreamingLLMSettings

REGISTRY: dict[str, type[KVMethod]] = {
    "kvsharer": KVSharer,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "pyramidinfer": PyramidInfer,
    "quantized": QuantizedKV,
    "simlayerkv": SimLayerKV,
    "minicache": MiniCache,
}


def available() -> list[str]:
    """The registered method names."""
    return list(REGISTRY)


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


def get(name: str) -> type[KVMethod]:
    """The method class registered under `name` (case, '-' and '_' ignored)."""
    keys = {_key(k): cls for k, cls in REGISTRY.items()}
    if _key(name) not in keys:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    return keys[_key(name)]


def make(name: str, **settings) -> KVMethod:
    """Build the method `name` with `settings` (the fields of its settings dataclass)."""
    cls = get(name)
    unknown = sorted(set(settings) - set(cls.setting_names()))
    if unknown:
        raise ValueError(
            f"method {cls.name!r} has no setting {', '.join(map(repr, unknown))}; "
            f"its settings: {', '.join(cls.setting_names()) or 'none'}"
        )
    try:
        return cls(**settings)
    except TypeError as e:  # a required setting missing
        raise ValueError(f"method {cls.name!r}: {e}; its settings: {', '.join(cls.setting_names())}") from None


def from_dict(data: dict) -> KVMethod:
    """Rebuild a method from its `to_dict()` (a composition from its members)."""
    if "members" in data:
        return Composition(*(from_dict(m) for m in data["members"]))
    settings = {k: v for k, v in data.items() if k != "method"}
    return make(data["method"], **settings)


__all__ = [
    "REGISTRY",
    "ROLES",
    "Composition",
    "EvictingLayer",
    "EvictionPolicy",
    "H2O",
    "H2OSettings",
    "KVMethod",
    "KVSharer",
    "KVSharerSettings",
    "MethodSettings",
    "MiniCache",
    "MiniCacheSettings",
    "PolicySettings",
    "PyramidInfer",
    "PyramidInferSettings",
    "QuantizedKV",
    "QuantizedSettings",
    "SimLayerKV",
    "SimLayerKVSettings",
    "StreamingLLM",
    "StreamingLLMSettings",
    "available",
    "from_dict",
    "get",
    "make",
]
