"""The design goals of issue 28, measured from the source of ``effllm/`` (``python tools/design_metrics.py``).

- import cycles: strongly connected groups of modules in the graph of ``import`` / ``from ... import`` statements,
  at module level and inside functions alike (``from pkg import sub`` counts as an edge to ``pkg.sub``);
- the largest module (lines), the longest function (def line to last line), the widest signature (parameters
  without ``self`` / ``cls``; the seeds'-keyword ``generate`` is exempt).

``tests/test_design.py`` holds the tree to the goals; this prints where it stands.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "effllm"
GOALS = {"import_cycles": 0, "largest_module": 500, "longest_function": 80, "widest_signature": 10}
SIGNATURE_EXEMPT = {"effllm.decoding.seeds.generate"}  # the seeds' own keywords, one per option


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imported(node: ast.AST, name: str, path: Path, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(known: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            graph[name].update(t for t in _imported(node, name, path, known) if t in known and t != name)
    return graph


def cycles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in nodes:
        if v not in index:
            visit(v)
    return found


def functions(known: dict[str, Path]) -> list[tuple[str, int, int]]:
    """(qualified name, lines, parameters) of every function and method."""
    rows = []
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                if a.args and a.args[0].arg in ("self", "cls"):
                    n -= 1
                rows.append((f"{name}.{node.name}", node.end_lineno - node.lineno + 1, n))
    return rows


def measure(root: Path = ROOT) -> dict[str, object]:
    known = modules(root)
    fns = functions(known)
    sizes = sorted(((len(p.read_text().splitlines()), n) for n, p in known.items()), reverse=True)
    signed = [f for f in fns if f[0] not in SIGNATURE_EXEMPT]
    return {
        "import_cycles": cycles(import_graph(known), list(known)),
        "largest_modules": sizes[:5],
        "longest_functions": sorted(((f[1], f[0]) for f in fns), reverse=True)[:5],
        "widest_signatures": sorted(((f[2], f[0]) for f in signed), reverse=True)[:5],
    }


def main() -> None:
    m = measure()
    print(f"import cycles: {len(m['import_cycles'])} (goal {GOALS['import_cycles']})")
    for group in m["import_cycles"]:
        print("   ", " <-> ".join(group))
    for key, goal in (("largest_modules", "largest_module"), ("longest_functions", "longest_function"),
                      ("widest_signatures", "widest_signature")):
        print(f"{key.replace('_', ' ')} (goal <= {GOALS[goal]}):", ", ".join(f"{n} {v}" for v, n in m[key]))


if __name__ == "__main__":
    main()
