"""The package's layers: every import of a deft_tvm module points down (or within its layer) and
there are no import cycles, read from the source with ``ast`` (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import deft_tvm

ROOT = Path(deft_tvm.__file__).parent
SCHEDULES = ROOT.parent / "schedules"  # installed as deft_tvm.schedules
# Lowest first; a module may import modules of its own layer or of a lower one.
LAYERS = ("compute", "schedules", "runtime", "frontend", "reference", "tuning", "app", "package")


def _modules() -> dict[str, Path]:
    files = {f"deft_tvm.{'.'.join(p.relative_to(ROOT).with_suffix('').parts)}": p for p in ROOT.rglob("*.py")}
    files.update({f"deft_tvm.schedules.{p.stem}": p for p in SCHEDULES.glob("*.py")})
    return {name.removesuffix(".__init__"): path for name, path in files.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return parts[1] if parts[1] in LAYERS else "app"  # deft_tvm.cli.*, deft_tvm.bench


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The deft_tvm modules ``module`` imports (a name imported from a package counts as that
    package's submodule when there is one)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return {name for name in found if name in known and name != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_imports_point_down_the_layers():
    upward = [f"{m} ({_layer(m)}) imports {i} ({_layer(i)})" for m, imports in _graph().items() for i in imports
              if LAYERS.index(_layer(i)) > LAYERS.index(_layer(m))]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_op_path_stays_below_tuning_and_verification():
    """The op's hot path (the front end's ops and everything it reaches) never imports tuning,
    statistics, the references or the app."""
    graph, seen, todo = _graph(), set(), ["deft_tvm.frontend.ops"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert {_layer(m) for m in seen} <= {"compute", "schedules", "runtime", "frontend"}, sorted(seen)
