"""The import graph of rlhf_lib: no cycles, and artifacts below every stage.

The graph is read from the source (ast), not by importing: every `import` and `from ... import` counts,
those inside functions too (a lazy import is still a dependency, and lazy imports are how the old
sft -> reward -> comparisons -> sft cycle hid), except under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "rlhf_lib"

# Cycles that are known and owned elsewhere; each entry says why it is still there. Any other cycle fails.
KNOWN_CYCLES: dict[frozenset[str], str] = {}
STAGE_MODULES = {"rlhf_lib.sft", "rlhf_lib.reward",
                 "rlhf_lib.comparisons", "rlhf_lib.ppo",
                 "rlhf_lib.dpo", "rlhf_lib.analysis", "rlhf_lib.stages", "rlhf_lib.pipeline"}


def module_files() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return hidden


def import_graph() -> dict[str, set[str]]:
    """module -> the rlhf_lib modules it imports (a submodule when `from pkg import sub` names one)."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        hidden = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in files:
                        edges.add(f"{base}.{alias.name}")
                    elif base in files:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_sees_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_rlhf_lib_has_no_import_cycle():
    graph = import_graph()
    assert {"rlhf_lib.sft", "rlhf_lib.reward", "rlhf_lib.comparisons", "rlhf_lib.artifacts"} <= graph.keys()
    unexpected = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not unexpected, f"import cycles in rlhf_lib: {unexpected}"


def test_artifacts_import_no_stage():
    """The on-disk formats sit below the stages: every stage may read them, they read no stage."""
    graph = import_graph()
    reachable, todo = set(), ["rlhf_lib.artifacts"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    assert not reachable & STAGE_MODULES
    assert not any(m.startswith("rlhf_lib.ppo.") for m in reachable)


def test_artifacts_import_alone_in_a_fresh_interpreter():
    code = ("import sys, rlhf_lib.artifacts; "
            "print(sorted(m for m in sys.modules if m.startswith('rlhf_lib.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out))  # a printed list of module names
    assert "rlhf_lib.artifacts" in loaded and not loaded & STAGE_MODULES
