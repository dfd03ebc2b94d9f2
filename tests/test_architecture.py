"""The package's layers, checked from its source: a lower layer never imports a higher one, the core never imports
the notebooks' logic (kvshare.experiments) nor matplotlib, there are no import cycles, and no module imports another
module's `_private` names. CONTRIBUTING.md describes the same layers.

Every import is read from the source with `ast`, imports inside functions included (a lazy import is still a
dependency), and a package's `__init__` is a module of its own (`from . import NAME` in kvshare/tasks/screening.py
imports kvshare/tasks/__init__.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvshare"

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("base", ["io", "pypi_files", "progress", "generation"]),
    ("model adapter and data", ["adapter", "data", "data_build", "models", "gptq"]),
    (
        "strategy, calibration, search, cache methods",
        [
            "strategy",
            "accounting",
            "calibration",
            "methods",
            "sharing",
            "search",
            "strategies",
            "damage",
            "combine",
        ],
    ),
    ("evaluation and bench", ["metrics", "claims", "evaluation", "tasks", "bench", "speed", "profile", "serving"]),
    ("experiments (one module per notebook)", ["experiments"]),
    ("interface", ["cli", "__main__", "__init__"]),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def top(module: str) -> str:
    return module.split(".")[0]


def imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported kvshare module, names taken from it) for every import of `module`."""
    tree = ast.parse(path.read_text())
    if module == "__init__":  # kvshare/__init__.py: its package is kvshare itself
        package = []
    else:
        package = module.split(".")[:-1] if not path.name == "__init__.py" else module.split(".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("kvshare"):
                target = node.module[len("kvshare.") :] if node.module != "kvshare" else "__init__"
            else:
                continue
            names = [a.name for a in node.names]
            if node.module is None or not target:  # `from . import x`: x are modules
                out += [(f"{target}.{n}".strip("."), []) for n in names]
            else:
                out.append((target, names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kvshare."):
                    out.append((a.name[len("kvshare.") :], []))
                elif a.name == "kvshare":
                    out.append(("__init__", []))
    return out


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in modules()} - set(LAYER_OF))
    assert not missing, f"modules without a layer in tests/test_architecture.py: {missing}"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for module, path in modules().items():
        mine = LAYER_OF[top(module)]
        for target, _ in imports(module, path):
            theirs = LAYER_OF.get(top(target))
            if theirs is not None and theirs > mine:
                bad.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for module, path in modules().items():
        for target, names in imports(module, path):
            if target == module:
                continue
            bad += [f"{module} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    """{module: the kvshare modules it imports}. A name taken from a package (`from . import NAME`, `from kvshare
    import NAME`) is an edge to the package's `__init__`, which is a module like any other."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for target, _ in imports(module, path):
            if target not in mods:  # `from .x import name` resolved to "x.name", or a name of kvshare/__init__.py
                target = target.rsplit(".", 1)[0] if "." in target else "__init__"
            if target in mods and target != module:
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in import order, the first one again at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (package __init__s and imports inside functions count): " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_package_importing_its_own_module_back():
    """kvshare.tasks re-exports kvshare.tasks.screening; screening taking a name from kvshare.tasks closes a cycle."""
    graph = {"tasks": {"tasks.screening"}, "tasks.screening": {"tasks.offline"}, "tasks.offline": set()}
    assert find_cycle(graph) is None
    graph["tasks.screening"].add("tasks")
    assert find_cycle(graph) == ["tasks", "tasks.screening", "tasks"]


def test_the_core_never_imports_the_experiments():
    """kvshare.experiments is the notebooks' logic: the core (everything else, the CLI included) is a library that
    works without it."""
    bad = [
        f"{module} imports {target}"
        for module, path in modules().items()
        if top(module) != "experiments"
        for target, _ in imports(module, path)
        if top(target) == "experiments"
    ]
    assert not bad, "the core imports kvshare.experiments; move what it needs into the core:\n" + "\n".join(bad)


def test_the_core_imports_matplotlib_only_lazily_to_draw():
    """`pip install kvshare` has no matplotlib (it comes with the notebooks extra): outside kvshare.experiments it is
    imported only inside a drawing function, whose module names the extra in its error."""
    bad = []
    for module, path in modules().items():
        if top(module) == "experiments":
            continue
        tree = ast.parse(path.read_text())
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            if not any(n == "matplotlib" or n.startswith("matplotlib.") for n in names):
                continue
            if id(node) not in lazy:
                bad.append(f"{module} imports matplotlib at import time (line {node.lineno})")
            elif "kvshare[notebooks]" not in path.read_text():
                bad.append(f"{module} imports matplotlib without saying `pip install 'kvshare[notebooks]'` when absent")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_the_package_and_the_cli_work_without_matplotlib():
    """With matplotlib missing: `import kvshare`, `import kvshare.cli` and `python -m kvshare --help` work, and the
    core's one figure says which extra to install."""
    code = """
import runpy, sys
sys.modules["matplotlib"] = None  # as if it were not installed
import kvshare, kvshare.cli, kvshare.evaluation, kvshare.metrics, kvshare.tasks, kvshare.serving.report
try:
    kvshare.serving.report.figure({})
except ImportError as e:
    assert "kvshare[notebooks]" in str(e), e
else:
    raise AssertionError("the serving figure drew without matplotlib")
sys.argv = ["kvshare", "--help"]
runpy.run_module("kvshare", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_the_architecture_sketch_in_the_docs_is_the_code_s():
    """docs/how-it-works.md draws the layers as boxes (top to bottom) with arrows for imports; the boxes must be
    LAYERS, in order, and LAYERS is what the tests above check against the code."""
    import re

    doc = (PACKAGE.parent / "docs" / "how-it-works.md").read_text()
    block = re.search(r"<!-- kvshare:layers -->\n```text\n(.*?)\n```\n<!-- /kvshare:layers -->", doc, re.S)
    assert block, "docs/how-it-works.md has no layer sketch between <!-- kvshare:layers --> markers"
    lines = block.group(1).splitlines()
    boxes = [re.match(r"^\[(.+?)\]\s+(.+)$", line) for line in lines[::2]]
    assert all(boxes) and all(line.strip().startswith("↓") for line in lines[1::2]), "a box per layer, arrows between"
    drawn = [(b.group(1), b.group(2).split(" · ")) for b in boxes]
    assert drawn == list(reversed(LAYERS)), "the sketch in docs/how-it-works.md is not tests/test_architecture.LAYERS"
