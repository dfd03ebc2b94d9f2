"""Long-context suite: lm-eval's generated RULER tasks at chosen context lengths, offline.

lm-eval 0.4.13 generates RULER's needle-in-a-haystack and variable-tracking data itself (its `ruler` tasks build
their dataset with a Python generator, no download), sized in the evaluated model's own tokens. `prepare` calls
those generators once per (task, length, tokenizer) -- seeded, so a task's data never depend on what else runs --
and writes them as local JSONL with one small YAML per task that includes this package's `long.yaml` (RULER's
prompt, generation prefix and string-match scoring), like the offline suite. Evaluation then reads local files.

- `niah_single_1`: one needle (a 7-digit number for a word key) in a repeated filler text (passkey retrieval);
- `niah_multikey_2`: the needle among a haystack made of other needles (KV retrieval);
- `niah_multikey_3`: the same with UUID keys and values;
- `ruler_vt`: variable tracking, a 4-hop chain of assignments in filler text, with one worked example.

`length` is RULER's max_seq_length: prompt plus the task's generation allowance (128 tokens for NIAH, 30 for
variable tracking), in the model's tokens. The score (`acc`) is RULER's string match: the share of the expected
values found in the generated answer (0 or 1 for NIAH; fifths for variable tracking's five variables).

Needs the `wonderwords` package (lm-eval's `ruler` extra). RULER's generators import nltk and fetch its `punkt_tab`
data at import time; only RULER's essay haystacks use it (none of these tasks), so that fetch is skipped here and
nothing touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io import atomic_write_text
from ..pypi_files import kvshare_home

HERE = Path(__file__).resolve().parent
FORMAT_VERSION = 1  # bump when data generation or the prompt config changes (part of the results cache key)
SEED = 42  # RULER's own random seed: python's and numpy's generators are seeded with it before each task's data

# RULER task -> (lm-eval module in lm_eval.tasks.ruler, its dataset function, tokens generated: lm-eval's YAML)
GENERATORS = {
    "niah_single_1": ("niah_utils", "niah_single_1", 128),
    "niah_multikey_2": ("niah_utils", "niah_multikey_2", 128),
    "niah_multikey_3": ("niah_utils", "niah_multikey_3", 128),
    "ruler_vt": ("vt_utils", "get_vt_dataset", 30),
}
# where a prompt's question starts (RULER's templates: the context, then this line): query-agnostic evaluation
# prefills and compresses what comes before it, then reads the question against the compressed cache
# (NIAH's template with one needle says "is" where several say "are all")
QUESTION_MARKERS = ("\nWhat are all the special magic", "\nWhat is the special magic", "\nQuestion: Find all variables")
LONG_TASKS = tuple(GENERATORS)
LONG_LENGTHS = (1024, 2048, 4096)
LONG_LIMIT = 10  # examples per task and length by default (a 4k prompt takes about 35 s of one CPU core)
BATCH_TOKENS = 8192  # generation batch: at most this many prompt tokens at once (1k: 8 prompts, 4k: 2)
INSTALL = "pip install 'wonderwords==3.0.1' (or pip install -e '.[eval]', which has it)"


class MissingDependency(RuntimeError):
    """A package the long suite needs is not installed (the message says how to install it)."""


@dataclass(frozen=True)
class LongTask:
    """One RULER task at one context length, evaluated through lm-eval on data generated in the model's tokens."""

    task: str  # lm-eval's RULER task name (a key of GENERATORS)
    length: int  # RULER's max_seq_length: prompt + the task's generation allowance, in the model's tokens
    category: str = "long context"
    metric: str = "acc"  # RULER's string match: share of the expected values found in the answer
    chance: float = 0.0  # a guess of a random 7-digit number, UUID or 5-letter variable name
    limit: int | None = LONG_LIMIT
    chat: bool = True  # through the model's chat template when it has one (instruct models), as lm-eval's RULER
    num_fewshot: int = 0
    format: int = FORMAT_VERSION
    kind: str = "ruler"

    @property
    def name(self) -> str:
        return f"{self.task}_{self.length}"

    @property
    def max_gen_toks(self) -> int:
        return GENERATORS[self.task][2]


