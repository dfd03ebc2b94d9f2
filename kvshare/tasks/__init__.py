"""Task definitions of the evaluation suites (used by `kvshare.evaluation`).

offline: standard multiple-choice tasks (data/tasks: ARC, BoolQ, CommonsenseQA, HellaSwag, OpenBookQA, PIQA, SciQ,
         Social IQa) and perplexity on the held-out text, from local files (no network);
online:  lm-eval's own tasks (PIQA, HellaSwag, WSC, CommonSenseQA, BoolQ, MMLU, RACE, ...).
"""

from __future__ import annotations

from .offline import MCTask, PerplexityTask
from .online import ONLINE_DEFAULT, ONLINE_TASKS, LMEvalTask

EVAL_LIMIT = 500  # test questions evaluated per kept task (all of them where a task has fewer)

# The default model's offline suite: the multiple-choice tasks that the keep rule (kvshare.tasks.screening) keeps on
# the default model's own screen (figures/03_evaluation_screen.json; tests/test_screening.py checks that this list is
# what the rule keeps there). The screen sees only each task's `screen` part and the suite evaluates only its
# disjoint `test` part (kvshare.tasks.offline: SCREEN_FRACTION, example_id), so choosing the suite does not bias its
# scores. Another model's suite is what the same rule keeps on that model's own screen (`offline_tasks(model)`);
# a model never screened gets this one, with a warning.
OFFLINE_TASKS = [
    MCTask("sciq", "examination", metric="acc", limit=EVAL_LIMIT),
    MCTask("arc_easy", "examination", metric="acc", limit=EVAL_LIMIT),
    MCTask("piqa", "reasoning", metric="acc", limit=EVAL_LIMIT),
    MCTask("hellaswag", "reasoning", metric="acc_norm", limit=EVAL_LIMIT),
    PerplexityTask(limit=6),
]
OFFLINE_DEFAULT = [t.name for t in OFFLINE_TASKS]

# The screen's candidates: (task of data/tasks, the prompt it is screened with). `screen_tasks` gives them as tasks
# on their screen part.
SCREEN = [
    ("arc_easy", "raw"),
    ("arc_challenge", "raw"),
    ("openbookqa", "raw"),
    ("sciq", "raw"),
    ("hellaswag", "raw"),
    ("piqa", "raw"),
    ("socialiqa", "raw"),
    ("csqa", "raw"),
    ("boolq", "raw"),
]
SCREEN_LIMIT = 100  # screen examples scored per candidate (the first of its screen part)

# each candidate's category, after the KVSharer paper's table (reasoning, language, knowledge, examination,
# understanding; docs/evaluation.md says which of the paper's benchmarks each task stands in for); the keep rule
# spreads a suite over them (kvshare.tasks.screening.MAX_PER_CATEGORY)
SCREEN_CATEGORIES = {
    "arc_easy": "examination",
    "arc_challenge": "examination",
    "openbookqa": "examination",
    "sciq": "examination",
    "hellaswag": "reasoning",
    "piqa": "reasoning",
    "socialiqa": "reasoning",
    "csqa": "knowledge",
    "boolq": "knowledge",
}


def screen_tasks(which: str = "all", limit: int | None = SCREEN_LIMIT, model: str | None = None) -> list[MCTask]:
    """The screen's candidates as tasks on their `screen` part: `which="all"` (every candidate of SCREEN) or
    `"kept"` (the suite's own tasks and prompts: `model`'s suite, `offline_tasks`)."""
    if which == "kept":
        pairs = [(t.source, t.prompt) for t in offline_tasks(model, warn=False) if t.kind == "multiple_choice"]
    elif which == "all":
        pairs = SCREEN
    else:
        raise ValueError(f"unknown screen {which!r}; use all or kept")
    return [MCTask(source, "screen", prompt=prompt, limit=limit, split="screen") for source, prompt in pairs]


def offline_tasks(model: str | None = None, warn: bool = True) -> list:
    """The offline suite of `model` (None: the default model's, OFFLINE_TASKS): see
    `kvshare.tasks.screening.suite_for`, which also says where the suite comes from."""
    from .screening import suite_for

    return suite_for(model, warn=warn)[0]


def suite_tasks(suite: str, model: str | None = None) -> dict:
    """{task name: spec} of a suite (offline: `model`'s suite, then the default suite's other tasks by name)."""
    if suite == "offline":
        return {t.name: t for t in OFFLINE_TASKS} | {t.name: t for t in offline_tasks(model, warn=False)}
    if suite == "online":
        return {t.name: t for t in ONLINE_TASKS}
    raise ValueError(f"unknown suite {suite!r}; use offline or online")


def default_tasks(suite: str, model: str | None = None) -> list[str]:
    """The names of a suite's default tasks (offline: `model`'s suite)."""
    if suite == "offline":
        return [t.name for t in offline_tasks(model)]
    return list(ONLINE_DEFAULT)


__all__ = [
    "EVAL_LIMIT",
    "LMEvalTask",
    "MCTask",
    "OFFLINE_DEFAULT",
    "OFFLINE_TASKS",
    "ONLINE_DEFAULT",
    "ONLINE_TASKS",
    "PerplexityTask",
    "SCREEN",
    "SCREEN_CATEGORIES",
    "SCREEN_LIMIT",
    "default_tasks",
    "offline_tasks",
    "screen_tasks",
    "suite_tasks",
]
