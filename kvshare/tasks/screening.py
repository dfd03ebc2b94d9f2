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
(`python -m kvshare screen --model NAME`, or notebook 03 run for a model without one: `choose_suite`), written to
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

from . import suite  # the suite's names are read as `suite.NAME` when used (a test swaps in its own candidates)
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
    """The keep rule (module docstring) on a screen's rows (`screen`), the request tokens per example of each
    candidate (`costs`: {source: tokens}) and their categories: one entry per candidate, in decreasing z, with
    `kept` and the `reason` it was not kept (None when kept)."""
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
    return [
        MCTask(e["source"], e["category"], prompt=e["prompt"], metric=e["metric"], limit=suite.EVAL_LIMIT)
        for e in decisions
        if e["kept"]
    ]


def suite_from_screen(record: dict) -> list:
    """The offline suite a screen file gives: its kept multiple-choice tasks (rebuilt by `decide` from the measured
    rows and costs), then perplexity as in the default suite."""
    unknown = sorted({r["source"] for r in record["rows"]} - set(suite.SCREEN_CATEGORIES))
    if unknown:
        raise ValueError(
            f"the screen of {record.get('model')} scored tasks that are no longer candidates ({', '.join(unknown)}): "
            f"rerun it with `python -m kvshare screen --model {record.get('model')}`"
        )
    decisions = decide(record["rows"], record["request_tokens"], suite.SCREEN_CATEGORIES)
    recorded = record.get("kept")
    now = [e["source"] for e in decisions if e["kept"]]
    if recorded is not None and recorded != now:
        raise ValueError(
            f"the screen of {record.get('model')} kept {recorded} when it was run, the rule now keeps {now}: "
            "rerun the screen (python -m kvshare screen --model ...)"
        )
    return kept_tasks(decisions) + [t for t in suite.OFFLINE_TASKS if t.kind != "multiple_choice"]


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

    if model is None or model == DEFAULT_MODEL:
        where = {"model": model or DEFAULT_MODEL, "source": "default", "screened_on": DEFAULT_MODEL}
        return list(suite.OFFLINE_TASKS), where
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
    return list(suite.OFFLINE_TASKS), {"model": model, "source": "default", "screened_on": DEFAULT_MODEL}


def screen_record(model: str, rows: list[dict], costs: dict[str, float], chat_template: bool, **extra) -> dict:
    """The screen file's contents: every measured number, the rule, the decision per candidate and the kept list."""
    from .offline import SCREEN_FRACTION, SPLIT_RULE

    decisions = decide(rows, costs, suite.SCREEN_CATEGORIES)
    return {
        "format": FORMAT,
        "model": model,
        "what": "the offline suite's screen: every candidate of kvshare.tasks.SCREEN scored zero-shot on its screen "
        "part (disjoint from the evaluated test part), and which the keep rule keeps (kvshare.tasks.screening)",
        "chat_template": chat_template,
        "screen_limit": suite.SCREEN_LIMIT,
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


# ------------------------------------------------------------------------------------------------
# the screen itself: the candidates scored on a model (`python -m kvshare screen`, notebook 03)
# ------------------------------------------------------------------------------------------------
def screen_tasks(which: str = "all", limit: int | None = suite.SCREEN_LIMIT, model: str | None = None) -> list[MCTask]:
    """The screen's candidates as tasks on their `screen` part: `which="all"` (every candidate of SCREEN) or
    `"kept"` (the suite's own tasks and prompts: `model`'s suite, `suite_for`)."""
    if which == "kept":
        pairs = [(t.source, t.prompt) for t in suite_for(model, warn=False)[0] if t.kind == "multiple_choice"]
    elif which == "all":
        pairs = suite.SCREEN
    else:
        raise ValueError(f"unknown screen {which!r}; use all or kept")
    return [MCTask(source, "screen", prompt=prompt, limit=limit, split="screen") for source, prompt in pairs]


def screen(evaluator, which: str = "kept", limit: int | None = None) -> list[dict]:
    """Rerun the screen on the screen part only (the full model; `evaluator`: a `kvshare.evaluation.Evaluator`):
    per candidate (task, prompt) and metric (acc, acc_norm), the score, chance, n and z = (score − chance) / stderr;
    `chosen` marks each candidate's metric of larger z. `which`: "kept" (the evaluated model's suite; data already
    local) or "all" (every candidate of kvshare.tasks.SCREEN; all read from data/tasks). `limit`: screen examples per
    candidate (None: kvshare.tasks.SCREEN_LIMIT). Multiple-choice requests never use a chat template."""
    from ..models import model_name

    specs = screen_tasks(which, suite.SCREEN_LIMIT if limit is None else limit, model=model_name(evaluator.model))
    result = evaluator.evaluate(None, suite="offline", tasks=specs, label="screen")
    out = []
    for spec in specs:
        mine = [r for r in result["rows"] if r["task"] == spec.name and r["metric"] in ("acc", "acc_norm")]
        for r in mine:
            se = r.get("stderr")
            z = (r["value"] - r["chance"]) / se if se and r.get("chance") is not None else None
            out.append(
                {
                    "source": spec.source,
                    "prompt": spec.prompt,
                    "metric": r["metric"],
                    "value": r["value"],
                    "stderr": se,
                    "chance": r.get("chance"),
                    "n": r["n"],
                    "z": z,
                }
            )
    for spec in specs:
        mine = [x for x in out if x["source"] == spec.source and x["prompt"] == spec.prompt]
        best = max(mine, key=lambda x: -math.inf if x["z"] is None else x["z"], default=None)
        for x in mine:
            x["chosen"] = x is best
    return out


def choose_suite(evaluator, out=None, limit: int | None = None, progress: bool = True) -> dict:
    """Screen every candidate (`screen(evaluator, "all")`) for the evaluator's model, measure what each costs in
    its tokenizer and apply the keep rule; write the screen file to `out` (None: the model's place in this
    checkout, `screen_path`) and return its record. `kvshare.tasks.offline_tasks` (and so notebook 03 and
    `kvshare eval`) read the suite back from that file. `limit`: screen examples per candidate (None:
    SCREEN_LIMIT; anything else is a smoke run, flagged in the record)."""
    import time

    from ..io import environment_info, write_json
    from ..models import model_name

    name = model_name(evaluator.model)
    n = suite.SCREEN_LIMIT if limit is None else limit
    if n != suite.SCREEN_LIMIT and out is None:
        raise ValueError(
            f"a screen of {n} examples per candidate is a smoke run: give it its own out=..., not the "
            f"model's screen file (that one screens {suite.SCREEN_LIMIT})"
        )
    t0 = time.perf_counter()
    rows = screen(evaluator, "all", n)
    seconds = time.perf_counter() - t0
    costs = {spec.source: round(request_tokens(spec, evaluator.tokenizer, n), 2) for spec in screen_tasks("all", n)}
    record = screen_record(
        name,
        rows,
        costs,
        chat_template=False,  # multiple-choice requests never go through a chat template
        examples_per_candidate=n,
        smoke=n != suite.SCREEN_LIMIT,
        seconds=round(seconds, 1),
        environment=environment_info(),
    )
    path = Path(out) if out is not None else screen_path(name)
    if path is None:
        raise ValueError("not inside a kvshare checkout: say where the screen file goes (out=...)")
    write_json(path, record)
    record["path"] = str(path)
    if progress:
        print(decisions_table(record["decisions"]))
        print(f"kept: {', '.join(record['kept']) or 'none'}; screen {seconds:.0f} s; wrote {path}")
    return record
