"""Seed the shared held-out store from notebook 11's results cache (one-off; safe to run again).

    .venv/bin/python scripts/seed_heldout_store.py [FIGURES_DIR ...]    (default: figures/)

Notebook 11 (kvshare.experiments.best_search.evaluate) used to keep its held-out perplexities in its private
results cache, `<figures>/11_best_search_results.json` under ["heldout"]["value"]: {mapping key: result}. Each
result is `kvshare.metrics.heldout_perplexity` of one strategy under the protocol recorded in the entry itself
(`result["protocol"]`: kvshare.metrics.HELDOUT, 16,384 BBC tokens in windows of 512), i.e. exactly the computation
the store (`kvshare.experiments.common.HeldOutStore`, `<figures>/heldout_scores.json`) holds and notebooks 01, 02
and 11 now all read: the same model, the same strategy, the same protocol give the same numbers. Copying them is
reuse of a finished computation, not a new measurement, and spares ~39 s per strategy on 2 cores.

The model name comes from `<figures>/11_best_search_settings.json` (the run that produced the cache). Entries
already in the store are left as they are; nothing is evaluated here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvshare.experiments.common import HeldOutStore
from kvshare.io import write_json

ROOT = Path(__file__).resolve().parent.parent


def seed(figures: Path) -> tuple[int, int]:
    """(entries copied, entries already present) from figures/11_best_search_results.json into the store there."""
    cache = figures / "11_best_search_results.json"
    settings = figures / "11_best_search_settings.json"
    if not cache.is_file() or not settings.is_file():
        raise SystemExit(f"{cache} or {settings} is missing: run notebook 11 first (nothing to seed)")
    heldout = json.loads(cache.read_text()).get("heldout", {}).get("value") or {}
    model = json.loads(settings.read_text())["model"]
    store = HeldOutStore.beside(figures)
    entries = dict(store.entries)
    copied = present = 0
    for mapping, result in heldout.items():
        if "protocol" not in result:
            raise SystemExit(f"{cache}: entry {mapping!r} does not record its protocol; not copied")
        key = store.key(model, result["protocol"], mapping)
        if key in entries:
            present += 1
            continue
        entries[key] = result
        copied += 1
    if copied:
        write_json(store.path, {"about": store.ABOUT, "entries": entries})
    return copied, present


def main(argv: list[str]) -> int:
    for folder in [Path(a) for a in argv] or [ROOT / "figures"]:
        copied, present = seed(folder)
        print(
            f"{folder / 'heldout_scores.json'}: {copied} entries copied from 11_best_search_results.json, "
            f"{present} already there"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
