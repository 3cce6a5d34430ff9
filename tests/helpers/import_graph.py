"""The import graph of a set of Python packages, read with :mod:`ast` (nothing is imported): cycles and layer checks.

Project-independent: give it a source root and the top-level package names. Every import statement counts, at
module level or inside a function (a function-level import that closes a cycle is still a cycle), including
``from x import y`` (an edge to ``x.y`` when that is a module, else to ``x``), relative imports and
``importlib.import_module("literal")``. Imports under ``if TYPE_CHECKING:`` never run: they are kept out of the
cycle check but still have to point down. A package's ``__init__`` running before its submodules is Python's
import order, not an edge.

Example:
    >>> graph = ImportGraph.scan(Path("."), ["mypkg"])                              # doctest: +SKIP
    >>> graph.cycles()                   # [["mypkg.a", "mypkg.b", "mypkg.a"], ...]  # doctest: +SKIP
    >>> graph.upward_imports(Layers([("low", ["mypkg.util*"]), ("high", ["mypkg*"])]))  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One import of a project module by another."""

    source: str
    target: str
    line: int
    lazy: bool  # inside a function body: runs on first call, not at import time
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs

    def __str__(self) -> str:
        kind = " (type-checking only)" if self.type_only else " (in a function)" if self.lazy else ""
        return f"{self.source}:{self.line} imports {self.target}{kind}"


def discover_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root/<package>`` (``__init__`` -> the package)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Raw imported names of one module: (dotted name, alternative dotted name or None, line, lazy, type_only)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, str | None, int, bool, bool]] = []
        self._depth = 0
        self._type_only = 0

    def _add(self, name: str, alternative: str | None, node: ast.AST) -> None:
        self.found.append((name, alternative, node.lineno, self._depth > 0, self._type_only > 0))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._type_only += 1
        for child in node.body:
            self.visit(child)
        self._type_only -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, None, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".") if self.package else []
            anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            self._add(base, f"{base}.{alias.name}" if alias.name != "*" else None, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                self._add(arg.value, None, node)
        self.generic_visit(node)


class ImportGraph:
    """Intra-project imports of a set of packages."""

    def __init__(self, modules: dict[str, Path], imports: Sequence[Import]) -> None:
        self.modules = modules
        self.imports = list(imports)

    @classmethod
    def scan(cls, root: Path, packages: Iterable[str]) -> ImportGraph:
        modules = discover_modules(root, packages)
        imports: list[Import] = []
        for module, path in modules.items():
            collector = _Collector(module, path.name == "__init__.py")
            collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
            for name, alternative, line, lazy, type_only in collector.found:
                target = cls._resolve(modules, name, alternative)
                if target is not None and target != module:
                    imports.append(Import(module, target, line, lazy, type_only))
        return cls(modules, imports)

    @staticmethod
    def _resolve(modules: dict[str, Path], name: str, alternative: str | None) -> str | None:
        """The project module an import loads: ``alternative`` (``x.y`` of ``from x import y``) when it is a module,
        else the longest prefix of ``name`` that is one; None for third-party and standard-library imports."""
        if alternative in modules:
            return alternative
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                return candidate
        return None

    def _runtime_edges(self) -> dict[str, dict[str, Import]]:
        edges: dict[str, dict[str, Import]] = defaultdict(dict)
        for imp in self.imports:
            if not imp.type_only:
                edges[imp.source].setdefault(imp.target, imp)
        return edges

    def tangles(self) -> list[list[str]]:
        """The strongly connected components of the runtime graph that hold a cycle (sorted module names)."""
        edges = {module: sorted(targets) for module, targets in self._runtime_edges().items()}
        return sorted(sorted(component) for component in _strongly_connected(sorted(self.modules), edges))

    def cycles(self) -> list[list[Import]]:
        """One shortest cycle (imports in order) per tangle, through its first module; breaking it may leave
        another cycle in the same tangle, so a fix is checked by scanning again."""
        edges = self._runtime_edges()
        found = []
        for component in self.tangles():
            path = _shortest_cycle(component[0], set(component), edges)
            found.append([edges[a][b] for a, b in zip(path[:-1], path[1:], strict=True)])
        return found

    def upward_imports(self, layers: Layers) -> list[tuple[Import, str, str]]:
        """(import, source layer, target layer) for every import of a module in a higher layer."""
        bad = []
        for imp in self.imports:
            low, high = layers.index(imp.source), layers.index(imp.target)
            if high > low:
                bad.append((imp, layers.names[low], layers.names[high]))
        return bad


class Layers:
    """Ordered layers, lowest first; each is a list of :mod:`fnmatch` patterns over dotted module names.

    A module belongs to the layer of its most specific matching pattern: an exact name beats any wildcard, and a
    longer wildcard beats a shorter one. Two layers may not claim the same pattern.
    """

    def __init__(self, table: Sequence[tuple[str, Sequence[str]]]) -> None:
        self.names = [name for name, _ in table]
        self._patterns: dict[str, int] = {}
        for index, (_, patterns) in enumerate(table):
            for pattern in patterns:
                if pattern in self._patterns:
                    raise ValueError(f"pattern {pattern!r} is in two layers")
                self._patterns[pattern] = index

    def index(self, module: str) -> int:
        matches = [p for p in self._patterns if fnmatch.fnmatchcase(module, p)]
        if not matches:
            raise KeyError(module)
        best = max(matches, key=lambda p: (not any(c in p for c in "*?["), len(p)))
        return self._patterns[best]

    def unplaced(self, modules: Iterable[str]) -> list[str]:
        return [m for m in modules if not any(fnmatch.fnmatchcase(m, p) for p in self._patterns)]


def _strongly_connected(nodes: Sequence[str], edges: dict[str, list[str]]) -> Iterator[set[str]]:
    """Tarjan's algorithm (iterative); yields only components that hold a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(edges.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    yield component


def _shortest_cycle(start: str, component: set[str], edges: dict[str, dict[str, Import]]) -> list[str]:
    """``[start, ..., start]``: a shortest path back to ``start`` inside ``component`` (breadth first)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges.get(node, {})):
            if child not in component:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # unreachable for a strongly connected component


def describe_cycle(cycle: Sequence[Import]) -> str:
    """``a -> b -> a`` followed by where each import is."""
    path = " -> ".join([cycle[0].source, *(imp.target for imp in cycle)])
    return path + "".join(f"\n    {imp}" for imp in cycle)
