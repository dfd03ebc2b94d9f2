"""The README's and docs' result blocks, rebuilt from the committed results files under `figures/`.

A page (README.md, docs/*.md) holds generated blocks between markers:

    <!-- kvshare:results NAME -->
    ... written by this module, never by hand ...
    <!-- /kvshare:results NAME -->

`render_page` rewrites only what lies between the markers; everything else on the page is left alone. Every
number in a block is read from a results file a notebook wrote (JSON, CSV, or the Markdown summary the notebook
computed); a file that is missing renders as one line naming the notebook to run, never as a number.

    python -m kvshare.experiments.reports.readme            # rewrite README.md and docs/*.md in place
    python -m kvshare.experiments.reports.readme --check    # exit 1 and name the pages that differ

`./run_all.sh` calls it at the end of a full run of the default model; `tests/test_readme.py` fails when a page
differs from what this module produces from the committed files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...metrics import clear_sign, clearly_higher, clearly_lower, z_score
from ...models import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[3]
FIGURES = "figures"
# the model families the README sets side by side: the default first, then the one `./run_all.sh --model` adds
FAMILIES = (DEFAULT_MODEL, "gemma3-270m")
PAGES = ("README.md", "docs/*.md")
BLOCK_RE = re.compile(
    r"(?P<start><!-- kvshare:results (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<end><!-- /kvshare:results (?P=name) -->)",
    re.S,
)

NOTEBOOKS = {
    "01": "01_observation",
    "02": "02_search",
    "03": "03_evaluation",
    "04": "04_memory_speed",
    "05": "05_intra_layer",
    "06": "06_quantized",
    "07": "07_peers",
    "08": "08_ablations",
    "09": "09_long_context",
    "10": "10_serving",
    "11": "11_best_search",
}
# results files written by something else than a notebook: who writes them
WRITERS = {
    "10_serving_vllm": "`.venv-vllm/bin/python scripts/vllm_proof.py` (needs `scripts/setup_vllm.sh`)",
    "gemma3-270m/heldout_baseline": "`.venv/bin/python figures/gemma3-270m/heldout_baseline.py`",
}


class Missing(Exception):
    """A results file a block needs is not committed."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


class Results:
    """The committed results files, read relative to the repository root; `page` is where links point from and
    `folder` (under the root) holds one model's results: `figures` for the default model, `figures/MODEL` for another
    (see `for_model`)."""

    def __init__(self, root: Path = ROOT, page: str = "README.md", folder: str = FIGURES):
        self.root = Path(root)
        self.page = page
        self.folder = folder

    def for_model(self, model: str) -> Results:
        """The same page's view of MODEL's results, where `./run_all.sh --model MODEL` writes them."""
        return Results(self.root, self.page, FIGURES if model == DEFAULT_MODEL else f"{FIGURES}/{model}")

    def path(self, name: str) -> Path:
        path = self.root / self.folder / name
        if not path.is_file():
            raise Missing(f"{self.folder}/{name}")
        return path

    def json(self, name: str):
        return json.loads(self.path(name).read_text())

    def csv(self, name: str) -> list[dict]:
        with self.path(name).open(newline="") as f:
            return list(csv.DictReader(f))

    def text(self, name: str) -> str:
        return self.path(name).read_text().strip()

    def link(self, name: str, label: str | None = None) -> str:
        """A Markdown link to FOLDER/NAME from the page (the file must exist)."""
        target = os.path.relpath(self.path(name), (self.root / self.page).parent)
        return f"[{label or name}]({Path(target).as_posix()})"


def run_command(path: str) -> str | None:
    """The `./run_all.sh` call that writes a notebook's results file, e.g. figures/gemma3-270m/01_x.json ->
    `./run_all.sh --model gemma3-270m --only 01`; None for a file no notebook writes."""
    number = Path(path).name[:2]
    if number not in NOTEBOOKS:
        return None
    folder = Path(path).parent.as_posix()
    model = folder.removeprefix(f"{FIGURES}/") if folder.startswith(f"{FIGURES}/") else None
    return "./run_all.sh" + (f" --model {model}" if model else "") + f" --only {number}"


def missing_line(path: str) -> str:
    """The line a block shows instead of numbers when its results file is not committed."""
    for key, writer in WRITERS.items():
        if path.startswith(f"{FIGURES}/{key}"):
            return f"*Not measured yet: `{path}` is not committed; it is written by {writer}.*"
    command = run_command(path)
    if command:
        notebook = NOTEBOOKS[Path(path).name[:2]]
        return f"*Not run yet: `{path}` is not committed; run notebook `notebooks/{notebook}.ipynb` (`{command}`).*"
    return f"*Not run yet: `{path}` is not committed.*"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def layers_label(num_shared: int, num_layers: int) -> str:
    """A rate as the exact fraction of layers, e.g. '8/30 layers (26.7%)'."""
    return f"{num_shared}/{num_layers} layers ({pct(num_shared / num_layers)})"


def shift_headings(md: str, levels: int = 3) -> str:
    """Demote a summary's own headings so that they sit under the page's heading."""
    return re.sub(r"^(#{1,6}) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", md, flags=re.M)


def first_verdict(md: str) -> str:
    """The first bold-led line of a notebook's conclusion that is not the 'computed from this run' preamble."""
    for line in md.splitlines():
        line = line.strip().lstrip("-").strip()
        if line.startswith("**") and not line.lower().startswith("**computed"):
            return line
    return next((ln.strip() for ln in md.splitlines() if ln.strip()), "")


# ---- one finding per claim: (claim, the number here, the verdict, links) -----------------------------------------


