#!/usr/bin/env bash
# The main job: set up (or reuse) .venv, then execute every notebook in notebooks/ in order with
# papermill, headless, and regenerate every figure.
#
#   ./run_all.sh                  full run: figures/ (the committed figures), executed copies in runs/full/
#   ./run_all.sh --quick          minutes-long run of every code path: runs/quick/figures/, runs/quick/
#   ./run_all.sh --model NAME     passed to every notebook (embedded name, hub id, path); a non-default
#                                 model writes its figures into figures/NAME/ (quick: runs/quick/figures/NAME/)
#   ./run_all.sh --only 01,02     only the notebooks whose names start with these prefixes
#   ./run_all.sh --force          full run of the speed notebooks (04, 05) even on a loaded machine
#
# A failing cell stops the run with a non-zero exit status, naming the notebook and the cell.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
quick=0
model=""
only=""
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --model) [ $# -ge 2 ] || { echo "run_all: --model needs a NAME" >&2; exit 2; }; model="$2"; shift ;;
    --model=*) model="${1#--model=}" ;;
    --only) [ $# -ge 2 ] || { echo "run_all: --only needs a list like 01,02" >&2; exit 2; }; only="$2"; shift ;;
    --only=*) only="${1#--only=}" ;;
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

# RUN_ALL_NOTEBOOKS / RUN_ALL_RUNS / RUN_ALL_SKIP_SETUP exist for the tests (another notebook folder,
# another runs/ folder, no setup); a normal run leaves them unset.
if [ -z "${RUN_ALL_SKIP_SETUP:-}" ]; then
  echo "run_all: setting up .venv (reused when present), the package, the default model and the offline data"
  t0=$(date +%s)
  "$root/scripts/setup.sh"
  echo "run_all: setup took $(( $(date +%s) - t0 )) s"
fi

exec "$root/.venv/bin/python" - "$quick" "$model" "$only" "$force" <<'PY'
"""Run the notebooks with papermill; print progress; name the failing notebook and cell."""
import logging
import os
import sys
import time
from pathlib import Path

import papermill as pm
from papermill.exceptions import PapermillExecutionError

quick, model, only, force = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4] == "1"
root = Path.cwd()
mode = "quick" if quick else "full"
runs_root = Path(os.environ.get("RUN_ALL_RUNS") or root / "runs").resolve()
runs = runs_root / mode
# a quick run never writes over the committed figures
figures = runs_root / "quick" / "figures" if quick else root / "figures"


def model_folder(name: str) -> str:
    """The subfolder of a non-default model's figures: an embedded name as it is, a hub id with '/' as '--'
    (org--model), a local checkpoint by its folder's name."""
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name.strip("/").replace("/", "--")


if model:
    from kvshare.models import DEFAULT_MODEL

    if model != DEFAULT_MODEL:  # the default model's figures stay in figures/ (runs/quick/figures/ when quick)
        figures = figures / model_folder(model)
notebook_dir = Path(os.environ.get("RUN_ALL_NOTEBOOKS") or root / "notebooks").resolve()
notebooks = sorted(notebook_dir.glob("[0-9]*.ipynb"))
if only:
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in wanted if not any(p.name.startswith(w) for p in notebooks)]
    if unknown:
        sys.exit(f"run_all: --only {only}: no notebook starts with {', '.join(unknown)} "
                 f"(have: {', '.join(p.stem for p in notebooks)})")
    notebooks = [p for p in notebooks if any(p.name.startswith(w) for w in wanted)]
if not notebooks:
    sys.exit("run_all: no notebooks to run")
runs.mkdir(parents=True, exist_ok=True)

# Notebooks 04 and 05 measure speed: a full run needs a quiet machine (kvshare.bench.LOAD_LIMIT_PER_CORE: other
# processes' busy cores over a 5 s sample, taken while no notebook runs, so our own previous notebook does not
# count). Checked before the run starts and again before each of them; --force runs them anyway (flagged figures).
SPEED_NOTEBOOKS = ("04", "05")


def refuse_if_loaded(names: list[str]) -> None:
    if quick or force or not names:
        return
    from kvshare.bench import cpu_count, load_refusal, machine_load

    fake = os.environ.get("RUN_ALL_LOAD")  # for the tests: other processes' busy cores, instead of measuring
    load = machine_load() if fake is None else {"other_busy_cores": float(fake), "cpu_count": cpu_count()}
    message = load_refusal(load, f"notebook(s) {', '.join(names)}, which measure speed")
    if message:
        sys.exit(f"run_all: {message}; wait until the machine is quiet, or add --force to run them anyway "
                 "(their figures are then flagged)")


def speed_names(nbs) -> list[str]:
    return [p.stem for p in nbs if p.name.startswith(SPEED_NOTEBOOKS)]


refuse_if_loaded(speed_names(notebooks))


def rel(p: Path) -> str:
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


figures.mkdir(parents=True, exist_ok=True)


class Prefix(logging.Formatter):
    name = ""

    def format(self, record):
        return "\n".join(f"[{self.name}] {line}" for line in record.getMessage().splitlines() or [""])


handler = logging.StreamHandler(sys.stdout)
prefix = Prefix()
handler.setFormatter(prefix)
log = logging.getLogger("papermill")
log.handlers[:] = [handler]
log.setLevel(logging.INFO)
log.propagate = False

print(f"run_all: {mode} run of {len(notebooks)} notebook(s): {', '.join(p.name for p in notebooks)}")
print(f"run_all: figures -> {rel(figures)}/, executed notebooks -> {rel(runs)}/"
      + (f", model {model}" if model else ""), flush=True)
times = []
total0 = time.perf_counter()
for i, nb in enumerate(notebooks, 1):
    out = runs / nb.name
    params = {"quick": quick, "out_dir": str(figures)}
    if model:
        params["model"] = model
    prefix.name = nb.stem
    if i > 1:
        refuse_if_loaded(speed_names([nb]))
    print(f"\nrun_all: [{i}/{len(notebooks)}] {rel(nb)} ({mode}) ...", flush=True)
    t = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(out), parameters=params, cwd=str(nb.parent), log_output=True,
                            progress_bar=False, kernel_name="python3")
    except PapermillExecutionError as e:
        source = (e.source or "").strip().splitlines()
        first = source[0] if source else ""
        print(f"\nrun_all: FAILED in {rel(nb)}, cell {e.cell_index} (In [{e.exec_count}]): {first}",
              file=sys.stderr)
        print(f"run_all: {e.ename}: {e.evalue}", file=sys.stderr)
        print(f"run_all: the executed notebook with the traceback: {rel(out)}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # kernel died, notebook unreadable, ...
        print(f"\nrun_all: FAILED in {rel(nb)}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    dt = time.perf_counter() - t
    times.append((nb.name, dt))
    print(f"run_all: [{i}/{len(notebooks)}] {nb.name} done in {dt / 60:.1f} min", flush=True)

total = time.perf_counter() - total0
print("\nrun_all: all notebooks ran")
for name, dt in times:
    print(f"run_all:   {name:<32} {dt / 60:6.1f} min")
print(f"run_all:   {'total':<32} {total / 60:6.1f} min")
print(f"run_all: figures in {rel(figures)}/")
if not quick and figures == root / "figures":  # a full run of the default model: the README follows its figures
    from kvshare.experiments.reports import readme

    changed = readme.update(root)
    print("run_all: result blocks of README.md and docs/ " + (f"rebuilt: {', '.join(changed)}" if changed else "up to date"))
PY
