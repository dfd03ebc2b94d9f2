"""Several KV-cache methods applied together, as one plain object.

`Composition(kvsharer, h2o, quantized)` holds at most one method per role (see kvshare.methods.base) and
is itself a `KVMethod`: a kept layer's slot is the eviction method's evicting layer holding the storage
method's storage object (or the storage method's own layer, or transformers' default); the sharing
strategy comes from the sharing method; bytes are predicted from the members. kvshare.compression
builds one of these from whatever it is given.
"""

from __future__ import annotations

from ..strategy import Strategy
from .base import ROLES, KVMethod


class Composition(KVMethod):
    name = "composition"
    role = "composition"

    def __init__(self, *methods):
        self.members: dict[str, KVMethod] = {}
        for m in methods:
            if m is None:
                continue
            if isinstance(m, Composition):
                for member in m.members.values():
                    self._add(member)
            else:
                self._add(m)
        if "cache" in self.members and ({"eviction", "storage"} & set(self.members)):
            other = next(self.members[r] for r in ("eviction", "storage") if r in self.members)
            raise ValueError(
                f"{self.members['cache'].name} owns the whole cache slot and cannot be combined with "
                f"{other.name}; it combines with layer sharing only"
            )
        self.settings = None

    def _add(self, method) -> None:
        if isinstance(method, Strategy):
            from .kvsharer import KVSharer

            method = KVSharer(strategy=method)
        if not isinstance(method, KVMethod):
            raise TypeError(
                f"expected a kvshare method (kvshare.methods.make(...)) or a Strategy, got {type(method).__name__}"
            )
        if method.role not in ROLES:
            raise ValueError(f"method {method.name!r} has no valid role ({method.role!r})")
        if method.role in self.members:
            raise ValueError(
                f"two {method.role} methods ({self.members[method.role].name} and {method.name}): "
                f"combine at most one method per role ({', '.join(ROLES)})"
            )
        self.members[method.role] = method

    def member(self, role: str) -> KVMethod | None:
        return self.members.get(role)

    def shared_state(self) -> tuple:
        return tuple(o for m in self.members.values() for o in m.shared_state())

    @property
    def cache_members(self) -> list[KVMethod]:
        """The members that shape kept layers' slots (everything but sharing)."""
        return [m for r, m in self.members.items() if r != "sharing"]

    # -- description ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "method": "+".join(m.name for m in self.members.values()),
            "members": [m.to_dict() for m in self.members.values()],
        }

    def __repr__(self):
        return f"Composition({', '.join(repr(m) for m in self.members.values())})"

    def __eq__(self, other):
        return isinstance(other, Composition) and self.members == other.members

    def __hash__(self):
        return hash(tuple(self.members.items()))

    @property
    def scored_by_decoding(self) -> bool:
        return any(m.scored_by_decoding for m in self.members.values())

    @property
    def causal(self) -> bool:
        return all(m.causal for m in self.members.values())

    @property
    def causal_tolerance(self) -> float:
        return max(m.causal_tolerance for m in self.members.values()) if self.members else 0.0

    # -- building the cache ----------------------------------------------------------------------
    def make_layer(self, layer_idx: int, config, storage=None):
        storage_method = self.members.get("storage")
        if "cache" in self.members:
            return self.members["cache"].make_layer(layer_idx, config)
        if "eviction" in self.members:
            storage = storage_method.make_storage(layer_idx, config) if storage_method is not None else None
            return self.members["eviction"].make_layer(layer_idx, config, storage=storage)
        if storage_method is not None:
            return storage_method.make_layer(layer_idx, config)
        return None

    def attach(self, model) -> None:
        for m in self.cache_members:
            m.attach(model)

    def detach(self, model) -> None:
        for m in self.cache_members:
            m.detach(model)

    def strategy_for(self, model):
        sharing = self.members.get("sharing")
        return None if sharing is None else sharing.strategy_for(model)

    @property
    def strategy(self):
        sharing = self.members.get("sharing")
        return None if sharing is None else sharing.strategy

    # -- bytes ---------------------------------------------------------------------------------
    def predicted_tokens(self, layer_idx: int, config, lengths) -> int:
        keeper = self.members.get("cache") or self.members.get("eviction")
        return (
            KVMethod.predicted_tokens(self, layer_idx, config, lengths)
            if keeper is None
            else keeper.predicted_tokens(layer_idx, config, lengths)
        )

    def bytes_per_token(self, config, dtype_bytes: int) -> int:
        storer = self.members.get("cache") or self.members.get("storage")
        return (
            KVMethod.bytes_per_token(self, config, dtype_bytes)
            if storer is None
            else storer.bytes_per_token(config, dtype_bytes)
        )

    def predicted_layer_bytes(self, layer_idx: int, config, lengths, dtype_bytes: int) -> int:
        if "cache" in self.members:
            return self.members["cache"].predicted_layer_bytes(layer_idx, config, lengths, dtype_bytes)
        return self.predicted_tokens(layer_idx, config, lengths) * self.bytes_per_token(config, dtype_bytes)
