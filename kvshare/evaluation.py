"""Evaluation: a model, an optional sharing strategy and a task suite -> a results table.

Multiple-choice and generation tasks run through lm-evaluation-harness (`HFLM` wrapping the very
model object that `kvshare.sharing` patches); perplexity runs through `kvshare.perplexity`.

    ev = Evaluator(model, tokenizer)
    result = ev.evaluate(strategy, suite="offline")     # {"rows": [...], "seconds": ..., ...}
    write_results(result, "results.json")              # and results.csv beside it

Rows have the columns ROW_COLUMNS: task, metric, value, stderr, n (examples; scored tokens for
perplexity), category, chance (uniform-guess score, where defined), primary (the task's headline
metric, averaged in the compression table), scores (per-example values, kept in the JSON only).

With a cache method (`method=`: any kvshare.methods method beside the strategy: eviction, quantization),
sharing and the method are applied together through `kvshare.compression`. Token eviction only shows
when tokens are scored by decoding, so with an evicting method log-likelihoods and perplexity are
scored by decoding (`decode=True`, see kvshare.tasks.lmeval); pass `decode=True` for the full model
too to compare under the same protocol. A quantized cache shows in the usual one-pass scoring.

Results are cached per (model fingerprint, strategy, method, protocol, task definition, limit) under
`<kvshare cache>/eval_cache`, so re-running a notebook recomputes nothing that is done.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .combine import compression
from .io import write_csv, write_json
from .methods import Composition
from .models import model_name
from .pypi_files import kvshare_home
from .strategy import Strategy
from .tasks import default_tasks, suite_tasks

ROW_COLUMNS = ("task", "metric", "value", "stderr", "n", "category", "chance", "primary", "higher_is_better")
SUITES = ("offline", "online", "long")
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
def resolve_tasks(suite: str = "offline", tasks=None, lengths=None, model: str | None = None) -> list:
    """Task specs of `suite`: its defaults, or `tasks` (names, comma-separated string or spec objects); the long
    suite's at each context length of `lengths` (kvshare.tasks.long). The offline suite is `model`'s own (None: the
    default model's; `kvshare.tasks.offline_tasks`)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; use one of {', '.join(SUITES)}")
    if suite == "long":
        from .tasks.long import long_tasks

        return long_tasks(tasks, lengths)
    if lengths is not None:
        raise ValueError("context lengths apply to the long suite (suite='long')")
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if tasks and all(not isinstance(t, str) for t in tasks):
        return list(tasks)  # spec objects: nothing to look up (a model's screen must not need its suite)
    available = suite_tasks(suite, model)
    if tasks is None:
        return [available[n] for n in default_tasks(suite, model)]
    out = []
    for t in tasks:
        if not isinstance(t, str):  # a spec object (MCTask, PerplexityTask, LMEvalTask)
            out.append(t)
            continue
        spec = available.get(t) or available.get("kvshare_" + t)
        if spec is None:
            raise ValueError(f"unknown {suite} task {t!r}; available: {', '.join(sorted(available))}")
        out.append(spec)
    if not out:
        raise ValueError(f"no tasks given; available: {', '.join(sorted(available))}")
    return out


def task_key(spec) -> str:
    """What defines a task's numbers besides model, strategy and limit (part of the cache key)."""
    from dataclasses import asdict

    from .tasks.offline import FORMAT_VERSION

    d = asdict(spec)
    d.pop("limit", None)
    d.pop("category", None)
    if d.get("source", "").endswith((".jsonl", ".jsonl.gz")):  # a local file: its contents define the task
        d["source_sha"] = hashlib.sha256(Path(d["source"]).read_bytes()).hexdigest()[:16]
    return json.dumps({"spec": d, "format": FORMAT_VERSION}, sort_keys=True)


def prepare_offline() -> Path:
    """Write the offline suite's lm-eval files from data/ (checked against its manifest), so that a first evaluation
    finds them ready (scripts/setup.sh calls this); nothing is downloaded."""
    from .tasks import OFFLINE_TASKS
    from .tasks.offline import prepare

    return prepare(OFFLINE_TASKS)


# --------------------------------------------------------------------------------------------
# cache keys
# --------------------------------------------------------------------------------------------
def model_fingerprint(model, tokenizer) -> str:
    """Name + architecture + a checksum of a few weights + tokenizer: tells random test models apart."""
    import torch

    h = hashlib.sha256()
    h.update(model_name(model).encode())
    h.update(model.config.to_json_string(use_diff=True).encode())
    with torch.no_grad():
        for name, p in list(model.named_parameters())[:3] + list(model.named_parameters())[-2:]:
            h.update(name.encode())
            h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    h.update(f"{type(tokenizer).__name__}:{len(tokenizer)}:{getattr(tokenizer, 'name_or_path', '')}".encode())
    h.update(str(model.dtype).encode())
    return h.hexdigest()[:16]


def strategy_key(strategy: Strategy | None) -> str:
    """'full' for no sharing (None or an empty mapping: the model is left untouched), else a digest."""
    if strategy is None or not strategy.mapping:
        return "full"
    text = json.dumps({"n": strategy.num_layers, "m": sorted(strategy.mapping.items())})
    return f"c{strategy.num_shared}-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def method_description(method) -> dict | None:
    """What defines a cache method's effect: its name and settings, flat (None: no method). A composition's
    name joins its members' names (`h2o+quantized`) and its settings are theirs, merged."""
    if method is None:
        return None
    d = method.to_dict()
    if "members" in d:
        settings = {k: v for m in d["members"] for k, v in m.items() if k != "method"}
        return {"method": d["method"], **settings}
    return dict(d)


def method_key(method, decode: bool = False) -> str:
    """'none' (or 'decode': the full cache scored by decoding), else name + settings (+ '-decode')."""
    d = method_description(method)
    base = (
        "none"
        if d is None
        else "-".join([safe_name(str(d.get("method")))] + [f"{k}{v}" for k, v in sorted(d.items()) if k != "method"])
    )
    return ("decode" if d is None else base + "-decode") if decode else base


def evicts(method) -> bool:
    """Is `method` lossy after the prefill (tokens dropped or merged), so that only scoring by decoding shows it?"""
    return method is not None and method.scored_by_decoding


def split_methods(model, strategy, method):
    """(strategy, cache method) of what an evaluation is given: `method` may be any method or composition from
    kvshare.methods, a sharing one (`kvsharer`) included; its strategy then joins (or is) `strategy`."""
    if method is None:
        return strategy, None
    combined = Composition(strategy, method)
    members = combined.cache_members
    cache_method = None if not members else members[0] if len(members) == 1 else Composition(*members)
    return combined.strategy_for(model), cache_method


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------
class Evaluator:
    """One loaded model evaluated under any number of strategies (the lm-eval wrapper is built once)."""

    def __init__(
        self, model, tokenizer, batch_size: int = 32, cache: bool = True, cache_dir=None, progress: bool = True
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir else kvshare_home() / "eval_cache"
        self.progress = progress
        self._lm = None
        self._decode = False  # the protocol of the evaluation in progress
        self._query_agnostic = True  # the long suite's setting of the evaluation in progress
        self._online_tasks = None
        self._fingerprint = None

    # -- lm-eval plumbing ------------------------------------------------------------------
    @property
    def lm(self):
        if self._lm is None:
            from .tasks.lmeval import make_hflm

            self._lm = make_hflm(self.model, self.tokenizer, self.batch_size)
        self._lm.decode = self._decode
        return self._lm

    def _task_manager(self):
        """lm-eval's index of its own tasks (online suite), built once."""
        from lm_eval.tasks import TaskManager

        if self._online_tasks is None:
            self._online_tasks = TaskManager()
        return self._online_tasks

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.tokenizer)
        return self._fingerprint

    def chat(self) -> bool:
        """Whether requests that may be chat requests (the long suite) use the chat template: an instruct model
        with one; never a base model (`kvshare.models.KIND`)."""
        from .models import uses_chat_template

        return uses_chat_template(self.model, self.tokenizer)

    # -- cache -----------------------------------------------------------------------------
    def _cache_path(self, strategy, spec, limit, method=None, decode: bool = False, agnostic: bool = False) -> Path:
        text = task_key(spec) + f"|chat={self.chat()}|v{CACHE_VERSION}"
        if agnostic and getattr(spec, "kind", None) == "ruler":  # the query-aware key stays what it always was
            text += "|query=agnostic"
        key = hashlib.sha256(text.encode()).hexdigest()[:10]
        name = f"{safe_name(spec.name)}-limit{limit if limit is not None else 'all'}-{key}.json"
        where = strategy_key(strategy)
        if method is not None or decode:
            where += "/" + method_key(method, decode)
        return self.cache_dir / f"{safe_name(model_name(self.model))}-{self.fingerprint}" / where / name

    def _cached(self, path: Path):
        if self.cache and path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return None
        return None

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(
        self,
        strategy: Strategy | None = None,
        suite: str = "offline",
        tasks=None,
        limit: int | None = None,
        label: str | None = None,
        method=None,
        decode: bool | None = None,
        lengths=None,
        query_agnostic: bool = True,
    ) -> dict:
        """Evaluate the model under `strategy` (None: no sharing) and cache `method` (None: none) on a suite;
        returns the results dict.

        `query_agnostic` (the long suite): each prompt's context is prefilled and compressed before its question is
        read (kvshare.tasks.lmeval.answer_tokens); False: the whole prompt is prefilled, then compressed.

        `limit` caps the examples of every task (for perplexity: 512-token windows); None uses each
        task's default size (the offline suite's defaults fit the 5-minute budget on 2 CPU cores).
        `decode` scores log-likelihoods and perplexity by decoding (module docstring); None: on exactly
        when `method` evicts tokens. An evicting method with `decode=False` is refused: it would
        measure nothing. `lengths`: the long suite's context lengths (default 1k, 2k, 4k; its answers are generated,
        so eviction shows under either protocol).
        """
        specs = resolve_tasks(suite, tasks, lengths, model=model_name(self.model))
        strategy, method = split_methods(self.model, strategy, method)
        if strategy is not None:
            strategy.check_model(self.model)
        if decode is None:
            decode = evicts(method)
        elif not decode and evicts(method):
            raise ValueError(
                f"{method!r} drops tokens only after a forward: one-pass scoring would not see it; "
                "score by decoding (decode=True, or leave decode unset)"
            )
        t0 = time.perf_counter()
        entries, todo = {}, []
        for spec in specs:
            n = limit if limit is not None else spec.limit
            path = self._cache_path(strategy, spec, n, method, decode, query_agnostic)
            hit = self._cached(path)
            if hit is not None:
                entries[spec.name] = hit
            else:
                todo.append((spec, n, path))
        computed = 0.0
        if todo:
            t1 = time.perf_counter()
            self._decode = decode
            self._query_agnostic = query_agnostic
            try:
                with compression(self.model, strategy, method):
                    for spec, _n, path, entry in self._run(todo):
                        entries[spec.name] = entry
                        if self.cache:
                            write_json(path, entry)
            finally:
                self._decode = False
                self._query_agnostic = True
            computed = time.perf_counter() - t1
        elapsed = time.perf_counter() - t0
        rows = [row for spec in specs for row in entries[spec.name]["rows"]]
        return {
            "model": model_name(self.model),
            "label": label,
            "suite": suite,
            "limit": limit,
            "strategy": None if strategy is None else strategy.to_dict(),
            "num_shared": 0 if strategy is None else strategy.num_shared,
            "method": method_description(method),
            "protocol": "decode" if decode else "one-pass",
            # the long suite's generation: context compressed before the question is read, or after
            "query": ("agnostic" if query_agnostic else "aware") if any(s.kind == "ruler" for s in specs) else None,
            "tasks": [s.name for s in specs],
            "cached_tasks": [s.name for s in specs if s.name not in {t[0].name for t in todo}],
            "seconds": round(elapsed, 2),
            "compute_seconds": round(computed, 2),
            "rows": rows,
        }

    def _run(self, todo):
        """Yield (spec, limit, path, entry) for each task to compute; lm-eval tasks are batched together.

        `seconds` of an entry is the time of the lm-eval call it shared with the tasks in `batched_with`."""
        from lm_eval.tasks import TaskManager

        from .tasks.lmeval import run_lm_eval, run_perplexity

        groups: dict = {}
        long_groups: dict = {}  # the long suite: one lm-eval call per context length (kvshare.tasks.long)
        for item in todo:
            spec, n = item[0], item[1]
            if spec.kind == "ruler":
                long_groups.setdefault(spec.length, []).append(item)
                continue
            if spec.kind == "perplexity":
                t0 = time.perf_counter()
                rows = run_perplexity(
                    self.model,
                    self.tokenizer,
                    spec,
                    n,
                    progress=self.progress,
                    decode=self._decode,
                    batch_size=min(self.batch_size, 8),
                )
                yield (*item, {"rows": rows, "seconds": round(time.perf_counter() - t0, 2)})
                continue
            online = spec.kind == "lm_eval"
            # offline tasks of any size share one lm-eval call (per-task example indices); online ones share a limit
            groups.setdefault((online, n if online else None), []).append(item)
        offline = [i[0] for i in todo if i[0].kind == "multiple_choice"]
        if offline:
            from .tasks.offline import prepare

            root = prepare(offline)
        for (online, n), items in groups.items():
            t0 = time.perf_counter()
            specs = [i[0] for i in items]
            if online:
                results = run_lm_eval(self.lm, self._task_manager(), specs, limit=n)
            else:
                from .tasks.offline import test_size

                # the offline folder's index takes milliseconds: rebuilt, as this run may have added configs
                tm = TaskManager(include_path=str(root), include_defaults=False)
                samples = {
                    s.name: list(range(test_size(s) if m is None else min(m, test_size(s)))) for s, m, _ in items
                }
                results = run_lm_eval(self.lm, tm, specs, samples=samples)
            seconds = round(time.perf_counter() - t0, 2)
            for item in items:
                yield (
                    *item,
                    {"rows": results[item[0].name], "seconds": seconds, "batched_with": [s.name for s in specs]},
                )
        for items in long_groups.values():
            from .tasks.long import question_start, run_long

            t0 = time.perf_counter()
            lm = self.lm
            lm.question_start = question_start if self._query_agnostic else None
            try:
                results = run_long(lm, self.tokenizer, [(i[0], i[1]) for i in items], chat=self.chat())
            finally:
                lm.question_start = None
            seconds = round(time.perf_counter() - t0, 2)
            for item in items:
                yield (
                    *item,
                    {"rows": results[item[0].name], "seconds": seconds, "batched_with": [i[0].name for i in items]},
                )


def evaluate(
    model,
    tokenizer,
    strategy: Strategy | None = None,
    suite: str = "offline",
    tasks=None,
    limit: int | None = None,
    method=None,
    decode: bool | None = None,
    lengths=None,
    **kwargs,
) -> dict:
    """One-off evaluation (see `Evaluator` to reuse the model across strategies and methods)."""
    return Evaluator(model, tokenizer, **kwargs).evaluate(
        strategy, suite=suite, tasks=tasks, limit=limit, method=method, decode=decode, lengths=lengths
    )


def write_results(result: dict, path) -> tuple[Path, Path]:
    """The results dict as JSON at `path` and its rows (without per-example scores) as CSV beside it."""
    path = Path(path)
    write_json(path, result)
    csv_path = path.with_suffix(".csv")
    write_csv(csv_path, [{k: r.get(k) for k in ROW_COLUMNS} for r in result["rows"]])
    return path, csv_path


def headline(rows) -> dict:
    """{task: primary metric value} of a results table's rows."""
    return {r["task"]: r["value"] for r in rows if r.get("primary")}


def format_rows(rows) -> str:
    """A plain-text table of results rows (primary metrics marked with *)."""
    lines = [f"{'task':34} {'metric':9} {'value':>9} {'stderr':>8} {'n':>6} {'chance':>7}"]
    for r in rows:
        se = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        chance = "" if r.get("chance") is None else f"{r['chance']:.3f}"
        star = "*" if r.get("primary") else " "
        lines.append(f"{r['task']:34} {r['metric'] + star:9} {r['value']:9.4f} {se:>8} {r['n'] or '':>6} {chance:>7}")
    return "\n".join(lines)
