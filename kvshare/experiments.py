"""The experiments behind the notebooks: thin notebook cells call these functions.

Cost model (what makes a full run fit on 2 CPU cores):
- a greedy search to C visits exactly the candidates a search to any smaller C visits, up to where
  it stops, so ONE search per (order, seed, calibration set) to the largest C gives every smaller C
  as `Strategy.prefix(c)`;
- identical strategies are evaluated once: every order's C = 0 point is the same unshared model,
  and two searches that accept the same pairs share their perplexity;
- every strategy is scored on the SAME held-out tokens, so two strategies are compared by the
  paired difference of their per-window mean NLLs, far more precise than the two absolute
  perplexities' error bars suggest.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .calibration import distances_from_means, encode_calibration, kv_means, reference_forward
from .data import calibration_texts, eval_text
from .metrics import token_nlls
from .models import model_name
from .search import candidate_pairs, search
from .sharing import num_layers, sharing
from .strategy import Strategy

ORDER_LABELS = {
    "dissimilar": "dissimilar (KVSharer)",
    "similar": "similar",
    "random": "random",
}


# ------------------------------------------------------------------------------------------------
# settings and paths
# ------------------------------------------------------------------------------------------------
def repo_root(start: str | os.PathLike | None = None) -> Path | None:
    """The kvshare checkout containing `start` (default: the working directory), or None."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        py = d / "pyproject.toml"
        if py.is_file() and (d / "notebooks").is_dir() and 'name = "kvshare"' in py.read_text():
            return d
    return None