@dataclass(frozen=True)
class Finding:
    """One claim's finding on one model. `number` and `verdict` fill the findings table; `headline` is the number a
    side-by-side cell shows; `outcomes` are (aspect, what the verdict says) in words that compare across models."""

    notebook: str
    claim: str
    number: str
    verdict: str
    links: str
    headline: str
    outcomes: tuple[tuple[str, str], ...]

    def row(self) -> tuple:
        return (self.notebook, self.claim, self.number, self.verdict, self.links)


OBSERVATION_CLAIM = "Sharing the most *dissimilar* layers hurts less than sharing similar ones"


def observation_finding(r: Results) -> Finding:
    """Notebook 01: dissimilar against similar over its distinct comparisons, and against random at C ≈ L/4."""
    data = r.json("01_observation_ppl_curves.json")
    if "distinct_comparisons" not in data:  # a results file from before the distinct comparisons were written
        return observation_finding_from_rows(r, data)
    num_layers = data["num_layers"]
    similar = [d for d in data["distinct_comparisons"] if d["versus"] == "similar"]
    n = len(similar)
    similar_clear = sum(clearly_higher(d["z"]) for d in similar)  # the ratio's 95% paired interval above 1
    dissimilar_clear = sum(clearly_lower(d["z"]) for d in similar)
    target = min({d["num_shared"] for d in similar}, key=lambda c: abs(c / num_layers - 0.25))
    at = [d["ppl_ratio"] for d in similar if d["num_shared"] == target]
    geo = math.exp(sum(math.log(v) for v in at) / len(at))
    if similar_clear == n:
        verdict = f"**does not hold**: similar is clearly lower in all {n} distinct comparisons"
        versus_similar = "similar beats dissimilar"
    elif dissimilar_clear == n:
        verdict = f"**holds**: dissimilar is clearly lower in all {n} distinct comparisons"
        versus_similar = "dissimilar beats similar"
    else:
        verdict = (
            f"**mixed**: similar is clearly lower in {similar_clear}, dissimilar in {dissimilar_clear} of {n} "
            "distinct comparisons"
        )
        versus_similar = "neither of dissimilar and similar beats the other everywhere"
    headline = f"dissimilar / similar ×{geo:.2f} at C = {layers_label(target, num_layers)}"
    number = f"perplexity {headline} ({len(at)} distinct strategy pair(s) over the calibration sets)"
    outcomes = [("similar", versus_similar)]
    random = [x for x in data.get("random_versus", []) if x["num_shared"] == target]
    if random:
        x = random[0]
        interval = f"95% interval {x['ratio_lo']:.2f}–{x['ratio_hi']:.2f}"
        number += f"; dissimilar / random ×{x['ratio']:.2f} ({interval} over {x['strategies']} random strategies)"
        if x["ratio_hi"] < 1:
            versus_random, apart = "dissimilar beats random", "dissimilar clearly lower"
        elif x["ratio_lo"] > 1:
            versus_random, apart = "random beats dissimilar", "random clearly lower"
        else:
            versus_random, apart = "dissimilar and random not clearly apart", "not clearly apart"
        headline += f"; dissimilar / random ×{x['ratio']:.2f} ({interval}: {apart})"
        outcomes.append(("random", versus_random))
    links = r.link("01_observation_ppl_curves.png", "figure") + ", " + r.link("01_observation_conclusion.md", "summary")
    return Finding("01", OBSERVATION_CLAIM, number, verdict, links, headline, tuple(outcomes))


def observation_finding_from_rows(r: Results, data: dict) -> Finding:
    """Notebook 01's finding from the rows alone (results files without `distinct_comparisons`)."""
    num_layers = data["num_layers"]
    rows = [x for x in data["rows"] if x["num_shared"] > 0 and x["order"] in ("dissimilar", "similar")]
    by_key: dict[tuple, dict] = {}
    for x in rows:
        by_key[(x["calibration_set"], x["num_shared"], x["order"])] = x
    comparisons = {}  # distinct (C, dissimilar strategy, similar strategy): one comparison, however many sets chose it
    for (s, c, order), x in by_key.items():
        if order != "dissimilar" or (s, c, "similar") not in by_key:
            continue
        y = by_key[(s, c, "similar")]
        key = (c, tuple(sorted(x["mapping"].items())), tuple(sorted(y["mapping"].items())))
        comparisons[key] = x["ppl"] / y["ppl"]
    target = min({c for c, *_ in comparisons}, key=lambda c: abs(c / num_layers - 0.25))
    at = [v for (c, *_), v in comparisons.items() if c == target]
    geo = math.exp(sum(math.log(v) for v in at) / len(at))
    similar_wins = sum(v > 1 for v in comparisons.values())
    n = len(comparisons)
    if similar_wins == n:
        verdict = f"**does not hold**: similar is lower in all {n} distinct comparisons"
        versus_similar = "similar lower than dissimilar everywhere (no intervals)"
    elif similar_wins == 0:
        verdict = f"**holds**: dissimilar is lower in all {n} distinct comparisons"
        versus_similar = "dissimilar lower than similar everywhere (no intervals)"
    else:
        verdict = f"**mixed**: similar is lower in {similar_wins} of {n} distinct comparisons"
        versus_similar = "neither of dissimilar and similar lower everywhere (no intervals)"
    headline = f"dissimilar / similar ×{geo:.2f} at C = {layers_label(target, num_layers)}"
    number = f"perplexity {headline} ({len(at)} distinct strategy pair(s) over the calibration sets)"
    links = r.link("01_observation_ppl_curves.png", "figure") + ", " + r.link("01_observation_conclusion.md", "summary")
    return Finding("01", OBSERVATION_CLAIM, number, verdict, links, headline, (("similar", versus_similar),))


def finding_observation(r: Results) -> list[tuple]:
    return [observation_finding(r).row()]


