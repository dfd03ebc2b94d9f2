"""The offline suite's fixed parts: the default model's tasks, the screen's candidates and their categories.

`kvshare.tasks` re-exports every name; `kvshare.tasks.screening` (the keep rule that chooses a model's suite from
its screen) reads them from here.
"""

from __future__ import annotations

from .offline import MCTask, PerplexityTask

EVAL_LIMIT = 500  # test questions evaluated per kept task (all of them where a task has fewer)

# The default model's offline suite: the multiple-choice tasks that the keep rule (kvshare.tasks.screening) keeps on
# the default model's own screen (figures/03_evaluation_screen.json; tests/test_screening.py checks that this list is
# what the rule keeps there). The screen sees only each task's `screen` part and the suite evaluates only its
# disjoint `test` part (kvshare.tasks.offline: SCREEN_FRACTION, example_id), so choosing the suite does not bias its
# scores. Another model's suite is what the same rule keeps on that model's own screen
# (`kvshare.tasks.offline_tasks(model)`); a model never screened gets this one, with a warning.
OFFLINE_TASKS = [
    MCTask("sciq", "examination", metric="acc", limit=EVAL_LIMIT),
    MCTask("arc_easy", "examination", metric="acc", limit=EVAL_LIMIT),
    MCTask("piqa", "reasoning", metric="acc", limit=EVAL_LIMIT),
    MCTask("hellaswag", "reasoning", metric="acc_norm", limit=EVAL_LIMIT),
    PerplexityTask(limit=6),
]
OFFLINE_DEFAULT = [t.name for t in OFFLINE_TASKS]

# The screen's candidates: (task of data/tasks, the prompt it is screened with). `screening.screen_tasks` gives them
# as tasks on their screen part.
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
