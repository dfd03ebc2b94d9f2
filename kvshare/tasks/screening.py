"""Which multiple-choice tasks a model's offline suite keeps: the screen's keep rule, per model.

Every candidate of `kvshare.tasks.SCREEN` (the standard tasks of data/tasks) is screened on the model, and `decide`
keeps the candidates that pass one rule, the same for every model:

1. each candidate is scored zero-shot, without a chat template, on the first `SCREEN_LIMIT` examples of its
   `screen` part (disjoint from the `test` part that is evaluated: `kvshare.tasks.offline`); its metric is the one
   of larger z = (score - chance) / stderr (acc or acc_norm);
2. candidates are taken in decreasing z; one is kept unless, in this order: it is excluded for its content
   (`EXCLUDED`), it is saturated (score >= `SATURATED`), its z is below `Z_KEEP` (not clearly above chance), an
   example costs more than `MAX_REQUEST_TOKENS` tokens in the model's tokenizer (the context once per choice plus
   the choice: what lm-eval scores), its mirror is already kept (`MIRRORS`), its category already has
   `MAX_PER_CATEGORY` tasks, or the suite already has `MAX_TASKS`;
3. a kept task evaluates `kvshare.tasks.EVAL_LIMIT` questions of its test part (all of them where it has fewer).

The default model's suite (`kvshare.tasks.OFFLINE_TASKS`) is what the rule keeps on the default model's committed
screen (figures/03_evaluation_screen.json; a test checks it). A model's screen is one command
(`python -m kvshare screen --model NAME`, or notebook 03 run for a model without one), written to
`<checkout>/figures/<model folder>/03_evaluation_screen.json` with every measured number; the suite is rebuilt from
those numbers by `decide` whenever it is needed, never typed in (`suite_for`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

from .offline import MCTask, mc_rows

SCREEN_FILE = "03_evaluation_screen.json"
FORMAT = 1  # of the screen file

# the rule (see the module docstring)
Z_KEEP = 2.0  # clearly above chance: two standard errors
SATURATED = 0.95  # a score at the ceiling cannot show what sharing costs
MAX_REQUEST_TOKENS = 600  # tokens lm-eval scores per question (context once per choice): the time budget of a suite
MAX_PER_CATEGORY = 2  # spread over the paper's categories
MAX_TASKS = 6  # the size of the suite's multiple-choice part (its evaluation time budget)
EXCLUDED: dict[str, str] = {}  # a task excluded for its content: {task: why}
MIRRORS: dict[str, str] = {}  # a task and its mirror image: at most one of them is kept (the one of larger z)
RULE = {
    "z_keep": Z_KEEP,
    "saturated": SATURATED,
    "max_request_tokens": MAX_REQUEST_TOKENS,
    "max_per_category": MAX_PER_CATEGORY,
    "max_tasks": MAX_TASKS,
    "excluded": EXCLUDED,
    "mirrors": MIRRORS,
    "text": (
        "candidates in decreasing z (metric of larger z per candidate, zero-shot, no chat template, on the screen "
        "part only); kept unless excluded for content, saturated (score >= {saturated}), z < {z_keep}, over "
        "{max_request_tokens} request tokens per example, the mirror of a kept task, its category already holding "
        "{max_per_category}, or the suite already holding {max_tasks}"
    ).format(
        saturated=SATURATED,
        z_keep=Z_KEEP,
        max_request_tokens=MAX_REQUEST_TOKENS,
        max_per_category=MAX_PER_CATEGORY,
        max_tasks=MAX_TASKS,
    ),
}


# ------------------------------------------------------------------------------------------------
# cost and the decision
# ------------------------------------------------------------------------------------------------
def request_tokens(spec: MCTask, tokenizer, limit: int | None = None) -> float:
    """Mean tokens lm-eval scores per example of `spec`'s evaluated part (its first `limit`): for every choice,
    the prompt (with the task's description) and the choice after a space, in `tokenizer`."""
    rows = mc_rows(spec)[1]
    rows = rows if limit is None else rows[:limit]
    if not rows:
        return 0.0
    total = 0
    for r in rows:
        context = len(tokenizer(r["query"])["input_ids"])
        total += sum(context + len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in r["choices"])
    return total / len(rows)


def _z(row: dict) -> float:
    z = row.get("z")
    return -math.inf if z is None or (isinstance(z, float) and math.isnan(z)) else float(z)


def candidates(rows: list[dict]) -> list[dict]:
    """One entry per screened (task, prompt): its chosen metric's row (the metric of larger z) and every metric's
    score, in the screen's order."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["source"], r["prompt"])
        entry = out.setdefault(key, {"source": r["source"], "prompt": r["prompt"], "scores": {}})
        entry["scores"][r["metric"]] = {k: r.get(k) for k in ("value", "stderr", "z")}
        best = entry.get("metric")
        if best is None or _z(r) > _z(entry) or (r.get("chosen") and _z(r) == _z(entry)):
            entry.update(metric=r["metric"], value=r["value"], stderr=r.get("stderr"), chance=r.get("chance"))
            entry.update(n=r.get("n"), z=r.get("z"))
    return list(out.values())


def decide(rows: list[dict], costs: dict[str, float], categories: dict[str, str]) -> list[dict]:
    """The keep rule (module docstring) on a screen's rows (`kvshare.experiments.evaluation.screen`), the request
    tokens per example of each candidate (`costs`: {source: tokens}) and their categories: one entry per candidate,
    in decreasing z, with `kept` and the `reason` it was not kept (None when kept)."""
    entries = sorted(candidates(rows), key=lambda e: -_z(e))
    kept: list[dict] = []
    per_category: Counter = Counter()
    for e in entries:
        src = e["source"]
        e["category"] = categories.get(src, "other")
        e["request_tokens"] = costs.get(src)
        z = _z(e)
        if src in EXCLUDED:
            reason = f"excluded: {EXCLUDED[src]}"
        elif e["value"] is not None and e["value"] >= SATURATED:
            reason = f"saturated ({e['metric']} {e['value']:.3f} >= {SATURATED})"
        elif z < Z_KEEP:
            reason = f"not clearly above chance (z {z:.2f} < {Z_KEEP})" if z > -math.inf else "no z (zero stderr)"
        elif e["request_tokens"] is None:
            reason = "its cost was not measured"
        elif e["request_tokens"] > MAX_REQUEST_TOKENS:
            reason = f"{e['request_tokens']:.0f} request tokens per example > {MAX_REQUEST_TOKENS} (time budget)"
        elif MIRRORS.get(src) in {k["source"] for k in kept}:
            reason = f"the mirror of the kept {MIRRORS[src]}"
        elif per_category[e["category"]] >= MAX_PER_CATEGORY:
            reason = f"{e['category']} already has {MAX_PER_CATEGORY} tasks (spread over the categories)"
        elif len(kept) >= MAX_TASKS:
            reason = f"the suite already has {MAX_TASKS} multiple-choice tasks (time budget)"
        else:
            reason = None
        e["kept"] = reason is None
        e["reason"] = reason
        if reason is None:
            kept.append(e)
            per_category[e["category"]] += 1
    return entries


def kept_tasks(decisions: list[dict]) -> list[MCTask]:
    """The kept candidates as the suite's MCTasks (test part): the screen's prompt and chosen metric, EVAL_LIMIT
    questions each."""
    from . import EVAL_LIMIT

    return [
        MCTask(e["source"], e["category"], prompt=e["prompt"], metric=e["metric"], limit=EVAL_LIMIT)
        for e in decisions
        if e["kept"]
    ]


def suite_from_screen(record: dict) -> list:
    """The offline suite a screen file gives: its kept multiple-choice tasks (rebuilt by `decide` from the measured
    rows and costs), then perplexity as in the default suite."""
    from . import OFFLINE_TASKS, SCREEN_CATEGORIES

    unknown = sorted({r["source"] for r in record["rows"]} - set(SCREEN_CATEGORIES))
    if unknown:
        raise ValueError(
            f"the screen of {record.get('model')} scored tasks that are no longer candidates ({', '.join(unknown)}): "
            f"rerun it with `python -m kvshare screen --model {record.get('model')}`"
        )
    decisions = decide(record["rows"], record["request_tokens"], SCREEN_CATEGORIES)
    recorded = record.get("kept")
    now = [e["source"] for e in decisions if e["kept"]]
    if recorded is not None and recorded != now:
        raise ValueError(
            f"the screen of {record.get('model')} kept {recorded} when it was run, the rule now keeps {now}: "
            "rerun the screen (python -m kvshare screen --model ...)"
        )
    return kept_tasks(decisions) + [t for t in OFFLINE_TASKS if t.kind != "multiple_choice"]


# ------------------------------------------------------------------------------------------------
# where a model's screen lives
# ------------------------------------------------------------------------------------------------
def model_folder(model: str) -> str:
    """A model's folder under figures/ (as run_all.sh names it): an embedded name as it is, a hub id with '/' as
    '--', a local checkpoint by its folder's name; '' for the default model (figures/ itself)."""
    from ..models import DEFAULT_MODEL

    if model == DEFAULT_MODEL:
        return ""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model.strip("/").replace("/", "--")


def checkout_root() -> Path | None:
    """The kvshare checkout: the one this package sits in (an editable install), else the one around the working
    directory; None outside a checkout."""
    here = Path(__file__).resolve().parents[2]
    if (here / "figures").is_dir() and (here / "pyproject.toml").is_file():
        return here
    for d in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        py = d / "pyproject.toml"
        if py.is_file() and (d / "figures").is_dir() and 'name = "kvshare"' in py.read_text():
            return d
    return None


def screen_path(model: str, root: str | os.PathLike | None = None) -> Path | None:
    """Where `model`'s committed screen is (or goes): <checkout>/figures/<model folder>/03_evaluation_screen.json;
    None outside a checkout (no root given)."""
    base = Path(root) if root is not None else checkout_root()
    if base is None:
        return None
    folder = model_folder(model)
    return base / "figures" / folder / SCREEN_FILE if folder else base / "figures" / SCREEN_FILE


def read_screen(path: str | os.PathLike) -> dict:
    record = json.loads(Path(path).read_text())
    if record.get("format") != FORMAT or "rows" not in record or "request_tokens" not in record:
        raise ValueError(f"{path} is not a kvshare screen file (format {FORMAT})")
    return record


_WARNED: set = set()  # models told once per process that they have no screen of their own


def suite_for(model: str | None, root: str | os.PathLike | None = None, warn: bool = True) -> tuple[list, dict]:
    """(the offline suite's tasks, where they come from) for `model`.

    The default model (or None): its suite, OFFLINE_TASKS (what the rule keeps on its committed screen). Another
    model: the tasks its own committed screen keeps (`suite_from_screen`). A model that has not been screened gets
    the default model's suite, said in the provenance (`source: "default"`) and in a warning: fine for a quick look,
    not for results about that model (notebook 03 screens such a model first in a full run)."""
    from ..models import DEFAULT_MODEL
    from . import OFFLINE_TASKS

    if model is None or model == DEFAULT_MODEL:
        return list(OFFLINE_TASKS), {"model": model or DEFAULT_MODEL, "source": "default", "screened_on": DEFAULT_MODEL}
    base = Path(root) if root is not None else checkout_root()
    path = None if base is None else screen_path(model, base)
    if path is not None and path.is_file():
        record = read_screen(path)
        tasks = suite_from_screen(record)
        where = Path(os.path.relpath(path, base)).as_posix()
        return tasks, {"model": model, "source": "screen", "screened_on": record["model"], "file": where}
    if warn and model not in _WARNED:
        _WARNED.add(model)
        warnings.warn(
            f"{model} has no screen of its own ({path or SCREEN_FILE} is missing): its offline suite is the default "
            f"model's ({DEFAULT_MODEL}'s screen); run `python -m kvshare screen --model {model}` to choose its own",
            stacklevel=2,
        )
    return list(OFFLINE_TASKS), {"model": model, "source": "default", "screened_on": DEFAULT_MODEL}


def screen_record(model: str, rows: list[dict], costs: dict[str, float], chat_template: bool, **extra) -> dict:
    """The screen file's contents: every measured number, the rule, the decision per candidate and the kept list."""
    from . import SCREEN_CATEGORIES, SCREEN_LIMIT
    from .offline import SCREEN_FRACTION, SPLIT_RULE

    decisions = decide(rows, costs, SCREEN_CATEGORIES)
    return {
        "format": FORMAT,
        "model": model,
        "what": "the offline suite's screen: every candidate of kvshare.tasks.SCREEN scored zero-shot on its screen "
        "part (disjoint from the evaluated test part), and which the keep rule keeps (kvshare.tasks.screening)",
        "chat_template": chat_template,
        "screen_limit": SCREEN_LIMIT,
        "split": {"fraction": SCREEN_FRACTION, "rule": SPLIT_RULE},
        "rule": RULE,
        "kept": [e["source"] for e in decisions if e["kept"]],
        "decisions": decisions,
        "rows": rows,
        "request_tokens": costs,
        **extra,
    }


def decisions_table(decisions: list[dict]) -> str:
    """A plain-text table of the decisions (for the command line and the notebook)."""
    head = f"{'task':44} {'prompt':6} {'category':13} {'metric':8} {'score':>6} {'chance':>6} {'n':>3} {'z':>6}"
    lines = [head + f" {'tokens':>6}  decision"]
    for e in decisions:
        z = "" if e["z"] is None else f"{e['z']:.2f}"
        tokens = "" if e.get("request_tokens") is None else f"{e['request_tokens']:.0f}"
        chance = "" if e.get("chance") is None else f"{e['chance']:.3f}"
        lines.append(
            f"{e['source']:44} {e['prompt']:6} {e['category']:13} {e['metric']:8} {e['value']:6.3f} {chance:>6} "
            f"{e['n'] or 0:3d} {z:>6} {tokens:>6}  {'KEPT' if e['kept'] else e['reason']}"
        )
    return "\n".join(lines)