def resolve_out_dir(out_dir, quick: bool) -> Path:
    """Where a notebook writes its figures.

    An explicit `out_dir` wins. Otherwise, inside a checkout: `figures/` for a full run and
    `runs/quick/figures/` for a quick one (a quick run never overwrites the committed figures);
    outside a checkout: `./figures` or `./runs/quick/figures`.
    """
    if out_dir:
        path = Path(out_dir).expanduser()
    else:
        base = repo_root() or Path.cwd()
        path = base / ("runs/quick/figures" if quick else "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def num_for_fraction(num_layers_: int, fraction: float) -> int:
    """Layers to replace for a fraction of the model, rounded half up (12.5% of 30 -> 4, 25% -> 8)."""
    return int(math.floor(num_layers_ * fraction + 0.5))


def c_grid(num_layers_: int, max_fraction: float = 0.4, step: int = 2) -> list[int]:
    """0, step, 2*step, ... up to at least `max_fraction` of the layers (never all of them)."""
    top = min(num_layers_ - 1, math.ceil(num_layers_ * max_fraction - 1e-9))
    grid = list(range(0, top + 1, step))
    if grid[-1] < top:
        grid.append(grid[-1] + step if grid[-1] + step <= num_layers_ - 1 else top)
    return grid


@dataclass
class Settings:
    """Everything a notebook's numbers depend on (saved beside its figures)."""

    model: str
    quick: bool
    seed: int
    samples: int = 30  # calibration texts per set
    max_tokens: int = 64  # tokens per calibration text
    calibration_sets: int = 3
    threshold: float = 0.5
    metric: str = "euclidean"
    max_fraction: float = 0.4
    c_step: int = 2
    random_seeds: int = 3
    eval_tokens: int = 3072  # held-out tokens per perplexity: every strategy on the same ones
    window: int = 256  # scoring window (= stride): 12 independent windows for the standard errors
    thresholds: list = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    sweep_fraction: float = 0.25
    max_new_tokens: int = 48

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = dict(samples=6, calibration_sets=2, max_fraction=4 / 30, random_seeds=2, eval_tokens=1024, window=128,
             thresholds=[0.3, 0.6, 0.9], sweep_fraction=0.1, max_new_tokens=16)


def make_settings(cls, quick_values: dict, model: str, quick: bool, seed: int = 0, **overrides):
    """A notebook's settings dataclass `cls`: full-run defaults, or `quick_values` over them in quick mode
    (minutes on 2 cores, every code path); then `overrides`, where None means the default."""
    base = cls(model=model, quick=bool(quick), seed=int(seed))
    values = dict(quick_values) if quick else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in values.items():
        if not hasattr(base, k):
            raise ValueError(f"unknown setting {k!r}")
        setattr(base, k, v)
    return base


def settings(model: str, quick: bool, seed: int = 0, **overrides) -> Settings:
    """Notebooks 01 and 02's settings (see `make_settings`)."""
    return make_settings(Settings, QUICK, model, quick, seed, **overrides)


# ------------------------------------------------------------------------------------------------
# progress that reads well in Jupyter, in papermill's log and in a CI log
# ------------------------------------------------------------------------------------------------
class Progress:
    """Counts steps of a long loop and prints one line at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, desc: str, every: float = 10.0, enabled: bool = True, stream=None):
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.stream = stream or sys.stdout
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        if enabled:
            self._print("started")

    def _print(self, note: str = ""):
        elapsed = time.perf_counter() - self.t0
        eta = ""
        if 0 < self.done < self.total:
            eta = f", ~{_fmt(elapsed / self.done * (self.total - self.done))} left"
        print(f"{self.desc}: {self.done}/{self.total} ({_fmt(elapsed)}{eta}){' ' + note if note else ''}",
              file=self.stream, flush=True)

    def update(self, n: int = 1, note: str = ""):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            self._print(note)

    def close(self):
        if self.enabled and self.done < self.total:
            self._print("stopped")


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------------------------------------
# distances
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def distance_matrices(model, tokenizer, texts, max_tokens: int = 64) -> dict[str, np.ndarray]:
    """Euclidean and cosine layer-to-layer KV distances from one reference forward."""
    ids, _ = encode_calibration(tokenizer, texts, max_tokens)
    keys, values = kv_means(reference_forward(model, ids))
    return {m: distances_from_means(keys, values, metric=m) for m in ("euclidean", "cosine")}


def dissimilarity_ranks(distances) -> dict[tuple[int, int], int]:
    """(r, s) -> its position in the dissimilar (KVSharer) order, 0 = most dissimilar."""
    return {pair: i for i, pair in enumerate(candidate_pairs(distances, "dissimilar"))}


def matrix_rows(matrices: dict[str, np.ndarray]) -> list[dict]:
    """Long-format rows (metric, layer_a, layer_b, distance) for CSV."""
    return [{"metric": m, "layer_a": a, "layer_b": b, "distance": float(d[a, b])}
            for m, d in matrices.items() for a in range(d.shape[0]) for b in range(d.shape[1])]


# ------------------------------------------------------------------------------------------------
# evaluation on held-out text
# ------------------------------------------------------------------------------------------------
class Evaluator:
    """Perplexity of strategies on one fixed held-out token sample; identical strategies run once."""

    def __init__(self, model, tokenizer, text: str | None = None, tokens: int = 4096, window: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.text = eval_text() if text is None else text
        self.tokens, self.window = tokens, window
        self.cache: dict[tuple, dict] = {}
        self.evaluations = 0
        self.seconds = 0.0

    @staticmethod
    def key(strategy: Strategy | None) -> tuple:
        return () if strategy is None else tuple(sorted(strategy.mapping.items()))

    def __call__(self, strategy: Strategy | None) -> dict:
        k = self.key(strategy)
        if k not in self.cache:
            t0 = time.perf_counter()
            use = strategy if strategy is not None and strategy.mapping else None
            with sharing(self.model, use):
                nll = token_nlls(self.model, self.tokenizer, self.text, window=self.window, stride=self.window,
                                 max_tokens=self.tokens)
            self.cache[k] = summarize_nll(nll, self.window)
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0
        return self.cache[k]


def summarize_nll(nll: torch.Tensor, window: int) -> dict:
    """Perplexity with a standard error; windows are the independent units (tokens within one are not)."""
    means = np.array([c.mean().item() for c in nll.split(window)])
    mean = float(nll.mean().item())
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return {"ppl": math.exp(mean), "nll": mean, "nll_se": se, "ppl_se": math.exp(mean) * se,
            "tokens": int(nll.numel()), "window_nll": means.tolist()}


def paired_difference(a: dict, b: dict) -> dict:
    """NLL(a) - NLL(b) on the same windows, with the paired standard error; ratio = ppl(a) / ppl(b)."""
    wa, wb = np.asarray(a["window_nll"]), np.asarray(b["window_nll"])
    if wa.shape != wb.shape:
        raise ValueError("paired differences need the same evaluation windows")
    d = wa - wb
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    diff = a["nll"] - b["nll"]
    return {"nll_diff": diff, "nll_diff_se": se, "ppl_ratio": math.exp(diff), "z": diff / se if se > 0 else float("nan")}


# ------------------------------------------------------------------------------------------------
# searches and perplexity-versus-C curves
# ------------------------------------------------------------------------------------------------
@dataclass
class SearchRun:
    calibration_set: int
    order: str
    seed: int
    strategy: Strategy
    trace: list

    @property
    def name(self) -> str:
        return f"set{self.calibration_set}-{self.order}" + (f"-seed{self.seed}" if self.order == "random" else "")


class _SearchWatch:
    """A heartbeat for one long search: every `every` seconds, a line with the candidates scored so far.

    The count comes from wrapping `kvshare.search.similarity` (called once per candidate) for the
    duration of the search; the wrapper is removed again afterwards.
    """

    def __init__(self, label: str, threshold: float, every: float = 30.0, enabled: bool = True):
        self.label, self.threshold, self.every, self.enabled = label, threshold, every, enabled
        self.scored = self.passed = 0

    def __enter__(self):
        import importlib
        import threading

        # the module, not the function `kvshare.search` that the package exports under the same name
        search_module = importlib.import_module(".search", __package__)

        self._module = search_module
        self._original = getattr(search_module, "similarity", None)
        if self.enabled and self._original is not None:
            def counting(*args, **kwargs):
                score = self._original(*args, **kwargs)
                self.scored += 1
                self.passed += score > self.threshold
                return score

            search_module.similarity = counting
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self.every):
            print(f"{self.label}: still searching, {_fmt(time.perf_counter() - self._t0)}, "
                  f"{self.scored} candidates scored, {self.passed} above T = {self.threshold}", flush=True)

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled and self._original is not None:
            self._module.similarity = self._original
        return False


def run_search(model, tokenizer, texts, num_shared: int, order: str, seed: int, cfg: Settings,
               calibration_set: int = 0, threshold: float | None = None, progress: bool = True) -> SearchRun:
    """One greedy search (a heartbeat line every 30 s while it runs long)."""
    T = cfg.threshold if threshold is None else threshold
    label = f"search ({order}{f' seed {seed}' if order == 'random' else ''}, set {calibration_set}, T={T}, C={num_shared})"
    with _SearchWatch(label, T, enabled=progress):
        strategy, trace = search(model, tokenizer, texts, num_shared, threshold=T, order=order, metric=cfg.metric,
                                 seed=seed, max_tokens=cfg.max_tokens, progress=False)
    strategy.metadata["calibration"].update(source="bbc", set_index=calibration_set)
    return SearchRun(calibration_set, order, seed, strategy, trace)


def order_runs(cfg: Settings) -> list[tuple[str, int]]:
    """(order, seed) of every search per calibration set: dissimilar, similar, random x seeds."""
    return [("dissimilar", cfg.seed), ("similar", cfg.seed)] + [("random", cfg.seed + i) for i in range(cfg.random_seeds)]


def ppl_curves(model, tokenizer, cfg: Settings, evaluator: Evaluator, progress: bool = True):
    """One greedy search per (calibration set, order, seed) to the largest C; every C is a prefix.

    Returns (rows, runs): one row per (set, order, seed, C) with perplexity and per-window NLLs.
    """
    L = num_layers(model)
    grid = c_grid(L, cfg.max_fraction, cfg.c_step)
    top = grid[-1]
    plan = [(k, o, s) for k in range(cfg.calibration_sets) for o, s in order_runs(cfg)]
    bar = Progress(len(plan) * len(grid), f"ppl curves ({len(plan)} searches to C={top}, {len(grid)} points each)",
                   enabled=progress)
    rows, runs = [], []
    try:
        for k, order, seed in plan:
            texts = calibration_texts(cfg.samples, set_index=k)
            run = run_search(model, tokenizer, texts, top, order, seed, cfg, calibration_set=k)
            runs.append(run)
            reached = run.strategy.num_shared
            for c in grid:
                if c > reached:  # the search ran out of candidates above the threshold
                    bar.update()
                    continue
                strategy = run.strategy.prefix(c)
                result = evaluator(strategy)
                rows.append({"calibration_set": k, "order": order, "seed": seed, "num_shared": c,
                             "kv_fraction": (L - c) / L, "mapping": {str(r): s for r, s in strategy.mapping.items()},
                             **result})
                bar.update(note=f"set {k} {order}{'' if order != 'random' else f' seed {seed}'} C={c} "
                                f"ppl={result['ppl']:.2f}")
    finally:
        bar.close()
    return rows, runs


def curve_summary(rows: list[dict]) -> list[dict]:
    """Per (set, order, C): perplexity; random as the mean over seeds with its spread (std, min, max)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["calibration_set"], r["order"], r["num_shared"]), []).append(r)
    out = []
    for (k, order, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], list(ORDER_LABELS).index(kv[0][1]), kv[0][2])):
        ppls = np.array([r["ppl"] for r in rs])
        out.append({"calibration_set": k, "order": order, "num_shared": c, "seeds": len(rs),
                    "ppl": float(ppls.mean()), "ppl_std": float(ppls.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "ppl_min": float(ppls.min()), "ppl_max": float(ppls.max()),
                    "ppl_se": float(np.mean([r["ppl_se"] for r in rs])), "nll": float(np.mean([r["nll"] for r in rs]))})
    return out


def _find(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def paired_comparisons(rows: list[dict]) -> list[dict]:
    """Per (set, C > 0): dissimilar vs similar, and dissimilar vs each random seed (paired on windows)."""
    out = []
    sets = sorted({r["calibration_set"] for r in rows})
    for k in sets:
        for c in sorted({r["num_shared"] for r in rows if r["calibration_set"] == k and r["num_shared"] > 0}):
            dis = _find(rows, calibration_set=k, order="dissimilar", num_shared=c)
            if not dis:
                continue
            for other in ("similar", "random"):
                for o in _find(rows, calibration_set=k, order=other, num_shared=c):
                    d = paired_difference(dis[0], o)
                    out.append({"calibration_set": k, "num_shared": c, "versus": other, "seed": o["seed"],
                                "ppl_dissimilar": dis[0]["ppl"], "ppl_other": o["ppl"], **d})
    return out


def observation_conclusion(rows: list[dict], num_layers_: int, model: str, z_crit: float = 2.0,
                           runs: list | None = None) -> str:
    """The markdown conclusion of notebook 01, written from the numbers (and the searches' traces, if given)."""
    comps = paired_comparisons(rows)
    sets = sorted({r["calibration_set"] for r in rows})
    cs = sorted({c["num_shared"] for c in comps})
    main = sets[0]
    lines = [f"**Computed from this run** ({model}, {num_layers_} layers, {len(sets)} disjoint calibration sets, "
             f"perplexity on the same {rows[0]['tokens']} held-out tokens for every strategy; differences are paired "
             f"per evaluation window, \"clear\" means |difference| > {z_crit:g} paired standard errors).", ""]

    def verdict(c_list, k):
        wins = []
        for c in c_list:
            vs = _find(comps, calibration_set=k, num_shared=c, versus="similar")
            if vs:
                wins.append(vs[0])
        return wins

    # headline table on the first calibration set
    lines.append(f"| C (layers replaced) | KV kept | dissimilar | similar | random (mean ± std) | dissimilar vs similar |")
    lines.append("|---|---|---|---|---|---|")
    summary = curve_summary(rows)
    for c in cs:
        d = _find(summary, calibration_set=main, order="dissimilar", num_shared=c)
        s = _find(summary, calibration_set=main, order="similar", num_shared=c)
        rnd = _find(summary, calibration_set=main, order="random", num_shared=c)
        vs = _find(comps, calibration_set=main, num_shared=c, versus="similar")
        cell = lambda x: f"{x[0]['ppl']:.2f}" if x else "n/a"
        rcell = f"{rnd[0]['ppl']:.2f} ± {rnd[0]['ppl_std']:.2f}" if rnd else "n/a"
        vcell = (f"{(vs[0]['ppl_ratio'] - 1) * 100:+.1f}% ({vs[0]['z']:+.1f} SE)" if vs else "n/a")
        lines.append(f"| {c} ({c / num_layers_:.0%}) | {(num_layers_ - c) / num_layers_:.0%} | {cell(d)} | {cell(s)} | "
                     f"{rcell} | {vcell} |")
    lines.append("")
    lines.append(f"Table: calibration set {main}. Last column: perplexity of dissimilar relative to similar "
                 "(negative = dissimilar better) and the paired z-score.")
    lines.append("")

    # winner per C, over all sets
    dis_better = dis_worse = ties = 0
    per_c = []
    for c in cs:
        vs = [v for k in sets for v in verdict([c], k)]
        b = sum(v["z"] < -z_crit for v in vs)
        w = sum(v["z"] > z_crit for v in vs)
        dis_better += b
        dis_worse += w
        ties += len(vs) - b - w
        ratios = [v["ppl_ratio"] for v in vs]
        gm = math.exp(np.mean(np.log(ratios))) if ratios else float("nan")
        if b == len(vs):
            who = "dissimilar wins on every set"
        elif w == len(vs):
            who = "similar wins on every set"
        elif b > 0 and w == 0:
            who = f"dissimilar wins on {b} of {len(vs)} sets, the rest too close to call"
        elif w > 0 and b == 0:
            who = f"similar wins on {w} of {len(vs)} sets, the rest too close to call"
        elif b == 0 and w == 0:
            who = "too close to call on every set"
        else:
            who = f"mixed: dissimilar wins on {b}, similar on {w} of {len(vs)} sets"
        per_c.append(f"- C = {c} ({c / num_layers_:.0%} of layers): {who}; dissimilar/similar perplexity ratio "
                     f"{gm:.3f} (geometric mean over sets; per set {', '.join(f'{r:.3f}' for r in ratios)}).")
    total = dis_better + dis_worse + ties
    if total == 0:
        claim = "There is no shared C > 0 to compare: nothing can be concluded."
    elif dis_better == total:
        claim = (f"**The paper's claim holds on {model}:** sharing the most *dissimilar* layers' KV cache gives lower "
                 f"perplexity than sharing the most *similar* ones at every compression level and on every calibration "
                 f"set ({total} of {total} comparisons clear).")
    elif dis_worse == total:
        claim = (f"**The paper's claim does not hold on {model}:** sharing the most *similar* layers gives lower "
                 f"perplexity than the dissimilar (KVSharer) order in all {total} comparisons.")
    elif dis_better > dis_worse:
        claim = (f"**The paper's claim mostly holds on {model}:** dissimilar beats similar clearly in {dis_better} of "
                 f"{total} (set, C) comparisons, similar wins clearly in {dis_worse}, and {ties} are too close to call.")
    elif dis_worse > dis_better:
        claim = (f"**The paper's claim does not hold on {model}:** similar beats dissimilar clearly in {dis_worse} of "
                 f"{total} (set, C) comparisons, dissimilar wins clearly in {dis_better}, and {ties} are too close to call.")
    else:
        claim = (f"**No clear winner on {model}:** dissimilar wins clearly in {dis_better} of {total} (set, C) "
                 f"comparisons, similar in {dis_worse}, {ties} too close to call.")
    lines.insert(2, claim)
    lines.insert(3, "")
    lines.extend(["Which order wins at which compression (all calibration sets):", ""] + per_c + [""])

    # random as a reference
    rnd = [v for v in comps if v["versus"] == "random"]
    if rnd:
        better = sum(v["z"] < -z_crit for v in rnd)
        worse = sum(v["z"] > z_crit for v in rnd)
        lines.append(f"Against the random order (each seed a separate greedy search): dissimilar is clearly better in "
                     f"{better}, clearly worse in {worse} and too close to call in {len(rnd) - better - worse} of "
                     f"{len(rnd)} (set, C, seed) comparisons.")
        lines.append("")
    # stability of the ordering across calibration sets
    stable = []
    for c in cs:
        signs = {np.sign(v["nll_diff"]) for k in sets for v in verdict([c], k)}
        stable.append(len(signs) == 1)
    lines.append(
        f"Stability: the sign of (dissimilar − similar) is the same on all {len(sets)} calibration sets at "
        f"{sum(stable)} of {len(cs)} compression levels"
        + ("." if all(stable) else f" (it flips at C = {', '.join(str(c) for c, s in zip(cs, stable) if not s)}).")
    )
    if len(sets) > 1:
        same = []
        for order in ORDER_LABELS:
            keys = sorted({(r["seed"], r["num_shared"]) for r in rows if r["order"] == order and r["num_shared"] > 0})
            n_same = sum(len({json.dumps(r["mapping"], sort_keys=True)
                              for r in _find(rows, order=order, seed=sd, num_shared=c)}) == 1 for sd, c in keys)
            if keys:
                same.append(f"{order} {n_same} of {len(keys)}")
        lines.append(f"The searches on the {len(sets)} calibration sets chose the *identical* strategy at "
                     f"{', '.join(same)} (seed, C) points, so their curves coincide there.")
    if runs:
        visited = sum(len(r.trace) for r in runs)
        rejected = sum(not t["accepted"] for r in runs for t in r.trace)
        lines.append(f"The threshold rejected {rejected} of the {visited} candidates the {len(runs)} searches visited"
                     + (": the candidate order alone decided every strategy (so a random order with a given seed "
                        "picks the same layers whatever the calibration set)." if rejected == 0 else "."))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# search anatomy (notebook 02)
# ------------------------------------------------------------------------------------------------
def trace_rows(trace: list[dict], ranks: dict[tuple[int, int], int] | None = None) -> list[dict]:
    """The search trace with each candidate's dissimilarity rank (0 = the most dissimilar pair)."""
    out = []
    for i, t in enumerate(trace):
        row = {"visited": i, **t}
        if ranks is not None:
            row["dissimilarity_rank"] = ranks[(t["replaced"], t["source"])]
        out.append(row)
    return out


def acceptance_by_decile(rows: list[dict], num_pairs: int, bins: int = 10, rank_key: str = "dissimilarity_rank") -> list[dict]:
    """Acceptance rate of the visited candidates per decile of dissimilarity rank (decile 1 = most dissimilar)."""
    out = []
    for b in range(bins):
        lo, hi = b * num_pairs / bins, (b + 1) * num_pairs / bins
        sel = [r for r in rows if lo <= r[rank_key] < hi]
        acc = sum(bool(r["accepted"]) for r in sel)
        out.append({"decile": b + 1, "rank_from": int(math.ceil(lo)), "rank_to": int(math.ceil(hi)) - 1,
                    "visited": len(sel), "accepted": acc, "rate": acc / len(sel) if sel else float("nan")})
    return out


def sweep_searches(model, tokenizer, texts, cfg: Settings, num_shared: int, order: str = "dissimilar",
                   reuse: dict | None = None, progress: bool = True) -> list[SearchRun]:
    """One greedy search to `num_shared` per threshold in `cfg.thresholds`.

    `reuse` maps a threshold to a SearchRun already made with the same settings (not searched again).
    A strict threshold rejects most candidates, so its search walks far down the list: that is its real cost.
    """
    reuse = reuse or {}
    runs = []
    bar = Progress(len(cfg.thresholds), f"threshold sweep: a search to C={num_shared} per T", enabled=progress, every=0)
    try:
        for T in cfg.thresholds:
            run = reuse.get(T)
            if run is None or run.strategy.metadata.get("target_num_shared") != num_shared:
                run = run_search(model, tokenizer, texts, num_shared, order, cfg.seed, cfg, threshold=T)
            runs.append(run)
            acc = sum(t["accepted"] for t in run.trace)
            bar.update(note=f"T={T}: {acc}/{len(run.trace)} passed in {run.strategy.metadata['search_seconds']:.0f} s")
    finally:
        bar.close()
    return runs


def sweep_rows(runs: list[SearchRun], evaluator: Evaluator, reference: Strategy | None = None,
               progress: bool = True) -> list[dict]:
    """Per threshold: how many visited candidates passed, and the perplexity of the resulting strategy.

    With a `reference` strategy (the default search's), each row also holds the paired perplexity ratio
    against it and its z-score (same evaluation windows).
    """
    rows = []
    ref = evaluator(reference) if reference is not None else None
    bar = Progress(len(runs), "threshold sweep: perplexity per T", enabled=progress, every=0)
    for run in runs:
        st = run.strategy
        visited = len(run.trace)
        accepted = sum(t["accepted"] for t in run.trace)
        target = st.metadata["target_num_shared"]
        result = evaluator(st)
        rows.append({"threshold": st.metadata["threshold"], "target": target, "accepted": accepted, "visited": visited,
                     "rejected": visited - accepted, "pass_rate": accepted / visited if visited else float("nan"),
                     "reached_target": st.num_shared >= target, "num_shared": st.num_shared,
                     "search_seconds": st.metadata["search_seconds"], "layer_forwards": st.metadata["layer_forwards"],
                     "mapping": {str(r): s for r, s in st.mapping.items()},
                     **{k: v for k, v in result.items() if k != "window_nll"}})
        if ref is not None:
            d = paired_difference(result, ref)
            rows[-1].update(ppl_ratio_vs_default=d["ppl_ratio"], z_vs_default=d["z"])
        bar.update(note=f"T={rows[-1]['threshold']}: ppl={result['ppl']:.2f}")
    return rows


def threshold_sweep(model, tokenizer, texts, cfg: Settings, evaluator: Evaluator, num_shared: int,
                    order: str = "dissimilar", reuse: dict | None = None, progress: bool = True):
    """`sweep_searches` then `sweep_rows`: returns (rows, runs)."""
    runs = sweep_searches(model, tokenizer, texts, cfg, num_shared, order, reuse, progress)
    return sweep_rows(runs, evaluator, progress=progress), runs


def run_counts(run: SearchRun) -> dict:
    visited = len(run.trace)
    accepted = sum(t["accepted"] for t in run.trace)
    return {"visited": visited, "accepted": accepted, "rejected": visited - accepted}


def search_summary(run: SearchRun) -> dict:
    m = run.strategy.metadata
    return {"num_shared": run.strategy.num_shared, "candidates_visited": m["candidates_visited"],
            "search_seconds": m["search_seconds"], "layer_forwards": m["layer_forwards"],
            "naive_layer_forwards": m["naive_layer_forwards"],
            "speedup_vs_naive": m["naive_layer_forwards"] / max(1, m["layer_forwards"])}


DEFAULT_PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Write a short story about a robot who learns to paint.",
    "Explain in simple terms why the sky is blue.",
)


def generations(model, tokenizer, strategies: dict[str, Strategy | None], prompts=DEFAULT_PROMPTS,
                max_new_tokens: int = 48, progress: bool = True) -> list[dict]:
    """Greedy completions of each prompt under each strategy (None = the full model)."""
    from .generation import generate_text

    rows = []
    bar = Progress(len(strategies), "generations", enabled=progress, every=0)
    for label, st in strategies.items():
        with sharing(model, st if st is not None and st.mapping else None):
            outs = generate_text(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
        for p, o in zip(prompts, outs):
            rows.append({"setting": label, "num_shared": 0 if st is None else st.num_shared, "prompt": p, "completion": o})
        bar.update(note=label)
    return rows


def generations_markdown(rows: list[dict]) -> str:
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    settings_ = list(dict.fromkeys(r["setting"] for r in rows))
    esc = lambda s: " ".join(s.split()).replace("|", "\\|")
    lines = ["| prompt | " + " | ".join(settings_) + " |", "|---" * (len(settings_) + 1) + "|"]
    for p in prompts:
        cells = [esc(next(r["completion"] for r in rows if r["prompt"] == p and r["setting"] == s)) for s in settings_]
        lines.append(f"| {esc(p)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search_conclusion(sweep: list[dict], deciles_by_source: dict[str, list[dict]], main: dict, default_T: float,
                      control: dict | None = None, default: dict | None = None) -> str:
    """Markdown for notebook 02: what the threshold and the ranking do, computed from the numbers."""
    lines = [f"**Computed from this run.** The default search (T = {default_T}) replaced {main['num_shared']} layers "
             f"after visiting {main['candidates_visited']} candidates in {main['search_seconds']:.1f} s "
             f"({main['layer_forwards']} layer-forwards; re-running the whole model for every candidate and for the "
             f"reference would cost {main['naive_layer_forwards']}, {main['speedup_vs_naive']:.1f}x more).", ""]
    if default is None:  # counts of the default search: from the sweep when it holds the default T
        default = next((r for r in sweep if r["threshold"] == default_T), None)
    if default is not None:
        if default["rejected"] == 0:
            lines.append(f"At the default T = {default_T} the threshold rejected nothing: the first "
                         f"{default['accepted']} candidates in dissimilarity order all passed, so the *ranking* alone "
                         "chose the strategy.")
        else:
            lines.append(f"At the default T = {default_T} the threshold rejected {default['rejected']} of "
                         f"{default['visited']} visited candidates, so both the ranking and the threshold shaped the strategy.")
    if control is not None:
        lines.append(f"The random-order control at the same T passed {control['accepted']} of {control['visited']} "
                     "candidates it visited" + (" (nothing rejected either)." if control["rejected"] == 0 else "."))
    lines += ["", "Threshold sweep (same target, dissimilar order):", ""]
    for r in sweep:
        short = "" if r["reached_target"] else f" (the candidates ran out: only {r['num_shared']} of {r['target']} layers)"
        vs = ""
        if "ppl_ratio_vs_default" in r and r["threshold"] != default_T and not math.isnan(r["z_vs_default"]):
            vs = f", {(r['ppl_ratio_vs_default'] - 1) * 100:+.1f}% against the default T ({r['z_vs_default']:+.1f} paired SE)"
        lines.append(f"- T = {r['threshold']}: {r['accepted']} of {r['visited']} visited candidates passed "
                     f"({r['pass_rate']:.0%}){short}; perplexity {r['ppl']:.2f} ± {r['ppl_se']:.2f}{vs}.")
    reached = [r for r in sweep if r["reached_target"]]
    if reached and default is not None:
        best = min(reached, key=lambda r: r["ppl"])
        strictest = max(r["threshold"] for r in reached)
        lines += ["", f"Of the thresholds whose search reached the target C, T = {best['threshold']} gave the lowest "
                      f"perplexity ({best['ppl']:.2f}); the strictest one that still reached it was T = {strictest}."]
    lines.append("")
    for src, rows in deciles_by_source.items():
        seen = [r for r in rows if r["visited"]]
        if not seen:
            continue
        desc = ", ".join(f"{r['decile']}: {r['accepted']}/{r['visited']}" for r in seen)
        lines.append(f"- Accepted/visited by dissimilarity decile, {src}: {desc}.")
    return "\n".join(lines)


def strategy_json(strategy: Strategy) -> dict:
    return strategy.to_dict()


def environment_info() -> dict:
    import platform

    import transformers

    import kvshare

    return {"kvshare": kvshare.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "machine": platform.machine()}


def timing_line(t_start: float, cpu_start: float) -> str:
    """Wall time and this process's CPU time since the start (CPU / threads ~ wall time on an idle machine)."""
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    threads = torch.get_num_threads()
    return (f"notebook time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU with {threads} torch thread(s) "
            f"(~{cpu / threads / 60:.1f} min wall on {threads} idle core(s))")