def search_finding(r: Results) -> Finding:
    """Notebook 02: how many of the visited candidates the threshold let through, beside the random-order control."""
    strategy = r.json("02_search_strategy.json")
    meta = strategy["metadata"]
    visited, accepted = meta["candidates_visited"], meta["num_shared"]
    rejected = visited - accepted
    number = f"T = {meta['threshold']}: {accepted} of {visited} visited candidates accepted"
    headline = f"T = {meta['threshold']}: {accepted} of {visited} candidates accepted"
    if "num_layers" in strategy:
        headline += f", C = {layers_label(accepted, strategy['num_layers'])}"
    try:
        random = r.json("02_search_random.json")
    except Missing:  # written since the random control became a distribution over seeds
        random = None
    if random is not None:
        counts = random["counts"]
        number += f"; random order ({counts['searches']} seeds): {counts['accepted']} of {counts['visited']} accepted"
        q = random["quality"]
        if "reference_vs_random" in q:
            number += (
                f"; at C = {q['num_shared']} the default strategy's perplexity is ×{q['reference_vs_random']:.2f} a "
                f"random order's (95% interval {q['reference_vs_random_lo']:.2f}–{q['reference_vs_random_hi']:.2f} "
                f"over {q['n']} seeds)"
            )
    if rejected == 0:
        verdict = "**the ranking alone chose the strategy**: the threshold rejected nothing"
        outcome = "the threshold rejected nothing (the ranking alone chose)"
    else:
        verdict = f"the threshold rejected {rejected} of {visited} candidates"
        outcome = "the threshold rejected candidates (it chose)"
    links = r.link("02_search_threshold_sweep.png", "figure") + ", " + r.link("02_search_summary.md", "summary")
    claim = "The threshold T on the final hidden states picks the pairs to share"
    return Finding("02", claim, number, verdict, links, headline, (("threshold", outcome),))


def finding_search(r: Results) -> list[tuple]:
    return [search_finding(r).row()]


def evaluation_finding(r: Results) -> Finding:
    """Notebook 03: the share of the full model's benchmark average kept at the paper's rate, for every order; the
    verdict is the paper's (dissimilar) order's."""
    data = r.json("03_evaluation.json")
    conc = data["conclusion"]
    num_layers = next(iter(data["strategies"].values()))["num_layers"]
    shared = {x["order"]: x["num_shared"] for x in data["summary"] if abs(x["rate"] - conc["rate"]) < 1e-9}
    orders = conc["orders"]
    paper = orders.get("dissimilar")
    c = shared.get("dissimilar")
    at = layers_label(c, num_layers) if c is not None else pct(conc["rate"])
    rate = pct(conc["rate"], 0)
    claim = f"Over {conc['threshold_pct']:.0f}% of the full model's performance kept at {rate} compression"
    links = r.link("03_evaluation_scores.png", "figure") + ", " + r.link("03_evaluation_summary.md", "summary")
    headline = f"dissimilar {paper['kept_pct']:.1f}% kept" if paper is not None else "no dissimilar order"
    if paper is not None and "verdict" not in paper:  # a results file from before the intervals (issue 14)
        number = "; ".join(f"{o} {orders[o]['kept_pct']:.1f}%" for o in orders) + " of the full average kept"
        words = "holds" if paper["holds"] else "does not hold"
        verdict = f"**{words}** for the paper's order at {at}"
        return Finding("03", claim, number, verdict, links, headline, (("paper", f"{words} for the paper's order"),))

    def kept(o):
        v = orders[o]
        who = f"{o} (mean of {len(v['seeds'])} seeds)" if len(v.get("seeds") or []) > 1 else o
        return f"{who} {v['kept_pct']:.1f}% [{v['kept_lo']:.1f}, {v['kept_hi']:.1f}]"

    number = "; ".join(kept(o) for o in orders) + f" of the full average kept at {at} (95% intervals)"
    if paper is None:
        verdict = "no dissimilar (paper's) order in the results"
        outcome = "no paper's order"
    else:
        words = {"holds": "holds", "fails": "does not hold", "undecided": "undecided"}[paper["verdict"]]
        verdict = (
            f"**{words}** for the paper's order at {at} (95% interval of % kept "
            f"[{paper['kept_lo']:.1f}, {paper['kept_hi']:.1f}] against {conc['threshold_pct']:g}%)"
        )
        outcome = f"{words} for the paper's order"
        agree = suite_vs_perplexity(data["summary"], conc["rate"])
        verdict += f". {agree}" if agree else ""
    return Finding("03", claim, number, verdict, links, headline, (("paper", outcome),))


def suite_vs_perplexity(summary: list[dict], rate: float, a: str = "dissimilar", b: str = "similar") -> str | None:
    """One sentence: whether notebook 03's suite and the held-out perplexity rank orders `a` and `b` the same way at
    `rate` (each with its 95% interval; non-overlapping intervals are called clear). None without both numbers."""
    at = {x["order"]: x for x in summary if abs(x["rate"] - rate) < 1e-9}
    if a not in at or b not in at or at[a].get("ppl") is None or at[b].get("ppl") is None:
        return None
    x, y = at[a], at[b]

    def apart(lo_key, hi_key):
        return x[hi_key] < y[lo_key] or y[hi_key] < x[lo_key]

    suite_first = a if x["kept_pct"] >= y["kept_pct"] else b
    ppl_first = a if x["ppl"] <= y["ppl"] else b
    suite = (
        f"on the suite {suite_first} is ahead ({a} {x['kept_pct']:.1f}% against {b} {y['kept_pct']:.1f}% kept; "
        + ("intervals apart" if apart("kept_lo", "kept_hi") else "the intervals overlap")
        + ")"
    )
    ppl = (
        f"on held-out perplexity {ppl_first} is ahead ({a} {x['ppl']:.1f} against {b} {y['ppl']:.1f}; "
        + ("intervals apart" if apart("ppl_lo", "ppl_hi") else "the intervals overlap")
        + ")"
    )
    if suite_first == ppl_first:
        return f"The two measures agree: {suite}, and {ppl}."
    return f"The two measures disagree: {suite}, but {ppl}."


