"""Decode speed against context length: every registered method at a share of the full model's KV bytes, beside
the full model, in one process on one model.

    rows = speed_grid("smollm2-135m", methods=["h2o", "kvsharer"], contexts=(1024, 2048), batches=(1, 4))

A grid point is a (context, batch) pair. Its prompt is held-out long text (kvshare.data.long_documents), the same
tokens for every method and every sequence of the batch. `context` is the length the cache reaches at the end of
decoding: the prompt is `context - new_tokens` tokens, so a model's full context length is a valid grid point.

Every configuration (the full model, then each method at each share) is prefilled once (its prefill time is that
one run) and then decoded `rounds` times from that prefilled state (the cache's layers copied back before each
round): `new_tokens` timed greedy decode steps per round, alternating with the full model's rounds
(`bench.measure_rounds` on the pair), so each method's speed ratio is against the full model's rounds beside its
own. The fastest decode of the rounds is kept, each round's numbers and the machine's load beside it. Only two
prefilled caches live at a time (the full model's and one method's).

A method "at 75% of the bytes" is its mildest setting whose KV bytes after the prefill, counted as a 16-bit model
would store them, are at most 75% of the full model's (`method_at`). The rows carry the shares measured, never the
nominal one: `kept_share` (bytes held in the dtype the model runs, over the full model's) and `kept_share16` (the
same bytes in 16-bit floats). Where a method cannot get down to the share, its strongest setting is measured and
`target_reached` is False.

Beside each speed ratio stands the bound the bytes allow (`bytes_bound`): a decode step reads the weights and the
cache, so a method can be at most (weights + full cache) / (weights + kept cache) times as fast as the full model.

Peak memory is not measured here: on a CPU it needs a process of its own per configuration (`bench.measure_isolated`),
which this grid avoids so that the model is built once.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import methods
from .accounting import cache_bytes, kv_token_bytes, predicted_cache_bytes
from .adapter import decoder_layers, head_dim, layer_types, model_cache_kwarg, num_layers, text_config
from .bench import (
    SPEED_ROUNDS,
    LoadMeter,
    build_model,
    check_context,
    last_logits_only,
    load_note,
    measure_rounds,
    new_cache,
    sync,
)
from .combine import compression, copy_cache_layers
from .methods.quantized import SUPPORTED_BITS
from .strategy import Strategy, spread_strategy

FULL = "full"  # the method name of the uncompressed model's rows
SHARE_SLACK = 1e-9  # float noise allowed when a predicted share is compared with its target


@dataclass
class GridSettings:
    """What a speed grid measures (see the module docstring)."""

    methods: tuple = field(default_factory=lambda: tuple(methods.REGISTRY))
    contexts: tuple = (1024, 2048, 4096, 8192)
    batches: tuple = (1, 4)
    keep: tuple = (0.75, 0.5)  # shares of the full model's KV bytes (16-bit), one configuration per method each
    new_tokens: int = 32
    rounds: int = SPEED_ROUNDS
    strategy: object = None  # kvsharer's best-first strategy (a Strategy, its dict or a file); None: evenly spread
    random_weights: bool = False
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    estimate: bool = True  # time a short unit first and print how long the grid will take

    def check(self) -> None:
        """One line for any setting the grid cannot run with, before anything is loaded."""
        for name in self.methods:
            methods.get(name)  # its one-line error names the registered methods
        if self.new_tokens < 1 or self.rounds < 1:
            raise ValueError(f"new_tokens and rounds must be >= 1, got {self.new_tokens} and {self.rounds}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        for share in self.keep:
            if not 0 < share < 1:
                raise ValueError(f"a share of the bytes must be in (0, 1), got {share} (1 is the full model)")
        for context in self.contexts:
            if context <= self.new_tokens:
                raise ValueError(
                    f"a context of {context} tokens leaves no prompt before {self.new_tokens} new tokens: "
                    f"use contexts above {self.new_tokens}"
                )

    def prompt_len(self, context: int) -> int:
        return context - self.new_tokens


def speed_grid(
    model="smollm2-135m",
    methods=None,
    contexts=(1024, 2048, 4096, 8192),
    batches=(1, 4),
    keep=(0.75, 0.5),
    new_tokens: int = 32,
    rounds: int = SPEED_ROUNDS,
    progress: bool = True,
    **options,
) -> list[dict]:
    """Decode speed of every method at each share of the bytes against the full model, per (context, batch).

    `model` is a name (built once: `bench.build_model`) or a loaded model. `methods` are registered names (None:
    all). `options` are the other fields of `GridSettings` (strategy, random_weights, device, dtype, estimate)."""
    settings = GridSettings(
        contexts=tuple(contexts),
        batches=tuple(batches),
        keep=tuple(keep),
        new_tokens=new_tokens,
        rounds=rounds,
        progress=progress,
        **options,
    )
    if methods is not None:
        settings.methods = tuple(methods)
    return run_grid(model, settings)


def run_grid(model, settings: GridSettings) -> list[dict]:
    """`speed_grid` with its settings gathered."""
    settings.check()
    if isinstance(model, str):
        for context in settings.contexts:  # before the (slow) load, as `kvshare bench` does
            _check_context_named(model, context, settings)
        model = build_model(model, settings.random_weights, device=settings.device, dtype=settings.dtype)
    for context in settings.contexts:
        _check_context_loaded(model, context, settings)
    ids = heldout_ids(max(settings.contexts), getattr(model, "kvshare_tokenizer", None), _vocab(model))
    if settings.estimate:
        estimate = estimate_seconds(model, settings, ids)
        if settings.progress:
            print(format_estimate(estimate), file=sys.stderr, flush=True)
    weights = weight_bytes(model)
    rows = []
    for context in settings.contexts:
        for batch in settings.batches:
            rows += measure_point(model, settings, ids, context, batch, weights)
    return rows


def _check_context_named(name: str, context: int, settings: GridSettings) -> None:
    try:
        check_context(name, settings.prompt_len(context), settings.new_tokens)
    except ValueError as e:
        raise ValueError(f"context {context} (prompt + new tokens): {e}") from None


def _check_context_loaded(model, context: int, settings: GridSettings) -> None:
    """The same line for a loaded model, from its own config (a model passed in was never checked by name)."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    if limit and context > limit:
        raise ValueError(
            f"context {context} (prompt + new tokens) exceeds the model's context of {limit} tokens: "
            f"use contexts of at most {limit}"
        )


