"""kvshare: layer-wise KV-cache sharing (KVSharer) on Hugging Face transformers, beside the other KV-cache methods
of its registry (kvshare.methods)."""

from . import methods  # kvshare.methods.available(), kvshare.methods.make("h2o", budget=128)
from .accounting import cache_bytes, num_shared_for, predicted_cache_bytes
from .calibration import layer_distances
from .combine import apply, compression, sharing
from .damage import damage_map
from .data import calibration_texts, eval_text
from .metrics import perplexity
from .models import DEFAULT_MODEL, load_model
from .search import search
from .sharing import SUPPORTED_MODEL_TYPES, disable_sharing, enable_sharing
from .strategy import Strategy

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_MODEL_TYPES",
    "Strategy",
    "apply",
    "cache_bytes",
    "calibration_texts",
    "compression",
    "disable_sharing",
    "enable_sharing",
    "eval_text",
    "layer_distances",
    "load_model",
    "methods",
    "num_shared_for",
    "perplexity",
    "predicted_cache_bytes",
    "search",
    "sharing",
    "damage_map",
]
__version__ = "0.1.0"
