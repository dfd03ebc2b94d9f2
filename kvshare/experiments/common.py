"""What several notebooks share: paths and settings, held-out perplexity, one greedy search, generations.

Cost model (what makes a full run of notebooks 01 and 02 fit on 2 CPU cores):
- a greedy search to C visits exactly the candidates a search to any smaller C visits, up to where
  it stops, so ONE search per (order, seed, calibration set) to the largest C gives every smaller C
  as `Strategy.prefix(c)`;
- identical strategies are evaluated once (`HeldOutScorer`): every order's C = 0 point is the same
  unshared model, and two searches that accept the same pairs share their perplexity;
- every strategy is scored on the SAME held-out tokens, so two strategies are compared by the
  paired difference of their per-window mean NLLs, far more precise than the two absolute
  perplexities' error bars suggest.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..calibration import distances_from_means, encode_calibration, kv_means, reference_forward
from ..combine import sharing
from ..data import eval_text
from ..metrics import token_nlls
from ..progress import Progress, format_seconds
from ..search import search
from ..strategy import Strategy

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


QUICK = dict(
    samples=6,
    calibration_sets=2,
    max_fraction=4 / 30,
    random_seeds=2,
    eval_tokens=1024,
    window=128,
    thresholds=[0.3, 0.6, 0.9],
    sweep_fraction=0.1,
    max_new_tokens=16,
)


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
# distances
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def distance_matrices(model, tokenizer, texts, max_tokens: int = 64) -> dict[str, np.ndarray]:
    """Euclidean and cosine layer-to-layer KV distances from one reference forward."""
    ids, _ = encode_calibration(tokenizer, texts, max_tokens)
    keys, values = kv_means(reference_forward(model, ids))
    return {m: distances_from_means(keys, values, metric=m) for m in ("euclidean", "cosine")}


# ------------------------------------------------------------------------------------------------
# perplexity on held-out text
# ------------------------------------------------------------------------------------------------
class HeldOutScorer:
    """Perplexity of strategies on one fixed held-out token sample; identical strategies run once.

    Notebooks 01 and 02 score every strategy with it; the benchmark runner is `kvshare.evaluation.Evaluator`.
    """

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
                nll = token_nlls(
                    self.model,
                    self.tokenizer,
                    self.text,
                    window=self.window,
                    stride=self.window,
                    max_tokens=self.tokens,
                )
            self.cache[k] = summarize_nll(nll, self.window)
            self.evaluations += 1
            self.seconds += time.perf_counter() - t0
        return self.cache[k]


def summarize_nll(nll: torch.Tensor, window: int) -> dict:
    """Perplexity with a standard error; windows are the independent units (tokens within one are not)."""
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
    strategy.metadata["calibration"].update(source="bbc", set_index=calibration_set)
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


def environment_info() -> dict:
    import platform

    import transformers

    import kvshare

    return {
        "kvshare": kvshare.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def timing_line(t_start: float, cpu_start: float) -> str:
    """Wall time and this process's CPU time since the start (CPU / threads ~ wall time on an idle machine)."""
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu_start
    threads = torch.get_num_threads()
    return (
        f"notebook time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU with {threads} torch thread(s) "
        f"(~{cpu / threads / 60:.1f} min wall on {threads} idle core(s))"
    )
