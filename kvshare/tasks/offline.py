"""Offline tasks: BIG-bench JSON (from the `bigbench==1.0.0` sdist on PyPI) as lm-eval tasks on local files.

`prepare(specs)` writes, under `<kvshare cache>/lm_eval_tasks/`, one JSONL data folder and one small
YAML per task; the YAML includes this package's `multiple_choice.yaml` or `summarization.yaml`
and points lm-eval's `json` dataset builder at the local files (`dataset_path: json`), so nothing
touches the hub. The folder is then passed to lm-eval's `TaskManager(include_path=...)`.

Multiple choice: examples with exactly one best answer (highest target score, > 0) are kept, shuffled
once with a fixed seed; the first `FEWSHOT_POOL` form the few-shot pool (`train`), never evaluated. The
rest are split once more, by a hash of each example's content (`example_id`), into `screen` (the share
`SCREEN_FRACTION`: the examples on which tasks, prompts and metrics are chosen, `kvshare.tasks.SCREEN`)
and `test` (everything else: the examples that are evaluated), so no evaluated example took part in
choosing the suite. `MCTask(split="screen")` evaluates the screen part instead (its own task name).
Chance is the expected accuracy of a uniform guess over each example's choices.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import SPLIT_SEED, bigbench_task, ensure_bigbench_tasks, eval_articles
from ..io import atomic_write_text
from ..pypi_files import kvshare_home

HERE = Path(__file__).resolve().parent
FEWSHOT_POOL = 5
PREFIX = "kvshare_"  # lm-eval task names of the offline suite; avoids clashes with lm-eval's own `bigbench_*`
FORMAT_VERSION = 2  # bump when the data or prompt construction changes (part of the results cache key)
# 2: the screen / test split (multiple choice evaluates only `test`)
# 2: a base model's XSum prompt ends "\nSummary:" (was "\n\nOne-sentence summary of the article:", after which
# Gemma-3-270M starts with a blank line, so the "\n" stop left every summary empty); part of the results cache key of
# XSum without a chat template only, so instruct models' cached results stand
PLAIN_SUMMARY_VERSION = 2
SCREEN_FRACTION = 0.3  # share of a multiple-choice task's examples (after the few-shot pool) in its screen part
SPLITS = ("test", "screen")
SPLIT_RULE = (
    "example_id = first 12 hex digits of sha256 over the JSON of [task source, input, choices]; an example is in the "
    "screen part when int(example_id, 16) / 16**12 < SCREEN_FRACTION, else in the test part (the few-shot pool, the "
    "first FEWSHOT_POOL examples after the seed-1234 shuffle, is in neither)"
)


@dataclass(frozen=True)
class MCTask:
    """A BIG-bench multiple-choice task evaluated through lm-eval."""

    source: str  # BIG-bench task (sub)folder ("social_iqa", "goal_step_wikihow/goal_inference") or a task.json path
    category: str  # reasoning, language, knowledge or understanding (the paper's categories)
    prompt: str = "qa"  # see PROMPTS
    num_fewshot: int = 0
    metric: str = "acc"  # the headline metric of the table: acc or acc_norm
    limit: int | None = None  # examples evaluated by default (None: all)
    kind: str = "multiple_choice"
    split: str = "test"  # the part evaluated: "test" (held out from the screen) or "screen" (choosing the suite)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"MCTask split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    @property
    def name(self) -> str:
        if self.source.endswith(".json"):  # a local file in BIG-bench's format
            path = Path(self.source)
            stem = path.parent.name if path.name == "task.json" else path.stem
            base = PREFIX + stem
        else:
            base = PREFIX + self.source.replace("/", "_")
        return base + ("_screen" if self.split == "screen" else "")


@dataclass(frozen=True)
class SummarizationTask:
    """XSum-style one-sentence summaries of held-out BBC articles (BIG-bench gem/xsum), ROUGE."""

    name: str = PREFIX + "xsum"
    category: str = "understanding"
    max_words: int = 120  # articles are cut to their first `max_words` words (whole sentences kept when possible)
    metric: str = "rougeL"
    limit: int | None = None  # articles evaluated by default (None: all 701)
    chat: bool = True  # wrap the request in the model's chat template when it has one (instruct models)
    num_fewshot: int = 0
    kind: str = "summarization"


@dataclass(frozen=True)
class PerplexityTask:
    """Perplexity on the held-out BBC text (disjoint from calibration), through `kvshare.perplexity`."""

    name: str = PREFIX + "ppl"
    category: str = "language modeling"
    window: int = 512
    metric: str = "ppl"
    limit: int | None = 8  # windows of `window` tokens scored (None: the whole held-out text)
    num_fewshot: int = 0
    kind: str = "perplexity"
    context: int | None = None  # scored by decoding: tokens prefilled per window (None: half the window)


def prompt_qa(task: dict, text: str) -> str:
    return f"Question: {text.strip()}\nAnswer:"


def prompt_native(task: dict, text: str) -> str:
    """BIG-bench's own example framing (its input and output prefixes; "Q: " / "A: " by default)."""
    q = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    a = task.get("example_output_prefix", "\nA: ").rstrip(" ")
    return f"{q}{text.strip()}{a}".rstrip()


