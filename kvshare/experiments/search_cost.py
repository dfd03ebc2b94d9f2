"""Search cost against model depth, calibration size and C (notebook 08, the reviewers' cost question).

What a search costs is counted in layer-forwards (one decoder layer run over one calibration text), which the
model's width does not change; wall time is measured beside it. Deep models are random-weight Llama-layout
models at a small width (`CostSettings.hidden`): their weights make the threshold's decisions meaningless, so
every search here accepts every candidate (`threshold=-1`) and visits exactly C candidates in the fixed orders,
which isolates the cost of the search itself from how often it rejects.

The official implementation's cost model, set beside ours: every candidate it visits costs two full forwards
of every calibration text (the shared model and, again, the reference), 2 * L * texts layer-forwards. kvshare's
fixed-order search runs the reference once and, for a candidate replacing layer r, only layers r..L-1 from the
accepted state (`kvshare.search`). The best-first search adds its damage screen and re-scoring
(`search(..., order="best")`; its metadata splits the count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..accounting import num_shared_for
from ..data import calibration_texts
from ..progress import Progress
from ..search import search


@dataclass
class CostSettings:
    layers: list = field(default_factory=lambda: [16, 32, 48, 64, 80])  # depths of the random-weight models
    texts: list = field(default_factory=lambda: [5, 10, 30])  # calibration texts (at the middle depth)
    rates: list = field(default_factory=lambda: [0.125, 0.25, 0.4])  # C = rate x layers
    orders: list = field(default_factory=lambda: ["dissimilar", "best"])
    base_texts: int = 10  # texts of the depth sweep
    base_rate: float = 0.25  # C of the depth and texts sweeps
    tokens: int = 64  # tokens per calibration text
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    seed: int = 0


QUICK_COST = CostSettings(layers=[8, 16], texts=[2, 4], rates=[0.25], base_texts=2, tokens=16)


def random_llama(num_layers_: int, vocab: int, cfg: CostSettings):
    """A random-weight Llama-layout model of `num_layers_` layers at the settings' width (seeded)."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=num_layers_,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(256, 2 * cfg.tokens),
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def plan(cfg: CostSettings) -> list[tuple[int, int, float]]:
    """Distinct (layers, texts, rate) points: depth sweep, texts sweep at the middle depth, C sweep there."""
    mid = cfg.layers[len(cfg.layers) // 2]
    points = [(n, cfg.base_texts, cfg.base_rate) for n in cfg.layers]
    points += [(mid, t, cfg.base_rate) for t in cfg.texts]
    points += [(mid, cfg.base_texts, r) for r in cfg.rates]
    return list(dict.fromkeys(points))


def cost_rows(tokenizer, cfg: CostSettings, progress: bool = True) -> list[dict]:
    """One row per (layers, texts, C, order): seconds, layer-forwards, the official cost model's count."""
    points = plan(cfg)
    vocab = len(tokenizer)
    bar = Progress(len(points) * len(cfg.orders), "search cost", enabled=progress, every=0)
    rows, models = [], {}
    try:
        for layers, n_texts, rate in points:
            model = models.setdefault(layers, random_llama(layers, vocab, cfg))
            texts = calibration_texts(n_texts, set_index=0)
            c = num_shared_for(rate, layers)
            for order in cfg.orders:
                strategy, _ = search(
                    model, tokenizer, texts, c, threshold=-1.0, order=order, max_tokens=cfg.tokens, progress=False
                )
                meta = strategy.metadata
                rows.append(
                    {
                        "layers": layers,
                        "texts": n_texts,
                        "num_shared": c,
                        "order": order,
                        "seconds": meta["search_seconds"],
                        "layer_forwards": meta["layer_forwards"],
                        "official_layer_forwards": 2 * layers * n_texts * meta["candidates_visited"],
                        "candidates_visited": meta["candidates_visited"],
                    }
                )
                bar.update(note=f"L={layers} texts={n_texts} C={c} {order}: {meta['search_seconds']:.1f} s")
    finally:
        bar.close()
    return rows


def scaling_exponents(rows: list[dict], cfg: CostSettings) -> dict[str, dict[str, float]]:
    """Per order: the log-log slope, against depth, of layer-forwards, seconds and the official cost model's
    layer-forwards (the depth sweep: base texts, C = base rate of each depth). A slope of 2 is quadratic."""
    import numpy as np

    out = {}
    for order in cfg.orders:
        depth = {
            r["layers"]: r
            for r in rows
            if r["order"] == order
            and r["texts"] == cfg.base_texts
            and r["num_shared"] == num_shared_for(cfg.base_rate, r["layers"])
        }
        if len(depth) < 2:
            continue
        xs = np.log([float(k) for k in depth])
        out[order] = {
            key: float(np.polyfit(xs, np.log([max(1e-9, float(d[key])) for d in depth.values()]), 1)[0])
            for key in ("layer_forwards", "seconds", "official_layer_forwards")
        }
    return out