def finding_evaluation(r: Results) -> list[tuple]:
    return [evaluation_finding(r).row()]


def finding_memory_speed(r: Results) -> list[tuple]:
    from ..memory_speed import PAPER

    rates = r.json("04_memory_speed_rates.json")
    acc = r.json("04_memory_speed_accounting.json")
    links = r.link("04_memory_speed_rates.png", "figure") + ", " + r.link("04_memory_speed_conclusion.md", "summary")
    out = []
    shared = [x for x in rates if x["mode"] == "shared" and x["num_shared"] > 0]
    x = min(shared, key=lambda x: (abs(x["rate"] - PAPER["rate"]), -x["batch"]))
    plain = next(p for p in rates if p["mode"] == "plain" and p["batch"] == x["batch"])
    ratio = x["kv_bytes"] / plain["kv_bytes"]
    expected = (x["num_layers"] - x["num_shared"]) / x["num_layers"]
    exact = x["kv_bytes"] == plain["kv_bytes"] * (x["num_layers"] - x["num_shared"]) // x["num_layers"]
    out.append(
        (
            "04",
            "Sharing C of L layers leaves (L−C)/L of the KV cache",
            f"{ratio:.4f} of plain at {layers_label(x['num_shared'], x['num_layers'])}, batch {x['batch']}; "
            f"(L−C)/L = {expected:.4f}",
            "**holds exactly**" if exact else "**differs** from (L−C)/L",
            links,
        )
    )
    check = acc["paper_memory_check"]
    lower, reported = check["predicted_peak_ratio_lower_bound"], check["paper_peak_ratio"]
    out.append(
        (
            "04",
            f"Peak memory falls to {pct(reported)} of plain ({check['preset']}, paper)",
            f"fp16 weights alone bound the peak to at least {pct(lower)} when "
            f"{check['num_shared']}/{check['num_layers']} layers' K/V go",
            "**not explained by KV sharing**" if lower > reported else "within what KV sharing can remove",
            links,
        )
    )
    paper_speedup = PAPER["tokens_per_s"][1] / PAPER["tokens_per_s"][0]
    bounds = {
        row["cache"]: row["speedup_bound"]
        for row in acc["paper_shapes"]
        if row["num_shared"] > 0 and abs(row["rate"] - PAPER["rate"]) < 1e-9
    }
    bound_text = ", ".join(f"{b:.2f}x ({cache} cache)" for cache, b in bounds.items())
    out.append(
        (
            "04",
            f"Decoding {paper_speedup:.2f}x faster ({check['preset']}, paper)",
            f"bytes moved per decode bound a memory-bound speed-up to {bound_text}",
            "**beyond what the saved bytes allow**"
            if max(bounds.values()) < paper_speedup
            else "within the bytes-moved bound",
            r.link("04_memory_speed_accounting_paper.png", "figure")
            + ", "
            + r.link("04_memory_speed_conclusion.md", "summary"),
        )
    )
    out += finding_memory_budget(r)
    return out


def finding_memory_budget(r: Results) -> list[tuple]:
    """Notebook 04's long-prompt budget rows (section 4), once they carry the limits (a results file from before has
    none: no row)."""
    try:
        rows = r.json("04_memory_speed_budget.json")
    except Missing:
        return []
    plain = next((b for b in rows if b["mode"] == "plain" and b.get("fits")), None)
    shared = [b for b in rows if b["mode"] == "shared" and "per_sequence_bytes_ratio" in b]
    if plain is None or not shared:
        return []
    parts = [
        f"{layers_label(b['num_shared'], b['num_layers'])}: batch {b['batch']} vs {plain['batch']} "
        f"({b['batch_ratio']:.2f}x, limit {b['ideal_ratio']:.2f}x), {b['throughput_ratio']:.2f}x decode tokens/s, "
        f"{b['per_sequence_bytes_ratio']:.2f} of the bytes per sequence (limit {b['kv_limit_ratio']:.2f})"
        for b in shared
    ]
    meets = [b for b in shared if b.get("meets_paper_speedup")]
    verdict = (
        f"**≥ {shared[0]['paper_min_speedup']:.1f}x at {', '.join(pct(b['rate'], 0) for b in meets)}**"
        if meets
        else f"**below the paper's ≥ {shared[0]['paper_min_speedup']:.1f}x**"
    )
    if not all(b.get("largest_proven") for b in [plain, *shared]):
        verdict += " (a search stopped at its bound)"
    return [
        (
            "04",
            f"More sequences and throughput within a memory budget ({plain['prompt_len']}-token prompts, "
            f"{plain['budget_bytes'] / 2**30:g} GiB peak; paper: ≥ 1.3x throughput)",
            "; ".join(parts),
            verdict,
            r.link("04_memory_speed_budget.png", "figure") + ", " + r.link("04_memory_speed_conclusion.md", "summary"),
        )
    ]


def finding_speed_context(r: Results) -> list[tuple]:
    """Notebook 04's section 5: decode speed against the context, every method (no row before its results exist)."""
    try:
        goals = r.json("04_memory_speed_speed_goals.json")
    except Missing:
        return []
    judged = [g for g in goals if g.get("at_or_above_full") is not None]
    bounded = [g for g in goals if g.get("within_bound_goal") is not None]
    if not judged:
        return []

    def name(g):
        return f"{g['method']} {pct(g['kept_share16'], 0)}"

    below = [g for g in judged if not g["at_or_above_full"]]
    here = f"{len(judged) - len(below)} of {len(judged)} method settings at or above x1.00 from 2k tokens (batch 1)"
    if below:
        here += "; below: " + ", ".join(f"{name(g)} x{g['min_ratio_batch1']:.2f}" for g in below)
    if bounded:
        batch, context = bounded[0]["largest"]
        short = [g for g in bounded if not g["within_bound_goal"]]
        here += (
            f"; batch {batch} x {context} tokens: {len(bounded) - len(short)} of {len(bounded)} within 80% of "
            "their bytes bound"
        )
    verdict = "**holds**" if not below else f"**holds for {len(judged) - len(below)} of {len(judged)}**"
    return [
        (
            "04",
            "A compressed cache decodes at least as fast as the full one (every method at 75% and 50% of the 16-bit "
            "cache's bytes, batch 1, 2k-8k tokens)",
            here,
            verdict,
            r.link("04_memory_speed_speed_context.png", "figure")
            + ", "
            + r.link("04_memory_speed_conclusion.md", "summary"),
        )
    ]


