"""The damage map: what replacing ONE layer's K/V by an earlier layer's does to the model, for every pair.

For every pair (r, s), r > s, of the same attention type, layer r alone reads layer s's K/V and the
calibration texts run through the shared model; the row holds

- `hidden_cosine`: the paper's score, the mean over texts of the cosine similarity of the final normed
  hidden states, shared vs full (1 = no change);
- `kl`: the mean over calibration positions of KL(full || shared) of the next-token distributions (nats;
  0 = no change). It is the expected extra negative log-likelihood per token when the full model's
  predictions are the truth, so it is the score that tracks perplexity;
- `distance_<metric>`: the layer-to-layer calibration distance of the pair under every metric of
  `kvshare.calibration.METRICS` (what the paper's order sorts by), so the table answers "does
  dissimilarity predict low damage?" on its own.

Cost: one reference forward, then for each pair only layers r..L-1 (a pair changes nothing below r: the
incremental forward of `kvshare.search`), all texts as one batch. The KL needs the LM head, which on a
small model costs as much as several decoder layers over all positions; `kl_stride` scores every
`kl_stride`-th position of each text (exact KL at those positions; the hidden cosine always uses them all).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .adapter import cache_kwarg_name, check_supported, decoder_layers, final_norm, layer_types, num_layers
from .calibration import METRICS, distances_from_means, encode_calibration, kv_means, reference_forward
from .progress import Progress
from .sharing import (
    active_method,
    active_strategy,
    disable_sharing,
    enable_sharing,
    prepare_cache,
    release_cache,
    replace_attention,
    restore_attention,
)
from .strategy import Strategy

DEFAULT_KL_STRIDE = 4  # every 4th position: see `damage_map`


class DamageMap(list):
    """The rows of a damage map (one dict per pair), with `metadata` (cost, settings) and matrix views."""

    def __init__(self, rows, num_layers_: int, metadata: dict | None = None):
        super().__init__(rows)
        self.num_layers = num_layers_
        self.metadata = dict(metadata or {})

    def matrix(self, column: str) -> np.ndarray:
        """L x L array of `column` at [r, s] for every pair in the map, NaN elsewhere."""
        out = np.full((self.num_layers, self.num_layers), np.nan)
        for row in self:
            out[row["replaced"], row["source"]] = row[column]
        return out

    def ranked(self, criterion: str = "kl") -> list[tuple[int, int]]:
        """Pairs from the least to the most harmful by `criterion` ('kl' or 'hidden_cosine'); ties by (r, s)."""
        sign = -1.0 if criterion == "hidden_cosine" else 1.0
        return [
            (row["replaced"], row["source"])
            for row in sorted(self, key=lambda row: (sign * row[criterion], row["replaced"], row["source"]))
        ]

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "metadata": self.metadata, "rows": list(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "DamageMap":
        return cls(data["rows"], data["num_layers"], data.get("metadata"))


def run_from(model, layer_inputs, layer_kwargs, slots, start: int, mapping: dict[int, int]):
    """Run layers start..L-1 under `mapping` from the accepted hidden state at `start` (the incremental forward of
    the search and of the damage map: a strategy changes nothing below its first replaced layer).

    Returns the final normed hidden states, the inputs each layer saw and the cache slots. The attention modules
    of layers start..L-1 are left as `mapping` set them: callers restore them (`restore_attentions`).
    """
    layers = decoder_layers(model)
    for i in range(start, len(layers)):
        attn = layers[i].self_attn
        restore_attention(attn)
        if i in mapping:
            replace_attention(attn, mapping[i])
    cache = DynamicCache()  # full K/V in every slot: later candidates read sources from these slots
    cache.layers[:start] = slots[:start]  # read-only: the layers below `start` do not run
    prepare_cache(cache, Strategy(mapping, len(layers)))
    cache_kwarg = cache_kwarg_name(layers[start].forward)
    hidden = layer_inputs[start]
    inputs = {}
    try:
        for i in range(start, len(layers)):
            inputs[i] = hidden
            out = layers[i](hidden, **layer_kwargs[i], **{cache_kwarg: cache})
            hidden = out[0] if isinstance(out, tuple) else out
    finally:
        release_cache(cache)
    return final_norm(model)(hidden), inputs, cache.layers


def similarity(shared: torch.Tensor, original: torch.Tensor) -> float:
    """Mean over texts of the cosine similarity of the final hidden states, all positions flattened."""
    return F.cosine_similarity(shared.float().flatten(1), original.float().flatten(1), dim=1).mean().item()


class PairScorer:
    """Scores strategies against the full model on one calibration batch, restarting at the first changed layer.

    One reference forward keeps what every layer saw and stored; `score(start, mapping, inputs, slots)` runs
    layers start..L-1 under `mapping` from the given layer inputs and cache slots (those of the strategy
    accepted so far, or the reference's) and returns both damage scores with what the run left behind.
    `layer_forwards` counts decoder-layer forwards of one text, the unit `kvshare.search` reports.
    """

    @torch.no_grad()
    def __init__(self, model, input_ids: torch.Tensor, kl_stride: int = DEFAULT_KL_STRIDE):
        if not isinstance(kl_stride, int) or kl_stride < 1:
            raise ValueError(f"kl_stride must be a positive integer, got {kl_stride!r}")
        self.model = model
        self.num_layers = num_layers(model)
        self.n_texts, length = input_ids.shape
        self.reference = reference_forward(model, input_ids)
        # every kl_stride-th position, the last one included (stride 1: all of them)
        self.positions = torch.arange(length - 1, -1, -kl_stride).flip(0)
        self.head = model.get_output_embeddings()
        # what the KL needs of the full model at each scored position: its hidden state h0, its next-token
        # log-probabilities log p (and their log-sum-exp, 0 up to rounding) and its expected output embedding
        # m = sum_v p_v W_v
        self._reference = []
        for h0 in self._chunks(self.reference.final_hidden):
            logp = torch.log_softmax(self.head(h0).float(), dim=-1)
            m = logp.exp() @ self.head.weight.float()
            self._reference.append((h0, logp, torch.logsumexp(logp, dim=-1), m))
        self.layer_forwards = self.num_layers * self.n_texts

    # the LM head over [chunk of texts, scored positions, vocabulary] at a time keeps memory flat
    def _chunks(self, hidden: torch.Tensor, size: int = 8):
        return hidden[:, self.positions.to(hidden.device)].split(size)

    def kl(self, final_hidden: torch.Tensor) -> float:
        """Mean over texts and scored positions of KL(full || shared), in nats.

        With the logits' change dz = W (h - h0) (a bias cancels), log q = log p + dz - log sum_v p_v e^dz_v, so
        KL(p || q) = log sum_v p_v e^dz_v - sum_v p_v dz_v = lse(log p + dz) - lse(log p) - m . (h - h0): one
        matmul and one log-sum-exp per position, no softmax of the shared model, and well conditioned (no
        difference of two large log-normalizers; exactly 0 when the hidden state is unchanged).
        """
        total = 0.0
        for (h0, logp, lse_p, m), h in zip(self._reference, self._chunks(final_hidden)):
            dh = h - h0
            dz = F.linear(dh, self.head.weight).float()
            total += (torch.logsumexp(logp + dz, dim=-1) - lse_p - (dh.float() * m).sum(-1)).sum().item()
        return max(0.0, total / (self.n_texts * len(self.positions)))  # rounding can dip a hair below 0

    def cosine(self, final_hidden: torch.Tensor) -> float:
        return similarity(final_hidden, self.reference.final_hidden)

    @torch.no_grad()
    def score(self, start: int, mapping: dict[int, int], layer_inputs=None, slots=None):
        """Run layers start..L-1 under `mapping`; return ({hidden_cosine, kl}, layer inputs, cache slots)."""
        layer_inputs = self.reference.layer_inputs if layer_inputs is None else layer_inputs
        slots = self.reference.cache_layers if slots is None else slots
        kwargs = self.reference.layer_kwargs
        final, inputs, new_slots = run_from(self.model, layer_inputs, kwargs, slots, start, mapping)
        self.layer_forwards += (self.num_layers - start) * self.n_texts
        return {"hidden_cosine": self.cosine(final), "kl": self.kl(final)}, inputs, new_slots


def same_type_pairs(model) -> list[tuple[int, int]]:
    """Every (r, s), r > s, whose layers have the same attention type, in (r, s) order."""
    types = layer_types(model)
    n = num_layers(model)
    return [(r, s) for r in range(n) for s in range(r) if types[r] == types[s]]


@torch.no_grad()
def damage_map(
    model, tokenizer, texts, max_tokens: int = 64, progress: bool = True, kl_stride: int = DEFAULT_KL_STRIDE, pairs=None
) -> DamageMap:
    """Score every single pair (r, s), r > s, of the same attention type by what sharing it alone does.

    Returns a `DamageMap`: a list of rows {replaced, source, hidden_cosine, kl, distance_<metric>...} in
    (r, s) order, with `metadata` (seconds, layer-forwards, calibration, kl_stride). `pairs` restricts the
    map to some pairs. `kl_stride=1` scores every position; the default 4 scores every 4th one, which on
    the default model ranks the pairs as the full KL does (the check is in notebook 11's results) at a
    fraction of the LM head's cost. Runs without gradients, all texts as one batch; the model is left
    exactly as it was (any sharing enabled before is re-enabled).
    """
    check_supported(model)
    previous = active_strategy(model), active_method(model)
    disable_sharing(model)
    t0 = time.perf_counter()
    ids, description = encode_calibration(tokenizer, texts, max_tokens)
    todo = same_type_pairs(model) if pairs is None else [(int(r), int(s)) for r, s in pairs]
    try:
        scorer = PairScorer(model, ids, kl_stride)
        rows = map_rows(scorer, todo, progress)
    finally:
        restore_attentions(model)
        if previous[0] is not None:
            enable_sharing(model, *previous)
    elapsed = time.perf_counter() - t0
    meta = {
        "seconds": round(elapsed, 3),
        "pairs": len(rows),
        "layer_forwards": scorer.layer_forwards,
        "kl_stride": kl_stride,
        "kl_positions_per_text": len(scorer.positions),
        "calibration": description,
        "threads": torch.get_num_threads(),
    }
    return DamageMap(rows, num_layers(model), meta)


def map_rows(scorer: PairScorer, pairs, progress: bool = True) -> list[dict]:
    """One damage-map row per pair, each scored alone against the full model by `scorer`."""
    keys, values = kv_means(scorer.reference)
    distances = {m: distances_from_means(keys, values, metric=m) for m in METRICS}
    L = scorer.num_layers
    rows = []
    bar = Progress(
        sum(L - r for r, _ in pairs),
        f"damage map: {len(pairs)} pairs on {scorer.n_texts} texts (counted in layer-forwards)",
        enabled=progress,
    )
    try:
        for r, s in pairs:
            scores, _, _ = scorer.score(r, {r: s})
            rows.append(
                {"replaced": r, "source": s, **scores, **{f"distance_{m}": float(distances[m][r][s]) for m in METRICS}}
            )
            bar.update(L - r, note=f"{r}->{s}: KL {scores['kl']:.4f}")
    finally:
        bar.close()
    return rows


def restore_attentions(model) -> None:
    """Give every attention module its own forward back (scoring replaces them as it goes)."""
    for layer in decoder_layers(model):
        restore_attention(layer.self_attn)
