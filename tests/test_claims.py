"""Verdicts as data (kvshare.claims) and the one significance rule (kvshare.metrics): a claim's status follows its
evidence and nothing else, survives JSON, renders as the status its evidence implies, and fills the findings table's
fixed columns; "clearly different" is decided in one place, at 95%, and nowhere else in the package."""

from __future__ import annotations

import ast
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest

from kvshare import claims, metrics
from kvshare.claims import COLUMNS, Claim, interval_status, render_table, status_from, z_status
from kvshare.metrics import Z95, clear_sign, clearly_different, clearly_higher, clearly_lower, interval95, verdict_of

PACKAGE = Path(__file__).resolve().parents[1] / "kvshare"
EPS = 1e-9


# ---- the one rule -------------------------------------------------------------------------------------------------
def test_z95_is_the_normal_quantile_of_a_two_sided_95_interval():
    assert Z95 == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-12)


@pytest.mark.parametrize(
    "z, sign",
    [
        (Z95 + EPS, 1),
        (Z95 - EPS, 0),
        (Z95, 0),  # at the bound: not clear
        (-Z95 + EPS, 0),
        (-Z95 - EPS, -1),
        (-Z95, 0),
        (0.0, 0),
        (2.0, 1),  # between the bound and 2: clear by the one rule
        (-1.97, -1),
        (math.inf, 1),
        (-math.inf, -1),
        (math.nan, 0),
    ],
)
def test_clear_sign_boundaries(z, sign):
    assert clear_sign(z) == sign
    assert clearly_higher(z) == (sign > 0)
    assert clearly_lower(z) == (sign < 0)
    assert clearly_different(z) == (sign != 0)


def test_z_score_interval_and_verdict_agree():
    assert metrics.z_score(1.0, 0.5) == 2.0
    assert math.isnan(metrics.z_score(1.0, 0.0)) and math.isnan(metrics.z_score(1.0, math.nan))
    lo, hi = interval95(1.0, 0.5)
    assert (lo, hi) == pytest.approx((1.0 - Z95 * 0.5, 1.0 + Z95 * 0.5))
    se = 1.0
    assert verdict_of(-(Z95 + EPS) * se, se) == "better"
    assert verdict_of(-(Z95 - EPS) * se, se) == "same"
    assert verdict_of((Z95 + EPS) * se, se) == "worse"
    assert verdict_of((Z95 + EPS) * se, se, lower_is_better=False) == "better"
    assert verdict_of(1.0, 0.0) == "same"  # no spread: nothing to test


def test_paired_difference_uses_the_one_interval():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.3, 40)
    b = a - 0.05 + rng.normal(0, 0.02, 40)
    d = metrics.paired_difference({"window_nll": a.tolist()}, {"window_nll": b.tolist()})
    lo, hi = interval95(d["nll_diff"], d["nll_diff_se"])
    assert d["ppl_ratio_ci95"] == pytest.approx([math.exp(lo), math.exp(hi)])
    assert d["z"] == pytest.approx(d["nll_diff"] / d["nll_diff_se"])
    # the interval excludes 1 exactly when the rule calls the difference clear
    assert (d["ppl_ratio_ci95"][0] > 1) == clearly_higher(d["z"])


# ---- status follows evidence --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lo, hi, holds_if, status",
    [
        (0.80, 0.95, "below", "holds"),  # wholly below the threshold 1
        (1.05, 1.20, "below", "fails"),  # wholly above
        (0.90, 1.10, "below", "undecided"),  # straddles
        (1.00, 1.10, "below", "undecided"),  # a bound at the threshold decides nothing
        (1.05, 1.20, "above", "holds"),
        (0.80, 0.95, "above", "fails"),
        (0.90, 1.10, "above", "undecided"),
        (0.90, 1.10, "contains", "holds"),
        (1.05, 1.20, "contains", "fails"),
        (math.nan, 1.10, "above", "undecided"),
    ],
)
def test_interval_status(lo, hi, holds_if, status):
    assert interval_status(lo, hi, 1.0, holds_if) == status
    c = Claim.from_interval("ratio against 1", (lo + hi) / 2, lo, hi, threshold=1.0, holds_if=holds_if, n=32)
    assert c.status == status and status_from(c.evidence) == status


def test_interval_status_refuses_an_unknown_side():
    with pytest.raises(ValueError):
        interval_status(0.0, 1.0, 0.5, "beside")


@pytest.mark.parametrize(
    "z, holds_if, status",
    [
        (-(Z95 + EPS), "below", "holds"),
        (-(Z95 - EPS), "below", "undecided"),
        (Z95 + EPS, "below", "fails"),
        (Z95 + EPS, "above", "holds"),
        (Z95 - EPS, "contains", "holds"),
        (Z95 + EPS, "contains", "fails"),
        (math.nan, "contains", "undecided"),
    ],
)
def test_z_status_reads_clear_sign(z, holds_if, status):
    assert z_status(z, holds_if) == status
    c = Claim.from_z("best below dissimilar", z * 0.01, 0.01, holds_if=holds_if, n=32)
    if not math.isnan(z):
        assert c.evidence["z"] == pytest.approx(z)
        assert c.status == status


