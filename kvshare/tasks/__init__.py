"""Task definitions of the evaluation suites (used by `kvshare.evaluation`).

offline: BIG-bench multiple-choice tasks, XSum and perplexity on local files (no network);
online:  lm-eval's own tasks (PIQA, HellaSwag, WSC, CommonSenseQA, BoolQ, MMLU, RACE, ...).
"""

from __future__ import annotations

from .offline import MCTask, PerplexityTask, SummarizationTask
from .online import ONLINE_DEFAULT, ONLINE_TASKS, LMEvalTask

# The offline suite. Each multiple-choice task was kept because the default model (SmolLM2-135M)
# scores measurably above chance on it with this prompt (docs/evaluation.md lists the screen).
OFFLINE_TASKS = [
    MCTask("goal_step_wikihow/step_inference", "reasoning", prompt="raw", limit=48),
    MCTask("similarities_abstraction", "reasoning", prompt="native", metric="acc_norm", limit=30),
    MCTask("phrase_relatedness", "language", prompt="qa", metric="acc_norm", limit=None),
    MCTask("general_knowledge", "knowledge", prompt="qa", limit=None),
    MCTask("human_organs_senses", "knowledge", prompt="qa", limit=None),
    MCTask("metaphor_understanding/lit2met", "understanding", prompt="qa", limit=32),
    SummarizationTask(limit=20),
    PerplexityTask(limit=6),
]
OFFLINE_DEFAULT = [t.name for t in OFFLINE_TASKS]


def suite_tasks(suite: str) -> dict:
    """{task name: spec} of a suite."""
    if suite == "offline":
        return {t.name: t for t in OFFLINE_TASKS}
    if suite == "online":
        return {t.name: t for t in ONLINE_TASKS}
    raise ValueError(f"unknown suite {suite!r}; use offline or online")


def default_tasks(suite: str) -> list[str]:
    return list(OFFLINE_DEFAULT if suite == "offline" else ONLINE_DEFAULT)


__all__ = [
    "LMEvalTask",
    "MCTask",
    "OFFLINE_DEFAULT",
    "OFFLINE_TASKS",
    "ONLINE_DEFAULT",
    "ONLINE_TASKS",
    "PerplexityTask",
    "SummarizationTask",
    "default_tasks",
    "suite_tasks",
]
