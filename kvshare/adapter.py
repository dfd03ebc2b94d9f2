"""The model adapter: everything kvshare needs to know about a decoder-only transformers model, in one place.

Sharing, search, calibration, the cache methods and the benchmark read a model only through these
functions, so supporting a new architecture means teaching this module about it:

- the decoder layers, their number, the final norm;
- the attention geometry: KV heads, `head_dim` (the config's own `head_dim` when it has one, else
  `hidden_size / num_attention_heads`), the sliding window and attention type of every layer;
- the keyword under which the installed transformers passes the KV cache (`cache` from 5.24 on,
  `past_key_values` before);
- a layer's query as its attention computes it: projection, the model's own per-head norm (Qwen3,
  Gemma-3) and the model's own RoPE; the attention function and the extra arguments the
  architecture passes to it.
"""

from __future__ import annotations

import inspect
import sys

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


# --------------------------------------------------------------------------------------------
# the model and its layers
# --------------------------------------------------------------------------------------------
def text_config(config_or_model):
    """The text (decoder) config of a model or config."""
    config = getattr(config_or_model, "config", config_or_model)
    return config.get_text_config()


def model_type(model) -> str:
    return text_config(model).model_type


def check_supported(model) -> None:
    """Raise a one-line error when kvshare cannot share K/V in this architecture."""
    kind = model_type(model)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"KV sharing does not support the '{kind}' architecture; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def base_model(model):
    """The decoder stack (the module with `layers` and `norm`) of a causal LM, or the model itself."""
    return model.base_model if hasattr(model, "base_model") else model


def decoder_layers(model):
    """The decoder layer list of a causal LM (or of its base model)."""
    layers = getattr(base_model(model), "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__} has no `layers` list of decoder layers")
    return layers


def final_norm(model):
    """The norm applied to the last decoder layer's output (the 'final hidden states' of the search)."""
    return base_model(model).norm


def num_layers(config_or_model) -> int:
    return text_config(config_or_model).num_hidden_layers


# --------------------------------------------------------------------------------------------
# attention geometry
# --------------------------------------------------------------------------------------------
def head_dim(config_or_model) -> int:
    """Channels per attention head: the config's `head_dim` when set (Qwen3, Gemma), else hidden / heads."""
    cfg = text_config(config_or_model)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(config_or_model) -> int:
    return text_config(config_or_model).num_key_value_heads


def query_groups(config_or_model) -> int:
    """Query heads per KV head (grouped-query attention)."""
    cfg = text_config(config_or_model)
    return cfg.num_attention_heads // cfg.num_key_value_heads


def layer_types(config_or_model) -> list[str]:
    """The attention type of every layer ('full_attention', 'sliding_attention', ...)."""
    cfg = text_config(config_or_model)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return list(types)
    kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return [kind] * cfg.num_hidden_layers


def layer_window(config_or_model, layer_idx: int) -> int | None:
    """The sliding window of layer `layer_idx` (None for full attention), as transformers' caches see it."""
    cfg = text_config(config_or_model)
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types is not None:
        return window if types[layer_idx] in ("sliding_attention", "chunked_attention") and window else None
    return window or None


# --------------------------------------------------------------------------------------------
# the cache keyword of the installed transformers
# --------------------------------------------------------------------------------------------
def cache_kwarg_name(forward) -> str:
    """The name under which `forward` takes the KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    params = inspect.signature(forward).parameters
    if "cache" in params or "past_key_values" in params:
        return "cache" if "cache" in params else "past_key_values"
    # a wrapper taking **kwargs only (hooks, quantized models): the name the installed transformers uses
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def model_cache_kwarg(model) -> str:
    """`cache_kwarg_name` of a model's top-level forward, for calls like `model(ids, **{kw: cache})`."""
    return cache_kwarg_name(model.forward)


def cache_of(kwargs: dict):
    """The cache in a forward's keyword arguments, under either name."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


# --------------------------------------------------------------------------------------------
# a layer's attention, as the model computes it
# --------------------------------------------------------------------------------------------
def _modeling_module(attn):
    return sys.modules[type(attn).__module__]


def rotary(attn):
    """The model's own `apply_rotary_pos_emb` for this attention module."""
    return _modeling_module(attn).apply_rotary_pos_emb


def query_states(attn, projected, position_embeddings):
    """The layer's query as its attention sees it: `projected` (the q_proj output, [batch, q, heads * dim])
    split into heads, normalized per head where the model does (Qwen3, Gemma-3), rotated by the model's RoPE.
    Returns [batch, heads, q, dim]."""
    batch, q_len = projected.shape[:2]
    query = projected.view(batch, q_len, -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        query = attn.q_norm(query)
    query = query.transpose(1, 2)
    cos, sin = position_embeddings
    query, _ = rotary(attn)(query, query[:, :0], cos, sin)  # an empty key tensor costs nothing
    return query


def attention_function(attn):
    """A getter for the attention function the model is configured with (eager, sdpa, ...), read at call
    time so that `model.set_attn_implementation` keeps working."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = _modeling_module(attn).eager_attention_forward

    def get():
        impl = attn.config._attn_implementation
        if impl in (None, "eager"):
            return eager
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
            return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        return ALL_ATTENTION_FUNCTIONS[impl]

    return get


def attention_kwargs(attn) -> dict:
    """Extra keyword arguments the architecture passes to its attention function.

    Gemma-3 (`gemma3_text`): the layer's own `sliding_window` (None on full-attention layers), as
    Gemma3Attention passes it. Everything else Gemma-3 does differently reaches a replaced layer without
    an argument here: its query norm (`q_norm`, applied by `query_states` / the shared forward), its
    scaling (`attn.scaling` = query_pre_attn_scalar ** -0.5, which the shared forward passes), its RoPE
    (the decoder stack hands every layer the cos/sin of its own layer type: local base on sliding
    layers, global base on full ones) and its sliding-window mask (chosen per layer type by the stack).
    Attention-logit softcapping: Gemma3Attention in the installed transformers passes no `softcap`, so
    `attn_logit_softcapping` has no effect on the plain model and none is passed here either (the
    shared layer computes what the plain layer computes); should a release pass it, it is passed too.
    """
    kind = attn.config.model_type
    if kind == "mistral":
        return {"sliding_window": getattr(attn.config, "sliding_window", None)}
    if kind in ("qwen2", "qwen3"):
        return {"sliding_window": attn.sliding_window}
    if kind == "gemma3_text":
        extra = {"sliding_window": attn.sliding_window}
        if _passes_softcap(attn) and getattr(attn, "attn_logit_softcapping", None) is not None:
            extra["softcap"] = attn.attn_logit_softcapping
        return extra
    return {}


def _passes_softcap(attn) -> bool:
    """Whether the installed modeling code's attention forward hands `softcap=` to its attention function
    (Gemma-2 does; Gemma-3 in transformers 5.24 does not)."""
    try:
        return "softcap=" in inspect.getsource(type(attn).forward)
    except (OSError, TypeError):  # source unavailable (frozen install): follow the config
        return True