def _vocab(model) -> int:
    return text_config(model).vocab_size


# ---------------------------------------------------------------------------------------------
# the prompt
# ---------------------------------------------------------------------------------------------
def heldout_ids(tokens: int, tokenizer=None, vocab: int | None = None) -> torch.Tensor:
    """The first `tokens` tokens of the held-out long documents, one after another ([tokens] ids).

    Without a tokenizer (random-weight shapes, the tests' tiny models) the text's UTF-8 bytes are folded into the
    vocabulary above its three special ids: still the same text-shaped input for every method."""
    from .data import long_documents

    ids: list[int] = []
    for i, doc in enumerate(long_documents("heldout")):
        text = doc["text"] if i == 0 else "\n\n" + doc["text"]
        if tokenizer is not None:
            ids += tokenizer(text, add_special_tokens=i == 0)["input_ids"]
        else:
            ids += [3 + b % (vocab - 3) for b in text.encode()]
        if len(ids) >= tokens:
            return torch.tensor(ids[:tokens], dtype=torch.long)
    raise ValueError(f"the held-out long documents hold {len(ids)} tokens, fewer than a context of {tokens}")


# ---------------------------------------------------------------------------------------------
# a method at a share of the bytes
# ---------------------------------------------------------------------------------------------
def _sharing(share, config, context, strategy):
    L = num_layers(config)
    if strategy is not None:  # a best-first search result: its first C accepted pairs are its C-layer strategy
        accepted = len(strategy.metadata.get("accepted_pairs") or [])
        if strategy.num_layers != L or not accepted:
            raise ValueError(
                f"kvsharer at a share of the bytes takes the first C accepted pairs of a search result for this "
                f"model's {L} layers; the strategy given has {strategy.num_layers} layers and {accepted} accepted pairs"
            )
        return [methods.make("kvsharer", strategy=strategy.prefix(c)) for c in range(1, accepted + 1)]
    out = []
    for c in range(1, L):
        try:
            out.append(methods.make("kvsharer", strategy=spread_strategy(L, c, layer_types(config))))
        except ValueError:  # mixed attention types: not every C can be spread within them
            continue
    return out


