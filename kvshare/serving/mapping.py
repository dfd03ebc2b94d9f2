"""The strategy as vLLM sees it: which attention layer reads which earlier layer's KV cache.

Plain Python, shared by the exporter (main environment, no vLLM) and the vLLM plugin (serving environment), so
the checks that decide whether vLLM can serve a strategy run, and are tested, without vLLM.

vLLM's cross-layer KV sharing (`Attention(kv_sharing_target_layer_name=...)`) accepts exactly kvshare's
strategies: the target must be an earlier layer of the same attention type that holds its own cache. A chain
r -> s -> t is resolved to r -> t (kvshare.strategy does this on construction), so every target owns a cache.
"""

from __future__ import annotations

from typing import Any

# Hugging Face architecture -> the kvshare architecture that serves it with sharing (kvshare.serving.vllm_plugin)
ARCHITECTURES = {
    "LlamaForCausalLM": "KVShareLlamaForCausalLM",
    "Qwen2ForCausalLM": "KVShareQwen2ForCausalLM",
    "Qwen3ForCausalLM": "KVShareQwen3ForCausalLM",
}
CONFIG_KEY = "kvshare"  # the config.json entry that carries the strategy
FORMAT = "kvshare-vllm/1"


def attention_name(layer: int, model_prefix: str = "model") -> str:
    """vLLM's name of layer `layer`'s `Attention` module (its key in the forward context and the KV cache)."""
    return f"{model_prefix}.layers.{layer}.self_attn.attn"


def layer_index(prefix: str) -> int:
    """The decoder layer index in a vLLM module prefix such as `model.layers.7.self_attn`."""
    parts = prefix.split(".")
    for name, value in zip(parts, parts[1:]):
        if name == "layers" and value.isdigit():
            return int(value)
    raise ValueError(f"no decoder layer index in the module name {prefix!r}")


def servable_mapping(mapping: dict, num_layers: int, layer_types: list[str] | None = None) -> dict[int, int]:
    """Validate a strategy's mapping for vLLM and return it as {replaced layer: source layer}, chains resolved.

    Raises ValueError with one line when vLLM cannot serve it: a layer out of range, a source that is not
    earlier, or a pair of layers of different attention types (vLLM shares a cache only within one type).
    """
    from ..strategy import Strategy

    resolved = Strategy(mapping, num_layers).mapping  # range, order and whole-number checks, chains resolved
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"the config lists {len(layer_types)} layer_types for {num_layers} layers")
        for r, s in resolved.items():
            if layer_types[r] != layer_types[s]:
                raise ValueError(
                    f"vLLM cannot serve this strategy: layer {r} ({layer_types[r]}) would read layer {s}'s cache "
                    f"({layer_types[s]}); share only between layers of the same attention type"
                )
    return resolved


def sharing_targets(mapping: dict[int, int], model_prefix: str = "model") -> dict[int, str]:
    """{replaced layer: the attention name it reads}, what each replaced layer passes to vLLM's `Attention`."""
    return {r: attention_name(s, model_prefix) for r, s in sorted(mapping.items())}


def strategy_entry(
    mapping: dict[int, int], num_layers: int, base_architecture: str, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `kvshare` entry written into an exported config.json."""
    return {
        "format": FORMAT,
        "base_architecture": base_architecture,
        "num_layers": num_layers,
        "num_shared": len(mapping),
        "mapping": {str(r): s for r, s in sorted(mapping.items())},
        "metadata": dict(metadata or {}),
    }


def read_entry(config: dict | Any, architecture: str) -> tuple[dict[int, int], int]:
    """Read and validate the `kvshare` entry of a config (a dict or a transformers config object).

    `architecture` is the kvshare architecture being built; the entry must be for its base architecture.
    Returns (mapping, num_layers).
    """
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    entry = get(CONFIG_KEY)
    num_layers = get("num_hidden_layers")
    if not isinstance(entry, dict) or "mapping" not in entry:
        raise ValueError(
            f"{architecture} needs a '{CONFIG_KEY}' entry with a 'mapping' in config.json: "
            "export the model with `python -m kvshare export-vllm`"
        )
    base = entry.get("base_architecture")
    if base and ARCHITECTURES.get(base) != architecture:
        raise ValueError(f"this config's strategy is for {base}, not {architecture}: export the model again")
    if entry.get("num_layers", num_layers) != num_layers:
        raise ValueError(
            f"the strategy in config.json is for {entry['num_layers']} layers but the model has "
            f"{num_layers}: export it again with a strategy searched for this model"
        )
    mapping = servable_mapping(entry["mapping"], num_layers, get("layer_types"))
    return mapping, num_layers
