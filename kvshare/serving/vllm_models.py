"""The kvshare architectures in vLLM: Llama, Qwen2 and Qwen3 with a post-hoc sharing strategy.

Each class is vLLM's own model, built as usual, after which every replaced layer's self-attention becomes a
`SharedQueryAttention`: its `Attention` is built with `kv_sharing_target_layer_name` pointing at the source
layer's, so vLLM gives it no KV cache, writes none for it, and attends over the source's cache (vLLM's
cross-layer sharing, as Gemma3n/Gemma4 use it). Unlike Gemma3n it also computes no keys or values: the fused
q/k/v projection is replaced by a query-only one, and the checkpoint's k_proj/v_proj of that layer are dropped
while loading.

Imported only by vLLM (lazily, through kvshare.serving.vllm_plugin), in the serving environment.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, PPMissingLayer
from vllm.v1.attention.backend import AttentionType

from .mapping import read_entry


class QueryProjection(ColumnParallelLinear):
    """A replaced layer's query-only projection, in place of (and named like) its fused `qkv_proj`.

    Keeping the name lets the model's own weight mapper route the checkpoint's q_proj/k_proj/v_proj here as
    shards "q", "k" and "v": the query shard is loaded, the key and value shards are dropped.
    """

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[str]:
        for name, tensor in weights:
            shard = getattr(tensor, "shard_id", None)
            if shard in ("k", "v"):
                continue
            if shard != "q":
                raise ValueError(
                    f"kvshare: a replaced layer's {self.prefix}.{name} must come as separate "
                    "q_proj/k_proj/v_proj tensors, not a fused qkv projection"
                )
            param = getattr(self, name)
            param.weight_loader(param, tensor)
            yield name


class SharedQueryAttention(nn.Module):
    """Self-attention of a replaced layer: queries only, attending over the KV cache of `target`.

    Built from the layer's own attention module as vLLM constructed it (Llama, Qwen2 or Qwen3), reusing its
    output projection, rotary embedding and query norm (Qwen3), so what differs is only what sharing changes.
    """

    def __init__(self, original: nn.Module, target: str, vllm_config: VllmConfig):
        super().__init__()
        attn = original.attn
        if attn.attn_type != AttentionType.DECODER:
            raise ValueError(
                f"kvshare: {attn.layer_name} is not causal decoder attention; sharing applies to "
                "decoder self-attention only"
            )
        if getattr(original, "dual_chunk_attention_config", None):
            raise ValueError("kvshare: dual-chunk attention is not supported with sharing")
        qkv = original.qkv_proj
        self.num_heads, self.head_dim = original.num_heads, original.head_dim
        self.q_size, self.kv_size = original.q_size, original.kv_size
        self.qkv_proj = QueryProjection(
            qkv.input_size,
            original.total_num_heads * original.head_dim,
            bias=qkv.bias is not None,
            quant_config=vllm_config.quant_config,
            prefix=qkv.prefix,
        )
        self.o_proj = original.o_proj
        self.rotary_emb = original.rotary_emb
        # Qwen3 (and Qwen2 with qk_norm) normalize each query head; the key norm goes with the keys
        self.q_norm = getattr(original, "q_norm", None)
        # vLLM registers every Attention under its name when it is built; this layer is built again as a
        # reader of `target`, under the same name, so its first registration goes
        del vllm_config.compilation_config.static_forward_context[attn.layer_name]
        self.attn = Attention(
            attn.num_heads,
            attn.head_size,
            original.scaling,
            num_kv_heads=attn.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            per_layer_sliding_window=attn.sliding_window,
            attn_type=attn.attn_type,
            kv_sharing_target_layer_name=target,
            prefix=attn.layer_name,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, _ = self.qkv_proj(hidden_states)
        if self.q_norm is not None:
            q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(-1, self.q_size)
        q, _ = self.rotary_emb(positions, q, None)
        # vLLM's attention op takes key and value tensors, but a sharing layer's are never read: the cache write is
        # skipped and the backend attends over the target's cache. So it gets empty ones instead of computed ones.
        nothing = q.new_empty((0, self.kv_size))
        out = self.attn(q, nothing, nothing)
        out, _ = self.o_proj(out)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # the checkpoint's key norm (Qwen3) of a replaced layer has nothing to normalize here
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=["k_norm."]).load_weights(weights)


def share_layers(model: nn.Module, architecture: str) -> dict[int, int]:
    """Turn each replaced layer of `model` (a vLLM causal LM, just built) into a `SharedQueryAttention`."""
    vllm_config = get_current_vllm_config()
    mapping, _ = read_entry(vllm_config.model_config.hf_config.get_text_config(), architecture)
    inner = model.model
    for r, s in mapping.items():
        if not inner.start_layer <= r < inner.end_layer:
            continue  # another pipeline stage holds this layer
        if not inner.start_layer <= s < inner.end_layer or isinstance(inner.layers[s], PPMissingLayer):
            raise ValueError(
                f"kvshare: layer {r} reads layer {s}'s cache, which pipeline parallelism placed on "
                "another stage: use tensor parallelism, or a strategy within one stage"
            )
        layer = inner.layers[r]
        target = inner.layers[s].self_attn.attn.layer_name
        layer.self_attn = SharedQueryAttention(layer.self_attn, target, vllm_config)
    return mapping


class KVShareLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.kvshare_mapping = share_layers(self, type(self).__name__)


class KVShareQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.kvshare_mapping = share_layers(self, type(self).__name__)


class KVShareQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.kvshare_mapping = share_layers(self, type(self).__name__)