def test_from_z_keeps_the_95_interval_and_no_spread_is_undecided():
    c = Claim.from_z("lower than the reference", -0.1, 0.02, n=32)
    assert c.status == "holds"
    assert (c.evidence["lo"], c.evidence["hi"]) == pytest.approx(interval95(-0.1, 0.02))
    assert Claim.from_z("lower than the reference", -0.1, 0.0).status == "undecided"


def test_counts_use_an_exact_sign_test():
    assert claims.sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert claims.sign_test_p(0, 0) == 1.0
    assert Claim.from_counts("best wins per set", 6, 0).status == "holds"
    assert Claim.from_counts("best wins per set", 0, 6).status == "fails"
    assert Claim.from_counts("best wins per set", 5, 0).status == "undecided"  # p = 1/16: too few to tell
    assert Claim.from_counts("best wins per set", 3, 3, ties=2).evidence["n"] == 8


def test_not_tested_keeps_the_reason():
    c = Claim.not_tested("Throughput ≥ 1.3x on a GPU", "no GPU in this run")
    assert c.status == "not tested" and c.evidence == {"reason": "no GPU in this run"}


def test_a_status_that_contradicts_its_evidence_is_refused():
    good = Claim.from_interval("ppl within 10%", 1.05, 1.02, 1.08, threshold=1.10, holds_if="below")
    assert good.status == "holds"
    with pytest.raises(ValueError, match="implies 'holds'"):
        Claim(good.statement, "fails", dict(good.evidence))
    with pytest.raises(ValueError, match="status is one of"):
        Claim("x", "mostly holds", {})
    edited = good.to_dict() | {"status": "undecided"}
    with pytest.raises(ValueError):
        Claim.from_dict(edited)


# ---- JSON ---------------------------------------------------------------------------------------------------------
def test_a_claim_round_trips_through_json(tmp_path):
    from kvshare.io import write_json

    c = Claim.from_interval(
        "KVSharer keeps perplexity within 10% at C = 8",
        np.float64(1.39),
        np.float64(1.31),
        np.float64(1.47),
        threshold=1.10,
        holds_if="below",
        n=500,
        test="paired ratio, 95%",
        paper="≤ 10% perplexity increase",
        link="figures/11_best_search_ppl_curves.png",
        baseline=26.44,
    )
    assert c.status == "fails"
    write_json(tmp_path / "c.json", c.to_dict())
    back = Claim.from_dict(json.loads((tmp_path / "c.json").read_text()))
    assert back == c and back.render() == c.render()
    for made in (
        Claim.from_counts("wins", 7, 1, 2),
        Claim.not_tested("served on vLLM", "no GPU"),
        Claim.from_z("lower", -0.1, 0.02, n=32),
    ):
        assert Claim.from_dict(json.loads(json.dumps(made.to_dict()))) == made


def test_nan_evidence_written_as_null_reads_back():
    c = Claim.from_z("no spread", 0.0, 0.0)
    strict = json.loads(json.dumps(c.to_dict()).replace("NaN", "null"))
    back = Claim.from_dict(strict)
    assert back.status == c.status == "undecided" and math.isnan(back.evidence["z"])


# ---- rendering ----------------------------------------------------------------------------------------------------
def test_render_is_one_sentence_with_the_status_its_evidence_implies():
    c = Claim.from_interval("Best-first beats random at C = 8", 1.39, 1.31, 1.47, threshold=1.0, n=500)
    assert c.render() == "Best-first beats random at C = 8: holds (estimate 1.39, 95% interval 1.31 to 1.47, n = 500)."
    rng = np.random.default_rng(1)
    for _ in range(200):
        lo = float(rng.normal(1.0, 0.2))
        hi = lo + float(rng.uniform(0, 0.3))
        side = str(rng.choice(claims.SIDES))
        c = Claim.from_interval("claim", (lo + hi) / 2, lo, hi, threshold=1.0, holds_if=side)
        assert c.render().startswith(f"claim: {interval_status(lo, hi, 1.0, side)} (")
        assert c.render().count(".") >= 1 and "\n" not in c.render()
    assert Claim.from_counts("wins", 6, 0).render().startswith("wins: holds (6 wins and 0 losses of 6")
    assert Claim.not_tested("served", "no GPU").render() == "served: not tested (no GPU)."