def _budget(name):
    def rule(share, config, context, strategy):
        return [methods.make(name, budget=max(1, int(share * context)))]

    return rule


def _simlayerkv(share, config, context, strategy):
    # threshold 0: every layer lazy, so the bytes follow from the settings and not from the text
    sink = methods.SimLayerKVSettings().sink
    return [methods.make("simlayerkv", threshold=0.0, sink=sink, recent=max(1, int(share * context) - sink))]


def _quantized(share, config, context, strategy):
    return [methods.make("quantized", bits=b) for b in sorted(SUPPORTED_BITS, reverse=True)]


def _minicache(share, config, context, strategy):
    # pairs are merged from start_layer to the top: a later start merges fewer layers (milder, more bytes)
    return [methods.make("minicache", start_layer=s) for s in range(num_layers(config) - 1, -1, -1)]


#: Per registered method: its candidate settings for a share of the bytes, mildest first.
SHARE_RULES = {
    "kvsharer": _sharing,
    "streamingllm": _budget("streamingllm"),
    "h2o": _budget("h2o"),
    "pyramidinfer": _budget("pyramidinfer"),
    "quantized": _quantized,
    "simlayerkv": _simlayerkv,
    "minicache": _minicache,
}


def share16(method, config, context: int) -> float:
    """KV bytes `method` holds after a `context`-token prefill over the full model's, both in 16-bit floats."""
    full = predicted_cache_bytes(config, None, 1, [context], 2)
    return predicted_cache_bytes(config, method, 1, [context], 2) / full


def choose_method(name: str, share: float, config, context: int, strategy=None):
    """(method, its predicted 16-bit share, whether that is at most `share`): the mildest candidate of
    `SHARE_RULES` at or under the share, else the strongest one."""
    cls = methods.get(name)  # one line for an unknown name
    if not 0 < share < 1:
        raise ValueError(f"a share of the bytes must be in (0, 1), got {share}")
    rule = SHARE_RULES.get(cls.name)
    if rule is None:
        raise ValueError(f"no rule puts {cls.name} at a share of the bytes: add one to kvshare.speed.SHARE_RULES")
    if strategy is not None and not isinstance(strategy, Strategy):
        strategy = Strategy.from_dict(strategy) if isinstance(strategy, dict) else Strategy.load(strategy)
    candidates = rule(share, config, context, strategy)
    if not candidates:
        raise ValueError(f"{cls.name} has no setting for a {context}-token context")
    shares = [share16(m, config, context) for m in candidates]
    for method, s in zip(candidates, shares):
        if s <= share + SHARE_SLACK:
            return method, s, True
    strongest = min(range(len(shares)), key=shares.__getitem__)
    return candidates[strongest], shares[strongest], False


def method_at(name: str, share: float, config, context: int, strategy=None):
    """The registered method `name` at `share` of the full model's KV bytes (16-bit) after a `context`-token
    prefill: kvsharer replaces C = ceil((1 - share) L) layers spread evenly (or the first C pairs of a best-first
    `strategy`); streamingllm, h2o and pyramidinfer keep int(share x context) tokens; simlayerkv makes every layer
    lazy with sink + recent = int(share x context); quantized takes the most bits at or under the share; minicache
    the latest start_layer at or under it. Where the share is out of reach, the strongest setting."""
    return choose_method(name, share, config, context, strategy)[0]


@dataclass
class Point:
    """One configuration of a grid point: the full model (settings None) or a method at a share."""

    method: str
    target_share: float
    settings: dict | None
    predicted_share16: float
    target_reached: bool