def finding_intra_layer(r: Results) -> list[tuple]:
    table = r.csv("05_intra_layer_table.csv")
    rows = r.csv("05_intra_layer_additivity.csv")
    exact = sum(x["kv_bytes"] == x["kv_bytes_predicted"] for x in table)
    sign = [clear_sign(z_score(float(x["interaction"]), float(x["interaction_se"]))) for x in rows]
    worse = [x for x, s in zip(rows, sign) if s > 0]
    better = [x for x, s in zip(rows, sign) if s < 0]
    add_up = len(rows) - len(worse) - len(better)
    number = (
        f"K/V bytes equal the prediction of sharing × policy in {exact} of {len(table)} configurations; "
        f"quality costs (ΔNLL) add up (the interaction's 95% interval contains 0) in {add_up} of {len(rows)} "
        "combinations"
    )
    verdict = "**bytes exact**" if exact == len(table) else f"**bytes differ** in {len(table) - exact} configurations"
    for label, group in (("worse than the sum", worse), ("better than the sum", better)):
        if group:
            verdict += f"; {label}: " + ", ".join(f"{x['policy']} {x['budget']}" for x in group)
    links = r.link("05_intra_layer_pareto.png", "figure") + ", " + r.link("05_intra_layer_summary.md", "summary")
    return [("05", "Sharing combines with token eviction (H2O, PyramidInfer, StreamingLLM)", number, verdict, links)]


def finding_quantized(r: Results) -> list[tuple]:
    from ..quantized import REBUTTAL

    rows = r.json("06_quantized_table.json")
    reb = REBUTTAL["ppl"]
    c_reb = max(reb)
    groups: dict[tuple, dict] = {}
    for x in rows:
        groups.setdefault((x["weights"], x["kv"]), {})[x["num_shared"]] = x["ppl"]
    rising = all(all(g[a] < g[b] for a, b in zip(sorted(g), sorted(g)[1:])) for g in groups.values())
    c_here = max(next(iter(groups.values())))
    ratios = [g[c_here] / g[0] for g in groups.values() if 0 in g and c_here in g]
    num_layers = r.json("06_quantized_settings.json").get("num_layers")
    at = f"C = {c_here}" + (f" of {num_layers}" if num_layers else "")
    number = f"perplexity ×{min(ratios):.2f}–{max(ratios):.2f} at {at} over the weight and KV-cache settings"
    verdict = "**same direction**: rises with every added layer" if rising else "**not monotone** in C"
    claim = (
        f"Perplexity rises moderately with C on GPTQ weights ({REBUTTAL['model']}, rebuttal: "
        f"×{reb[c_reb] / reb[0]:.2f} at C = {c_reb} of {REBUTTAL['num_layers']})"
    )
    links = r.link("06_quantized.png", "figure") + ", " + r.link("06_quantized_summary.md", "summary")
    return [("06", claim, number, verdict, links)]


def finding_serving(r: Results) -> list[tuple]:
    data = r.json("10_serving_vllm.json")
    cap, gen, thr = data["capacity"], data["generations"], data["throughput"]
    number = (
        f"KV capacity ×{cap['ratio']:.4f} (L/(L−C) = {cap['expected_ratio']:.4f}); greedy generations identical "
        f"{gen['shared']['matches']}/{gen['shared']['prompts']}; throughput ×{thr['ratio']:.2f} at a KV-bound load"
    )
    to_block = abs(cap["shared_blocks"] - cap["expected_shared_blocks"]) < 1
    verdict = "**holds** (to the block)" if to_block else "**differs** from L/(L−C)"
    links = r.link("10_serving_vllm.png", "figure") + ", " + r.link("10_serving_vllm.md", "summary")
    claim = f"A shared model served on vLLM holds L/(L−C) more tokens in the same KV memory ({data['vllm']})"
    return [("10", claim, number, verdict, links)]