def test_the_findings_table_has_exactly_the_fixed_columns():
    rows = [
        Claim.from_interval(
            "Perplexity within 10% | at C = 8",
            1.39,
            1.31,
            1.47,
            threshold=1.10,
            holds_if="below",
            n=500,
            paper="≤ 10%",
            link="[figure](figures/x.png)",
        ),
        Claim.not_tested("Served on vLLM", "no GPU"),
        Claim.from_counts("best wins per set", 6, 0),
    ]
    table = render_table(rows).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == list(COLUMNS) == ["claim", "paper says", "we measured", "verdict", "link"]
    assert table[1] == "|---|---|---|---|---|"
    assert len(table) == 2 + len(rows)
    for line, c in zip(table[2:], rows):
        cells = [x.strip() for x in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == len(COLUMNS)
        assert cells[COLUMNS.index("verdict")] == c.status
    first = [x.strip() for x in re.split(r"(?<!\\)\|", table[2].strip())[1:-1]]
    assert first[2] == "1.39 (95% interval 1.31 to 1.47, n = 500)"  # one number with its interval
    assert first[1] == "≤ 10%" and first[4] == "[figure](figures/x.png)"


def test_the_table_refuses_other_columns_or_another_order():
    c = [Claim.not_tested("x", "y")]
    assert render_table(c, ("claim", "verdict")).splitlines()[0] == "| claim | verdict |"
    with pytest.raises(ValueError):
        render_table(c, ("claim", "notes"))
    with pytest.raises(ValueError):
        render_table(c, ("verdict", "claim"))


# ---- the rule stays in one place ----------------------------------------------------------------------------------
# A hard-coded significance rule: the 1.96 quantile, a z compared with ±2, a ±2-standard-error band, a z_crit knob,
# or prose that names one of them. kvshare/metrics.py is the one place allowed to hold the rule.
HARD_CODED = re.compile(
    r"\b1\.96|\b1\.9599"
    r"|\bz_crit\b"
    r"|(?<![A-Za-z0-9])z\W{0,3}\s*[<>]=?\s*[-−]?\s*2(?:\.0)?\b(?!\.\d)"  # z < -2, z"] > 2, |z| > 2, z < −2
    r"|[<>]=?\s*[-−]?\s*2(?:\.0)?\s*\*(?!\*)"  # x > 2 * se, x < -2 * se (not 2 ** n)
    r"|\b2(?:\.0)? (?:s\.e\.|standard errors?)"  # prose: within 2 s.e.
)


def hard_coded_rules(text: str) -> list[str]:
    return [m.group(0) for m in HARD_CODED.finditer(text)]


def test_the_check_catches_a_hard_coded_rule_and_passes_benign_code():
    bad = [
        "lo = x - 1.96 * se",
        'sum(r["z"] < -2 for r in rs)',
        'abs(r["vs_reference_z"]) > 2',
        "(paired z < −2)",
        "worse = d > 2 * se",
        "better = d < -2 * float(x['se'])",
        "def f(z_crit: float = 2.0): ...",
        "within 2 s.e. of 0",
        "z = 1.959964",
    ]
    benign = [
        "if len(rows) > 2:",
        "blitz > 2",
        "x >= 2 ** (10 * power)",
        "if end - begin >= 2:",
        "clearly_lower(z)",
        "z > 2.5",
    ]
    assert all(hard_coded_rules(s) for s in bad), [s for s in bad if not hard_coded_rules(s)]
    assert not any(hard_coded_rules(s) for s in benign), [s for s in benign if hard_coded_rules(s)]


def test_no_hard_coded_significance_rule_outside_metrics():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "metrics.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(PACKAGE.parent)}:{i}: {hit!r}" for hit in hard_coded_rules(line)]
    assert not found, "use kvshare.metrics (Z95, clear_sign, clearly_*, interval95) instead:\n" + "\n".join(found)


def test_claims_imports_nothing_of_kvshare_but_metrics():
    tree = ast.parse((PACKAGE / "claims.py").read_text())
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    absolute = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    absolute |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level and n.module}
    assert local == {"metrics"}
    assert not {m for m in absolute if m.startswith("kvshare")}


def test_committed_verdicts_are_read_by_the_one_rule():
    """Notebook 11's claim 1 as the README reads it: a point is clear when its closest rival's z is beyond -Z95."""
    from kvshare.experiments.best_search import lower_everywhere

    def point(s, c, z):
        return {"set": s, "C": c, "closest_z": z}

    per = [point(0, 2, -(Z95 + EPS)), point(0, 4, -9.0), point(1, 2, -(Z95 - EPS)), point(1, 4, -9.0)]
    per += [point(2, 2, -3.0), point(2, 4, -9.0)]
    got = lower_everywhere(per, [0, 1, 2])
    assert got == {"clear_points": 5, "sets_where_clear_at_every_C": [0, 2], "holds": True}
    assert lower_everywhere(per[2:4], [1])["holds"] is False
