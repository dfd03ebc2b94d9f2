"""Calibration and evaluation text.

Offline default ("bbc"): the BBC articles of BIG-bench's `gem/xsum` task, taken from the
`bigbench==1.0.0` source distribution on PyPI (downloaded with `pip download --no-deps`; only the
needed task files are extracted into the kvshare cache, the package is never installed).
The 1001 articles are shuffled once with a fixed seed and split: the first 300 form the
calibration pool (10 disjoint sets of 30), the remaining 701 are held out for evaluation.

Online option ("wikitext2"): WikiText-2 through `datasets` (train split for calibration, test split
for evaluation).
"""

from __future__ import annotations

import json
import random
import tarfile
from functools import lru_cache
from pathlib import Path

from .pypi_files import kvshare_home, pip_download, scratch_dir

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
SOURCES = ("bbc", "wikitext2")
CALIBRATION_POOL = 300
SPLIT_SEED = 1234


def bigbench_dir() -> Path:
    return kvshare_home() / "bigbench"


def ensure_bigbench_tasks(tasks) -> Path:
    """Make sure `<cache>/bigbench/<task>/task.json` exists for every task; return the folder."""
    root = bigbench_dir()
    missing = [t for t in tasks if not (root / t / "task.json").is_file()]
    if not missing:
        return root
    with scratch_dir(kvshare_home()) as tmp:
        try:
            sdist = pip_download(BIGBENCH_REQUIREMENT, Path(tmp))
        except RuntimeError as e:
            raise RuntimeError(
                f"the offline data is not cached and could not be fetched: {e} "
                f"Alternatively extract bigbench/benchmark_tasks/<task>/task.json for {', '.join(missing)} "
                f"into {root}/<task>/, or use the online source (source='wikitext2')."
            ) from None
        wanted = {f"/bigbench/benchmark_tasks/{t}/task.json": t for t in missing}
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                task = next((t for suffix, t in wanted.items() if member.name.endswith(suffix)), None)
                if task is None:
                    continue
                target = root / task / "task.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                part = target.with_suffix(".part")
                with tar.extractfile(member) as src, open(part, "wb") as dst:
                    dst.write(src.read())
                part.replace(target)
    still = [t for t in missing if not (root / t / "task.json").is_file()]
    if still:
        raise RuntimeError(f"{BIGBENCH_REQUIREMENT} has no task(s) named {', '.join(still)}")
    return root


@lru_cache(maxsize=32)
def bigbench_task(name: str) -> dict:
    """A BIG-bench task's JSON (examples and metadata)."""
    root = ensure_bigbench_tasks([name])
    return json.loads((root / name / "task.json").read_text())


@lru_cache(maxsize=1)
def _bbc_split() -> tuple[list[dict], list[dict]]:
    examples = [e for e in bigbench_task("gem/xsum")["examples"] if e["input"].strip()]
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    shuffled = [examples[i] for i in order]
    return shuffled[:CALIBRATION_POOL], shuffled[CALIBRATION_POOL:]


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")


def calibration_texts(n: int = 30, source: str = "bbc", set_index: int = 0) -> list[str]:
    """`n` calibration texts; different `set_index` values give disjoint sets."""
    _check_source(source)
    if n < 1 or set_index < 0:
        raise ValueError("n must be >= 1 and set_index >= 0")
    if source == "bbc":
        pool = [e["input"] for e in _bbc_split()[0]]
    else:
        pool = _wikitext("train", min_chars=400)
    lo, hi = set_index * n, (set_index + 1) * n
    if hi > len(pool):
        raise ValueError(
            f"the {source} calibration pool holds {len(pool)} texts: {len(pool) // n} disjoint sets of {n} at most"
        )
    return pool[lo:hi]


def eval_articles(source: str = "bbc") -> list[dict]:
    """Held-out articles (never used for calibration) with their one-line summaries."""
    _check_source(source)
    if source != "bbc":
        raise ValueError("held-out articles with summaries exist only for the 'bbc' source")
    return [
        {"article": e["input"], "summary": e["target"] if isinstance(e["target"], str) else e["target"][0]}
        for e in _bbc_split()[1]
    ]


def eval_text(source: str = "bbc") -> str:
    """The held-out evaluation text (for perplexity), disjoint from every calibration set."""
    _check_source(source)
    if source == "bbc":
        return "\n\n".join(e["input"].strip() for e in _bbc_split()[1])
    return "\n\n".join(_wikitext("test", min_chars=1))


@lru_cache(maxsize=2)
def _wikitext(split: str, min_chars: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError("the 'wikitext2' source needs the `datasets` package: pip install datasets") from None
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # offline, hub unreachable, ...
        raise RuntimeError(
            f"could not load WikiText-2 from the hub ({type(e).__name__}); use the offline default source='bbc'"
        ) from None
    return [t.strip() for t in ds["text"] if len(t.strip()) >= min_chars and not t.strip().startswith("=")]
