"""Task definitions of the evaluation suites (used by `kvshare.evaluation`).

offline: BIG-bench multiple-choice tasks, XSum and perplexity on local files (no network);
online:  lm-eval's own tasks (PIQA, HellaSwag, WSC, CommonSenseQA, BoolQ, MMLU, RACE, ...).
"""

from __future__ import annotations

from .offline import MCTask, PerplexityTask, SummarizationTask
from .online import ONLINE_DEFAULT, ONLINE_TASKS, LMEvalTask

# The default model's offline suite. Each multiple-choice task was kept because the default model (SmolLM2-135M)
# scores measurably above chance on it with this prompt (docs/evaluation.md lists the screen). The screen
# sees only each task's `screen` part and the suite evaluates only its disjoint `test` part
# (kvshare.tasks.offline: SCREEN_FRACTION, example_id), so choosing the suite does not bias its scores.
# Another model's suite is what the same keep rule keeps on that model's own screen (kvshare.tasks.screening:
# `offline_tasks(model)`); a model never screened gets this one, with a warning.
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

# each candidate's category among the paper's (reasoning, language, knowledge, understanding): the kept tasks' as in
# OFFLINE_TASKS; the keep rule spreads a suite over them (kvshare.tasks.screening.MAX_PER_CATEGORY)
SCREEN_CATEGORIES = {
    "unit_conversion/unit_identification": "reasoning",
    "metaphor_understanding/lit2met": "understanding",
    "similarities_abstraction": "reasoning",
    "movie_recommendation": "knowledge",
    "general_knowledge": "knowledge",
    "phrase_relatedness": "language",
    "metaphor_understanding/met2lit": "understanding",
    "goal_step_wikihow/step_inference": "reasoning",
    "conceptual_combinations/emergent_properties": "language",
    "emoji_movie": "understanding",
    "human_organs_senses": "knowledge",
    "social_iqa": "reasoning",
    "riddle_sense": "reasoning",
    "logical_sequence": "reasoning",
    "hindu_knowledge": "knowledge",
    "odd_one_out": "language",
    "goal_step_wikihow/goal_inference": "reasoning",
    "known_unknowns": "knowledge",
    "date_understanding": "reasoning",
    "cause_and_effect/one_sentence": "reasoning",
    "identify_odd_metaphor": "understanding",
    "crass_ai": "reasoning",
    "simple_ethical_questions": "understanding",
    "common_morpheme": "language",
    "english_proverbs": "understanding",
}


def screen_tasks(which: str = "all", limit: int | None = SCREEN_LIMIT, model: str | None = None) -> list[MCTask]:
    """The screen's candidates as tasks on their `screen` part: `which="all"` (every candidate of SCREEN; their
    BIG-bench data comes with one download of the sdist) or `"kept"` (the suite's own tasks and prompts: `model`'s
    suite, `offline_tasks`)."""
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
    "SummarizationTask",
    "default_tasks",
    "offline_tasks",
    "screen_tasks",
    "suite_tasks",
]
