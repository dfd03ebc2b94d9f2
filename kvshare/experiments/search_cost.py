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
    orders: list = field(default_factory=lambda: ["dissimilar", "best"])  # the depth sweep's orders
    sweep_orders: list = field(default_factory=lambda: ["dissimilar"])  # the texts and C sweeps' orders
    best_max_layers: int = 48  # best-first's damage map grows as L^3: 80 layers alone take ~4 min on 2 cores
    base_texts: int = 10  # texts of the depth sweep
    base_rate: float = 0.25  # C of the depth and texts sweeps
    tokens: int = 64  # tokens per calibration text
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    seed: int = 0


QUICK_COST = CostSettings(layers=[8, 16], texts=[2, 4], rates=[0.25], base_texts=2, tokens=16, best_max_layers=8)


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

    def orders_at(layers: int, n_texts: int, rate: float) -> list[str]:
        depth_point = n_texts == cfg.base_texts and rate == cfg.base_rate
        wanted = [o for o in cfg.orders if depth_point] + [o for o in cfg.sweep_orders if not depth_point]
        return [o for o in dict.fromkeys(wanted) if o != "best" or layers <= cfg.best_max_layers]

    points = plan(cfg)
    vocab = len(tokenizer)
    bar = Progress(sum(len(orders_at(*p)) for p in points), "search cost", enabled=progress, every=0)
    rows, models = [], {}
    try:
        for layers, n_texts, rate in points:
            model = models.setdefault(layers, random_llama(layers, vocab, cfg))
            texts = calibration_texts(n_texts, set_index=0)
            c = num_shared_for(rate, layers)
            for order in orders_at(layers, n_texts, rate):
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
                        # the official search at T = -1 visits exactly C candidates, two full forwards each
                        "official_layer_forwards": 2 * layers * n_texts * c,
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


def depth_sentences(rows: list[dict], cfg: CostSettings) -> list[str]:
    """The computed verdict of the depth sweep: growth with depth (log-log slope) and the saving against the
    official cost model at the deepest model."""
    slopes = scaling_exponents(rows, cfg)
    lines = []
    for order, s in slopes.items():
        deepest = max(r["layers"] for r in rows if r["order"] == order)
        at = next(
            (
                r
                for r in rows
                if r["order"] == order
                and r["layers"] == deepest
                and r["texts"] == cfg.base_texts
                and r["num_shared"] == num_shared_for(cfg.base_rate, deepest)
            ),
            None,
        )
        saving = (
            f"; at {deepest} layers: {at['layer_forwards']:,} layer-forwards ({at['seconds']:.1f} s), "
            f"{at['official_layer_forwards'] / max(1, at['layer_forwards']):.1f}x fewer than the official cost "
            f"model's {at['official_layer_forwards']:,} for the same C"
            if at is not None and at["layer_forwards"] <= at["official_layer_forwards"]
            else f"; at {deepest} layers: {at['layer_forwards']:,} layer-forwards ({at['seconds']:.1f} s), "
            f"{at['layer_forwards'] / max(1, at['official_layer_forwards']):.1f}x the official fixed-order cost "
            f"model's {at['official_layer_forwards']:,} for the same C"
            if at is not None
            else ""
        )
        lines.append(
            f"- **{order}**: with C = {cfg.base_rate:g} x L and {cfg.base_texts} texts, layer-forwards grow as "
            f"L^{s['layer_forwards']:.2f} and seconds as L^{s['seconds']:.2f} (the official cost model: "
            f"L^{s['official_layer_forwards']:.2f}){saving}."
        )
    return lines
