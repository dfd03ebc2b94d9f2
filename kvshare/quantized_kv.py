"""The quantized KV cache under its wave-1 name: it now lives in `kvshare.methods.quantized` (the method
`quantized` of the registry); this module keeps `from kvshare.quantized_kv import QuantizedKV` working."""

from .methods.quantized import (  # noqa: F401
    SUPPORTED_BITS,
    QTensor,
    QuantizedKV,
    QuantizedKVLayer,
    QuantizedSettings,
    QuantizedStorage,
    dequantize,
    error_bound,
    held_tokens,
    make_policy,
    plain_cache_bytes,
    quantize,
    quantized,
    quantized_eviction,
)

__all__ = [
    "QTensor",
    "QuantizedKV",
    "QuantizedKVLayer",
    "QuantizedSettings",
    "QuantizedStorage",
    "SUPPORTED_BITS",
    "dequantize",
    "error_bound",
    "held_tokens",
    "make_policy",
    "plain_cache_bytes",
    "quantize",
    "quantized",
    "quantized_eviction",
]
