"""The package's imports run in one direction.

Module level: no module imports, at import time, a module that (directly or through others)
imports it back. Between subpackages (``fastkd.engine``, ``fastkd.cache``, ``fastkd.losses``,
``fastkd.kernels``, ``fastkd.analysis``, ``fastkd.data``, ``fastkd.models``, ``fastkd.bench``; each
root module such as ``fastkd.recipes`` counts on its own), imports inside functions count too: a
deferred import hides a cycle from Python, not from the design. The ``cli`` modules are entry points
that the ``fastkd`` dispatcher loads by name: library code never imports them.

The graph is built from the installed package's source with ``ast`` (nothing is imported):
one node per module of ``fastkd`` (``fastkd.kernels`` included, wherever it is installed from),
an edge for every import statement at module level (inside top-level ``if`` / ``try`` / ``with``
blocks too, but not inside functions or classes, and not under ``if TYPE_CHECKING:``), or, for the
subpackage graph, at any depth. Importing a submodule also initialises its parent packages; those
implicit edges are left out, as Python handles a parent package that is still initialising.
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pytest


def _modules(package: str) -> dict[str, Path]:
    """Every module of ``package`` (recursively): dotted name -> source file."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin, f"cannot find package {package}"
    found = {package: Path(spec.origin)}
    for info in pkgutil.iter_modules(list(spec.submodule_search_locations or [])):
        name = f"{package}.{info.name}"
        if info.ispkg:
            found.update(_modules(name))
        else:
            sub = importlib.util.find_spec(name)
            if sub is not None and sub.origin and sub.origin.endswith(".py"):
                found[name] = Path(sub.origin)
    return found


def _top_level_imports(tree: ast.Module):
    """Import statements executed when the module is imported."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name != "TYPE_CHECKING":
                todo += node.body
            todo += node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                todo += handler.body
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            todo += node.body


def _all_imports(tree: ast.Module):
    """Every import statement, at any depth (inside functions and classes too), except under
    ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If):
            test = node.test
            if (test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)) == "TYPE_CHECKING":
                todo += node.orelse
                continue
        todo += list(ast.iter_child_nodes(node))


def import_graph(root: str = "fastkd", *, in_functions: bool = False) -> dict[str, set[str]]:
    """Module -> the modules it imports: at module level, or (``in_functions``) anywhere."""
    walk = _all_imports if in_functions else _top_level_imports
    modules = _modules(root)
    # kernels/ is installed as fastkd.kernels from outside fastkd/ (package-dir mapping), so an
    # editable install does not list it among fastkd's folders: add it by name.
    if root == "fastkd" and "fastkd.kernels" not in modules:
        modules.update(_modules("fastkd.kernels"))
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
                edges.update(t for t in targets if t in modules)
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            # ``from pkg import sub`` imports the module pkg.sub; ``from mod import name`` imports mod.
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            edges.update(subs)
            if len(subs) < len(node.names):
                edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def unit(module: str, graph: dict[str, set[str]]) -> str:
    """The subpackage a module belongs to (``fastkd.engine.trainer`` -> ``fastkd.engine``); a root
    module (``fastkd.cli``, ``fastkd.recipes``) and the root package are units of their own."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and any(m.startswith(module + ".") for m in graph)):
        return ".".join(parts[:2])
    return module


def subpackage_graph() -> dict[str, set[str]]:
    """Unit -> the units it imports, counting imports inside functions."""
    graph = import_graph(in_functions=True)
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        u = unit(module, graph)
        units.setdefault(u, set()).update(unit(t, graph) for t in targets)
    for u, targets in units.items():
        targets.discard(u)
    return units


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:  # a shortest closed path through the component's first module
        members, start = set(comp), comp[0]
        parents, frontier, path = {start: None}, [start], None
        while frontier and path is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        path = [v]
                        while parents[path[-1]] is not None:
                            path.append(parents[path[-1]])
                        path = path[::-1] + [start]
                        break
                    if w not in parents:
                        parents[w] = v
                        nxt.append(w)
                if path:
                    break
            frontier = nxt
        cycles.append(path)
    return cycles


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "fastkd.kernels" in graph and "fastkd.data.loader" in graph and "fastkd.engine.trainer" in graph
    # a known module-level edge is found (the data factory imports the shared base types)
    assert "fastkd.data.base" in graph["fastkd.data.loader"]


def test_find_cycles_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    if cycles:
        pytest.fail("module-level import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles))


def test_data_backends_import_only_base_decode_and_index():
    graph = import_graph()
    allowed = {"fastkd.data.base", "fastkd.data.decode", "fastkd.data.index", "fastkd._compat"}
    for backend in ("fastkd.data.torch_loader", "fastkd.data.dali", "fastkd.data.synthetic"):
        assert graph[backend] <= allowed, (backend, graph[backend] - allowed)


def test_the_function_level_walk_sees_deferred_imports():
    graph = import_graph(in_functions=True)
    # fastkd.losses.functional imports the kernels inside a function only (they compile on first use)
    assert "fastkd.kernels" in graph["fastkd.losses.functional"]
    assert "fastkd.kernels" not in import_graph()["fastkd.losses.functional"]
    units = subpackage_graph()
    assert {"fastkd.engine", "fastkd.cache", "fastkd.losses", "fastkd.kernels", "fastkd.data", "fastkd.models",
            "fastkd.analysis", "fastkd.bench", "fastkd.cli", "fastkd.recipes"} <= set(units)
    assert "fastkd.engine" in units["fastkd.cache"]  # the cache builds on the engine


def test_no_import_cycles_between_subpackages():
    cycles = find_cycles(subpackage_graph())
    if cycles:
        pytest.fail("import cycles between subpackages (imports inside functions included):\n"
                    + "\n".join("  " + " -> ".join(c) for c in cycles))


def test_the_engine_never_imports_the_cache():
    """The cache builds on the engine (its teacher source, config, loaders); the choice of the cache's
    source for a run is made above both, in fastkd.recipes."""
    graph = import_graph(in_functions=True)
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("fastkd.engine")
                       for t in targets if t == "fastkd.cache" or t.startswith("fastkd.cache."))
    assert not offenders, offenders
    from fastkd.cache import store
    from fastkd.engine import config

    assert config.CACHE_MANIFEST == store.MANIFEST  # the engine names the cache's manifest without importing it


def test_library_code_never_imports_a_cli_module():
    """``cli`` modules hold argument parsing and ``main``; what they compute lives in library modules
    (e.g. fastkd.analysis.report), which the demo and the study import instead."""
    graph = import_graph(in_functions=True)
    is_cli = [m for m in graph if m.rpartition(".")[2] in ("cli", "train_cli")]
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                       if t in is_cli and m != "fastkd.__main__")  # python -m fastkd runs the dispatcher
    assert not offenders, offenders
