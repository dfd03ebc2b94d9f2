"""Where the time goes: a per-operation breakdown of plain and shared prefill and decode, beside what FLOPs and
bytes moved predict (`python -m kvshare bench --profile`).

Three views of the same configuration (model, batch, prompt, decoded tokens, cache kind), plain transformers and
the shared model alike:

- **wall time** of the prefill and of the decode, from clean runs (no hooks, no profiler), plain and shared
  alternating `rounds` times, the fastest kept (the Python-level view likewise: per part the least time);
- **torch.profiler** (CPU) of one more run, grouped by operator (`aten::linear`, `aten::cat`, `aten::index_copy_`,
  `aten::scaled_dot_product_attention`, ...): calls and self CPU time;
- **a Python-level view per module type** from forward hooks: k/v projections, q/o projections, the attention
  core (the attention module minus its projections and cache update: RoPE, scores, softmax), MLP, norms, LM head,
  the cache (`Cache.update` as called, the sharing tap included, and the slot's own write or `torch.cat` copy
  inside it), the sharing hooks on the decoder stack, and the rest (embedding, masks, Python glue).

The cost model (`cost_model`) counts, per token per layer, the multiply-adds of the q/k/v/o projections, of
attention over the cache length and of the MLP, the LM head's per position that computes logits, and the bytes
that move: every weight read once per forward, K/V read by attention, K/V written into the cache (a dynamic cache
rewrites a kept layer's whole cache per step by `torch.cat`; a static one writes one token in place, while
attention reads its whole preallocated length). A replaced layer runs no k/v projection, reads no k/v weights and
writes no cache; it still attends over its source's cache. Beside every measured ratio shared / plain stands the
ratio of FLOPs and the ratio of bytes; the prefill is compute-bound (FLOPs predict it), a decode step at small
batch is bound by memory traffic (bytes predict it).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from .accounting import kv_token_bytes, num_shared_for
from .adapter import head_dim, layer_types, model_cache_kwarg, num_layers, text_config
from .bench import LoadMeter, build_model, last_logits_only, new_cache, sync
from .combine import compression
from .strategy import Strategy, spread_strategy

PHASES = ("prefill", "decode")
# Python-level parts, in the order of the table
PARTS = (
    "k/v projections",
    "q/o projections",
    "attention core",
    "cache update (Cache.update, tap included)",
    "cache writes/copies (slot update)",
    "sharing hooks",
    "mlp",
    "norms",
    "lm head",
    "rest",
)
# which cost-model entry predicts which part (None: the model has no count for it)
PREDICTED_BY = {
    "k/v projections": "kv_proj",
    "q/o projections": "qo_proj",
    "attention core": "attention",
    "cache update (Cache.update, tap included)": "cache_write",
    "cache writes/copies (slot update)": "cache_write",
    "sharing hooks": None,
    "mlp": "mlp",
    "norms": None,
    "lm head": "lm_head",
    "rest": None,
}
MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h"}


# ---------------------------------------------------------------------------------------------
# the cost model
# ---------------------------------------------------------------------------------------------
def cost_model(
    cfg, num_shared: int, batch: int, prompt_len: int, new_tokens: int, cache: str = "dynamic", elem: int = 4
) -> dict:
    """FLOPs (2 per multiply-add) and bytes of each part of the prefill and the decode, whole batch.

    Per token per layer: q and o projections 2·h·(H·d) each; k and v projections 2·h·(K·d) each (kept layers
    only); attention 4·H·d per attended position (scores and weighted sum; every layer, kept or replaced); MLP
    3 · 2·h·I. LM head 2·h·V per position with logits (the prefill's last position, every decode step).
    Bytes: weights read once per forward (a replaced layer skips its k/v weights; the embedding rows read are
    left out); K/V read by attention once per forward (every layer; a static cache's whole preallocated length);
    K/V written to the cache (kept layers; a dynamic cache's step reads the layer's old cache and writes it anew
    with the new tokens, by `torch.cat`; a static one writes the new tokens in place). Norms, RoPE and softmax are
    left out (elementwise, a few FLOPs per element).
    Returns {phase: {part: {"flops", "bytes"}, "total": {...}}}; decode counts all `new_tokens` steps."""
    cfg = text_config(cfg)
    L, C = cfg.num_hidden_layers, num_shared
    kept = L - C
    h, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    inter, vocab = cfg.intermediate_size, cfg.vocab_size
    kv_tok = kv_token_bytes(cfg, elem)  # K + V of one token in one layer
    max_len = prompt_len + new_tokens
    # parameters of one layer's q+o, k+v, MLP, and of the LM head (FLOPs: 2 per parameter per position)
    w_qo, w_kv, w_mlp, w_head = 2 * h * H * d, 2 * h * K * d, 3 * h * inter, h * vocab

    def phase(q: int, cached_before: list[int], logits_rows: int) -> dict:
        """q: positions each forward computes per sequence; cached_before: the cache length before each forward;
        logits_rows: positions with logits, per sequence."""
        forwards, tokens = len(cached_before), q * len(cached_before)
        if cache == "dynamic":  # query i of a forward attends to the n cached positions and i of its own (causal)
            attended = sum(q * n + q * (q + 1) // 2 for n in cached_before)
            read = sum(n + q for n in cached_before)  # the layer's K/V, once per forward
            written = sum(2 * n + q for n in cached_before)  # torch.cat: read the old n, write n + q
        else:  # the kernel is given the whole preallocated length (masked), and one write per position
            attended, read, written = tokens * max_len, forwards * max_len, tokens
        parts = {
            "qo_proj": (batch * tokens * L * 2 * w_qo, forwards * L * w_qo * elem),
            "kv_proj": (batch * tokens * kept * 2 * w_kv, forwards * kept * w_kv * elem),
            "attention": (batch * attended * L * 4 * H * d, batch * read * L * kv_tok),
            "cache_write": (0, batch * written * kept * kv_tok),
            "mlp": (batch * tokens * L * 2 * w_mlp, forwards * L * w_mlp * elem),
            "lm_head": (batch * logits_rows * 2 * w_head, forwards * w_head * elem),
        }
        out = {name: {"flops": f, "bytes": b} for name, (f, b) in parts.items()}
        out["total"] = {k: sum(p[k] for p in out.values()) for k in ("flops", "bytes")}
        return out

    return {
        "prefill": phase(prompt_len, [0], 1),
        "decode": phase(1, [prompt_len + t for t in range(new_tokens)], new_tokens),
        "settings": dict(
            num_layers=L, num_shared=C, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, cache=cache
        ),
    }


def predicted_ratios(plain: dict, shared: dict) -> dict:
    """Shared / plain of FLOPs and of bytes, per phase and part (None where plain has none)."""
    out = {}
    for ph in PHASES:
        out[ph] = {}
        for part, p in plain[ph].items():
            s = shared[ph][part]
            out[ph][part] = {k: (s[k] / p[k] if p[k] else None) for k in ("flops", "bytes")}
    return out


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def _kind(name: str) -> str | None:
    """The part a leaf module's time belongs to, from its name (None: counted in `rest`)."""
    last = name.rsplit(".", 1)[-1]
    if last in ("k_proj", "v_proj", "k_norm"):
        return "k/v projections"
    if last in ("q_proj", "o_proj", "q_norm"):
        return "q/o projections"
    if last in MLP_NAMES:
        return "mlp"
    if last == "lm_head":
        return "lm head"
    if last.endswith("norm"):
        return "norms"
    return None


class PythonView:
    """Forward hooks that time each module type, each cache update and the sharing hooks, per phase."""

    def __init__(self, model):
        self.model = model
        self.time = defaultdict(float)
        self.calls = defaultdict(int)
        self.handles = []
        self.phase = None
        self.cache = None
        self.attn_children_by_phase = defaultdict(float)  # time of modules inside attention modules
        base = getattr(model, "model", model)
        for name, module in model.named_modules():
            kind = _kind(name)
            if kind is not None and not list(module.children()):
                self._time_module(module, kind, inside_attention=".self_attn." in name or ".attn." in name)
            elif name.endswith("self_attn"):
                self._time_module(module, "attention module", inside_attention=False)
        # the sharing hooks sit on the decoder stack: time what runs between a hook put first and one put last
        # (make the view after enabling sharing, so that sharing's hooks run between them)
        self._stamp = {}
        self.handles.append(base.register_forward_pre_hook(self._pre_first, prepend=True))
        self.handles.append(base.register_forward_pre_hook(self._pre_last))
        self.handles.append(base.register_forward_hook(self._post_first, prepend=True, always_call=True))
        self.handles.append(base.register_forward_hook(self._post_last, always_call=True))
        self.base = base

    def _add(self, kind, dt, calls=1):
        self.time[(self.phase, kind)] += dt
        self.calls[(self.phase, kind)] += calls

    def _time_module(self, module, kind, inside_attention):
        start = {}

        def pre(m, args):
            start[id(m)] = time.perf_counter()

        def post(m, args, out):
            dt = time.perf_counter() - start.pop(id(m))
            self._add(kind, dt)
            if inside_attention:
                self.attn_children_by_phase[self.phase] += dt

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def _pre_first(self, module, args):
        self._stamp["pre"] = time.perf_counter()

    def _pre_last(self, module, args):
        self._add("sharing hooks", time.perf_counter() - self._stamp["pre"], calls=0)
        self._wrap_cache()

    def _post_first(self, module, args, out):
        self._stamp["post"] = time.perf_counter()

    def _post_last(self, module, args, out):
        self._add("sharing hooks", time.perf_counter() - self._stamp["post"], calls=1)

    def _wrap_cache(self):
        """Time `Cache.update` as the attention calls it (the sharing tap, where there is one, wraps it) and each
        slot's own update (the write, or the `torch.cat` copy)."""
        cache = self.cache
        if cache is None:
            return
        outer = cache.update

        def timed_update(*args, **kwargs):
            t = time.perf_counter()
            out = outer(*args, **kwargs)
            self._add("cache update (Cache.update, tap included)", time.perf_counter() - t)
            return out

        cache.update = timed_update  # sharing's post hook pops it with its tap; plain: `forward` pops it
        for slot in cache.layers:  # a replaced layer's DummyLayer is wrapped too, and never called
            if "update" in slot.__dict__:
                continue  # timed already
            inner = slot.update

            def timed_slot(*args, _inner=inner, **kwargs):
                t = time.perf_counter()
                out = _inner(*args, **kwargs)
                self._add("cache writes/copies (slot update)", time.perf_counter() - t)
                return out

            slot.update = timed_slot

    def forward(self, phase, **kwargs):
        """One model call timed as part of `phase`."""
        self.phase = phase
        self.cache = kwargs.get(model_cache_kwarg(self.model))
        t = time.perf_counter()
        out = self.model(**kwargs)
        self._add("total", time.perf_counter() - t)
        if self.cache is not None:
            self.cache.__dict__.pop("update", None)  # the plain model's timing wrapper (sharing popped its own)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()

    def parts(self, phase) -> dict:
        """{part: {"time_s", "calls"}} of `phase`, the attention core and the rest derived."""
        get = {k: self.time[(phase, k)] for k in ("total", "attention module", *PARTS)}
        core = get["attention module"] - self.attn_children_by_phase[phase] - get[PARTS[3]]
        out = {}
        for part in PARTS:
            if part == "attention core":
                t, n = core, self.calls[(phase, "attention module")]
            elif part == "rest":
                named = sum(out[p]["time_s"] for p in PARTS[:-1] if p != PARTS[4])  # slot writes are inside updates
                t, n = get["total"] - named, self.calls[(phase, "total")]
            else:
                t, n = get[part], self.calls[(phase, part)]
            out[part] = {"time_s": t, "calls": n}
        out["total"] = {"time_s": get["total"], "calls": self.calls[(phase, "total")]}
        return out


@torch.no_grad()
def _generate(model, prompt, new_tokens: int, cache_kind: str, call=None):
    """Prefill + greedy decode like `kvshare.bench.run_once`, through `call(phase, **kwargs)`; returns the
    seconds of each phase."""
    device = prompt.device
    call = call or (lambda phase, **kw: model(**kw))
    cache = new_cache(model, cache_kind, prompt.shape[1] + new_tokens)
    kw = {model_cache_kwarg(model): cache}
    sync(device)
    t0 = time.perf_counter()
    logits = call("prefill", input_ids=prompt, use_cache=True, **kw, **last_logits_only(model)).logits
    token = logits[:, -1:].argmax(-1)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = call("decode", input_ids=token, use_cache=True, **kw).logits
        token = logits[:, -1:].argmax(-1)
    sync(device)
    return {"prefill": t1 - t0, "decode": time.perf_counter() - t1}


def _profiler_ops(model, prompt, new_tokens: int, cache_kind: str) -> dict:
    """torch.profiler (CPU) of one run, per phase: {operator: {"calls", "self_cpu_s"}}."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:

        def call(phase, **kw):
            with record_function(f"kvshare::{phase}"):
                return model(**kw)

        _generate(model, prompt, new_tokens, cache_kind, call)
    # attribute each event to its phase by the phase range it falls in
    ranges = {ph: [] for ph in PHASES}
    for e in prof.events():
        if e.name.startswith("kvshare::"):
            ranges[e.name.split("::", 1)[1]].append((e.time_range.start, e.time_range.end))
    ops = {ph: defaultdict(lambda: {"calls": 0, "self_cpu_s": 0.0}) for ph in PHASES}
    for e in prof.events():
        if e.name.startswith("kvshare::"):
            continue
        for ph, spans in ranges.items():
            if any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans):
                op = ops[ph][e.name]
                op["calls"] += 1
                op["self_cpu_s"] += e.self_cpu_time_total / 1e6
                break
    return {ph: dict(sorted(v.items(), key=lambda kv: -kv[1]["self_cpu_s"])) for ph, v in ops.items()}


def profile_pair(
    model,
    num_shared: int | None = None,
    rate: float | None = None,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    cache: str = "dynamic",
    rounds: int = 3,
    strategy=None,
    seed: int = 0,
    top_ops: int = 25,
) -> dict:
    """Plain and shared (`num_shared` layers, or `rate`, or `strategy`) on the same prompt: wall times, the
    Python-level view, the operator profile and the cost model's predicted ratios."""
    strategy = _strategy_to_profile(model, num_shared, rate, strategy)
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    modes = {"plain": None, "shared": strategy}
    walls, views, load = _timed_runs(model, modes, prompt, new_tokens, cache, rounds)
    result = {"modes": {}}
    for mode in modes:
        with compression(model, modes[mode]):
            ops = _profiler_ops(model, prompt, new_tokens, cache)
        result["modes"][mode] = {
            ph: {
                "wall_s": min(walls[mode][ph]),
                "wall_runs_s": walls[mode][ph],
                "modules": _fastest(views[mode], ph),
                "ops": dict(list(ops[ph].items())[:top_ops]),
                "op_calls": {op: v["calls"] for op, v in ops[ph].items()},
            }
            for ph in PHASES
        }
    elem = next(model.parameters()).element_size()
    plain_cost = cost_model(model.config, 0, batch, prompt_len, new_tokens, cache, elem)
    shared_cost = cost_model(model.config, strategy.num_shared, batch, prompt_len, new_tokens, cache, elem)
    result.update(
        settings=dict(
            batch=batch,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            cache=cache,
            num_layers=num_layers(model),
            num_shared=strategy.num_shared,
            strategy=strategy.to_dict(),
            rounds=rounds,
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            device=str(device),
            threads=torch.get_num_threads(),
        ),
        cost_model={"plain": plain_cost, "shared": shared_cost},
        predicted=predicted_ratios(plain_cost, shared_cost),
        comparison=comparison(result["modes"], predicted_ratios(plain_cost, shared_cost)),
        **load.result(),
    )
    return result


def _strategy_to_profile(model, num_shared: int | None, rate: float | None, strategy) -> Strategy:
    """The shared side: `strategy` (a Strategy, its to_dict() or a file), else C layers (`num_shared`, or `rate`
    of them) spread evenly."""
    if strategy is not None and not isinstance(strategy, Strategy):
        strategy = Strategy.load(strategy) if not isinstance(strategy, dict) else Strategy.from_dict(strategy)
    if strategy is None:
        L = num_layers(model)
        C = num_shared if num_shared is not None else num_shared_for(rate or 0.0, L)
        strategy = spread_strategy(L, C, layer_types(model))
    return strategy


def _timed_runs(model, modes: dict, prompt, new_tokens: int, cache: str, rounds: int):
    """A warm-up per mode, then `rounds` clean runs and `rounds` hooked runs (the Python-level view), plain and
    shared alternating; returns each mode's wall times and views per phase, and the load meter around them."""

    def run(mode, **kw):
        with compression(model, modes[mode]):
            return _generate(model, prompt, new_tokens, cache, **kw)

    for mode in modes:  # warm-up
        run(mode)
    walls = {m: {ph: [] for ph in PHASES} for m in modes}
    views = {m: [] for m in modes}
    with LoadMeter() as load:
        for k in range(rounds):  # clean runs, then hooked runs, plain and shared alternating
            for mode in list(modes) if k % 2 == 0 else list(modes)[::-1]:
                for ph, t in run(mode).items():
                    walls[mode][ph].append(t)
        for k in range(rounds):
            for mode in list(modes) if k % 2 == 0 else list(modes)[::-1]:
                with compression(model, modes[mode]):
                    view = PythonView(model)  # after sharing's hooks: they run between the view's first and last
                    try:
                        _generate(model, prompt, new_tokens, cache, view.forward)
                    finally:
                        view.remove()
                views[mode].append({ph: view.parts(ph) for ph in PHASES})
    return walls, views, load


def _fastest(runs: list[dict], phase: str) -> dict:
    """Per part, the least time over the hooked runs (a burst of other work only adds time); calls of the first."""
    return {
        part: {"time_s": min(r[phase][part]["time_s"] for r in runs), "calls": runs[0][phase][part]["calls"]}
        for part in runs[0][phase]
    }


def comparison(modes: dict, predicted: dict) -> list[dict]:
    """One row per phase and part: plain and shared seconds and calls, the measured ratio shared / plain, and
    the FLOP and byte ratios the cost model predicts for it."""
    rows = []
    for ph in PHASES:
        p, s = modes["plain"][ph], modes["shared"][ph]
        total = predicted[ph]["total"]
        rows.append(
            dict(
                phase=ph,
                part="wall (clean runs)",
                plain_s=p["wall_s"],
                shared_s=s["wall_s"],
                measured_ratio=s["wall_s"] / p["wall_s"] if p["wall_s"] else None,
                predicted_flops_ratio=total["flops"],
                predicted_bytes_ratio=total["bytes"],
                bound="flops" if ph == "prefill" else "bytes",
            )
        )
        for part in (*PARTS, "total"):
            pm, sm = p["modules"][part], s["modules"][part]
            key = "total" if part == "total" else PREDICTED_BY[part]
            pred = predicted[ph][key] if key else {"flops": None, "bytes": None}
            rows.append(
                dict(
                    phase=ph,
                    part=part if part != "total" else "total (hooked run)",
                    plain_s=pm["time_s"],
                    shared_s=sm["time_s"],
                    plain_calls=pm["calls"],
                    shared_calls=sm["calls"],
                    measured_ratio=sm["time_s"] / pm["time_s"] if pm["time_s"] > 0 else None,
                    predicted_flops_ratio=pred["flops"],
                    predicted_bytes_ratio=pred["bytes"],
                )
            )
    return rows


def profile(
    model_name: str,
    rates=(0.25,),
    batches=(1,),
    prompt_len: int = 256,
    new_tokens: int = 32,
    cache: str = "dynamic",
    random_weights: bool = False,
    device=None,
    dtype=None,
    rounds: int = 3,
    strategy=None,
    seed: int = 0,
    model=None,
) -> list[dict]:
    """`profile_pair` for every batch and every rate > 0 (or `strategy`), on one loaded model."""
    if model is None:
        model = build_model(model_name, random_weights, device=device, dtype=dtype)
    out = []
    chosen = [None] if strategy is not None else [r for r in rates if r > 0] or [0.0]
    for b in batches:
        for rate in chosen:
            res = profile_pair(
                model,
                rate=rate,
                batch=b,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                cache=cache,
                rounds=rounds,
                strategy=strategy,
                seed=seed,
            )
            res["settings"].update(model=model_name, rate=rate, weights="random" if random_weights else "real")
            out.append(res)
    return out


def format_profile(results: list[dict]) -> str:
    """A readable table per profiled pair: each part's seconds, measured and predicted ratios."""

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    blocks = []
    for res in results:
        st = res["settings"]
        head = (
            f"{st.get('model', '')}: batch {st['batch']}, {st['prompt_len']}+{st['new_tokens']} tokens, "
            f"{st['cache']} cache, C={st['num_shared']} of L={st['num_layers']}, {st['dtype']}, "
            f"{st['threads']} threads"
        )
        if res.get("under_load"):
            head += f"  [UNDER LOAD: other work {res.get('other_busy_cores')} of {res.get('cpu_count')} cores]"
        cells = [["phase", "part", "plain s", "shared s", "calls p/s", "measured", "pred FLOPs", "pred bytes"]]
        for r in res["comparison"]:
            calls = f"{r['plain_calls']}/{r['shared_calls']}" if "plain_calls" in r else ""
            cells.append(
                [
                    r["phase"],
                    r["part"],
                    f(r["plain_s"], "{:.4f}"),
                    f(r["shared_s"], "{:.4f}"),
                    calls,
                    f(r["measured_ratio"], "{:.3f}"),
                    f(r["predicted_flops_ratio"], "{:.3f}"),
                    f(r["predicted_bytes_ratio"], "{:.3f}"),
                ]
            )
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
        ]
        ops = []
        for ph in PHASES:
            p, s = res["modes"]["plain"][ph]["ops"], res["modes"]["shared"][ph]["ops"]
            top = list(p)[:8]
            ops.append(f"  {ph} top operators (self CPU s plain -> shared, calls plain -> shared):")
            for op in top:
                sv = s.get(op, {"self_cpu_s": 0.0, "calls": 0})
                ops.append(
                    f"    {op:<40} {p[op]['self_cpu_s']:.4f} -> {sv['self_cpu_s']:.4f}   "
                    f"{p[op]['calls']} -> {res['modes']['shared'][ph]['op_calls'].get(op, 0)}"
                )
        blocks.append("\n".join([head, *lines, *ops]))
    note = (
        "measured: shared / plain seconds; pred: shared / plain FLOPs and bytes from the shapes (kvshare.profile."
        "cost_model); the prefill is compute-bound (FLOPs), a decode step memory-bound (bytes)"
    )
    return "\n\n".join(blocks) + "\n" + note
