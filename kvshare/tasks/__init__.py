"""Task definitions of the evaluation suites (used by `kvshare.evaluation`).

offline: standard multiple-choice tasks (data/tasks: ARC, BoolQ, CommonsenseQA, HellaSwag, OpenBookQA, PIQA, SciQ,
         Social IQa) and perplexity on the held-out text, from local files (no network);
online:  lm-eval's own tasks (PIQA, HellaSwag, WSC, CommonSenseQA, BoolQ, MMLU, RACE, ...).

The offline suite's fixed parts (the default model's tasks, the screen's candidates) are in `suite`, the keep rule
that chooses another model's suite from its screen in `screening`; their public names are re-exported here.
"""

from __future__ import annotations

from .offline import MCTask, PerplexityTask
from .online import ONLINE_DEFAULT, ONLINE_TASKS, LMEvalTask
from .screening import screen_tasks, suite_for
from .suite import EVAL_LIMIT, OFFLINE_DEFAULT, OFFLINE_TASKS, SCREEN, SCREEN_CATEGORIES, SCREEN_LIMIT


def offline_tasks(model: str | None = None, warn: bool = True) -> list:
    """The offline suite of `model` (None: the default model's, OFFLINE_TASKS): see
    `kvshare.tasks.screening.suite_for`, which also says where the suite comes from."""
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
