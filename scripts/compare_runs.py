"""Compare the results of two notebook runs number by number: did a refactoring change any result?

    python scripts/compare_runs.py BEFORE_FIGURES AFTER_FIGURES [--rtol 1e-6]

Reads every JSON and CSV file present in both folders and compares them value by value: numbers within a
relative tolerance, everything else exactly. Measurements of the machine (times, speeds, memory peaks,
load, dates, versions) differ from run to run by nature and are skipped by name; the rest (perplexities,
scores, byte counts, strategies) must agree. Keys only the later run has (new columns) are listed by name.
Prints one line per difference and a summary; exits 1 when anything differs or a file is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

# keys (or CSV columns) that measure the machine rather than the method
VOLATILE = re.compile(
    r"(^|_)(s|seconds|sec|time|times|tps|speed|peak|rss|load|avg|date|version|versions|torch|transformers|cpu|"
    r"threads|host|platform|python|elapsed|wall|minutes|duration|started|finished|baseline|reserved|"
    r"decode_s|prefill_s|overhead|score_s|evict_s|ratio_spread|spread|device_name)($|_)"
)
TIMING_KEYS = {
    "decode_tps_ratio",
    "prefill_ratio",
    "peak_ratio",
    "peak_above_baseline_ratio",
    "decode_peak_bytes",
    "peak_bytes",
    "baseline_bytes",
    "search_seconds",
    "environment",
    "timing",
    "run_time",
    "load_avg_1min",
}


ADDED: set[str] = set()


def volatile(key: str) -> bool:
    key = str(key).lower()
    return key in TIMING_KEYS or bool(VOLATILE.search(key))


def number(x):
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def compare(a, b, where: str, rtol: float, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if volatile(k):
                continue
            if k not in b:
                out.append(f"{where}.{k}: lost (only in before)")
                continue
            if k not in a:
                ADDED.add(str(k))  # a new column or key: reported once by name, not a changed result
                continue
            compare(a[k], b[k], f"{where}.{k}", rtol, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items before, {len(b)} after")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{i}]", rtol, out)
    else:
        x, y = number(a), number(b)
        if x is not None and y is not None:
            if math.isnan(x) and math.isnan(y):
                return
            if not math.isclose(x, y, rel_tol=rtol, abs_tol=1e-12):
                out.append(f"{where}: {a!r} before, {b!r} after")
        elif a != b:
            out.append(f"{where}: {a!r} before, {b!r} after")


def load(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance for numbers (float noise)")
    args = p.parse_args(argv)
    files = sorted(f.name for f in args.before.iterdir() if f.suffix in (".json", ".csv"))
    diffs: list[str] = []
    compared, missing = 0, []
    for name in files:
        if not (args.after / name).is_file():
            missing.append(name)
            continue
        compare(load(args.before / name), load(args.after / name), name, args.rtol, diffs)
        compared += 1
    for line in diffs:
        print(line)
    for name in missing:
        print(f"{name}: missing after")
    if ADDED:
        print(f"keys added after (new columns, not compared): {', '.join(sorted(ADDED))}")
    print(f"compare_runs: {compared} files compared, {len(diffs)} differences, {len(missing)} files missing after")
    return 1 if diffs or missing else 0


if __name__ == "__main__":
    sys.exit(main())