def grid_points(settings: GridSettings, config, prompt_len: int) -> list[Point]:
    """The full model, then every method at every share, for a `prompt_len`-token prefill."""
    points = [Point(FULL, 1.0, None, 1.0, True)]
    for name in settings.methods:
        for share in settings.keep:
            method, s, reached = choose_method(name, share, config, prompt_len, settings.strategy)
            points.append(Point(methods.get(name).name, share, method.to_dict(), s, reached))
    return points


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def prefill_and_decode(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """One timed prefill of `prompt` on a fresh cache, then `new_tokens` timed greedy decode steps on it (the time
    estimate's unit)."""
    prefilled = prefill(model, prompt, None)
    return {"prefill_s": prefilled.prefill_s, **decode(model, prefilled, new_tokens)}


@dataclass
class Prefilled:
    """One configuration after its one timed prefill: the method object (kept: the slots may share state with
    it), the cache, a copy of the cache's layers as the prefill left them, and the first decoded token."""

    point: Point | None
    method: object
    cache: object
    layers: list
    token: torch.Tensor
    prefill_s: float
    kept_bytes: int


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, point: Point | None) -> Prefilled:
    method = methods.from_dict(point.settings) if point is not None and point.settings else None
    device = prompt.device
    cache = new_cache(model, "dynamic", prompt.shape[1])
    kw = model_cache_kwarg(model)
    with compression(model, method):
        sync(device)
        t0 = time.perf_counter()
        logits = model(input_ids=prompt, use_cache=True, **{kw: cache}, **last_logits_only(model)).logits
        token = logits[:, -1:].argmax(-1)
        sync(device)
        prefill_s = time.perf_counter() - t0
    del logits
    layers = copy_cache_layers(cache.layers, method)
    return Prefilled(point, method, cache, layers, token, prefill_s, cache_bytes(cache))


@torch.no_grad()
def decode(model, prefilled: Prefilled, new_tokens: int) -> dict:
    """`new_tokens` timed greedy decode steps from the prefilled state (its cache's layers restored from the copy);
    the cache bytes at the mid-point are read between two timed halves."""
    cache = prefilled.cache
    cache.layers = copy_cache_layers(prefilled.layers, prefilled.method)
    kw = model_cache_kwarg(model)
    device = prefilled.token.device
    token, decode_s, mid = prefilled.token, 0.0, prefilled.kept_bytes
    half = new_tokens // 2
    with compression(model, prefilled.method):
        for part, steps in enumerate((half, new_tokens - half)):
            t = time.perf_counter()
            for _ in range(steps):
                token = model(input_ids=token, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)
            sync(device)
            decode_s += time.perf_counter() - t
            if part == 0:
                mid = cache_bytes(cache)
    return {"decode_s": decode_s, "kept_bytes_mid": mid}


def decode_round(model, prefilled: Prefilled, new_tokens: int) -> dict:
    """One round of one configuration: decoding from its prefilled state, the machine's load beside."""
    with LoadMeter() as load:
        timed = decode(model, prefilled, new_tokens)
    loads = load.result()
    batch = prefilled.token.shape[0]
    return {
        **asdict(prefilled.point),
        **timed,
        "prefill_s": prefilled.prefill_s,
        "kept_bytes": prefilled.kept_bytes,
        "decode_tps": batch * new_tokens / timed["decode_s"],
        "load_avg_1min": loads["load_avg_before"],  # the key bench rows keep per round
        **loads,
    }


