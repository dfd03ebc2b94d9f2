"""Memory and speed: plain transformers next to the shared model, measured in one run.

Each configuration (mode, rate, batch) is measured the same way: a fresh cache, a prefill of
`prompt_len` random tokens (computing the last position's logits only, as `generate` does), then
`new_tokens` greedy decode steps, timed after a warm-up; the median of `repeats`. KV bytes are read
from the cache's tensors. Peak memory is CUDA's `max_memory_allocated`, or on CPU the peak resident
set of a process that runs that configuration alone (spawned fresh, so one configuration's garbage
never inflates another's peak).

Speed and memory do not depend on weight values, so the paper's model shapes can be built from a
config with random weights (`random_weights=True`, presets below). Which layers are replaced does not
change cost either: the benchmark's strategy replaces C layers spread evenly over the depth, each
reading the nearest kept layer below it (a searched strategy gives the same bytes and FLOPs).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import methods
from .accounting import cache_bytes, kv_token_bytes, num_shared_for, predicted_cache_bytes
from .adapter import head_dim, layer_types, num_layers, text_config
from .combine import compression
from .strategy import Strategy, spread_strategy

# Published shapes (layers, hidden, heads, KV heads, intermediate, vocabulary). InternLM2 packs
# q/k/v into one matrix; with the same shapes a Llama layout does the same FLOPs and stores the
# same KV bytes, so it is built as one.
PRESETS = {
    "llama2-7b": dict(
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "llama2-13b": dict(
        num_hidden_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
    ),
    "llama2-70b": dict(
        num_hidden_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
    ),
    "internlm2-7b": dict(
        num_hidden_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=92544,
    ),
    "internlm2-20b": dict(
        num_hidden_layers=48,
        hidden_size=6144,
        num_attention_heads=48,
        num_key_value_heads=8,
        intermediate_size=16384,
        vocab_size=92544,
    ),
}
CACHES = ("dynamic", "static")

# ---------------------------------------------------------------------------------------------
# Is the machine quiet? Speed figures need it.
# ---------------------------------------------------------------------------------------------
#: Alternating rounds behind every published speed figure (`measure_rounds`): with 5, one burst of other work
#: can spoil at most a run or two of a configuration, and the fastest of the five is kept.
SPEED_ROUNDS = 5
#: The line between a quiet machine and a loaded one: other processes kept more than this share of the cores
#: busy on average during the run. The benchmark itself uses every core (torch's threads = cores), so any
#: competing busy thread takes time from one of its threads, and torch's parallel kernels wait for the slowest
#: thread: one busy competitor on 2 cores can slow a step by up to 2x. 0.25 per core (half a core on 2 cores)
#: lets an idle machine's background (well under 0.1 core) through and catches any sustained job with one busy
#: thread (about 1 core), which is what skewed the committed 2-core figures (issue 18: 0.86x measured under load,
#: 1.08x on a quiet machine). Where the busy time cannot be read (no Linux /proc/stat), the 1-minute load average
#: before the run stands in, against the same line.
LOAD_LIMIT_PER_CORE = 0.25


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load_avgs() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def _machine_busy_s() -> float | None:
    """CPU seconds every core spent on anything but idling since boot (Linux /proc/stat; steal counts as busy:
    a neighbour on the host took the time)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Other work on the machine while a block runs: the load averages before and after, and the cores other
    processes kept busy on average (the machine's busy time minus this process's own CPU time, over the wall time).

        with LoadMeter() as load:
            ...
        load.result()  # {"load_avg_before": ..., "other_busy_cores": ..., "under_load": ...}
    """

    def __enter__(self):
        self.before = _load_avgs()
        self.busy0, self.own0, self.t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy1, own1 = _machine_busy_s(), _own_cpu_s()
        self.after = _load_avgs()
        self.other = None
        if self.busy0 is not None and busy1 is not None and self.wall > 0:
            self.other = max(0.0, (busy1 - self.busy0) - (own1 - self.own0)) / self.wall
        return False

    def result(self) -> dict:
        cores = cpu_count()
        row = {
            "load_avg_before": None if self.before is None else self.before[0],
            "load_avg_after": None if self.after is None else self.after[0],
            "other_busy_cores": None if self.other is None else round(self.other, 3),
            "cpu_count": cores,
        }
        row["under_load"] = is_under_load(row)
        return row


def is_under_load(load: dict) -> bool | None:
    """The line (`LOAD_LIMIT_PER_CORE`) applied to a LoadMeter result or a `machine_load()`; None: unknown."""
    cores = load.get("cpu_count") or cpu_count()
    other = load.get("other_busy_cores")
    if other is None:
        other = load.get("load_avg_before")
    if other is None:
        return None
    return other > LOAD_LIMIT_PER_CORE * cores


def machine_load(sample_s: float = 5.0) -> dict:
    """How busy the machine is right now: other processes' busy cores over `sample_s` seconds while this process
    sleeps, with the load averages. (The load averages alone would still count the previous notebook's run: the
    1-minute average takes minutes to decay; the sample does not.)"""
    with LoadMeter() as meter:
        time.sleep(sample_s)
    return meter.result()


def load_refusal(load: dict, what: str = "speed measurements") -> str | None:
    """None when `load` is quiet (or unknown); else one line saying how loaded the machine is and how to go on."""
    if not is_under_load(load):
        return None
    cores = load["cpu_count"]
    seen = (
        f"other processes kept {load['other_busy_cores']:.2f} of {cores} cores busy"
        if load.get("other_busy_cores") is not None
        else f"1-minute load average {load['load_avg_before']:.2f} on {cores} cores"
    )
    avg = f" (1-minute load average {load['load_avg_before']:.2f})" if load.get("load_avg_before") is not None else ""
    return (
        f"the machine is loaded: {seen}{avg}, above the line of {LOAD_LIMIT_PER_CORE * cores:.2f} "
        f"({LOAD_LIMIT_PER_CORE} per core) for {what}"
    )


def load_note(rows: list[dict]) -> str:
    """What a figure's title must say about how its speed numbers were taken: "" for rows from at least
    SPEED_ROUNDS alternating rounds on a quiet machine, else e.g. " [UNDER LOAD: other work up to 1.80 of 2 cores
    in 4/15 runs]" and/or " [2 rounds < 5]"."""
    runs = [run for r in rows for run in (r.get("rounds") or [r])]
    loaded = [run for run in runs if run.get("under_load")]
    notes = []
    if loaded:
        worst = max((run.get("other_busy_cores") or run.get("load_avg_before") or 0.0) for run in loaded)
        cores = max((run.get("cpu_count") or 0) for run in runs) or cpu_count()
        notes.append(f"UNDER LOAD: other work up to {worst:.2f} of {cores} cores in {len(loaded)}/{len(runs)} runs")
    fewest = min((len(r.get("rounds") or [r]) for r in rows), default=SPEED_ROUNDS)
    if rows and fewest < SPEED_ROUNDS:
        notes.append(f"{fewest} round{'s' if fewest > 1 else ''} < {SPEED_ROUNDS}")
    return "".join(f" [{n}]" for n in notes)