def finding_best_search(r: Results) -> list[tuple]:
    """Notebook 11: `best` against the fixed orders on held-out text (per set and C), at C = target, and on the
    offline suite; from its verdict, perplexity table and suite files."""
    from ..best_search import lower_everywhere

    v = r.json("11_best_search_verdict.json")
    rows = r.csv("11_best_search_ppl.csv")
    suite = r.json("11_best_search_suite.json")
    per = v["per_point"]
    sets = sorted({p["set"] for p in per})
    points = len(per)
    claim = lower_everywhere(per, sets)  # the one significance rule, whatever rule wrote the file
    c_t = v["target"][0]["C"]
    best = ", ".join(f"{t['ratio_to_full']:.2f}×" for t in v["target"])
    fixed = {}
    for row in rows:
        if int(row["C"]) == c_t and row["order"] in ("dissimilar", "similar"):
            fixed.setdefault(row["order"], []).append(float(row["ratio_to_full"]))
    others = "; ".join(f"{o} {min(x):.2f}–{max(x):.2f}×" for o, x in sorted(fixed.items()))
    L = suite["num_layers"]
    out = [
        (
            "11",
            "A best-first search (KL-guided, re-scored against the accepted strategy) is below every fixed order "
            "at every C",
            f"clearly lower (the ratio's paired 95% interval below 1) than dissimilar, similar and random at "
            f"{claim['clear_points']} of {points} (set, C) points; at every C on "
            f"{len(claim['sets_where_clear_at_every_C'])} of {len(sets)} calibration sets",
            "**holds**" if claim["holds"] else "**does not hold** (see where it falls short)",
            r.link("11_best_search_ppl_curves.png", "figure")
            + ", "
            + r.link("11_best_search_conclusion.md", "summary"),
        ),
        (
            "11",
            f"At {layers_label(c_t, L)}, held-out perplexity within {v['target_ratio']}× of the full model's",
            f"best {best} of the full model over the calibration sets; {others}",
            "**holds** on every set" if v["claim_within_target_on_every_set"] else "**does not hold** on every set",
            r.link("11_best_search_ppl_curves.png", "figure")
            + ", "
            + r.link("11_best_search_conclusion.md", "summary"),
        ),
    ]
    rivals = [x for x in suite["rows"] if "best_vs_this_z" in x and x["order"] not in ("full", "best")]
    b = next(x for x in suite["rows"] if x["label"] == "best")
    lowest = min(rivals, key=lambda x: x["best_vs_this_z"])
    out.append(
        (
            "11",
            f"On the offline suite at {layers_label(suite['C'], L)}, `best` above every fixed order",
            f"best keeps {b['kept_pct']:.1f}% of the full average ({suite['limit']} examples per task); closest rival "
            f"{lowest['label']} (z {lowest['best_vs_this_z']:+.1f})",
            "**holds clearly**"
            if all(clearly_higher(x["best_vs_this_z"]) for x in rivals)
            else "**higher, not clearly**"
            if suite["higher_than_all"]
            else "**does not hold**",
            r.link("11_best_search_conclusion.md", "summary"),
        )
    )
    return out


def finding_ablations(r: Results) -> list[tuple]:
    """Notebook 08: one row per section verdict its conclusion states (threshold, metric, depth, calibration, cost),
    quoted from the conclusion, which computed them."""
    md = r.text("08_ablations_conclusion.md")
    claims = {
        "threshold": "Guidance for the threshold T (every order, T = 0.3–0.95)",
        "metric": "Cosine distance beats Euclidean (rebuttal, Llama-2-7B)",
        "depth-matched": "Which layers vs which source (depth-matched control)",
        "calibration": "The strategy is robust to the calibration texts",
        "cost": "Search cost scaling",
    }
    rows = []
    for line in md.splitlines():
        line = line.strip()
        for key, claim in claims.items():
            lead = f"**Verdict ({key}).**"
            if line.startswith(lead):
                verdict = line[len(lead) :].strip()
                rows.append(("08", claim, "see the summary", verdict, r.link("08_ablations_conclusion.md", "summary")))
    return rows


def conclusion_finding(number: str, name: str, claim: str, lead: str | None = None) -> Callable[[Results], list[tuple]]:
    """A notebook whose conclusion Markdown states its own verdict: quote its first verdict line, or the first line
    that starts with `lead` (e.g. "**Verdict.**") where the conclusion opens with its protocol."""

    def finding(r: Results) -> list[tuple]:
        md = r.text(name)
        line = next((ln.strip() for ln in md.splitlines() if lead and ln.strip().startswith(lead)), None)
        return [(number, claim, line or first_verdict(md), "see the summary", r.link(name, "summary"))]

    return finding


FINDINGS: list[tuple[str, str, Callable[[Results], list[tuple]]]] = [
    ("01", "Sharing the most *dissimilar* layers hurts less than sharing similar ones", finding_observation),
    ("02", "The threshold T picks the pairs to share", finding_search),
    ("03", "Over 90% of the full model's performance kept at 25% compression (paper)", finding_evaluation),
    ("04", "Memory and speed of the shared model", finding_memory_speed),
    ("04", "Decode speed of every method against the context", finding_speed_context),
    ("05", "Sharing combines with token eviction", finding_intra_layer),
    ("06", "Sharing on quantized weights and a quantized KV cache", finding_quantized),
    (
        "07",
        "KVSharer against its cross-layer peers at equal KV bytes",
        conclusion_finding(
            "07", "07_peers_conclusion.md", "KVSharer against MiniCache, SimLayerKV and eviction", lead="**Verdict.**"
        ),
    ),
    ("08", "The reviewers' ablations: threshold, metric, depth, calibration, cost", finding_ablations),
    (
        "09",
        "Long context: RULER accuracy for every method",
        conclusion_finding(
            "09", "09_long_context_conclusion.md", "Sharing survives long inputs (RULER)", lead="**Verdict.**"
        ),
    ),
    ("10", "Serving on vLLM", finding_serving),
    ("11", "A best-first search finds a less harmful strategy", finding_best_search),
]


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def findings(r: Results) -> str:
    lines = ["| notebook | claim | on this model | verdict | details |", "|---|---|---|---|---|"]
    for number, claim, fn in FINDINGS:
        try:
            rows = fn(r)
        except Missing as e:
            rows = [(number, claim, missing_line(e.path), "—", "—")]
        for nb, what, here, verdict, links in rows:
            lines.append(f"| {nb} | {cell(what)} | {cell(here)} | {cell(verdict)} | {links} |")
    return "\n".join(lines)


# the claims notebooks 01-03 test, set side by side for every model family; the claim column is the same for all
SIDE_BY_SIDE: list[tuple[str, str, Callable[[Results], Finding]]] = [
    (
        "01",
        "Sharing the most *dissimilar* layers hurts less than sharing similar or random ones (held-out perplexity)",
        observation_finding,
    ),
    ("02", "The threshold T chooses the pairs, not the ranking alone", search_finding),
    ("03", "Over 90% of the full model's performance kept at 25% compression (paper)", evaluation_finding),
]


