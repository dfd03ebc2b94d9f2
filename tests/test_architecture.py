"""The package's layers, checked from its source: a lower layer never imports a higher one, there are no import
cycles, and no module imports another module's `_private` names. CONTRIBUTING.md describes the same layers.

Every import is read from the source with `ast`, imports inside functions included (a lazy import is still a
dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

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
            "damage",
            "combine",
            "policies",
            "quantized_kv",
        ],
    ),
    ("evaluation and bench", ["metrics", "evaluation", "tasks", "bench", "profile", "serving"]),
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


def test_no_import_cycles():
    mods = modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for target, _ in imports(module, path):
            target = (
                target if target in mods else target.rsplit(".", 1)[0] if target.rsplit(".", 1)[0] in mods else None
            )
            if target and target != module and not target.endswith("__init__") and target != "__init__":
                # a package's __init__ re-exports its modules: importing the package is not a cycle through them
                if not (module in mods and mods[module].name == "__init__.py" and target.startswith(module + ".")):
                    graph[module].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if mods[t].name == "__init__.py" and m.startswith(t + "."):
                continue  # a module of a package importing its package's face
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t) :] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
