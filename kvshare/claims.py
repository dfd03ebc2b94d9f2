"""Verdicts as data: a `Claim` is a statement, its status, the numbers behind the status and the test that read them.

Experiment modules return claims; reports render them. The status is never typed in by hand: the constructors derive
it from the evidence, and a `Claim` whose status contradicts its evidence (built by hand, or read back from edited
JSON) is refused, so a claim cannot say "holds" while its interval says otherwise.

- `Claim.from_interval`: an estimate with its 95% interval (kvshare.metrics' convention) against a threshold. The
  claim holds when the whole interval is on the claimed side of the threshold, fails when the whole interval is on
  the other side, and is undecided when the interval straddles it (a bound exactly at the threshold decides
  nothing).
- `Claim.from_z`: a paired difference in standard errors, read with `kvshare.metrics.clear_sign` (the one rule).
- `Claim.from_counts`: wins and losses over paired units (sets, seeds, tasks), read as an exact two-sided sign test
  at the same 95% level.
- `Claim.not_tested`: what was not run, with the reason.

`Claim.render()` is one short sentence; `render_table` writes the README's findings table, whose columns are fixed:
claim | paper says | we measured | verdict | link.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .metrics import clear_sign, interval95, z_score

STATUSES = ("holds", "fails", "undecided", "not tested")
SIDES = ("below", "above", "contains")
COLUMNS = ("claim", "paper says", "we measured", "verdict", "link")
ALPHA = 0.05  # the sign test's two-sided level: the same 95% as every interval


def interval_status(lo: float, hi: float, threshold: float, holds_if: str = "above") -> str:
    """'holds' / 'fails' / 'undecided' for a 95% interval [lo, hi] against `threshold`.

    holds_if "above": holds when lo > threshold, fails when hi < threshold. "below": the mirror image. "contains":
    holds when the interval contains the threshold (no clear difference from it), fails when it excludes it. A nan
    bound decides nothing."""
    _check_side(holds_if)
    if math.isnan(lo) or math.isnan(hi):
        return "undecided"
    above, below = lo > threshold, hi < threshold
    if holds_if == "contains":
        return "fails" if above or below else "holds"
    if holds_if == "below":
        above, below = below, above
    return "holds" if above else "fails" if below else "undecided"


def z_status(z: float, holds_if: str = "below") -> str:
    """'holds' / 'fails' / 'undecided' for a paired z read with `kvshare.metrics.clear_sign`: the difference is
    claimed clearly below 0, clearly above 0, or ("contains") not clearly different from 0. A nan z (no spread)
    decides nothing."""
    _check_side(holds_if)
    if math.isnan(z):
        return "undecided"
    sign = clear_sign(z)
    if holds_if == "contains":
        return "holds" if sign == 0 else "fails"
    claimed = -1 if holds_if == "below" else 1
    return "holds" if sign == claimed else "fails" if sign == -claimed else "undecided"


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability, with no real difference, of a split at least this uneven (ties
    left out by the caller). 1.0 with no decided pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def counts_status(wins: int, losses: int) -> str:
    """'holds' when wins clearly outnumber losses (sign test p < ALPHA), 'fails' when losses clearly outnumber wins,
    else 'undecided'."""
    if sign_test_p(wins, losses) >= ALPHA:
        return "undecided"
    return "holds" if wins > losses else "fails"


def status_from(evidence: dict) -> str | None:
    """The status the evidence implies, by its shape (a z, counts, an interval and threshold, or only a reason for
    not testing); None for evidence of no known shape, which then constrains nothing."""
    e = evidence
    if "z" in e:
        return z_status(e["z"], e.get("holds_if", "below"))
    if "wins" in e and "losses" in e:
        return counts_status(e["wins"], e["losses"])
    if {"lo", "hi", "threshold"} <= e.keys():
        return interval_status(e["lo"], e["hi"], e["threshold"], e.get("holds_if", "above"))
    if set(e) == {"reason"}:
        return "not tested"
    return None


def _check_side(holds_if: str) -> None:
    if holds_if not in SIDES:
        raise ValueError(f"holds_if is one of {SIDES}, not {holds_if!r}")


def _plain(x):
    """numpy scalars as Python numbers, so that evidence writes to JSON and compares equal after reading back."""
    return x.item() if hasattr(x, "item") else x


NAN_KEYS = ("estimate", "se", "z", "lo", "hi")  # numbers that may be nan, written as null by strict JSON writers


@dataclass(frozen=True)
class Claim:
    """One tested statement. Build it with a constructor below, which derives `status` from `evidence`; a status
    that contradicts its evidence is refused here, JSON read back included."""

    statement: str  # a short plain sentence, e.g. "KVSharer keeps perplexity within 10% at C = 8"
    status: str  # one of STATUSES
    evidence: dict = field(default_factory=dict)  # the numbers the status was read from
    test: str = ""  # the test that read them, e.g. "paired z, 95%"
    paper: str = ""  # what the paper says, quoted or summarised
    link: str = ""  # where the evidence is shown (a figure, a summary)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status is one of {STATUSES}, not {self.status!r}")
        implied = status_from(self.evidence)
        if implied is not None and implied != self.status:
            raise ValueError(f"{self.statement!r}: status {self.status!r}, but its evidence implies {implied!r}")

    @classmethod
    def from_interval(
        cls,
        statement: str,
        estimate: float,
        lo: float,
        hi: float,
        *,
        threshold: float,
        holds_if: str = "above",
        n: int | None = None,
        test: str = "95% interval",
        paper: str = "",
        link: str = "",
        **extra,
    ) -> Claim:
        """An estimate with its 95% interval against `threshold` (see `interval_status`); `extra` numbers are kept
        in the evidence beside estimate, lo, hi, n, threshold and holds_if."""
        evidence = {"estimate": estimate, "lo": lo, "hi": hi, "n": n, "threshold": threshold, "holds_if": holds_if}
        evidence = {k: _plain(v) for k, v in {**evidence, **extra}.items()}
        return cls(statement, interval_status(lo, hi, threshold, holds_if), evidence, test, paper, link)

    @classmethod
    def from_z(
        cls,
        statement: str,
        diff: float,
        se: float,
        *,
        holds_if: str = "below",
        n: int | None = None,
        test: str = "paired z, 95%",
        paper: str = "",
        link: str = "",
        **extra,
    ) -> Claim:
        """A paired difference (e.g. NLL a - b) claimed clearly below 0 (holds_if "below"), clearly above ("above")
        or not clearly different ("contains"), read by `z_status`; the evidence keeps its 95% interval too."""
        z = z_score(diff, se)
        lo, hi = interval95(diff, se) if se > 0 else (float("nan"), float("nan"))
        evidence = {"estimate": diff, "se": se, "z": z, "lo": lo, "hi": hi, "n": n, "holds_if": holds_if}
        evidence = {k: _plain(v) for k, v in {**evidence, **extra}.items()}
        return cls(statement, z_status(z, holds_if), evidence, test, paper, link)

    @classmethod
    def from_counts(
        cls,
        statement: str,
        wins: int,
        losses: int,
        ties: int = 0,
        *,
        test: str = "sign test, two-sided, 95%",
        paper: str = "",
        link: str = "",
        **extra,
    ) -> Claim:
        """Wins and losses over paired units (sets, seeds, tasks; ties not counted), read by `counts_status`."""
        wins, losses, ties = int(wins), int(losses), int(ties)
        p = sign_test_p(wins, losses)
        evidence = {"wins": wins, "losses": losses, "ties": ties, "n": wins + losses + ties, "p": p}
        evidence.update({k: _plain(v) for k, v in extra.items()})
        return cls(statement, counts_status(wins, losses), evidence, test, paper, link)

    @classmethod
    def not_tested(cls, statement: str, reason: str, *, paper: str = "", link: str = "") -> Claim:
        return cls(statement, "not tested", {"reason": reason}, "", paper, link)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Claim:
        """The inverse of `to_dict`, also for JSON whose writer turned nan into null."""
        evidence = {k: float("nan") if v is None and k in NAN_KEYS else v for k, v in d["evidence"].items()}
        return cls(d["statement"], d["status"], evidence, d.get("test", ""), d.get("paper", ""), d.get("link", ""))

    def measured(self) -> str:
        """The evidence as one number with its interval (or the counts): the findings table's "we measured"."""
        e = self.evidence
        if self.status == "not tested":
            return "not tested" + (f" ({e['reason']})" if e.get("reason") else "")
        if "wins" in e:
            return f"{e['wins']} wins, {e['losses']} losses of {e['n']} (sign test p = {_num(e['p'])})"
        n = f", n = {e['n']}" if e.get("n") is not None else ""
        return f"{_num(e.get('estimate'))} (95% interval {_num(e.get('lo'))} to {_num(e.get('hi'))}{n})"

    def render(self) -> str:
        """One plain sentence: the statement, the status its evidence implies, and that evidence in brief, e.g.
        'Best-first beats random at C = 8: holds (estimate 1.39, 95% interval 1.31 to 1.47, n = 500).'"""
        e = self.evidence
        if self.status == "not tested":
            return f"{self.statement}: not tested" + (f" ({e['reason']})." if e.get("reason") else ".")
        if "wins" in e:
            detail = f"{e['wins']} wins and {e['losses']} losses of {e['n']}, sign test p = {_num(e['p'])}"
        else:
            detail = f"estimate {_num(e.get('estimate'))}, 95% interval {_num(e.get('lo'))} to {_num(e.get('hi'))}"
            detail += f", n = {e['n']}" if e.get("n") is not None else ""
        return f"{self.statement}: {self.status} ({detail})."


def _num(x) -> str:
    """Three significant digits, plain (no exponent for the sizes these tables hold); 'n/a' for nan or None."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _cell(text: str) -> str:
    """A table cell: pipes escaped, line breaks flattened, empty shown as a dash."""
    return " ".join(str(text).replace("|", "\\|").split()) or "–"


def render_table(claims: list[Claim], columns: tuple[str, ...] = COLUMNS) -> str:
    """The findings table in Markdown, one row per claim. The columns are fixed (a subset of COLUMNS, in their
    order) so that data never lands in another column: claim | paper says | we measured | verdict | link."""
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"columns are among {COLUMNS}, not {unknown}")
    if list(columns) != sorted(columns, key=COLUMNS.index):
        raise ValueError(f"columns keep the order of {COLUMNS}")
    values = {
        "claim": lambda c: c.statement,
        "paper says": lambda c: c.paper,
        "we measured": Claim.measured,
        "verdict": lambda c: c.status,
        "link": lambda c: c.link,
    }
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(values[col](c)) for col in columns) + " |" for c in claims]
    return "\n".join(lines)