def agreement(findings: dict[str, Finding | None]) -> str:
    """Whether the models' verdicts agree, aspect by aspect, in the verdicts' own words."""
    if any(f is None for f in findings.values()):
        return "cannot tell yet"
    said = {model: dict(f.outcomes) for model, f in findings.items()}
    aspects = list(dict.fromkeys(a for f in findings.values() for a, _ in f.outcomes))
    same, differ = [], []
    for aspect in aspects:
        words = {model: said[model].get(aspect, "not measured") for model in findings}
        if len(set(words.values())) == 1:
            same.append(next(iter(words.values())))
        else:
            differ.append(", ".join(f"{w} on {model}" for model, w in words.items()))
    if not differ:
        return f"**agree**: {'; '.join(same)} on both"
    return f"**disagree**: {'; '.join(differ)}" + (f" (on both: {'; '.join(same)})" if same else "")


def side_by_side(r: Results) -> str:
    """The claims of notebooks 01-03 on every model family, one column per model, each cell computed by the same
    finding function as the findings table from that model's own results folder."""
    lines = [
        "| notebook | claim | " + " | ".join(FAMILIES) + " | agree? |",
        "|---|---|" + "---|" * len(FAMILIES) + "---|",
    ]
    missing = []
    for number, claim, finding in SIDE_BY_SIDE:
        found: dict[str, Finding | None] = {}
        cells = []
        for model in FAMILIES:
            try:
                f = found[model] = finding(r.for_model(model))
                cells.append(f"{f.verdict.rstrip('.')}; {f.headline}")
            except Missing as e:
                found[model] = None
                missing.append(e.path)
                cells.append(f"not run yet: `{run_command(e.path)}`")
        lines.append(f"| {number} | {cell(claim)} | " + " | ".join(cell(c) for c in cells) + f" | {agreement(found)} |")
    if missing:
        paths = ", ".join(f"`{p}`" for p in missing)
        lines += ["", f"*Not run yet: {paths} not committed; the command in each such cell writes its file.*"]
    return "\n".join(lines)


def how_to_choose(r: Results) -> str:
    """The README's "how to choose" list: notebook 08's computed section verdicts as advice, each linked to its
    figure; nothing here is typed but the labels."""
    name = "08_ablations_conclusion.md"
    md = r.text(name)
    advice = {
        "threshold": ("Order and threshold T", "08_ablations_threshold.png"),
        "metric": ("Distance metric", "08_ablations_metric.png"),
        "depth-matched": ("Which layers, which source", "08_ablations_depth.png"),
        "calibration": ("Calibration texts", "08_ablations_calibration.png"),
        "cost": ("Search cost", "08_ablations_search_cost.png"),
    }
    lines = []
    for key, (label, figure) in advice.items():
        lead = f"**Verdict ({key}).**"
        verdict = next((ln.strip()[len(lead) :].strip() for ln in md.splitlines() if ln.strip().startswith(lead)), None)
        if verdict:
            link = r.link(figure, "figure") if (r.root / r.folder / figure).is_file() else r.link(name, "summary")
            lines.append(f"- **{label}** ({link}): {verdict}")
    if not lines:
        return f"*{r.link(name, f'`{r.folder}/{name}`')} states no section verdict.*"
    return "\n".join(lines + ["", f"All of notebook 08's numbers: {r.link(name, 'its conclusion')}."])


# ---- the detail pages: each notebook's own summary, tables from its CSV/JSON -------------------------------------


def summary_block(name: str) -> Callable[[Results], str]:
    """A notebook's computed summary (Markdown it wrote beside its figures), quoted as written."""

    def render(r: Results) -> str:
        return f"From {r.link(name, f'`{r.folder}/{name}`')}:\n\n" + shift_headings(r.text(name))

    return render


def evaluation_table(r: Results) -> str:
    """Notebook 03's table: every task at every order and number of layers shared (random: the mean over its seeds
    [lowest–highest]), then the averages and the share kept with their 95% intervals."""
    data = r.json("03_evaluation.json")
    num_layers = next(iter(data["strategies"].values()))["num_layers"]
    summary = data["summary"]
    columns = [(x["order"], x["rate"], x["num_shared"]) for x in summary if x["num_shared"] > 0]
    full = next(x for x in summary if x["num_shared"] == 0)
    intervals = "kept_lo" in full  # results from before issue 14 have no intervals
    seeds = {(x["order"], x["num_shared"]): len(x.get("seeds") or [None]) for x in summary}

    def label(order, num_shared):
        n = seeds[(order, num_shared)]
        return f"{order} {num_shared}/{num_layers}" + (f" (mean of {n} seeds)" if n > 1 else "")

    rows = data["rows"]
    primary = [x for x in rows if x["primary"] and x["num_shared"] == 0 and x["order"] == full["order"]]

    def value(task, metric, order, num_shared):
        xs = [
            y
            for y in rows
            if y["task"] == task and y["metric"] == metric and y["order"] == order and y["num_shared"] == num_shared
        ]
        digits = 1 if metric == "ppl" else 3
        if len(xs) > 1:
            v = [y["value"] for y in xs]
            return f"{sum(v) / len(v):.{digits}f} [{min(v):.{digits}f}–{max(v):.{digits}f}]"
        return f"{xs[0]['value']:.{digits}f} ± {xs[0]['stderr']:.{digits}f}"

    head = ["task (metric)", "full"] + [label(o, c) for o, _, c in columns]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in primary:
        cells = [value(p["task"], p["metric"], full["order"], 0)]
        cells += [value(p["task"], p["metric"], o, c) for o, _, c in columns]
        lines.append(f"| {p['task'].removeprefix('kvshare_')} ({p['metric']}) | " + " | ".join(cells) + " |")
    by = {(x["order"], x["num_shared"]): x for x in summary}
    for title, key, lo, hi, fmt in (
        ("Average", "average", "average_lo", "average_hi", "{:.3f}"),
        ("% of full kept", "kept_pct", "kept_lo", "kept_hi", "{:.1f}"),
        ("% of above-chance margin kept", "above_chance_kept_pct", "above_chance_lo", "above_chance_hi", "{:.1f}"),
    ):

        def show(x, key=key, lo=lo, hi=hi, fmt=fmt):
            if not intervals or x.get(lo) is None or x["num_shared"] == 0:
                return fmt.format(x[key])
            return f"{fmt.format(x[key])} [{fmt.format(x[lo])}, {fmt.format(x[hi])}]"

        cells = [show(full)] + [show(by[(o, c)]) for o, _, c in columns]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    rates = sorted({(rate, c) for _, rate, c in columns})
    labels = ", ".join(f"{pct(rate, 1)} → {layers_label(c, num_layers)}" for rate, c in rates)
    intro = (
        f"From {r.link('03_evaluation.json', f'`{r.folder}/03_evaluation.json`')} "
        f"({data['settings']['model']}, {num_layers} layers; requested rate → layers replaced: {labels}). "
        "Columns are labelled by the exact number of replaced layers."
    )
    if intervals:
        split = data.get("split") or {}
        intro += (
            " Brackets: paired bootstrap 95% intervals (examples resampled within each task; random: seeds too)."
            + (
                f" Multiple-choice tasks are evaluated on their test part only ({pct(1 - split['fraction'], 0)} of "
                "each task's examples by a content hash; the disjoint rest is the screen that chose the suite)."
                if split.get("fraction") is not None
                else ""
            )
        )
    return intro + "\n\n" + "\n".join(lines)


