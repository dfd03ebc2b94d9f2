"""kvshare: layer-wise KV-cache sharing (KVSharer) on Hugging Face transformers."""
from .calibration import layer_distances
from .data import calibration_texts, eval_text
from .metrics import perplexity
from .models import DEFAULT_MODEL, load_model
from .search import search
from .sharing import SUPPORTED_MODEL_TYPES, cache_bytes, compression, disable_sharing, enable_sharing, sharing
from .strategy import Strategy
from . import policies  # kvshare.policies.make_policy("h2o", budget=128) after `import kvshare`

__all__ = [
    "DEFAULT_MODEL", "SUPPORTED_MODEL_TYPES", "Strategy", "cache_bytes", "compression", "calibration_texts", "disable_sharing",
    "enable_sharing", "eval_text", "layer_distances", "load_model", "perplexity", "policies", "search",
    "sharing",
]
__version__ = "0.1.0"
