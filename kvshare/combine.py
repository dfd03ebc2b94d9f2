"""Applying KV-cache methods to a model: the one entry point, `kvshare.compression(model, *methods)`.

    with kvshare.compression(model, strategy, kvshare.methods.make("h2o", budget=64),
                             kvshare.methods.make("quantized", bits=4)):
        model.generate(...)

The arguments (Strategy objects, kvshare.methods methods, None) become one `Composition` (at most one
method per role); its sharing strategy goes to kvshare.sharing, which replaces layers and gives every
kept layer the slot the cache methods make.
"""

from __future__ import annotations

import contextlib
import copy

from .adapter import num_layers
from .methods.compose import Composition
from .sharing import active_method, active_strategy, disable_sharing, enable_sharing
from .strategy import Strategy


def apply(model, *methods) -> Composition:
    """Apply methods (KVMethod objects, Strategy objects, None) to `model` until `kvshare.disable_sharing(model)`;
    return their composition. At most one method per role (sharing, eviction, storage, cache)."""
    combined = Composition(*methods)
    strategy = combined.strategy_for(model) or Strategy({}, num_layers(model))
    disable_sharing(model)
    cache_members = combined.cache_members
    if strategy.mapping or cache_members:
        # one cache method: pass it as it is (active_method(model) is then the object the caller made)
        method = None if not cache_members else cache_members[0] if len(cache_members) == 1 else combined
        enable_sharing(model, strategy, method)
    return combined


@contextlib.contextmanager
def compression(model, *methods):
    """The one way to apply any combination: `with kvshare.compression(model, strategy, h2o, quantized4): ...`.

    Each argument is a `Strategy`, a `kvshare.methods` method (`kvshare.methods.make(name, ...)`) or None.
    Sharing, eviction and quantized storage compose in any order with one semantics: a replaced layer
    reads its source's cache as the source's methods left it. Whatever was enabled before is restored
    on exit.
    """
    previous = (active_strategy(model), active_method(model))
    apply(model, *methods)
    try:
        yield model
    finally:
        disable_sharing(model)
        if previous[0] is not None:
            enable_sharing(model, previous[0], previous[1])


def sharing(model, strategy: Strategy | None):
    """`with kvshare.sharing(model, strategy): model.generate(...)`; None means no sharing."""
    return compression(model, strategy)


def copy_cache_layers(layers: list, method=None) -> list:
    """A deep copy of a cache's `layers`, for decoding again from the same state (a prefill measured once, decoded
    in several rounds): what the slots share with `method` (`shared_state()`) stays shared, not copied."""
    keep = method.shared_state() if method is not None else ()
    return copy.deepcopy(layers, {id(o): o for o in keep})
