"""The registry of KV-cache methods: one file per method, registered where it is defined.

    import kvshare
    kvshare.methods.available()                       # ['kvsharer', 'streamingllm', 'h2o', 'pyramidinfer', ...]
    h2o = kvshare.methods.make("h2o", budget=128)
    q4 = kvshare.methods.make("quantized", bits=4)
    with kvshare.compression(model, strategy, h2o, q4):  # sharing x eviction x quantization
        model.generate(...)

Every method is a `KVMethod` (kvshare.methods.base: the interface, documented once) with a settings
dataclass, and carries `@register` in its own file. The CLI (`--method NAME` and its settings as flags), the
evaluator, the benchmark, the notebooks and the shared test matrix (tests/test_methods.py) all read `REGISTRY`;
adding a method is one file plus its module's name in `METHOD_MODULES` below (see CONTRIBUTING.md). Every
registered class and its settings class can be imported from here (`from kvshare.methods import H2O`).
"""

from __future__ import annotations

from importlib import import_module

from .base import REGISTRY, ROLES, KVMethod, MethodSettings, register
from .compose import Composition
from .eviction import EvictingLayer, EvictionMethod, EvictionSettings

# The method modules, imported in this order: the registry's order, which the CLI's help, the test matrix and the
# notebooks list methods in. Each module registers its class with @register.
METHOD_MODULES = ("kvsharer", "streamingllm", "h2o", "pyramidinfer", "quantized", "simlayerkv", "minicache")
for _module in METHOD_MODULES:
    import_module(f"{__name__}.{_module}")
for _cls in REGISTRY.values():  # `from kvshare.methods import H2O, H2OSettings`
    globals()[_cls.__name__] = _cls
    globals()[_cls.settings_class.__name__] = _cls.settings_class
del _module, _cls


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
    "METHOD_MODULES",
    "REGISTRY",
    "ROLES",
    "Composition",
    "EvictingLayer",
    "EvictionMethod",
    "EvictionSettings",
    "KVMethod",
    "MethodSettings",
    "available",
    "from_dict",
    "get",
    "make",
    "register",
    *(cls.__name__ for cls in REGISTRY.values()),
    *(cls.settings_class.__name__ for cls in REGISTRY.values()),
]