def offline_suite_baseline(r: Results) -> str:
    """n, chance and the full model's score of every offline task (notebook 03's full-model rows)."""
    data = r.json("03_evaluation.json")
    rows = [x for x in data["rows"] if x["primary"] and x["num_shared"] == 0]
    seen, lines = set(), ["| task | metric | n | chance | full model (± stderr) |", "|---|---|---|---|---|"]
    for x in rows:
        if x["task"] in seen:
            continue
        seen.add(x["task"])
        chance = "—" if x.get("chance") is None else f"{x['chance']:.3f}"
        digits = 1 if x["metric"] == "ppl" else 3
        lines.append(
            f"| {x['task'].removeprefix('kvshare_')} | {x['metric']} | {x['n']} | {chance} | "
            f"{x['value']:.{digits}f} ± {x['stderr']:.{digits}f} |"
        )
    return (
        f"From {r.link('03_evaluation.json', f'`{r.folder}/03_evaluation.json`')} ({data['settings']['model']}; "
        "`n`: examples, scored tokens for perplexity):\n\n" + "\n".join(lines)
    )


def gemma_baseline(r: Results) -> str:
    gemma = r.for_model("gemma3-270m")
    data = gemma.json("heldout_baseline.json")
    h = data["heldout_protocol"]
    return (
        f"The plain `{data['model']}` (no sharing) has a held-out perplexity of {h['ppl']:.2f} ± {h['ppl_se']:.2f} "
        f"under the shared protocol ({h['description']}; "
        f"{gemma.link('heldout_baseline.json', f'`{gemma.folder}/heldout_baseline.json`')})."
    )


BLOCKS: dict[str, Callable[[Results], str]] = {
    "findings": findings,
    "side-by-side": side_by_side,
    "how-to-choose": how_to_choose,
    "01_observation": summary_block("01_observation_conclusion.md"),
    "02_search": summary_block("02_search_summary.md"),
    "03_evaluation": summary_block("03_evaluation_summary.md"),
    "03_table": evaluation_table,
    "03_offline_suite": offline_suite_baseline,
    "04_memory_speed": summary_block("04_memory_speed_conclusion.md"),
    "05_intra_layer": summary_block("05_intra_layer_summary.md"),
    "06_quantized": summary_block("06_quantized_summary.md"),
    "07_peers": summary_block("07_peers_conclusion.md"),
    "09_long_context": summary_block("09_long_context_conclusion.md"),
    "10_serving": summary_block("10_serving_vllm.md"),
    "11_best_search": summary_block("11_best_search_conclusion.md"),
    "gemma_baseline": gemma_baseline,
}


def render_block(name: str, results: Results) -> str:
    if name not in BLOCKS:
        raise KeyError(f"unknown results block {name!r}; known: {', '.join(BLOCKS)}")
    try:
        return BLOCKS[name](results).strip()
    except Missing as e:
        return missing_line(e.path)


def render_page(text: str, page: str, root: Path = ROOT) -> str:
    """The page with every generated block rebuilt from the results files; nothing outside the markers changes."""
    results = Results(root, page)
    return BLOCK_RE.sub(lambda m: f"{m['start']}{render_block(m['name'], results)}\n{m['end']}", text)


def pages(root: Path = ROOT) -> list[Path]:
    found = []
    for pattern in PAGES:
        found += sorted(root.glob(pattern))
    return found


def update(root: Path = ROOT, check: bool = False) -> list[str]:
    """Rewrite (or, with check, only compare) every page; returns the pages that differ(ed)."""
    changed = []
    for path in pages(root):
        page = path.relative_to(root).as_posix()
        text = path.read_text()
        new = render_page(text, page, root)
        if new != text:
            changed.append(page)
            if not check:
                path.write_text(new)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a page differs")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = parser.parse_args(argv)
    changed = update(args.root, check=args.check)
    if args.check:
        if changed:
            print(f"readme: out of date: {', '.join(changed)} (run python -m kvshare.experiments.reports.readme)")
            return 1
        print("readme: README.md and docs/ match the committed results")
        return 0
    print(f"readme: rewrote {', '.join(changed)}" if changed else "readme: README.md and docs/ already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
