"""A sharing strategy: which later layer reads which earlier layer's K/V.

The mapping is {replaced layer r: source layer s} with s < r. Chains are resolved on
construction (r -> s -> t becomes r -> t), so every source holds its own cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text


def resolve_chains(mapping: dict[int, int]) -> dict[int, int]:
    """Point every replaced layer at the root of its chain (a layer that is not replaced)."""
    resolved = {}
    for r in mapping:
        s = mapping[r]
        seen = {r}
        while s in mapping:
            if s in seen:  # unreachable once s < r is enforced, kept as a guard
                raise ValueError(f"sharing chain through layer {s} loops back on itself")
            seen.add(s)
            s = mapping[s]
        resolved[r] = s
    return resolved


@dataclass
class Strategy:
    """Layer-wise KV sharing: `mapping[r] = s` makes layer r attend over layer s's cache."""

    mapping: dict[int, int]
    num_layers: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        clean = {}
        for r, s in dict(self.mapping).items():
            try:
                r_i, s_i = int(r), int(s)
            except (TypeError, ValueError):
                raise ValueError(f"strategy mapping entries must be layer indices, got {r!r}: {s!r}") from None
            if str(r_i) != str(r).strip() or str(s_i) != str(s).strip():
                raise ValueError(f"strategy mapping entries must be whole layer indices, got {r!r}: {s!r}")
            for name, idx in (("replaced", r_i), ("source", s_i)):
                if not 0 <= idx < self.num_layers:
                    raise ValueError(
                        f"{name} layer {idx} is out of range for a model with "
                        f"{self.num_layers} layers (valid: 0..{self.num_layers - 1})"
                    )
            if r_i == s_i:
                raise ValueError(f"layer {r_i} cannot share with itself: drop the entry {r_i}: {s_i}")
            if s_i > r_i:
                raise ValueError(
                    f"source layer {s_i} must come before replaced layer "
                    f"{r_i}: a layer can only reuse an earlier layer's K/V"
                )
            clean[r_i] = s_i
        self.mapping = dict(sorted(resolve_chains(clean).items()))

    # -- views -------------------------------------------------------------------------------
    @property
    def num_shared(self) -> int:
        return len(self.mapping)

    @property
    def sources(self) -> list[int]:
        return sorted(set(self.mapping.values()))

    def kv_fraction(self) -> float:
        """Fraction of the unshared KV cache this strategy keeps: (L - C) / L."""
        return (self.num_layers - self.num_shared) / self.num_layers

    def source_of(self, layer: int) -> int:
        return self.mapping.get(layer, layer)

    def prefix(self, num_shared: int) -> "Strategy":
        """The strategy after the first `num_shared` accepted pairs of the search that made it.

        A greedy search to C visits exactly the same candidates as a search to any smaller C up to
        the point where it stops, so its first c acceptances *are* the c-layer strategy.
        """
        order = self.metadata.get("accepted_pairs")
        if order is None:
            raise ValueError("this strategy has no 'accepted_pairs' in its metadata: prefixes need a search result")
        if num_shared > len(order):
            raise ValueError(f"the search accepted only {len(order)} pairs, cannot take a prefix of {num_shared}")
        mapping: dict[int, int] = {}
        for r, s in order[:num_shared]:
            mapping = apply_pair(mapping, r, s)
        meta = dict(self.metadata, num_shared=num_shared, accepted_pairs=[list(p) for p in order[:num_shared]])
        return Strategy(mapping, self.num_layers, meta)

    # -- checks ------------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise a clear error when this strategy was made for a model with another layer layout."""
        n = model.config.get_text_config().num_hidden_layers
        if n != self.num_layers:
            name = self.metadata.get("model", "another model")
            raise ValueError(
                f"this strategy is for a model with {self.num_layers} layers ({name}), but the model has {n}: "
                "search a strategy for this model (python -m kvshare search ...)"
            )
        layer_types = getattr(model.config.get_text_config(), "layer_types", None)
        if layer_types:
            for r, s in self.mapping.items():
                if layer_types[r] != layer_types[s]:
                    raise ValueError(
                        f"layer {r} ({layer_types[r]}) cannot read layer {s}'s cache ({layer_types[s]}): "
                        "share only between layers of the same attention type"
                    )

    # -- io ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": "kvshare-strategy/1",
            "num_layers": self.num_layers,
            "num_shared": self.num_shared,
            "mapping": {str(r): s for r, s in self.mapping.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Strategy":
        if not isinstance(data, dict) or "mapping" not in data or "num_layers" not in data:
            raise ValueError("not a kvshare strategy: expected a JSON object with 'mapping' and 'num_layers'")
        if not isinstance(data["mapping"], dict):
            raise ValueError("not a kvshare strategy: 'mapping' must be an object {replaced: source}")
        return cls(data["mapping"], data["num_layers"], dict(data.get("metadata") or {}))

    def save(self, path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Strategy":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"strategy file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): not a kvshare strategy") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        pairs = ", ".join(f"{r}->{s}" for r, s in self.mapping.items())
        return f"Strategy({self.num_shared}/{self.num_layers} shared: {pairs or 'none'})"


def apply_pair(mapping: dict[int, int], r: int, s: int) -> dict[int, int]:
    """Return a new mapping with r reading s's K/V, chains resolved both ways.

    If s is itself replaced, r points at s's root. If r was a source, its dependants now
    point at r's new root, since r no longer holds a cache of its own.
    """
    root = mapping.get(s, s)
    new = {k: (root if v == r else v) for k, v in mapping.items()}
    new[r] = root
    return new


def spread_strategy(num_layers: int, num_shared: int, layer_types=None) -> Strategy:
    """C replaced layers spread evenly over layers 1..L-1, each reading the nearest kept layer below it of its own
    attention type (no search: the benchmark's default, and the `spread` order of the kvsharer method).

    With mixed layer types (`layer_types`, e.g. Gemma-3's sliding and full layers) a layer with no kept layer of
    its type below it cannot be replaced; the next layer down takes its place, so exactly C are replaced."""
    if not 0 <= num_shared < num_layers:
        raise ValueError(f"cannot replace {num_shared} of {num_layers} layers")
    types = list(layer_types) if layer_types is not None else ["same"] * num_layers
    step = (num_layers - 1) / num_shared if num_shared else 0
    targets = [num_layers - 1 - round(i * step) for i in range(num_shared)]
    candidates = list(dict.fromkeys(targets + list(range(num_layers - 1, 0, -1))))  # spread first, then top down

    def source(r, replaced):
        kept = [k for k in range(r) if k not in replaced and types[k] == types[r]]
        return max(kept) if kept else None

    replaced: set[int] = set()
    for r in candidates:
        if len(replaced) == num_shared:
            break
        trial = replaced | {r}
        if all(source(x, trial) is not None for x in trial):
            replaced = trial
    if len(replaced) < num_shared:
        raise ValueError(f"cannot replace {num_shared} of {num_layers} layers within their attention types")
    mapping = {r: source(r, replaced) for r in sorted(replaced)}
    return Strategy(mapping, num_layers, {"kind": "evenly spread (benchmark)"})