@dataclass
class Config:
    model: str
    mode: str  # "plain" (untouched transformers) or "shared"
    rate: float
    batch: int
    prompt_len: int
    new_tokens: int
    cache: str = "dynamic"
    random_weights: bool = False
    device: str | None = None
    dtype: str | None = None
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    strategy: dict | None = None  # a strategy's to_dict() to use instead of the evenly spread one
    # the cache methods of the shared rows (eviction, quantization, any registered method or a composition of them),
    # as their to_dict() (kvshare.methods); None: the shared rows only share layers
    method: dict | None = None
    compile: bool = False  # decode steps through torch.compile (static cache only, as transformers' generate does)
    warmup_prompt_len: int | None = None  # the warm-up's prompt (None: the prompt; shorter: a cheaper warm-up)


def build_model(name: str, random_weights: bool, device=None, dtype=None):
    """The model to time: a loaded checkpoint, or random weights with the shapes of `name`."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from .models import EMBEDDED, checkpoint_dir, load_model, resolve_device, resolve_dtype

    if not random_weights:
        return load_model(name, device=device, dtype=dtype)[0]
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if name in PRESETS:
        config = LlamaConfig(**PRESETS[name], max_position_embeddings=4096, rope_theta=10000.0)
    else:
        config = AutoConfig.from_pretrained(str(checkpoint_dir(name)) if name in EMBEDDED else name)
    config._attn_implementation = "sdpa"
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # small random values keep activations finite in fp16
            p.normal_(0.0, 0.02, generator=generator)
    model.kvshare_name = name
    return model.eval()


def param_count(cfg) -> int:
    """Parameters of a Llama-layout model with these shapes (untied embeddings and LM head)."""
    cfg = text_config(cfg)
    per_layer = (
        cfg.hidden_size * head_dim(cfg) * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
        + 3 * cfg.hidden_size * cfg.intermediate_size
        + 2 * cfg.hidden_size
    )
    return cfg.vocab_size * cfg.hidden_size * 2 + cfg.num_hidden_layers * per_layer + cfg.hidden_size


def bytes_needed(cfg, batch: int, prompt_len: int, new_tokens: int, dtype_bytes: int) -> int:
    """What one configuration needs at least: weights, the full KV cache of the batch, and the prefill's
    largest activations (hidden states and MLP intermediates of every prompt token)."""
    cfg = text_config(cfg)
    weights = param_count(cfg) * dtype_bytes
    kv = cfg.num_hidden_layers * kv_token_bytes(cfg, dtype_bytes) * batch * (prompt_len + new_tokens)
    return weights + kv + batch * prefill_activation_bytes(cfg, prompt_len, dtype_bytes)


def available_bytes(device) -> int:
    """Free memory where the model will live: CUDA's free memory, or the machine's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _proc_bytes(path: str, field: str) -> int | None:
    """A `field:  N kB` line of a Linux /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(
    name: str, random_weights: bool, batch: int, prompt_len: int, new_tokens: int, device=None, dtype=None
) -> None:
    """Refuse, before anything is loaded, a configuration that cannot fit in memory: one line with the bytes it
    needs, what the machine has, and which --dtype would fit."""
    from transformers import AutoConfig, LlamaConfig

    from .models import EMBEDDED, checkpoint_dir, resolve_device, resolve_dtype

    device = resolve_device(device)
    if name in PRESETS:
        cfg = LlamaConfig(**PRESETS[name])
    elif name in EMBEDDED:
        cfg = AutoConfig.from_pretrained(str(checkpoint_dir(name)))
    else:
        return  # a hub id or a path: its config may need the network; transformers reports its own errors
    chosen = resolve_dtype(dtype, device)
    need = bytes_needed(cfg, batch, prompt_len, new_tokens, torch.tensor([], dtype=chosen).element_size())
    have = available_bytes(device)
    if need <= have:
        return
    smaller = [
        d
        for d, b in (("bfloat16", 2), ("float16", 2))
        if b < torch.tensor([], dtype=chosen).element_size()
        and bytes_needed(cfg, batch, prompt_len, new_tokens, b) <= have
    ]
    hint = f"; --dtype {smaller[0]} would fit" if smaller else "; no --dtype fits: lower --batch or --prompt-len"
    raise MemoryError(
        f"{name} at batch {batch}, {prompt_len}+{new_tokens} tokens in {str(chosen).replace('torch.', '')} "
        f"needs at least {need / 2**30:.1f} GiB ({need:,} bytes), {device.type} has "
        f"{have / 2**30:.1f} GiB available{hint}"
    )


def sync(device):
    """Wait for the device's queued work (CUDA), so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def new_cache(model, kind: str, max_len: int):
    """A fresh transformers cache for `model`: DynamicCache, or StaticCache preallocated to `max_len` tokens (sharing
    turns a replaced layer's slot into a DummyLayer before it allocates: static bytes are (L - C) / L of plain)."""
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    raise ValueError(f"unknown cache kind {kind!r}; use one of {', '.join(CACHES)}")


