"""What several notebooks share: paths and settings, the held-out scorer and its store, one greedy search, the
random-order seed rule, 95% intervals, generations.

Cost model (what makes a full run of notebooks 01 and 02 fit on 2 CPU cores):
- a greedy search to C visits exactly the candidates a search to any smaller C visits, up to where
  it stops, so ONE search per (order, seed, calibration set) to the largest C gives every smaller C
  as `Strategy.prefix(c)`;
- every strategy is scored under ONE held-out protocol (`kvshare.metrics.HELDOUT`: 16,384 BBC tokens,
  windows of 512, ~39 s per strategy on 2 cores), and the result is kept in a store shared by every
  notebook of a model (`HeldOutStore`, `<out_dir>/heldout_scores.json`): identical strategies are
  evaluated once, across notebooks and runs (every order's C = 0 point is the same unshared model;
  notebooks 01, 02 and 11 search the same fixed and random orders on the same calibration sets);
- every strategy is scored on the SAME held-out windows, so two strategies are compared by the
  paired difference of their per-window mean NLLs, far more precise than the two absolute
  perplexities' error bars suggest.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..calibration import distances_from_means, encode_calibration, kv_means, reference_forward
from ..combine import sharing
from ..io import write_json
from ..metrics import HELDOUT, Z95, HeldOutProtocol, heldout_perplexity, interval95
from ..progress import Progress, format_seconds
from ..search import search
from ..strategy import Strategy
from .scaffold import RunSettings

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


@dataclass
class SearchSettings(RunSettings):
    """What a KVSharer search and its held-out scoring depend on (notebooks 01, 02 and 11 search the same orders on
    the same calibration sets)."""

    samples: int = 30  # calibration texts per set
    max_tokens: int = 64  # tokens per calibration text
    calibration_sets: int = 3
    threshold: float = 0.5
    metric: str = "euclidean"  # the fixed orders' distance
    random_seeds: int = 5  # random-order searches per calibration set, seeds drawn per set (`random_seeds`)
    # C points where the random seeds are scored: every strategy costs ~39 s on 2 cores under HELDOUT, and 5 seeds
    # x 3 sets at every C of the grid would be 90 strategies (about an hour); these are notebook 11's points
    random_c_values: list = field(default_factory=lambda: [4, 8, 12])
    heldout_tokens: int = HELDOUT.tokens  # the held-out protocol (`heldout_protocol`); quick mode scores a slice


@dataclass
class Settings(SearchSettings):
    """Everything notebooks 01 and 02's numbers depend on (saved beside their figures)."""

    max_fraction: float = 0.4
    c_step: int = 2
    c_points: list | None = None  # notebook 01's C points (None: 0, c_step, ... up to max_fraction of the layers)
    heldout_window: int = HELDOUT.window
    thresholds: list = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    sweep_fraction: float = 0.25
    max_new_tokens: int = 48
    model_plan: str | None = None  # why a model's full run differs from the default's (MODEL_FULL), else None

    QUICK = dict(
        samples=6,
        calibration_sets=2,
        max_fraction=4 / 30,
        random_seeds=2,
        random_c_values=[2, 4],
        heldout_tokens=1024,  # a slice of HELDOUT (notebook 11's quick slice: their quick runs share the store too)
        thresholds=[0.3, 0.6, 0.9],
        sweep_fraction=0.1,
        max_new_tokens=16,
    )

    # Model-aware full runs of notebooks 01 and 02: a model whose units cost more than the default model's gets
    # full settings that keep notebooks 01-03 within kvshare.experiments.budget.BUDGET_MIN on 2 cores and keep every
    # statistical requirement: 16,384 held-out tokens never in calibration, at least 5 random seeds at a C point,
    # paired per-window intervals. {model: (values over the full-run defaults, why)}; see budget.estimate for the
    # arithmetic.
    MODEL_FULL = {
        "gemma3-270m": (
            dict(
                calibration_sets=2,
                c_points=[2, 5, 7],
                random_c_values=[5],
                thresholds=[0.3, 0.5, 0.7, 0.9],
            ),
            "Gemma-3-270M scores a strategy on the 16,384 held-out tokens in ~100 s on 2 cores (SmolLM2: ~40 s; its "
            "262,144-word output layer is most of it), and the default model's full settings would score 55 "
            "strategies in notebook 01 alone (~100 min; 01-03 ~170 min, kvshare.experiments.budget). Its full run "
            "scores the curves at C = 2, 5 and 7 (12.5%, 25% and 37.5% of its 18 layers: notebook 03's rates, so 03 "
            "reads every perplexity from the store) on 2 calibration sets instead of 3, the 5 random seeds per set at "
            "C = 5 only (25%: the claim's rate and notebook 02's random controls), and a threshold sweep of 4 values "
            "(0.3, 0.5, 0.7, 0.9) instead of 7: ~84 min for 01-03 at most. The held-out protocol (16,384 tokens never "
            "in calibration), the 5 random seeds and the paired per-window intervals are the default model's.",
        ),
    }