def require_ruler() -> None:
    """One-line error when a package RULER's generators import is missing."""
    missing = [p for p in ("wonderwords", "nltk") if importlib.util.find_spec(p) is None]
    if missing:
        raise MissingDependency(
            f"the long suite needs {' and '.join(missing)} (lm-eval's `ruler` extra): "
            + (INSTALL if missing == ["wonderwords"] else f"pip install {' '.join(missing)}")
        )


def long_tasks(tasks=None, lengths=None) -> list[LongTask]:
    """LongTask specs: every task of `tasks` (names, a comma-separated string, or specs, kept as they are) at
    every length of `lengths` (default LONG_LENGTHS). Checks that RULER's generators can be imported."""
    require_ruler()
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if isinstance(lengths, (str, int)):
        lengths = [int(x) for x in str(lengths).split(",") if x.strip()]
    lengths = list(LONG_LENGTHS if lengths is None else lengths)
    if not lengths or any(int(n) < 1 for n in lengths):
        raise ValueError(f"context lengths must be positive token counts, got {lengths}")
    out = []
    for t in LONG_TASKS if tasks is None else tasks:
        if not isinstance(t, str):
            out.append(t)
            continue
        if t not in GENERATORS:
            raise ValueError(f"unknown long task {t!r}; available: {', '.join(LONG_TASKS)}")
        out += [LongTask(t, int(n)) for n in lengths]
    if not out:
        raise ValueError(f"no tasks given; available: {', '.join(LONG_TASKS)}")
    return out


# ------------------------------------------------------------------------------------------------
# data: lm-eval's generators, once per (tokenizer, task, length)
# ------------------------------------------------------------------------------------------------
def tasks_root() -> Path:
    return kvshare_home() / "lm_eval_long"


def tokenizer_dir(tokenizer) -> Path:
    """The tokenizer saved under the cache, in a folder named by a digest of its files (lm-eval's generators load a
    tokenizer by name or path; this is the evaluated model's own, whatever it was loaded from)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        h = hashlib.sha256()
        for f in sorted(Path(tmp).iterdir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        dest = tasks_root() / f"tokenizer-{h.hexdigest()[:16]}"
        if not dest.is_dir():
            part = dest.with_name(dest.name + f".part{random.randrange(1 << 30)}")
            shutil.copytree(tmp, part)
            try:
                part.rename(dest)
            except OSError:  # written meanwhile by another process: theirs is the same
                shutil.rmtree(part, ignore_errors=True)
    return dest


@contextlib.contextmanager
def ruler_imports():
    """Import RULER's generators quietly and offline: nltk's `punkt_tab` fetch at import is skipped (only essay
    haystacks use it), and the generators' progress bars and prints are kept out of the output."""
    require_ruler()
    import nltk

    fetch = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield lambda module: importlib.import_module(f"lm_eval.tasks.ruler.{module}")
    finally:
        nltk.download = fetch


def check_length(task: str, length: int, tokenizer) -> None:
    """Refuse lengths RULER's generators cannot fill (its variable-tracking sampler would loop for ever): one line."""
    if task != "ruler_vt":
        return  # the NIAH generators raise their own error when nothing fits
    with ruler_imports() as ruler:
        vt = ruler("vt_utils")
        state = random.getstate()
        try:
            example, _ = vt.generate_input_output(5, 1, 4, is_icl=True)  # the worked example: fits in 500 tokens
            prompt, _ = vt.generate_input_output(10, 1, 4)
        finally:
            random.setstate(state)
    tokens = lambda text: len(tokenizer(text)["input_ids"])
    if tokens(example) + 30 > 500:
        raise ValueError("ruler_vt cannot be generated with this tokenizer: its worked example does not fit 500 tokens")
    need = 500 + tokens(prompt) + GENERATORS[task][2]
    if length < need:
        raise ValueError(f"ruler_vt needs a context length of at least {need} tokens with this tokenizer, got {length}")


