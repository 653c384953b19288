"""The layout the architecture promises (docs/architecture.md), checked on the source itself.

Concept packages (kernels, models, trainer.optim) import nothing from the rest of trainer; no
module imports form a cycle; no function is longer than 120 lines; the loop and the run-comparison
module stay short enough to read in one sitting. Imports are read with ``ast`` (inside functions too).
"""
import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("trainer", "models", "kernels")
CONCEPTS = ("kernels", "models", "trainer.optim")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules()


def resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str) -> set[str]:
    """Project modules that module ``name`` imports (``from a import b`` counts ``a.b`` if it is a module)."""
    path, found = MODULES[name], set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = {resolve(f"{base}.{a.name}") for a in node.names}
            found |= {s for s in subs if s and s != resolve(base)} or {resolve(base)}
    return {m for m in found if m and m != name}


def is_concept(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in CONCEPTS)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if is_concept(m)))
def test_concept_packages_import_no_trainer_machinery(name):
    machinery = {m for m in imports(name) if m.startswith("trainer") and not is_concept(m) and m != "trainer"}
    assert not machinery, f"{name} imports {sorted(machinery)}"


def test_no_import_cycles():
    graph = {m: {t for t in imports(m) if not (t.startswith(m + ".") or m.startswith(t + "."))} for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif not state.get(t):
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)


def test_functions_stay_short_and_the_loop_reads_in_one_sitting():
    long = []
    for path in [*MODULES.values(), *(REPO / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 120:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long
    assert len((REPO / "trainer" / "loop.py").read_text().splitlines()) <= 250
    assert len((REPO / "trainer" / "analysis" / "runs.py").read_text().splitlines()) <= 300


@pytest.mark.parametrize("name", sorted(m for m in MODULES if is_concept(m)))
def test_hydra_stays_at_the_edges(name):
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not [n for n in names if n.split(".")[0] in ("hydra", "omegaconf")], name