settings = Settings.for_run  # notebooks 01 and 02: settings(model, quick, seed, **overrides)


# ------------------------------------------------------------------------------------------------
# distances
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def distance_matrices(model, tokenizer, texts, max_tokens: int = 64) -> dict[str, np.ndarray]:
    """Euclidean and cosine layer-to-layer KV distances from one reference forward."""
    ids, _ = encode_calibration(tokenizer, texts, max_tokens)
    keys, values = kv_means(reference_forward(model, ids))
    return {m: distances_from_means(keys, values, metric=m) for m in ("euclidean", "cosine")}


# ------------------------------------------------------------------------------------------------
# held-out perplexity: one protocol, one store per model's figures
# ------------------------------------------------------------------------------------------------
def heldout_protocol(cfg) -> HeldOutProtocol:
    """The held-out protocol of a notebook's settings: `kvshare.metrics.HELDOUT`, or a slice of it (quick mode)."""
    return replace(HELDOUT, tokens=cfg.heldout_tokens, window=getattr(cfg, "heldout_window", HELDOUT.window))


def mapping_key(strategy: Strategy | None) -> str:
    """A strategy's identity for scoring: "r:s,r:s" over its (sorted) mapping, "full" for the unshared model."""
    if strategy is None or not strategy.mapping:
        return "full"
    return ",".join(f"{r}:{s}" for r, s in sorted(strategy.mapping.items()))


STORE_NAME = "heldout_scores.json"
BASELINE_NAME = "heldout_baseline.json"  # the full model's held-out perplexity per protocol: the one number quoted


class HeldOutStore:
    """Held-out results shared by every notebook of a model: `<out_dir>/heldout_scores.json`.

    An entry is keyed by (model name, the protocol as a dict, the strategy's `mapping_key`) and holds the
    `kvshare.metrics.heldout_perplexity` result (ppl, nll, nll_se, window_nll, ..., seconds). A strategy scored by one
    notebook is read by the next; another protocol or another model never hits. The file is rewritten atomically
    after every new entry, merged with whatever another process wrote to it meanwhile.
    """

    ABOUT = (
        "Held-out perplexity of strategies (kvshare.experiments.common.HeldOutStore): key = "
        '[model, protocol, "r:s,..." or "full"], value = kvshare.metrics.heldout_perplexity result'
    )

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, dict] = self._read()

    @classmethod
    def beside(cls, out_dir: str | os.PathLike) -> "HeldOutStore":
        """The store of the notebooks writing into `out_dir`."""
        return cls(Path(out_dir) / STORE_NAME)

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        return dict(json.loads(self.path.read_text()).get("entries", {}))

    @staticmethod
    def key(model: str, protocol, mapping: str) -> str:
        proto = asdict(protocol) if is_dataclass(protocol) else dict(protocol)
        return json.dumps([str(model), proto, mapping], sort_keys=True)

    def get(self, model: str, protocol, mapping: str) -> dict | None:
        return self.entries.get(self.key(model, protocol, mapping))

    def put(self, model: str, protocol, mapping: str, result: dict) -> dict:
        self.entries = {**self._read(), **self.entries, self.key(model, protocol, mapping): result}
        write_json(self.path, {"about": self.ABOUT, "entries": self.entries})
        if mapping == "full":
            self.write_baselines()
        return result

    def baselines(self) -> list[dict]:
        """The full model's entry per (model, protocol): what `heldout_baseline.json` records."""
        out = []
        for key, result in sorted(self.entries.items()):
            model, protocol, mapping = json.loads(key)
            if mapping == "full":
                keep = {k: result[k] for k in ("ppl", "ppl_se", "nll", "nll_se", "tokens") if k in result}
                out.append({"model": model, "protocol": protocol, **keep})
        return out

    def write_baselines(self) -> Path:
        """`heldout_baseline.json` beside the store: the one recorded baseline per model and protocol, which every
        notebook quotes (a test checks that no committed result disagrees with it)."""
        path = self.path.with_name(BASELINE_NAME)
        record = json.loads(path.read_text()) if path.is_file() else {}  # other keys (a model's own script's) stay
        record["about_baselines"] = "the full model's held-out perplexity per (model, protocol), from " + self.path.name
        record["baselines"] = self.baselines()
        return write_json(path, record)

    def __len__(self) -> int:
        return len(self.entries)


