"""Task definitions of the evaluation suites (used by `kvshare.evaluation`).

offline: BIG-bench multiple-choice tasks, XSum and perplexity on local files (no network);
online:  lm-eval's own tasks (PIQA, HellaSwag, WSC, CommonSenseQA, BoolQ, MMLU, RACE, ...).
"""

from __future__ import annotations

from .offline import MCTask, PerplexityTask, SummarizationTask
from .online import ONLINE_DEFAULT, ONLINE_TASKS, LMEvalTask

# The offline suite. Each multiple-choice task was kept because the default model (SmolLM2-135M)
# scores measurably above chance on it with this prompt (docs/evaluation.md lists the screen). The screen
# sees only each task's `screen` part and the suite evaluates only its disjoint `test` part
# (kvshare.tasks.offline: SCREEN_FRACTION, example_id), so choosing the suite does not bias its scores.
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

# The screen that chose the multiple-choice tasks, prompts and metrics: (BIG-bench task, the prompt it was
# screened with), in the order of docs/evaluation.md. `screen_tasks` gives them as tasks on their screen part.
SCREEN = [
    ("unit_conversion/unit_identification", "raw"),
    ("metaphor_understanding/lit2met", "qa"),
    ("similarities_abstraction", "native"),
    ("movie_recommendation", "native"),
    ("general_knowledge", "qa"),
    ("phrase_relatedness", "qa"),
    ("metaphor_understanding/met2lit", "qa"),
    ("goal_step_wikihow/step_inference", "raw"),
    ("conceptual_combinations/emergent_properties", "native"),
    ("emoji_movie", "qa"),
    ("human_organs_senses", "qa"),
    ("social_iqa", "qa"),
    ("riddle_sense", "qa"),
    ("logical_sequence", "qa"),
    ("hindu_knowledge", "qa"),
    ("odd_one_out", "qa"),
    ("goal_step_wikihow/goal_inference", "raw"),
    ("known_unknowns", "qa"),
    ("date_understanding", "qa"),
    ("cause_and_effect/one_sentence", "raw"),
    ("identify_odd_metaphor", "qa"),
    ("crass_ai", "qa"),
    ("simple_ethical_questions", "qa"),
    ("common_morpheme", "qa"),
    ("english_proverbs", "qa"),
]
SCREEN_LIMIT = 40  # screen examples scored per candidate (the first of its screen part)


def screen_tasks(which: str = "all", limit: int | None = SCREEN_LIMIT) -> list[MCTask]:
    """The screen's candidates as tasks on their `screen` part: `which="all"` (every candidate of SCREEN; their
    BIG-bench data comes with one download of the sdist) or `"kept"` (the suite's own tasks and prompts)."""
    if which == "kept":
        pairs = [(t.source, t.prompt) for t in OFFLINE_TASKS if t.kind == "multiple_choice"]
    elif which == "all":
        pairs = SCREEN
    else:
        raise ValueError(f"unknown screen {which!r}; use all or kept")
    return [MCTask(source, "screen", prompt=prompt, limit=limit, split="screen") for source, prompt in pairs]


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
    "SCREEN",
    "SCREEN_LIMIT",
    "SummarizationTask",
    "default_tasks",
    "screen_tasks",
    "suite_tasks",
]
