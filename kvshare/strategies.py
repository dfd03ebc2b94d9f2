"""One store of sharing strategies: every notebook and command that needs "the <order> strategy at C" gets it here.

    key = kvshare.strategies.key_for(model, "best", 8)        # calibration set 0, 30 texts of 64 tokens
    strategy = kvshare.strategies.get(model, tokenizer, key)  # searched once, then read back

A strategy is searched once per key -- model, order, C, calibration set and the search's settings -- and kept as a
strategy JSON under `$KVSHARE_HOME/strategies/<model>/set<i>/<order>/`; every later request for the same key reads
that file, so two notebooks asking for the best-first strategy at C = 8 get the same layers, not two searches that
may differ (a different number of texts, another seed). `kvshare.methods.make("kvsharer", num_shared=8,
order="best")` reads the store too.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from .pypi_files import kvshare_home
from .strategy import Strategy

SEARCHED_ORDERS = ("dissimilar", "similar", "random", "best")


@dataclass(frozen=True)
class StrategyKey:
    """Everything a searched strategy depends on (the calibration texts: set `calibration_set`, `samples` texts cut
    to `max_tokens` tokens)."""

    model: str  # the model's name and a fingerprint of its config and weights (`model_key`)
    order: str
    num_shared: int
    calibration_set: int = 0
    samples: int = 30
    max_tokens: int = 64
    threshold: float = 0.5
    metric: str = "euclidean"
    seed: int = 0  # the random order's walk (the other orders do not read it)

    def __post_init__(self):
        if self.order not in SEARCHED_ORDERS:
            raise ValueError(f"the store keeps searched strategies: order is one of {', '.join(SEARCHED_ORDERS)}")
        if not isinstance(self.num_shared, int) or self.num_shared < 1:
            raise ValueError(f"num_shared must be a positive number of layers, got {self.num_shared!r}")

    def relative_path(self) -> Path:
        seed = f"-seed{self.seed}" if self.order == "random" else ""
        name = f"C{self.num_shared}-n{self.samples}-t{self.max_tokens}-T{self.threshold:g}-{self.metric}{seed}.json"
        safe_model = self.model.replace("/", "--").replace("@", "/")
        return Path(safe_model) / f"set{self.calibration_set}" / self.order / name


def model_key(model) -> str:
    """`<name>@<fingerprint>`: the model's name and 10 hex digits of its config and input embeddings, so that two
    models of one name (tiny test models, a checkpoint fine-tuned in place) never share a stored strategy."""
    import hashlib

    import torch

    from .models import model_name

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():  # a strided sample of the embeddings: cheap, and any other weights change it
        sample = model.get_input_embeddings().weight[::97, :16].double()
        digest.update(repr((float(sample.sum()), float(sample.abs().sum()))).encode())
    return f"{model_name(model)}@{digest.hexdigest()[:10]}"


def key_for(model, order: str, num_shared: int, **settings) -> StrategyKey:
    """The store's key of `model`'s `order` strategy at `num_shared` layers (settings: StrategyKey's other fields)."""
    return StrategyKey(model_key(model), order, num_shared, **settings)


def root() -> Path:
    """Where the store keeps its files: `$KVSHARE_STRATEGIES`, else `$KVSHARE_HOME/strategies`."""
    import os

    return Path(os.environ.get("KVSHARE_STRATEGIES") or kvshare_home() / "strategies")


def path_of(key: StrategyKey) -> Path:
    return root() / key.relative_path()


def get(model, tokenizer, key: StrategyKey, progress: bool = False) -> Strategy:
    """The strategy of `key`: read from the store, or searched (and stored) the first time it is asked for."""
    path = path_of(key)
    if path.is_file():
        return Strategy.load(path)
    if tokenizer is None:
        raise ValueError(
            f"no stored {key.order} strategy at C = {key.num_shared} for this model yet, and searching one needs "
            "the model's tokenizer: load the model with kvshare.load_model, or pass a strategy file "
            "(`python -m kvshare search`)"
        )
    strategy = search_for(model, tokenizer, key, progress)
    strategy.metadata["store_key"] = asdict(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    strategy.save(path)
    return Strategy.load(path)  # what every later call returns, byte for byte


def search_for(model, tokenizer, key: StrategyKey, progress: bool = False) -> Strategy:
    """Run the search `key` describes on `model` (kvshare.search.search)."""
    from .data import calibration_texts
    from .search import search

    if model_key(model) != key.model:
        raise ValueError(f"the key is for {key.model!r}, the model given is {model_key(model)!r}")
    texts = calibration_texts(key.samples, set_index=key.calibration_set)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy, _ = search(
            model,
            tokenizer,
            texts,
            key.num_shared,
            key.threshold,
            key.order,
            key.metric,
            key.seed,
            key.max_tokens,
            progress=progress,
        )
    return strategy