class HeldOutScorer:
    """Held-out perplexity of strategies under one protocol (`heldout_protocol`), each distinct strategy once: from
    this scorer's own results, else from the `store`, else computed (and put into the store).

    Counts what it did: `fresh` strategies computed in `seconds`, `from_store` strategies read from the store
    (`stored_seconds`: what they cost when they were computed). The benchmark runner is `kvshare.evaluation.Evaluator`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        protocol: HeldOutProtocol = HELDOUT,
        store: HeldOutStore | None = None,
        batch_size: int = 4,
    ):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.protocol, self.store, self.batch_size = protocol, store, batch_size
        self.results: dict[str, dict] = {}
        self.fresh = self.from_store = 0
        self.seconds = self.stored_seconds = 0.0

    def __call__(self, strategy: Strategy | None) -> dict:
        k = mapping_key(strategy)
        if k in self.results:
            return self.results[k]
        hit = self.store.get(self.model_name, self.protocol, k) if self.store is not None else None
        if hit is not None:
            self.from_store += 1
            self.stored_seconds += float(hit.get("seconds") or 0.0)
            result = hit
        else:
            t0 = time.perf_counter()
            with sharing(self.model, strategy if k != "full" else None):
                result = heldout_perplexity(self.model, self.tokenizer, self.protocol, batch_size=self.batch_size)
            result["seconds"] = round(time.perf_counter() - t0, 2)
            self.fresh += 1
            self.seconds += result["seconds"]
            if self.store is not None:
                self.store.put(self.model_name, self.protocol, k, result)
        self.results[k] = result
        return result

    @property
    def evaluations(self) -> int:
        """Distinct strategies this scorer has scored (fresh or from the store)."""
        return len(self.results)

    def accounting(self) -> dict:
        """What the scoring cost: for the settings/results files."""
        return {
            "protocol": asdict(self.protocol),
            "protocol_description": self.protocol.describe(),
            "store": None if self.store is None else self.store.path.name,
            "distinct_strategies": self.evaluations,
            "fresh": self.fresh,
            "from_store": self.from_store,
            "fresh_seconds": round(self.seconds, 1),
            "store_seconds_saved": round(self.stored_seconds, 1),
            "seconds_per_strategy": round((self.seconds + self.stored_seconds) / max(1, self.evaluations), 1),
        }

    def accounting_line(self) -> str:
        a = self.accounting()
        return (
            f"{a['distinct_strategies']} distinct strategies scored ({self.protocol.describe()}): {a['fresh']} fresh "
            f"in {format_seconds(a['fresh_seconds'])}, {a['from_store']} from the store {a['store']} "
            f"(saving ~{format_seconds(a['store_seconds_saved'])}); ~{a['seconds_per_strategy']:.0f} s per strategy"
        )


def summarize_nll(nll: torch.Tensor, window: int) -> dict:
    """Perplexity with a standard error from `nll` cut into windows of `window` tokens (synthetic results in tests;
    the notebooks score with `HeldOutScorer`)."""
    means = np.array([c.mean().item() for c in nll.split(window)])
    mean = float(nll.mean().item())
    se = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "nll_se": se,
        "ppl_se": math.exp(mean) * se,
        "tokens": int(nll.numel()),
        "window_nll": means.tolist(),
    }


# ------------------------------------------------------------------------------------------------
# random orders and 95% intervals
# ------------------------------------------------------------------------------------------------
def random_seeds(cfg, calibration_set: int) -> list[int]:
    """The random-order seeds of one calibration set: seed + 1000 * (set + 1) + k for k < cfg.random_seeds.

    Drawn per set, so no two sets share a random order; the one rule of notebooks 01, 02 and 11 (they search, and
    score from the shared store, the same random strategies)."""
    if cfg.random_seeds > 1000:
        raise ValueError("at most 1000 random seeds per calibration set (the rule spaces sets 1000 apart)")
    return [cfg.seed + 1000 * (calibration_set + 1) + k for k in range(cfg.random_seeds)]


# two-sided 95% quantiles of Student's t by degrees of freedom (no scipy in the core dependencies)
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a 95% two-sided interval)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95  # Cornish-Fisher expansion around the normal quantile: < 1e-4 off beyond 30 degrees of freedom
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95(values) -> dict:
    """Mean of `values` with its 95% t-interval (n - 1 degrees of freedom): {n, mean, sd, lo, hi}.

    One value has no interval (lo = hi = nan)."""
    v = np.asarray(list(values), dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "lo": float("nan"), "hi": float("nan")}
    mean = float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def ppl_ci95(nlls) -> dict:
    """Perplexity over strategies as exp(mean NLL) (the geometric mean of their perplexities), with the 95%
    t-interval of the mean NLL mapped through exp: {n, ppl, lo, hi}."""
    c = ci95(nlls)
    return {"n": c["n"], "ppl": math.exp(c["mean"]), "lo": math.exp(c["lo"]), "hi": math.exp(c["hi"])}


def result_ci95(result: dict) -> tuple[float, float]:
    """The 95% interval of one strategy's perplexity over its evaluation windows: exp of nll's `interval95`."""
    lo, hi = interval95(result["nll"], result["nll_se"])
    return math.exp(lo), math.exp(hi)


# ------------------------------------------------------------------------------------------------
# one greedy search, with a heartbeat
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

        # the module kvshare.search, not the function `kvshare.search` that the package exports under the same name
        search_module = importlib.import_module("..search", __package__)

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
            print(
                f"{self.label}: still searching, {format_seconds(time.perf_counter() - self._t0)}, "
                f"{self.scored} candidates scored, {self.passed} above T = {self.threshold}",
                flush=True,
            )

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled and self._original is not None:
            self._module.similarity = self._original
        return False


def run_search(
    model,
    tokenizer,
    texts,
    num_shared: int,
    order: str,
    seed: int,
    cfg: Settings,
    calibration_set: int = 0,
    threshold: float | None = None,
    progress: bool = True,
) -> SearchRun:
    """One greedy search (a heartbeat line every 30 s while it runs long)."""
    T = cfg.threshold if threshold is None else threshold
    label = (
        f"search ({order}{f' seed {seed}' if order == 'random' else ''}, set {calibration_set}, T={T}, C={num_shared})"
    )
    with _SearchWatch(label, T, enabled=progress):
        strategy, trace = search(
            model,
            tokenizer,
            texts,
            num_shared,
            threshold=T,
            order=order,
            metric=cfg.metric,
            seed=seed,
            max_tokens=cfg.max_tokens,
            progress=False,
        )
    strategy.metadata["calibration"].update(source="offline", set_index=calibration_set)
    return SearchRun(calibration_set, order, seed, strategy, trace)


# ------------------------------------------------------------------------------------------------
# generations
# ------------------------------------------------------------------------------------------------
DEFAULT_PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Write a short story about a robot who learns to paint.",
    "Explain in simple terms why the sky is blue.",
)


def generations(
    model,
    tokenizer,
    strategies: dict[str, Strategy | None],
    prompts=DEFAULT_PROMPTS,
    max_new_tokens: int = 48,
    progress: bool = True,
) -> list[dict]:
    """Greedy completions of each prompt under each strategy (None = the full model)."""
    from ..generation import generate_text

    rows = []
    bar = Progress(len(strategies), "generations", enabled=progress, every=0)
    for label, st in strategies.items():
        with sharing(model, st if st is not None and st.mapping else None):
            outs = generate_text(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
        for p, o in zip(prompts, outs):
            rows.append(
                {"setting": label, "num_shared": 0 if st is None else st.num_shared, "prompt": p, "completion": o}
            )
        bar.update(note=label)
    return rows


# ------------------------------------------------------------------------------------------------
# the record of a run
# ------------------------------------------------------------------------------------------------
def strategy_json(strategy: Strategy) -> dict:
    return strategy.to_dict()


def timing_line(t_start: float, cpu_start: float) -> str:
    """Wall time and this process's CPU time since the start (CPU / threads ~ wall time on an idle machine)."""
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    threads = torch.get_num_threads()
    return (
        f"notebook time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU with {threads} torch thread(s) "
        f"(~{cpu / threads / 60:.1f} min wall on {threads} idle core(s))"
    )