def measure_point(model, settings: GridSettings, ids, context: int, batch: int, weights: int) -> list[dict]:
    """Every configuration at one (context, batch). Each is prefilled once (timed once), then decoded from that
    state in `settings.rounds` rounds alternating with the full model's (full, method, method, full, ...): a
    method's speed ratio is against the full model's rounds beside its own. Two prefilled caches live at a time."""
    prompt_len = settings.prompt_len(context)
    device = next(model.parameters()).device
    prompt = ids[:prompt_len].unsqueeze(0).repeat(batch, 1).to(device)
    points = grid_points(settings, model.config, prompt_len)
    full = prefill(model, prompt, points[0])
    full_rows, full_rounds, rows = [], [], []
    for point in points[1:] or points[:1]:
        pair = [full] if point is points[0] else [full, prefill(model, prompt, point)]
        measured = measure_rounds(
            pair,
            lambda prefilled: decode_round(model, prefilled, settings.new_tokens),
            settings.rounds,
            progress=settings.progress,
            desc=f"speed {context} tokens x{batch}: {point.method} {point.target_share:.0%}",
        )
        full_rows.append(measured[0])
        full_rounds += measured[0].get("rounds", [])
        if len(measured) > 1:
            rows.append({**measured[1], "full_decode_tps": measured[0]["decode_tps"]})
    full_row = dict(max(full_rows, key=lambda r: r["decode_tps"]))  # the full model's best round of them all
    full_row.update(rounds=full_rounds, runs_under_load=sum(bool(r.get("under_load")) for r in full_rounds))
    rows.insert(0, full_row)
    for row in rows:
        row.update(context=context, prompt_len=prompt_len, batch=batch, new_tokens=settings.new_tokens)
    return add_speed_ratios(rows, model, weights)


def add_speed_ratios(rows: list[dict], model, weights: int) -> list[dict]:
    """Shares, 16-bit bytes, the speed ratio and the bytes bound of each row of one (context, batch), against its
    full row."""
    from .models import model_name

    full = next(r for r in rows if r["method"] == FULL)
    elem = next(model.parameters()).element_size()
    for r in rows:
        method = methods.from_dict(r["settings"]) if r["settings"] else None
        lengths = [r["prompt_len"]]
        predicted = predicted_cache_bytes(model.config, method, r["batch"], lengths, elem)
        predicted16 = predicted_cache_bytes(model.config, method, r["batch"], lengths, 2)
        r.update(
            model=model_name(model),
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            device=str(next(model.parameters()).device),
            threads=torch.get_num_threads(),
            num_layers=num_layers(model),
            kept_bytes_predicted=predicted,
            full_bytes=full["kept_bytes"],
            kept_share=r["kept_bytes"] / full["kept_bytes"],
            # the measured bytes as a 16-bit model would hold them (codes keep their width, floats take 2 bytes)
            bytes16=round(r["kept_bytes"] * predicted16 / predicted) if predicted else 0,
            full_bytes16=predicted_cache_bytes(model.config, None, r["batch"], lengths, 2),
            full_bytes_mid=full["kept_bytes_mid"],
            weight_bytes=weights,
            # against the full model's rounds that alternated with this configuration's
            speed_ratio=r["decode_tps"] / r.get("full_decode_tps", full["decode_tps"]),
            bytes_bound=bytes_bound(weights, full["kept_bytes_mid"], r["kept_bytes_mid"]),
        )
        r["kept_share16"] = r["bytes16"] / r["full_bytes16"]
        r["share_of_bound"] = r["speed_ratio"] / r["bytes_bound"]
    return rows


def bytes_bound(weight_bytes: int, full_cache_bytes: int, kept_cache_bytes: int) -> float:
    """The most a decode step can gain from a smaller cache when it reads the weights and the cache once:
    (weights + full cache) / (weights + kept cache)."""
    return (weight_bytes + full_cache_bytes) / (weight_bytes + kept_cache_bytes)