def prompt_raw(task: dict, text: str) -> str:
    """The input as is, the choice continues it (sentence-completion tasks)."""
    return text.strip()


PROMPTS = {"qa": prompt_qa, "native": prompt_native, "raw": prompt_raw}


def tasks_dir() -> Path:
    return kvshare_home() / "lm_eval_tasks"


def single_answer_examples(task: dict) -> list[dict]:
    out = []
    for e in task["examples"]:
        scores = e.get("target_scores")
        if not scores:
            continue
        best = max(scores.values())
        if best <= 0 or sum(1 for v in scores.values() if v == best) != 1:
            continue
        choices = [c.strip() for c in scores]
        if len(set(choices)) != len(choices) or any(not c for c in choices):
            continue
        out.append({"input": e["input"], "choices": choices, "gold": list(scores.values()).index(best)})
    return out


def load_task_json(source: str) -> dict:
    """A BIG-bench task by name (from the cached sdist) or from a local task.json in that format."""
    if source.endswith(".json"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {path}")
        return json.loads(path.read_text())
    return bigbench_task(source)


def split_source(source: str, task: dict) -> str:
    """The task's name in the split hash: the BIG-bench (sub)folder, or a local file's task name (never its path,
    which differs between machines and would move examples between the screen and test parts)."""
    return str(task.get("name") or Path(source).stem) if source.endswith(".json") else source


def example_id(source: str, example: dict) -> str:
    """A content hash of one multiple-choice example (stable under reordering and prompt changes); `source` as
    `split_source` gives it."""
    text = json.dumps([source, example["input"], example["choices"]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def in_screen(eid: str, fraction: float = SCREEN_FRACTION) -> bool:
    return int(eid, 16) / 16**12 < fraction


def mc_parts(spec: MCTask) -> dict[str, list[dict]]:
    """{"train": few-shot pool, "screen": ..., "test": ...} rows (query, choices, gold, id) of a task."""
    task = load_task_json(spec.source)
    examples = single_answer_examples(task)
    random.Random(SPLIT_SEED).shuffle(examples)
    make = PROMPTS[spec.prompt]
    key = split_source(spec.source, task)
    rows = [
        {"query": make(task, e["input"]), "choices": e["choices"], "gold": e["gold"], "id": example_id(key, e)}
        for e in examples
    ]
    rest = rows[FEWSHOT_POOL:]
    return {
        "train": rows[:FEWSHOT_POOL],
        "screen": [r for r in rest if in_screen(r["id"])],
        "test": [r for r in rest if not in_screen(r["id"])],
    }


def mc_rows(spec: MCTask) -> tuple[list[dict], list[dict]]:
    """(few-shot pool, the examples evaluated: the spec's split, in the shuffled order; a limit takes the first)."""
    parts = mc_parts(spec)
    return parts["train"], parts[spec.split]


def split_record(spec, limit: int | None = None) -> dict:
    """What a task's evaluation used and what its screen used: sizes, the rule and the screen examples' ids."""
    if spec.kind != "multiple_choice":
        return {
            "task": spec.name,
            "screened": False,
            "note": "not part of the screen (every example may be evaluated)",
        }
    parts = mc_parts(spec)
    n = limit if limit is not None else spec.limit
    test = parts["test"] if n is None else parts["test"][:n]
    return {
        "task": spec.name,
        "screened": True,
        "fraction": SCREEN_FRACTION,
        "rule": SPLIT_RULE,
        "fewshot_pool": len(parts["train"]),
        "screen": len(parts["screen"]),
        "test": len(parts["test"]),
        "evaluated": len(test),
        "screen_ids": [r["id"] for r in parts["screen"]],
        "evaluated_ids": [r["id"] for r in test],
    }


def mc_description(spec: MCTask) -> str:
    """The task's own instruction (BIG-bench `task_prefix`) for the native prompt, else nothing."""
    if spec.prompt != "native":
        return ""
    prefix = load_task_json(spec.source).get("task_prefix", "").strip()
    return prefix + "\n\n" if prefix else ""


def _first_words(text: str, max_words: int) -> str:
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    cut = " ".join(words[:max_words])
    end = cut.rfind(". ")
    return cut[: end + 1] if end > len(cut) // 2 else cut + " ..."


def summarization_rows(spec: SummarizationTask) -> list[dict]:
    rows = []
    for a in eval_articles():
        article = _first_words(a["article"], spec.max_words)
        rows.append(
            {
                "query": f"Summarize this article in one sentence.\n\n{article}",  # a chat request (instruct models)
                "query_plain": f"Article: {article}\nSummary:",  # base models (PLAIN_SUMMARY_VERSION)
                "summary": a["summary"].strip(),
            }
        )
    return rows


def test_size(spec) -> int:
    """Examples available for evaluation (the `test` split)."""
    if spec.kind == "multiple_choice":
        return len(mc_rows(spec)[1])
    if spec.kind == "summarization":
        return len(summarization_rows(spec))
    raise ValueError(f"{spec.kind} tasks have no examples")


def chance_level(spec, rows: list[dict] | None = None) -> float | None:
    """Expected score of a uniform guess (multiple choice); None where that is not defined."""
    if spec.kind != "multiple_choice":
        return None
    rows = mc_rows(spec)[1] if rows is None else rows
    return sum(1 / len(r["choices"]) for r in rows) / len(rows)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:  # unchanged files keep their mtime (datasets' cache)
        atomic_write_text(path, text)


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def prepare(specs, chat: bool = True) -> Path:
    """Write data and YAML configs for `specs` (MCTask / SummarizationTask); return the folder.

    `chat`: whether summarization requests go through the model's chat template (then the prompt is
    an instruction; otherwise it ends with "summary:" for a base model to continue).
    """
    root = tasks_dir()
    specs = list(specs)
    needed = {s.source for s in specs if s.kind == "multiple_choice" and not s.source.endswith(".json")}
    if needed:  # one download of the sdist for every missing task (gem/xsum comes with eval_articles)
        ensure_bigbench_tasks(sorted(needed))
    for spec in specs:
        if spec.kind == "perplexity":
            continue
        data = root / "data" / spec.name
        if spec.kind == "multiple_choice":
            train, test = mc_rows(spec)
            _write_jsonl(data / "train.jsonl", train)
            _write_jsonl(data / "test.jsonl", test)
            template = HERE / "multiple_choice.yaml"
            files = {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}
            extra = [f"num_fewshot: {spec.num_fewshot}", f"description: {_yaml_str(mc_description(spec))}"]
        elif spec.kind == "summarization":
            _write_jsonl(data / "test.jsonl", summarization_rows(spec))
            template = HERE / "summarization.yaml"
            files = {"test": str(data / "test.jsonl")}
            extra = [f"doc_to_text: {'query' if chat and spec.chat else 'query_plain'}"]
        else:
            raise ValueError(f"unknown task kind {spec.kind!r}")
        lines = [
            f"# generated by kvshare.tasks.offline from {json.dumps(asdict(spec))}",
            f"include: {_yaml_str(str(template))}",
            f"task: {spec.name}",
            "dataset_kwargs:",
            "  data_files:",
            *[f"    {split}: {_yaml_str(path)}" for split, path in files.items()],
            *extra,
        ]
        text = "\n".join(lines) + "\n"
        path = root / f"{spec.name}.yaml"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    return root
