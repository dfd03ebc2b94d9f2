"""The one interface of a KV-cache method, and how several methods compose.

A method changes what the KV cache holds. It plays one *role* in a composition:

- `sharing`: some layers hold no cache and read an earlier layer's (KVSharer);
- `eviction`: a kept layer drops tokens (StreamingLLM, H2O, PyramidInfer, ...);
- `storage`: a kept layer stores its tokens differently (the quantized cache);
- `cache`: the method owns the whole cache slot and combines with sharing only.

`kvshare.compression(model, strategy, h2o, quantized4)` applies at most one method per role; a kept
layer's slot is built by the eviction method holding the storage method's storage object (an
evicting layer with quantized storage), so combinations are plain objects of classes that live in
source files.

Everything a method may do has a default here, so callers never probe with `hasattr`:

| member | default | who overrides |
|---|---|---|
| `make_layer(i, config, storage)` | `None`: transformers' own slot | eviction, storage, cache |
| `make_storage(i, config)` | `None`: full-precision tensors | storage |
| `attach(model)` / `detach(model)` | nothing | methods with hooks |
| `shared_state()` | `()` | methods whose slots share state with the method (MiniCache, SimLayerKV) |
| `strategy_for(model)`, `strategy` | `None`: no layer replaced | sharing |
| `predicted_tokens(i, config, lengths)` | every token seen (window-capped) | eviction |
| `bytes_per_token(config, dtype_bytes)` | full-precision K + V | storage |
| `predicted_layer_bytes(i, config, lengths, dtype_bytes)` | tokens x bytes per token | cache |
| `scored_by_decoding` | False | methods whose cache is lossy after the prefill |
| `examples(config)` / `identity(config, length)` | — | every registered method (the test matrix) |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from ..accounting import kv_token_bytes
from ..adapter import layer_window

ROLES = ("sharing", "eviction", "storage", "cache")

#: every registered method class by its name, in registration order (kvshare.methods imports the method modules
#: in the order listings show them); `@register` on a class in its own file is what adds it
REGISTRY: dict[str, type["KVMethod"]] = {}


def register(cls: type["KVMethod"]) -> type["KVMethod"]:
    """Class decorator: add a `KVMethod` subclass to `REGISTRY` under its `name` (the CLI's `--method NAME`, the
    shared test matrix, `kvshare.methods.make(name)` and the notebooks then find it)."""
    if not cls.name or cls.role not in ROLES:
        raise ValueError(f"{cls.__name__} needs a name and a role of {', '.join(ROLES)} to be registered")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods named {cls.name!r}: {REGISTRY[cls.name].__name__} and {cls.__name__}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class MethodSettings:
    """Base of every method's settings dataclass (validate in `__post_init__`)."""

    def to_dict(self) -> dict:
        return asdict(self)


class KVMethod:
    """Base class of every KV-cache method. Subclasses set `name`, `role`, `settings_class` and override
    what their role needs (see the module docstring); build one with `kvshare.methods.make(name, ...)`."""

    name: ClassVar[str] = ""
    role: ClassVar[str] = ""
    settings_class: ClassVar[type] = MethodSettings
    #: the cache is lossy after the prefill (tokens dropped or merged as decoding goes on): one-pass
    #: perplexity would not see it, so evaluation scores such a method by decoding
    scored_by_decoding: ClassVar[bool] = False
    #: incremental decoding equals a full forward (the test matrix checks it where True) ...
    causal: ClassVar[bool] = True
    #: ... within this relative tolerance of the logits (float noise of batched vs one-token matmuls)
    causal_tolerance: ClassVar[float] = 1e-4

    def __init__(self, settings=None, **kwargs):
        if settings is None:
            settings = self.settings_class(**kwargs)
        elif kwargs:
            raise TypeError("pass either a settings object or keyword settings, not both")
        if not isinstance(settings, self.settings_class):
            raise TypeError(
                f"{type(self).__name__} takes {self.settings_class.__name__}, got {type(settings).__name__}"
            )
        self.settings = settings

    # -- description ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"method": self.name, **self.settings.to_dict()}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.to_dict().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.settings == other.settings

    def __hash__(self):
        return hash((type(self), repr(self.settings)))

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in fields(cls.settings_class)]

    # -- building the cache (defaults: a plain transformers cache) ---------------------------------
    def make_layer(self, layer_idx: int, config, storage=None):
        """The cache slot of kept layer `layer_idx`, holding `storage` when a storage method gives one;
        None leaves transformers' own slot."""
        return None

    def make_storage(self, layer_idx: int, config):
        """A storage object for an evicting slot (codes instead of tensors); None: full precision."""
        return None

    def attach(self, model) -> None:
        """Add what the method needs around the model (hooks); called when the method is applied."""

    def detach(self, model) -> None:
        """Remove what `attach` added."""

    def shared_state(self) -> tuple:
        """Objects the method's cache slots share with the method itself (and its hooks): a copy of a cache keeps
        pointing at these (`kvshare.combine.copy_cache_layers`), not at copies of them."""
        return ()

    def strategy_for(self, model):
        """The layer-sharing `Strategy` this method applies to `model` (sharing methods only)."""
        return None

    @property
    def strategy(self):
        """The sharing `Strategy` when it is known without a model (given, or already searched), else None."""
        return None

    # -- byte accounting (kvshare.accounting.predicted_cache_bytes reads these) --------------------
    def predicted_tokens(self, layer_idx: int, config, lengths) -> int:
        """Tokens kept layer `layer_idx` holds per sequence after forwards adding `lengths` tokens each
        (no padding): everything seen, or at most `window - 1` on a sliding-window layer."""
        seen = sum(lengths)
        window = layer_window(config, layer_idx)
        return seen if window is None else min(seen, window - 1)

    def bytes_per_token(self, config, dtype_bytes: int) -> int:
        """K + V bytes one token adds to one kept layer of one sequence."""
        return kv_token_bytes(config, dtype_bytes)

    def predicted_layer_bytes(self, layer_idx: int, config, lengths, dtype_bytes: int) -> int:
        """K/V bytes kept layer `layer_idx` holds for one sequence after forwards adding `lengths` tokens:
        `predicted_tokens` x `bytes_per_token` (a method that stores layers jointly overrides this)."""
        return self.predicted_tokens(layer_idx, config, lengths) * self.bytes_per_token(config, dtype_bytes)

    # -- the shared test matrix ---------------------------------------------------------------------
    @classmethod
    def examples(cls, config) -> list["KVMethod"]:
        """Instances that really compress on a small model with `config` (tests run every one)."""
        raise NotImplementedError(f"{cls.__name__} must give examples() for the shared test matrix")

    @classmethod
    def identity(cls, config, max_length: int) -> "KVMethod | None":
        """An instance that compresses nothing for sequences up to `max_length` tokens (it must then be
        the plain model bit for bit), or None when the method has no such setting."""
        return None