def _peaks(device) -> tuple[int, int]:
    """(peak bytes, peak reserved bytes) so far: CUDA's allocator, or this process's peak RSS twice on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    rss = _rss_bytes()
    return rss, rss


def _restart_peaks(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak()


def last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it: like `generate`, the prefill computes the logits of the
    last position only (all of them would be prompt x vocabulary floats that generation never reads)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def run_once(
    model,
    prompt,
    new_tokens: int,
    cache_kind: str,
    phases: dict | None = None,
    step=None,
    max_len: int | None = None,
    step_times: list | None = None,
):
    """Prefill + greedy decode with a fresh cache; returns (prefill_s, decode_s, cache).

    With a `phases` dict: the peaks up to the end of the prefill ("before_decode") and of the decode
    phase alone ("decode": the cache at its largest, without the prefill's activations and logits).
    `step` calls the decode steps instead of `model` (a compiled model: see `compiled_decode`). `max_len`: a
    static cache's length (default prompt + new_tokens; a warm-up that decodes fewer tokens passes the timed
    run's, so a compiled decode sees the same shapes and does not recompile). `step_times` (a list) receives the
    end time of every decode step."""
    from .adapter import model_cache_kwarg

    device = prompt.device
    cache = new_cache(model, cache_kind, max_len or prompt.shape[1] + new_tokens)
    kw = model_cache_kwarg(model)  # `cache` in transformers >= 5.24, `past_key_values` before
    sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=prompt, use_cache=True, **{kw: cache}, **last_logits_only(model)).logits
    token = logits[:, -1:].argmax(-1)
    sync(device)
    t1 = time.perf_counter()
    prefill_s = t1 - t0
    if phases is not None:
        del logits
        phases["before_decode"] = _peaks(device)
        _restart_peaks(device)
        t1 = time.perf_counter()
    step = model if step is None else step
    for _ in range(new_tokens):
        logits = step(input_ids=token, use_cache=True, **{kw: cache}).logits
        token = logits[:, -1:].argmax(-1)
        if step_times is not None:
            sync(device)
            step_times.append(time.perf_counter())
    sync(device)
    t2 = time.perf_counter()
    if phases is not None:
        phases["decode"] = _peaks(device)
    return prefill_s, t2 - t1, cache


def check_compile(model, cache: str) -> None:
    """Refuse --compile where transformers does not compile: one line saying why."""
    if cache != "static":
        raise ValueError(
            "--compile needs --cache static: transformers compiles decoding over a static cache (a dynamic cache "
            "changes shape every step, so every step would recompile)"
        )
    if not getattr(model, "_can_compile_fullgraph", False):
        raise ValueError(
            f"transformers does not support torch.compile for {type(model).__name__} "
            "(its _can_compile_fullgraph is False): run without --compile"
        )


def compiled_decode(model, cache: str):
    """The model's call through torch.compile, as transformers' generate compiles it for decoding over a static
    cache (`model.get_compiled_call`: fullgraph off, so the shared model's hooks may break the graph instead of
    failing; the row counts the breaks). The prefill stays uncompiled, as in generate."""
    from transformers import CompileConfig

    check_compile(model, cache)
    device = next(model.parameters()).device
    # "reduce-overhead" is CUDA graphs: on CUDA as transformers' default, on CPU the default mode
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    return model.get_compiled_call(CompileConfig(mode=mode, fullgraph=False, dynamic=False))


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def measure(config: Config, model=None) -> dict:
    """Measure one configuration in this process (CUDA peak memory is exact; CPU peak is RSS)."""
    from .models import model_name, resolve_device

    device = resolve_device(config.device)
    if model is None:
        model = build_model(config.model, config.random_weights, device=config.device, dtype=config.dtype)
    L = num_layers(model)
    C = num_shared_for(config.rate, L)
    strategy = (
        None
        if config.mode == "plain"
        else (Strategy.from_dict(config.strategy) if config.strategy else spread_strategy(L, C, layer_types(model)))
    )
    method = cache_method(config)
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(config.seed)
    prompt = torch.randint(0, vocab, (config.batch, config.prompt_len), generator=gen).to(device)
    if device.type == "cpu":
        _reset_peak()  # like reset_peak_memory_stats below: the peak of the run, not of loading the model
    rss_before = _rss_bytes()
    base_allocated = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_allocated = torch.cuda.memory_allocated(device)
    with compression(model, strategy, method), LoadMeter() as load:
        timed = _timed_runs(model, config, prompt, device)
    row = asdict(config)
    row.update(
        model=model_name(model),
        weights="random" if config.random_weights else "real",
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        num_layers=L,
        num_shared=0 if strategy is None else strategy.num_shared,
        kv_bytes=timed["kv_bytes"],
        prefill_s=statistics.median(timed["prefill"]),
        decode_s=statistics.median(timed["decode"]),
        decode_tps=config.batch * config.new_tokens / statistics.median(timed["decode"]),
        transformers=_transformers_version(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_avg_1min=_load_avg(),  # other work on the machine during the run shows here
        warmup_s=timed["warmup_s"],
        decode_tps_quarters=quarter_rates(timed["step_times"], config.batch),
        **load.result(),  # load averages before/after, other processes' busy cores, under_load (LOAD_LIMIT_PER_CORE)
    )
    if config.compile:
        row["compile_graph_breaks"] = _graph_breaks()
    _record_peaks(row, device, rss_before, base_allocated, timed["phases"])
    _record_accounting(row, model, config, strategy, method)
    return row


def _timed_runs(model, config: Config, prompt, device) -> dict:
    """The warm-up (with --compile: the compilation, so the timed runs reuse the graph), then `repeats` timed runs;
    the last one records the phases' peaks and, on CPU, every decode step's end time."""
    step = compiled_decode(model, config.cache) if config.compile else None
    t_warm = time.perf_counter()
    full_len = config.prompt_len + config.new_tokens
    for _ in range(config.warmup):
        warm = prompt[:, : config.warmup_prompt_len] if config.warmup_prompt_len else prompt
        run_once(model, warm, min(config.new_tokens, 8), config.cache, step=step, max_len=full_len)
    warmup_s = time.perf_counter() - t_warm
    prefill, decode, kv, phases, step_times = [], [], 0, {}, []
    for i in range(config.repeats):
        last = i == config.repeats - 1
        p, d, cache = run_once(
            model,
            prompt,
            config.new_tokens,
            config.cache,
            phases if last else None,
            step,
            step_times=step_times if last and device.type == "cpu" else None,  # no extra CUDA syncs
        )
        prefill.append(p)
        decode.append(d)
        kv = cache_bytes(cache)
        del cache
    return {
        "warmup_s": warmup_s,
        "prefill": prefill,
        "decode": decode,
        "kv_bytes": kv,
        "phases": phases,
        "step_times": step_times,
    }


def _record_peaks(row: dict, device, rss_before: int, base_allocated: int | None, phases: dict):
    """The run's peak memory and what it started from: CUDA's allocator, or the process's peak resident set."""
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        row["baseline_bytes"] = base_allocated
        row["peak_method"] = "cuda max_memory_allocated"
    else:
        row["peak_bytes"] = _rss_bytes()
        row["baseline_bytes"] = rss_before
        row["peak_method"] = "peak RSS of a process running this configuration alone"
    if phases:  # the last repeat restarted the peak after its prefill: the run's peak is the larger of the two
        row["decode_peak_bytes"] = phases["decode"][0]
        row["peak_bytes"] = max(row["peak_bytes"], phases["before_decode"][0], phases["decode"][0])
        if "peak_reserved_bytes" in row:
            row["peak_reserved_bytes"] = max(
                row["peak_reserved_bytes"], phases["before_decode"][1], phases["decode"][1]
            )


def _record_accounting(row: dict, model, config: Config, strategy, method):
    """What the shapes say the run moved and stored (`analysis`), and the cache bytes sharing and the methods
    predict together."""
    row.update(
        analysis(
            model.config.get_text_config(),
            row["num_shared"],
            config.batch,
            config.prompt_len,
            config.new_tokens,
            config.cache,
            torch.tensor([], dtype=next(model.parameters()).dtype).element_size(),
        )
    )
    if config.cache == "dynamic":  # what sharing and the methods predict together, from the shapes
        elem = next(model.parameters()).element_size()
        row["kv_bytes_predicted"] = predicted_cache_bytes(
            model.config, method, config.batch, [config.prompt_len] + [1] * config.new_tokens, elem, strategy=strategy
        )
    if method is not None:  # the analysis counts full-length caches: not what an evicting cache copies or reads
        row.update(cache_copy_bytes=None, attn_read_bytes=None)


def quarter_rates(step_times: list[float], batch: int) -> list[float] | None:
    """Decode tokens/s in each quarter of one run's steps (from the steps' end times): the spread within a run,
    for an error bar where a configuration is measured once (the budget search's rows)."""
    if len(step_times) < 5:
        return None
    n = len(step_times) - 1  # intervals between step ends; the first step's start is not among them
    edges = [round(k * n / 4) for k in range(5)]
    return [
        batch * (edges[k + 1] - edges[k]) / (step_times[edges[k + 1]] - step_times[edges[k]])
        for k in range(4)
        if edges[k + 1] > edges[k] and step_times[edges[k + 1]] > step_times[edges[k]]
    ]


def cache_method(config: Config):
    """The cache methods of a shared row (`config.method`, a to_dict()) as one composition, or None; plain rows are
    untouched transformers."""
    if not config.method:
        return None
    if config.mode == "plain" or config.cache != "dynamic":
        raise ValueError("cache methods apply to 'shared' rows with a dynamic cache (plain is untouched transformers)")
    return methods.Composition(methods.from_dict(config.method))


def analysis(cfg, num_shared: int, batch: int, prompt_len: int, new_tokens: int, cache: str, elem: int) -> dict:
    """Where the bytes and FLOPs go, from the shapes (exact counts, not estimates of timing).

    - kv_token_bytes: K+V of one token in one layer.
    - cache_copy_bytes: bytes written into the cache over the whole decode. A dynamic cache grows by
      `torch.cat`, rewriting the whole layer cache at every step (quadratic in length); a static cache
      writes one token per step in place.
    - attn_read_bytes: K/V bytes attention reads over the decode: every layer, replaced or not, still
      reads a cache of the full length; sharing does not reduce it.
    - kv_proj_flops_saved: multiply-adds x2 of k_proj and v_proj skipped in replaced layers, whole run.
    """
    L = cfg.num_hidden_layers
    kv_token = kv_token_bytes(cfg, elem) * batch
    kept = L - num_shared
    lengths = range(prompt_len + 1, prompt_len + new_tokens + 1)  # cache length after each decode step
    if cache == "dynamic":
        copy = kept * kv_token * sum(lengths)
    else:
        copy = kept * kv_token * new_tokens
    read = L * kv_token * sum(lengths)
    tokens = batch * (prompt_len + new_tokens)
    flops_saved = num_shared * tokens * 2 * 2 * cfg.hidden_size * cfg.num_key_value_heads * head_dim(cfg)
    return {
        "kv_token_bytes": kv_token,
        "cache_copy_bytes": copy,
        "attn_read_bytes": read,
        "kv_proj_flops_saved": flops_saved,
    }


def _rss_bytes() -> int:
    """Peak resident set of this process's own memory (Linux VmHWM, since the last `_reset_peak`).

    Not ru_maxrss where VmHWM exists: in a spawned child ru_maxrss starts at the parent's peak (a notebook
    kernel holding the model), so every configuration would report the parent's memory."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024)


def _reset_peak() -> None:
    """Restart the peak from the current resident set (Linux `clear_refs` 5; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _load_avg() -> float | None:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _worker(config: Config, queue):
    try:
        torch.set_num_threads(torch.get_num_threads())
        queue.put(("ok", measure(config)))
    except BaseException as e:  # report, never hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def measure_isolated(config: Config) -> dict:
    """Run one configuration in a fresh process (CPU peak memory needs a process of its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(config, queue))
    proc.start()
    status, payload = "error", "the benchmark process exited without a result"
    while True:  # a child that dies before reporting (e.g. killed for memory) must not hang us
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except Exception:
            if not proc.is_alive():
                payload += f" (exit code {proc.exitcode})"
                break
    proc.join()
    if status != "ok":
        raise RuntimeError(
            f"benchmark configuration {config.mode} rate={config.rate} batch={config.batch} failed: {payload}"
        )
    return payload


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios of each row against the plain model at the same batch and lengths."""

    def key(r):
        return r["batch"], r["prompt_len"], r["new_tokens"], r["cache"], bool(r.get("compile"))

    base = {key(r): r for r in rows if r["mode"] == "plain"}
    for r in rows:
        b = base.get(key(r))
        if b is None:
            continue
        r["kv_bytes_ratio"] = r["kv_bytes"] / b["kv_bytes"] if b["kv_bytes"] else float("nan")
        r["kv_bytes_expected_ratio"] = (r["num_layers"] - r["num_shared"]) / r["num_layers"]
        if r.get("method") and r.get("kv_bytes_predicted") is not None and b["kv_bytes"]:
            r["kv_bytes_expected_ratio"] = r["kv_bytes_predicted"] / b["kv_bytes"]
        r["peak_ratio"] = r["peak_bytes"] / b["peak_bytes"]
        r["peak_above_baseline_ratio"] = (r["peak_bytes"] - r["baseline_bytes"]) / max(
            1, b["peak_bytes"] - b["baseline_bytes"]
        )
        r["prefill_ratio"] = r["prefill_s"] / b["prefill_s"]
        r["decode_tps_ratio"] = r["decode_tps"] / b["decode_tps"]
    return rows


def bench(
    model: str,
    rates=(0.0, 0.125, 0.25),
    batches=(1, 4),
    prompt_len: int = 512,
    new_tokens: int = 128,
    cache: str = "dynamic",
    random_weights: bool = False,
    device=None,
    dtype=None,
    repeats: int = 3,
    warmup: int = 1,
    isolate: bool | None = None,
    progress: bool = True,
    seed: int = 0,
    rounds: int = 1,
    strategy=None,
    method=None,
    compile: bool = False,
) -> list[dict]:
    """Plain transformers and the shared model at each rate, side by side; rows with ratios.

    `cache="static"` uses transformers' StaticCache for plain and shared rows (a replaced layer's slot allocates
    nothing: its bytes are (L - C) / L of plain); `compile=True` (static cache only) decodes through torch.compile
    as transformers' generate does (`compiled_decode`).

    `rounds` > 1 measures every configuration that many times, in alternating order (see `measure_rounds`):
    on a shared machine a burst of other work then cannot make one configuration look fast or slow.

    `method` (a kvshare.methods method or composition, or its to_dict(): `methods.make("h2o", budget=128)`,
    `methods.make("quantized", bits=8)`, both composed) applies to every shared row (rate 0: the method alone; an
    eviction method with a quantized cache: its kept tokens held as codes). `strategy` (a Strategy or a strategy
    file) replaces the evenly spread strategy of the shared rows (its own C; `rates` then only says which rows use
    it: every rate > 0). The plain rows stay untouched transformers."""
    from .models import resolve_device

    _check_bench_arguments(cache, compile, rates)
    dev = resolve_device(device)
    check_fits(model, random_weights, max(batches), prompt_len, new_tokens, device, dtype)
    if isolate is None:
        isolate = dev.type == "cpu"
    if strategy is not None and not isinstance(strategy, Strategy):
        strategy = Strategy.load(strategy)
    if method is not None and not isinstance(method, dict):
        method = method.to_dict()
    # what plain and shared rows have in common; the shared rows add their rate and cache methods
    common = dict(
        model=model,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        cache=cache,
        random_weights=random_weights,
        device=device,
        dtype=dtype,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        compile=compile,
    )
    configs = _bench_configs(common, rates, batches, strategy, method)
    if isolate and progress:
        print(isolation_note(model, random_weights, len(configs), rounds), file=sys.stderr, flush=True)
    shared_model = None

    def run(config):
        nonlocal shared_model
        if isolate:
            return measure_isolated(config)
        if shared_model is None:
            shared_model = build_model(model, random_weights, device=device, dtype=dtype)
        return measure(config, shared_model)

    return add_ratios(measure_rounds(configs, run, rounds, progress=progress))


def isolation_note(model: str, random_weights: bool, configs: int, rounds: int) -> str:
    """Said before an isolated run starts: how many processes it starts and why, each building the model again."""
    try:
        size = f"{param_count(shape_config(model)) / 1e9:.2f}B parameters, "
    except Exception:  # a config that cannot be read without the weights: say it without the size
        size = ""
    weights = "random weights" if random_weights else "its weights"
    return (
        f"bench: {configs * rounds} runs ({configs} configurations x {rounds} rounds), each in a process of its own "
        f"so that its peak memory is its own; each process builds {model} ({size}{weights}) before it measures, "
        "so a large model takes minutes per run (the bar's estimate follows the first run). --rounds 1, or "
        "--same-process (built once, peaks not per configuration), is quicker for a shape check"
    )


def _check_bench_arguments(cache: str, compile: bool, rates):
    if cache not in CACHES:
        raise ValueError(f"unknown cache kind {cache!r}; use one of {', '.join(CACHES)}")
    if compile and cache != "static":
        check_compile(None, cache)
    for rate in rates:
        num_shared_for(rate, 2)  # validates the range


def _bench_configs(common: dict, rates, batches, strategy: Strategy | None, method: dict | None) -> list[Config]:
    """The plain row of every batch, then the shared rows (every batch at every rate) with the strategy and
    cache methods; `common` holds what they all share."""
    configs = [Config(mode="plain", rate=0.0, batch=b, **common) for b in batches]
    configs += [
        Config(
            mode="shared",
            rate=float(rate),
            batch=b,
            strategy=strategy.to_dict() if strategy is not None and rate > 0 else None,
            method=method,
            **common,
        )
        for b in batches
        for rate in rates
    ]
    return configs


ROUND_LOAD_KEYS = ("load_avg_1min", "load_avg_before", "load_avg_after", "other_busy_cores", "cpu_count", "under_load")


def measure_rounds(configs: list, run, rounds: int = 1, progress: bool = True, desc: str = "bench") -> list[dict]:
    """`run(config)` for every config, `rounds` times: forward order, then reverse, and so on, so that load
    drift hits every configuration alike. Per config the row of its fastest decode is kept, with the lowest
    prefill time and peaks of its runs (noise only adds to them), every run under `rounds` (with the load it ran
    under) and `runs_under_load`. Published speed figures use SPEED_ROUNDS; `load_note(rows)` titles the rest."""
    from tqdm.auto import tqdm

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs: list[list[dict]] = [[] for _ in configs]
    order = list(range(len(configs)))
    with tqdm(total=rounds * len(configs), desc=desc, disable=not progress) as bar:
        for k in range(rounds):
            for i in order if k % 2 == 0 else order[::-1]:
                row = run(configs[i])
                row["round"] = k
                runs[i].append(row)
                bar.update()
    rows = []
    for rs in runs:
        best = dict(max(rs, key=lambda r: r["decode_tps"]))
        if len(rs) > 1:
            best["prefill_s"] = min(r["prefill_s"] for r in rs)
            for key in ("peak_bytes", "decode_peak_bytes"):
                if all(r.get(key) is not None for r in rs):
                    best[key] = min(r[key] for r in rs)
            best["rounds"] = [
                {
                    k: r.get(k)
                    for k in ("round", "decode_tps", "prefill_s", "peak_bytes", "decode_peak_bytes", *ROUND_LOAD_KEYS)
                }
                for r in rs
            ]
        best["runs_under_load"] = sum(bool(r.get("under_load")) for r in rs)
        rows.append(best)
    return rows


def check_context(name: str, prompt_len: int, new_tokens: int) -> None:
    """Refuse, before anything runs, a prompt and generation longer than an embedded model's context (a preset's
    random weights and a hub model's config set no limit this check could trust)."""
    from .models import EMBEDDED

    if name not in EMBEDDED:
        return
    limit = getattr(shape_config(name), "max_position_embeddings", None)
    if limit and prompt_len + new_tokens > limit:
        raise ValueError(
            f"a {prompt_len}-token prompt and {new_tokens} new tokens exceed {name}'s context of {limit} tokens: "
            f"use a prompt of at most {limit - new_tokens} tokens"
        )


def shape_config(name: str, model=None):
    """The (text) config of `name` without loading weights: a preset's shapes, an embedded checkpoint's or a
    hub/local config (the loaded `model`'s when given)."""
    from transformers import AutoConfig, LlamaConfig

    from .models import EMBEDDED, checkpoint_dir

    if model is not None:
        return model.config.get_text_config()
    if name in PRESETS:
        return LlamaConfig(**PRESETS[name])
    return AutoConfig.from_pretrained(str(checkpoint_dir(name)) if name in EMBEDDED else name).get_text_config()


def prefill_activation_bytes(cfg, prompt_len: int, elem: int) -> int:
    """The prefill's largest activations for one sequence: hidden states and MLP intermediates of every prompt token
    (`bytes_needed`'s term; what a long prompt adds to the peak besides its KV cache)."""
    cfg = text_config(cfg)
    return prompt_len * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * elem


def sequence_bytes(cfg, num_shared: int, prompt_len: int, new_tokens: int, elem: int) -> int:
    """Predicted peak bytes one more sequence adds: the K/V of the L - C kept layers over prompt + generated tokens
    (exact) plus the prefill's activations (`prefill_activation_bytes`, an estimate the budget search corrects with
    its measurements)."""
    cfg = text_config(cfg)
    kept = cfg.num_hidden_layers - num_shared
    return kept * kv_token_bytes(cfg, elem) * (prompt_len + new_tokens) + prefill_activation_bytes(
        cfg, prompt_len, elem
    )


#: A budget probe's warm-up prompt: warm-up only wakes the kernels, and a full long prompt would double the cost of
#: every probe (the prefill of batch x 2k tokens dominates it on a CPU).
BUDGET_WARMUP_PROMPT = 64


def max_batch_within(
    model_name: str,
    budget_bytes: int,
    rate: float,
    prompt_len: int,
    new_tokens: int,
    cache: str = "dynamic",
    random_weights: bool = False,
    device=None,
    dtype=None,
    limit: int = 1024,
    model=None,
    fixed_bytes: int | None = None,
    repeats: int = 1,
    max_probes: int = 6,
    time_limit_s: float | None = None,
    probe_tokens: int = 4,
    seed: int = 0,
    plain_points: list | None = None,
    probe_repeats: int = 1,
) -> dict:
    """Largest batch whose measured peak memory stays within `budget_bytes`, for the plain (rate 0) or shared model,
    and its throughput there.

    Peak memory is affine in the batch: fixed bytes (weights, runtime) plus bytes per sequence. The line comes from
    measured peaks wherever there are any: `plain_points`, (batch, peak) pairs measured on the plain model (the
    K/V this mode does not store is taken off them, exactly), else two short probes at batch 1 and 2 (what one more
    sequence adds: its K/V, exact, and the prefill's activations, which the accounting only estimates and a 2k
    prompt makes as large as the K/V). Without either, the accounting's `sequence_bytes` through `fixed_bytes`
    gives the first guess. Every probe after that is a full
    timed run (`repeats`, warm-up on a short prompt) at the batch the line through the measured peaks predicts,
    kept strictly between the largest batch known to fit and the smallest known not to: with a good first guess
    the search ends after two runs (b fits, b + 1 does not), and the fitting one is the row returned.

    Bounded: at most `max_probes` full runs, and none is started once the runs so far plus the next one's predicted
    time (the last run's, scaled by the batch) would pass `time_limit_s`. `largest_proven` says whether batch + 1
    was measured not to fit (or batch is `limit`); `probes` lists every run (batch, peak, fits, seconds).

    `probe_repeats`: each probe is run that many times (each in a process of its own without `model`); a batch
    fits only if every repeat's peak does, and its peak is the largest of them (a peak measured once can be luck)."""
    mode = "plain" if rate == 0 else "shared"
    t0 = time.perf_counter()
    cfg = shape_config(model_name, model)
    C = num_shared_for(rate, cfg.num_hidden_layers)
    elem = _element_size(model, device, dtype)
    per_seq = sequence_bytes(cfg, C, prompt_len, new_tokens, elem)
    probe = Config(model_name, mode, rate, 1, prompt_len, new_tokens, cache, random_weights, device, dtype, seed=seed)
    probe.warmup_prompt_len = min(prompt_len, BUDGET_WARMUP_PROMPT)  # a short warm-up: it only wakes the kernels

    def run(b, tokens, reps, warmup):
        config = replace(probe, batch=b, new_tokens=tokens, repeats=reps, warmup=warmup)
        return measure(config, model) if model is not None else measure_isolated(config)

    # (batch, peak) pairs the line is fitted to: the plain model's measured peaks less the K/V of the C layers this
    # mode leaves out (exact), or two short probes of this mode; full probes are added as they run
    kv_left_out = C * kv_token_bytes(text_config(cfg), elem) * (prompt_len + new_tokens)
    points: list[tuple[int, int]] = [(b, p - b * kv_left_out) for b, p in plain_points or []]
    if not points and fixed_bytes is None:
        points = line_probe(run, min(new_tokens, probe_tokens))
    if fixed_bytes is None:
        fixed_bytes = int(fit_line(points, per_seq)[1])
    search = _BudgetSearch(budget_bytes, per_seq, fixed_bytes, points, limit, started=t0)
    search.run_probes(run, new_tokens, repeats, max_probes, time_limit_s, probe_repeats)
    asked = dict(mode=mode, rate=rate, num_layers=cfg.num_hidden_layers, num_shared=C, budget_bytes=budget_bytes)
    return search.result({**asked, "prompt_len": prompt_len, "new_tokens": new_tokens}, new_tokens)


def _element_size(model, device, dtype) -> int:
    """Bytes per weight element: the loaded model's, else those of the dtype the benchmark would load."""
    from .models import resolve_device, resolve_dtype

    if model is not None:
        return next(model.parameters()).element_size()
    return torch.tensor([], dtype=resolve_dtype(dtype, resolve_device(device))).element_size()


@dataclass
class _BudgetSearch:
    """One mode's search for the largest batch within `budget_bytes`: the line of peak memory against the batch,
    fitted to the measured (batch, peak) `points` (or the accounting's bytes per sequence through `fixed_bytes`),
    the largest batch known to fit (`lower`, its row `best`), the smallest known not to (`upper`), and every full
    run (`probes`)."""

    budget_bytes: int
    per_sequence: int
    fixed_bytes: int
    points: list
    limit: int
    started: float
    line_points: list = field(init=False)  # the points before any full run
    lower: int = 0
    upper: int = field(init=False)
    best: dict | None = None
    first_guess: int | None = None
    probes: list = field(default_factory=list)

    def __post_init__(self):
        self.line_points = list(self.points)
        self.upper = self.limit + 1

    def predicted_batch(self) -> int:
        slope, intercept = (
            fit_line(self.points, self.per_sequence) if self.points else (self.per_sequence, self.fixed_bytes)
        )
        return int((self.budget_bytes - intercept) // slope)

    def run_probes(
        self, run, new_tokens: int, repeats: int, max_probes: int, time_limit_s: float | None, probe_repeats: int = 1
    ):
        """Full timed runs at the predicted batch, kept strictly between `lower` and `upper`, until they meet or a
        bound stops the search; each probe `probe_repeats` times (it fits when every repeat fits)."""
        last_s = None
        while self.lower + 1 < self.upper and len(self.probes) < max_probes:
            b = min(max(self.predicted_batch(), self.lower + 1), self.upper - 1)
            self.first_guess = b if self.first_guess is None else self.first_guess
            spent = time.perf_counter() - self.started
            if (
                time_limit_s is not None
                and self.probes
                and spent + last_s * b / self.probes[-1]["batch"] > time_limit_s
            ):
                break
            t = time.perf_counter()
            runs = [run(b, new_tokens, repeats, 1) for _ in range(max(1, probe_repeats))]
            last_s = (time.perf_counter() - t) / len(runs)
            peaks = [r["peak_bytes"] for r in runs]
            row = {**max(runs, key=lambda r: r["decode_tps"]), "peak_bytes": max(peaks), "repeat_peaks": peaks}
            fits = all(p <= self.budget_bytes for p in peaks)
            self.points.append((b, row["peak_bytes"]))
            self.probes.append(
                {"batch": b, "peak_bytes": row["peak_bytes"], "peaks": peaks, "fits": fits, "seconds": round(last_s, 2)}
            )
            if fits:
                self.lower, self.best = b, row
            else:
                self.upper = b

    def result(self, head: dict, new_tokens: int) -> dict:
        """The row of the largest batch that fits (its measured row, the search's record and the throughput), or
        the record alone with batch 0 when none does."""
        search = {
            **head,
            "predicted_batch": self.first_guess,
            "predicted_sequence_bytes": self.per_sequence,
            "fixed_bytes": self.fixed_bytes,
            "line_points": self.line_points,
            "probes": self.probes,
            "search_s": round(time.perf_counter() - self.started, 2),
            "largest_proven": self.best is not None and (self.upper == self.lower + 1 or self.lower == self.limit),
        }
        if self.best is None:
            return {**search, "batch": 0, "fits": False}
        row = dict(self.best)
        row.update(search)
        row.update(
            fits=True,
            per_sequence_peak_bytes=(row["peak_bytes"] - self.fixed_bytes) / row["batch"],
            throughput_tps=row["decode_tps"],
            e2e_tps=row["batch"] * new_tokens / (row["prefill_s"] + row["decode_s"]),  # prefill included
        )
        return row


def fit_line(points: list[tuple[int, int]], slope: float) -> tuple[float, float]:
    """(bytes per sequence, fixed bytes) of the peak memory against the batch: the least-squares line through the
    measured (batch, peak) `points`, or, with a single batch among them (or a line that does not rise), `slope`
    (the accounting's bytes per sequence) through the last point."""
    if len({b for b, _ in points}) >= 2:
        n = len(points)
        mb, mp = sum(b for b, _ in points) / n, sum(p for _, p in points) / n
        var = sum((b - mb) ** 2 for b, _ in points)
        fitted = sum((b - mb) * (p - mp) for b, p in points) / var
        if fitted > 0:
            return fitted, mp - fitted * mb
    b, peak = points[-1]
    return slope, peak - b * slope


def line_probe(run, tokens: int) -> list[tuple[int, int]]:
    """Two short runs (`tokens` decode steps, no warm-up) at batch 1 and 2: their (batch, peak) pairs, the line of
    the peak memory against the batch before any full run."""
    return [(b, run(b, tokens, 1, 0)["peak_bytes"]) for b in (1, 2)]


def budget_comparison(
    model_name: str,
    budget_bytes: int,
    rates,
    prompt_len: int,
    new_tokens: int,
    cache: str = "dynamic",
    random_weights: bool = False,
    device=None,
    dtype=None,
    limit: int = 1024,
    model=None,
    repeats: int = 1,
    max_probes: int = 6,
    time_limit_s: float | None = None,
    seed: int = 0,
    probe_repeats: int = 1,
) -> list[dict]:
    """Throughput at the largest batch that fits the budget (`max_batch_within`): plain, then shared at each rate;
    each probe `probe_repeats` times (a batch fits when every repeat fits).

    Two short probes of the plain model (batch 1 and 2) and then its full runs give the line of peak memory against
    the batch for every search: weights, runtime and activations do not change with sharing, and the K/V a shared
    model leaves out is exact. `time_limit_s` bounds the whole comparison: each search gets the time left over the
    searches left. Shared rows carry the ratios to plain beside their limits: batch and throughput against
    L / (L - C) (the KV cache is the only thing that shrinks), bytes per sequence against (L - C) / L; the gap comes
    from the memory that does not scale with the cache (activations of the prefill, allocator slack)."""
    t0 = time.perf_counter()
    common = dict(
        cache=cache,
        random_weights=random_weights,
        device=device,
        dtype=dtype,
        limit=limit,
        model=model,
        repeats=repeats,
        max_probes=max_probes,
        seed=seed,
        probe_repeats=probe_repeats,
    )
    rates = [0.0, *(r for r in rates if r > 0)]
    plain_points = None
    rows = []
    for i, rate in enumerate(rates):
        left = None if time_limit_s is None else max(0.0, time_limit_s - (time.perf_counter() - t0)) / (len(rates) - i)
        row = max_batch_within(
            model_name,
            budget_bytes,
            rate,
            prompt_len,
            new_tokens,
            plain_points=plain_points,
            time_limit_s=left,
            **common,
        )
        if plain_points is None:  # the plain search's measured peaks, short probes and full runs
            plain_points = row["line_points"] + [(p["batch"], p["peak_bytes"]) for p in row["probes"]]
        rows.append(row)
    plain = rows[0]
    for row in rows[1:]:
        L, C = row["num_layers"], row["num_shared"]
        row["ideal_ratio"] = L / (L - C)
        row["kv_limit_ratio"] = (L - C) / L
        if plain.get("fits") and row.get("fits"):
            row["batch_ratio"] = row["batch"] / plain["batch"]
            row["throughput_ratio"] = row["throughput_tps"] / plain["throughput_tps"]
            row["e2e_ratio"] = row["e2e_tps"] / plain["e2e_tps"]
            row["gap_to_ideal"] = row["ideal_ratio"] - row["throughput_ratio"]
            row["per_sequence_bytes_ratio"] = row["per_sequence_peak_bytes"] / plain["per_sequence_peak_bytes"]
            row["kv_per_sequence_ratio"] = (row["kv_bytes"] / row["batch"]) / (plain["kv_bytes"] / plain["batch"])
            row["peak_ratio"] = row["peak_bytes"] / plain["peak_bytes"]
    for row in rows:
        row["comparison_s"] = round(time.perf_counter() - t0, 2)
    return rows


def format_table(rows: list[dict], budget: bool = False) -> str:
    """A fixed-width table of the rows, for the terminal."""
    if budget:
        cols = [
            ("mode", "{}"),
            ("rate", "{:.3f}"),
            ("prompt_len", "{}"),
            ("batch", "{}"),
            ("peak_bytes", "{:,}"),
            ("throughput_tps", "{:.1f}"),
            ("throughput_ratio", "{:.3f}"),
            ("ideal_ratio", "{:.3f}"),
            ("per_sequence_bytes_ratio", "{:.3f}"),
            ("kv_limit_ratio", "{:.3f}"),
            ("largest_proven", "{}"),
            ("search_s", "{:.0f}"),
        ]
    else:
        cols = [
            ("mode", "{}"),
            ("rate", "{:.3f}"),
            ("num_shared", "{}"),
            ("batch", "{}"),
            ("kv_bytes", "{:,}"),
            ("kv_bytes_ratio", "{:.4f}"),
            ("peak_bytes", "{:,}"),
            ("peak_ratio", "{:.3f}"),
            ("prefill_s", "{:.3f}"),
            ("decode_tps", "{:.1f}"),
            ("decode_tps_ratio", "{:.3f}"),
        ]
    cells = [[name for name, _ in cols]]
    for r in rows:
        cells.append([fmt.format(r[name]) if r.get(name) is not None else "-" for name, fmt in cols])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    weights = {r.get("weights") for r in rows if r.get("weights")}
    notes = ["  (random weights: speed and memory only)"] if "random" in weights else []
    if not budget and load_note(rows):
        notes.append(f"  speed figures:{load_note(rows)}")
    return "\n".join(lines + notes)