def weight_bytes(model) -> int:
    """Bytes of the model's weights as stored: every parameter and buffer once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# how long a grid takes
# ---------------------------------------------------------------------------------------------
def estimate_seconds(model, settings: GridSettings, ids=None, unit_tokens: int = 512, unit_steps: int = 4) -> dict:
    """The grid's time, from one short unit measured on the full model: a `unit_tokens` prefill (batch 1) and
    `unit_steps` decode steps, counted as the grid runs them (one prefill per configuration, each method's decode
    rounds beside as many of the full model's). A prefill scales with its FLOPs (linear in the tokens for the
    weights, quadratic for attention) and the batch; a decode step with the bytes it reads (weights + the batch's
    cache). Methods are counted at the full model's speed: a slower method makes the grid longer than this."""
    ids = heldout_ids(unit_tokens, getattr(model, "kvshare_tokenizer", None), _vocab(model)) if ids is None else ids
    n0 = min(unit_tokens, min(settings.prompt_len(c) for c in settings.contexts), len(ids))
    device = next(model.parameters()).device
    with compression(model):
        prefill_and_decode(model, ids[:16].unsqueeze(0).to(device), 1)  # wakes the kernels: not part of the unit
        unit = prefill_and_decode(model, ids[:n0].unsqueeze(0).to(device), unit_steps)
    step_s = unit["decode_s"] / unit_steps
    cfg = text_config(model)
    layer_params = sum(p.numel() for p in decoder_layers(model).parameters())
    attention = 2 * num_layers(cfg) * cfg.num_attention_heads * head_dim(cfg)  # causal QK and AV per token pair

    def prefill_work(n):
        return n * 2 * layer_params + attention * n * n

    weights = weight_bytes(model)
    token_bytes = num_layers(cfg) * kv_token_bytes(cfg, next(model.parameters()).element_size())
    configs = 1 + len(settings.methods) * len(settings.keep)
    points = []
    for context in settings.contexts:
        n = settings.prompt_len(context)
        mid = n + settings.new_tokens / 2
        for batch in settings.batches:
            prefill = unit["prefill_s"] * batch * prefill_work(n) / prefill_work(n0)
            step = step_s * (weights + batch * token_bytes * mid) / (weights + token_bytes * (n0 + unit_steps / 2))
            # one prefill per configuration; each method's rounds alternate with as many of the full model's
            decodes = settings.rounds * max(1, 2 * (configs - 1))
            seconds = configs * prefill + decodes * settings.new_tokens * step
            points.append({"context": context, "batch": batch, "seconds": seconds})
    return {
        "seconds": sum(p["seconds"] for p in points),
        "runs": settings.rounds * max(1, 2 * (configs - 1)) * len(points),
        "configurations": configs,
        "unit_tokens": n0,
        "unit_prefill_s": unit["prefill_s"],
        "unit_step_s": step_s,
        "points": points,
    }


def format_estimate(estimate: dict) -> str:
    """One line: how long the grid will take and where the estimate comes from."""
    s = estimate["seconds"]
    took = f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"
    step_ms = estimate["unit_step_s"] * 1e3
    return (
        f"speed grid: about {took}: {estimate['configurations']} configurations prefilled once at each of "
        f"{len(estimate['points'])} (context, batch) points, then {estimate['runs']} decode rounds (each method's "
        f"beside as many of the full model's), extrapolated from a {estimate['unit_tokens']}-"
        f"token prefill ({estimate['unit_prefill_s']:.2f} s) and decode steps of {step_ms:.0f} ms on the full model; "
        "methods slower than the full model take longer"
    )


def format_grid_table(rows: list[dict]) -> str:
    """A fixed-width table: method | share | 16-bit share | context | batch | tok/s | x full | bound | of bound
    (a share marked * is above the target: the method's strongest setting could not reach it)."""
    head = ["method", "share", "share16", "context", "batch", "tok/s", "x full", "bound", "of bound"]
    cells = [head]
    for r in rows:
        mark = "" if r.get("target_reached", True) else "*"
        cells.append(
            [
                r["method"] if r["method"] == FULL else f"{r['method']} @{r['target_share']:.0%}",
                f"{r['kept_share']:.3f}{mark}",
                f"{r['kept_share16']:.3f}{mark}",
                str(r["context"]),
                str(r["batch"]),
                f"{r['decode_tps']:.1f}",
                f"{r['speed_ratio']:.2f}",
                f"{r['bytes_bound']:.2f}",
                f"{r['share_of_bound']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    rounds = min((len(r.get("rounds") or [r]) for r in rows), default=0)
    lines.append(f"  best of {rounds} alternating round{'s' if rounds != 1 else ''}{load_note(rows)}")
    return "\n".join(lines)
