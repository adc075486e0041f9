"""The package imports in one direction: no import cycle, and each part imports only the parts
below it. Imports are read from the source (module level and inside functions alike), so a
cycle hidden in a function fails here as surely as one at the top of a file."""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bibo_export"

# What each part of the package may import from the package (docs/design.md):
# config/io/logs, then model, then train and runtimes, then export, then parity/report, then cli;
# artifacts and verdict sit low so that exporters and parity share them; the tokenizer sits
# just above artifacts (it names its file) so that training, runtimes and export all read it.
ALLOWED = {
    "config": set(), "io": set(), "logs": set(), "verdict": set(), "provenance": set(),
    "threads": set(),
    "resources": {"config"},
    "artifacts": {"config", "io"},
    "outputs": {"config", "io", "artifacts"},
    "tokenizer": {"artifacts", "io"},
    "model": {"config", "io", "artifacts", "resources"},
    "kernels": set(),  # custom operators: torch definitions and the compiled library
    "tasks": {"model"},
    "train": {"config", "io", "artifacts", "tokenizer", "model", "tasks", "resources"},
    "runtimes": {"config", "artifacts", "tokenizer", "model", "kernels", "threads"},
    "timing": {"runtimes"},
    "export": {"config", "io", "artifacts", "tokenizer", "verdict", "model", "kernels",
               "runtimes"},
    "parity": {"config", "artifacts", "verdict", "model", "tasks", "runtimes", "timing",
               "threads"},
    "report": {"io", "artifacts", "verdict", "tasks"},
    "cli": {"config", "io", "logs", "artifacts", "outputs", "resources", "tokenizer", "verdict",
            "model", "tasks", "train", "runtimes", "timing", "export", "parity", "report",
            "threads"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Every ``bibo_export`` module ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if is_module(f"{base}.{alias.name}"))
    return {module for module in found if module.split(".")[0] == "bibo_export"}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module → modules whose import it triggers: the target and, outside the importer's own
    packages, the target's packages (their ``__init__`` runs first)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        importer = module_name(path)
        own = {importer.rsplit(".", i)[0] for i in range(importer.count(".") + 1)}
        edges = set()
        for target in imported_modules(path):
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[importer] = {target for target in edges - own if target != importer}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["bibo_export.cli"], "the import graph was not read"
    assert cycles(graph) == []


def test_cycle_detection_finds_a_planted_cycle():
    """The checker itself: a cycle through a function-level import is reported."""
    graph = dict(import_graph())
    graph["bibo_export.model.moe"] = graph["bibo_export.model.moe"] | {"bibo_export.export.onnx"}
    assert any("bibo_export.export.onnx" in cycle for cycle in cycles(graph))


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_each_part_imports_only_the_parts_below_it(module):
    source = part(module)
    if source == "package":
        assert not import_graph()[module]
        return
    assert source in ALLOWED, f"{module}: add its part to ALLOWED"
    wrong = sorted(target for target in import_graph()[module]
                   if part(target) != source and part(target) not in ALLOWED[source])
    assert not wrong, f"{module} imports {wrong}"