def generate(task: str, length: int, tokenizer_path: Path) -> list[dict]:
    """RULER's examples of `task` at `length` (lm-eval's generator; 500 of them), seeded with SEED."""
    import numpy as np

    module, function, _ = GENERATORS[task]
    with ruler_imports() as ruler:
        generator = getattr(ruler(module), function)
        random.seed(SEED)
        np.random.seed(SEED)
        dataset = generator(tokenizer=str(tokenizer_path), max_seq_lengths=[int(length)])["test"]
    keys = ("index", "input", "outputs", "length", "max_length", "gen_prefix")
    return [{k: row[k] for k in keys} for row in dataset]


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def prepare(specs, tokenizer) -> Path:
    """Data and YAML configs of `specs` in the model's tokens (generated on first use); returns the folder to pass
    to lm-eval's `TaskManager(include_path=...)`: one per tokenizer."""
    tok_dir = tokenizer_dir(tokenizer)
    root = tok_dir.with_name(tok_dir.name.replace("tokenizer-", "tasks-"))
    for spec in specs:
        data = root / "data" / f"{spec.name}-v{spec.format}.jsonl"
        if not data.is_file():
            check_length(spec.task, spec.length, tokenizer)
            rows = generate(spec.task, spec.length, tok_dir)
            atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        lines = [
            f"# generated by kvshare.tasks.long from {json.dumps(asdict(spec))}",
            f"include: {_yaml_str(str(HERE / 'long.yaml'))}",
            f"task: {spec.name}",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {_yaml_str(str(data))}",
            "generation_kwargs:",
            "  do_sample: false",
            "  temperature: 0.0",
            f"  max_gen_toks: {spec.max_gen_toks}",
            "  until: []",
        ]
        text = "\n".join(lines) + "\n"
        path = root / f"{spec.name}.yaml"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    return root


def available(spec, root: Path) -> int:
    """Examples generated for `spec` (RULER skips the ones that cannot fit the length)."""
    with open(root / "data" / f"{spec.name}-v{spec.format}.jsonl") as f:
        return sum(1 for _ in f)


# ------------------------------------------------------------------------------------------------
# scoring and running
# ------------------------------------------------------------------------------------------------
def question_start(prompt: str) -> int | None:
    """Index in `prompt` (as lm-eval built it, chat template included) where its question starts: the last
    RULER question line; None when there is none."""
    start = max(prompt.rfind(marker) for marker in QUESTION_MARKERS)
    return start if start >= 0 else None


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """RULER's score of one answer under the name `acc` (lm-eval's own RULER names it by the length)."""
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all

    return {"acc": string_match_all(postprocess_pred(results), [doc["outputs"]])}


def run_long(lm, tokenizer, items, chat: bool = False) -> dict:
    """Evaluate `items` ((LongTask, limit) pairs, one context length) in one lm-eval call: {task name: rows}.

    Generation is batched by prompt tokens (BATCH_TOKENS), whatever the evaluator's batch size."""
    from lm_eval.tasks import TaskManager

    from .lmeval import run_lm_eval

    specs = [spec for spec, _ in items]
    lengths = {s.length for s in specs}
    if len(lengths) != 1:
        raise ValueError(f"run_long takes one context length at a time, got {sorted(lengths)}")
    length = lengths.pop()
    if length > lm.max_length:
        raise ValueError(
            f"context length {length} exceeds the model's {lm.max_length} tokens; choose smaller --lengths"
        )
    root = prepare(specs, tokenizer)
    samples = {}
    for spec, n in items:
        have = available(spec, root)
        samples[spec.name] = list(range(have if n is None else min(n, have)))
    tm = TaskManager(include_path=str(root), include_defaults=False)
    batch = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = max(1, min(int(batch), BATCH_TOKENS // length))
    try:
        results = run_lm_eval(lm, tm, specs, samples=samples, chat=chat and any(s.chat for s in specs))
    finally:
        lm.batch_size_per_gpu = batch
    for spec in specs:
        for row in results[spec.name]:
            row.update(ruler_task=spec.task, length=spec.length)
    return results
