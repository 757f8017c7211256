"""The layering of docs/architecture.md, checked on the source: imports go lrp_module <- export <- pipeline <-
demo, bench; nothing imports tests; and no two modules import each other, directly or round a loop (imports
inside functions count too: they only hide a cycle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lrp_module", "export", "pipeline", "demo", "bench")
# what each package may import of the project's packages (besides itself)
ALLOWED = {"lrp_module": set(), "export": {"lrp_module"}, "pipeline": {"lrp_module", "export"},
           "demo": {"lrp_module", "export", "pipeline"}, "bench": {"lrp_module", "export", "pipeline", "demo"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (at any depth, not under `if TYPE_CHECKING:`), resolved to the modules
    that exist (`from a.b import c` is a.b.c when that is a module, else a.b)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    resolved = set()
    for target in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def _graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {_module_name(p) for p in files} | {"tests"}
    return {_module_name(p): _imports(p, modules) for p in files}


def test_every_package_imports_only_the_layers_below_it_and_never_tests():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
             if (top := target.split(".")[0]) != module.split(".")[0] and top not in ALLOWED[module.split(".")[0]]]
    assert not wrong, wrong


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _packages_above(module: str) -> set[str]:
    """The packages a module lies in: `a.b.c` -> {a, a.b} (their __init__ files run before it)."""
    parts = module.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts))}


def _with_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph as Python runs it: importing `a.b.c` first runs a/__init__.py and a/b/__init__.py, so an import
    is an edge to every package above its target too. The importer's own packages are left out (they are already
    being imported when it runs): a package's __init__ re-exporting its modules is not a cycle with them."""
    return {module: {edge for target in targets for edge in {target} | (_packages_above(target) & graph.keys())
                     if edge not in _packages_above(module) and edge != module}
            for module, targets in graph.items()}


def test_no_module_imports_one_that_imports_it_back():
    graph = _with_package_inits(_graph())
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_through_a_package_init_is_seen():
    """pipeline.classes once imported pipeline.datasets.records, whose package __init__ imports
    pipeline.datasets.layouts, which imports pipeline.classes: a cycle no module-to-module edge shows."""
    graph = {"p": set(), "p.classes": {"p.data.records"}, "p.data": {"p.data.layouts", "p.data.records"},
             "p.data.records": set(), "p.data.layouts": {"p.classes", "p.data.records"}}
    assert _cycle(graph) is None
    assert _cycle(_with_package_inits(graph)) == ["p.classes", "p.data", "p.data.layouts", "p.classes"]
    # a module importing its own package's modules, and the __init__ re-exporting it, is no cycle
    assert _cycle(_with_package_inits({"p": {"p.a"}, "p.a": {"p.b"}, "p.b": set()})) is None


@pytest.mark.parametrize("source, imports", [
    ("from . import b\n", {"pkg.b"}),
    ("from .b import thing\n", {"pkg.b"}),
    ("def f():\n    from .b import thing\n", {"pkg.b"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import thing\n", set()),
    ("import pkg.b.c\n", {"pkg.b"}),
])
def test_the_import_reader_sees_relative_nested_and_ignores_type_checking_imports(tmp_path, monkeypatch, source,
                                                                                    imports):
    """The checks above are only as good as this reader: it must see what would make a cycle."""
    import tests.test_architecture as this

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(source)
    monkeypatch.setattr(this, "ROOT", tmp_path)
    assert this._imports(tmp_path / "pkg" / "a.py", {"pkg", "pkg.a", "pkg.b"}) == imports
    assert this._cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"] and this._cycle({"x": {"y"}, "y": set()}) is None
