"""The house's shape, checked: fastclip's modules import one another without a circle (function-level and
TYPE_CHECKING imports count: they hide a circle from Python, not from a reader), and a module over 300 lines says
in its docstring why it is one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastclip"
LONG = 300  # lines; a module past this says why in its docstring ("why one module") or is split


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, name: str, is_package: bool) -> list[str]:
    """Every module name ``tree`` imports, at any depth (functions, TYPE_CHECKING blocks, main blocks);
    ``from a import b`` gives both 'a.b' and 'a' (b may be a module or a name in a)."""
    found: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path = ROOT, package: str = "fastclip") -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every module under ``root/package``."""
    files = {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for target in _imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            while target and target not in files:  # 'a.b.NAME' -> 'a.b'
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                edges.add(target)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _say(found: list[list[str]], graph: dict[str, set[str]]) -> str:
    return "; ".join(" / ".join(f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in found)


def test_fastclip_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    found = circles(graph)
    assert not found, f"import circles (a lower module must not import a higher one): {_say(found, graph)}"


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"a.py": "import p.b", "b.py": "def f():\n    from p import a"}, [["p.a", "p.b"]]),  # a lazy import
        ({"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import X",
          "b.py": "from .a import Y"}, [["p.a", "p.b"]]),  # TYPE_CHECKING, and a relative import
        ({"a.py": "from p import b", "b.py": "from p.c import Z", "c.py": "import p.a"}, [["p.a", "p.b", "p.c"]]),
        ({"a.py": "import p.b", "b.py": 'if __name__ == "__main__":\n    from p.a import main'}, [["p.a", "p.b"]]),
        ({"a.py": "import p.b", "b.py": "import os"}, []),
    ],
)  # fmt: skip
def test_the_circle_check_sees_what_python_hides(tmp_path, files, expected):
    package = tmp_path / "p"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / name).write_text(text + "\n")
    assert circles(import_graph(tmp_path, "p")) == expected


def test_a_long_module_says_why_it_is_one():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LONG and "why one module" not in doc.lower():
            long[str(path.relative_to(ROOT))] = lines
    assert not long, f"over {LONG} lines without a 'why one module' paragraph in the docstring, or split: {long}"
