"""Online suite: the paper's benchmark categories mapped onto lm-evaluation-harness's own tasks.

The paper (KVSharer) reports OpenCompass scores grouped as reasoning, language, knowledge,
examination and understanding, with Chinese benchmarks for Chinese models. lm-eval 0.4 has no
CMNLI, CHID, C3 or XSum task, so those are mapped to the nearest task that exists; the mapping is
in docs/evaluation.md. These tasks download their data from the Hugging Face hub on first use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LMEvalTask:
    """A task (or group, e.g. mmlu) registered in lm-eval itself."""

    name: str
    category: str
    metric: str = "acc"  # headline metric
    chance: float | None = None  # uniform-guess accuracy
    paper: str = ""  # the paper's benchmark this stands for
    language: str = "en"
    num_fewshot: int | None = None  # None: the task's own default (zero-shot for all of these)
    kind: str = "lm_eval"


ONLINE_TASKS = [
    LMEvalTask("piqa", "reasoning", "acc_norm", 0.5, "PIQA"),
    LMEvalTask("hellaswag", "reasoning", "acc_norm", 0.25, "HellaSwag"),
    LMEvalTask("wsc273", "language", "acc", 0.5, "WSC"),
    LMEvalTask("winogrande", "language", "acc", 0.5, "WSC (larger Winograd set)"),
    LMEvalTask("commonsense_qa", "knowledge", "acc", 0.2, "CommonSenseQA"),
    LMEvalTask("boolq", "knowledge", "acc", 0.5, "BoolQ"),
    LMEvalTask("mmlu", "examination", "acc", 0.25, "MMLU"),
    LMEvalTask("race", "understanding", "acc", 0.25, "RACE-high / RACE-middle"),
    LMEvalTask("arc_easy", "reasoning", "acc_norm", 0.25, "(extra) ARC-Easy"),
    # Chinese benchmarks, for Chinese models (Qwen)
    LMEvalTask("cmmlu", "examination", "acc", 0.25, "CMMLU", "zh"),
    LMEvalTask("ceval-valid", "examination", "acc", 0.25, "C-Eval", "zh"),
    LMEvalTask("xnli_zh", "reasoning", "acc", 1 / 3, "CMNLI (nearest: XNLI zh)", "zh"),
    LMEvalTask("xwinograd_zh", "language", "acc", 0.5, "CLUEWSC (nearest: XWinograd zh)", "zh"),
    LMEvalTask("xcopa_zh", "reasoning", "acc", 0.5, "(extra) XCOPA zh", "zh"),
]

# the default online run: the English core of the paper's table (Chinese tasks by name with --tasks)
ONLINE_DEFAULT = ["piqa", "hellaswag", "wsc273", "commonsense_qa", "boolq", "mmlu", "race"]
