"""The package's import graph: every module imports, and no two modules import each other.

The graph is read statically (``ast``) from every ``import`` statement of the
package, at module level *and* inside functions (a deferred import that closes
a circle is still a circle: ``caps.strict_key()`` imported ``plugin`` that
imports ``caps``), leaving out only ``if TYPE_CHECKING:`` blocks, which never
run.  No root, no binaries: under a second.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import pytest_runtimefaults

PACKAGE = Path(pytest_runtimefaults.__file__).parent
NAME = "pytest_runtimefaults"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(node: ast.AST, package: str) -> list[str]:
    """The module names that *node*'s body imports at run time."""
    names: list[str] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for stmt in child.orelse:
                names.extend(_imported(ast.Module(body=[stmt], type_ignores=[]), package))
        elif isinstance(child, ast.Import):
            names.extend(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                parts = package.split(".")
                base = parts[: len(parts) - child.level + 1]
                source = ".".join([*base, *([child.module] if child.module else [])])
            else:
                source = child.module or ""
            names.append(source)
            # "from pkg import mod" imports the submodule pkg.mod too.
            names.extend(f"{source}.{alias.name}" for alias in child.names)
        else:
            names.extend(_imported(child, package))
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (run-time imports only)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target in _imported(ast.parse(path.read_text(), str(path)), package):
            if target == NAME or target.startswith(NAME + "."):
                resolved = resolve(target)
                if resolved is not None and resolved != module:
                    graph[module].add(resolved)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_circles_among_the_package_modules() -> None:
    cycles = import_cycles(import_graph())
    assert cycles == [], "modules that import each other: " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_cycle_finder_finds_a_circle() -> None:
    # So that the test above cannot pass by finding nothing at all.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    real = import_graph()
    assert "pytest_runtimefaults.caps" in real["pytest_runtimefaults.plugin"]
    # caps' deferred import of fixtures._common is seen (a function-level import).
    assert "pytest_runtimefaults.fixtures._common" in real["pytest_runtimefaults.caps"]


def test_the_stash_keys_module_is_a_leaf() -> None:
    assert import_graph()["pytest_runtimefaults._keys"] == set()
    common = import_graph()["pytest_runtimefaults.fixtures._common"]
    assert common <= {
        "pytest_runtimefaults",
        "pytest_runtimefaults._keys",
        "pytest_runtimefaults.core",
        "pytest_runtimefaults.core.log",
        "pytest_runtimefaults.fixtures",
    }


def _makes_a_key(node: ast.AST) -> bool:
    """``pytest.StashKey()`` or ``pytest.StashKey[T]()``: a call that makes a key."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func.value if isinstance(node.func, ast.Subscript) else node.func
    return isinstance(func, (ast.Attribute, ast.Name)) and (
        getattr(func, "attr", None) == "StashKey" or getattr(func, "id", None) == "StashKey"
    )


def test_every_stash_key_lives_in_keys() -> None:
    made = {
        module: [n.lineno for n in ast.walk(ast.parse(path.read_text())) if _makes_a_key(n)]
        for module, path in _modules().items()
    }
    assert len(made.pop("pytest_runtimefaults._keys")) >= 14
    assert {m: lines for m, lines in made.items() if lines} == {}


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_old_key_names_are_the_same_objects() -> None:
    from pytest_runtimefaults import _keys, caps, plugin
    from pytest_runtimefaults.fixtures import dbus, recovery

    assert plugin.SEED_KEY is _keys.SEED_KEY
    assert plugin.FAULTS_KEY is _keys.FAULTS_KEY
    assert caps.strict_key() is _keys.STRICT_KEY is plugin.STRICT_KEY
    assert recovery.BUDGET_KEY is _keys.BUDGET_KEY
    assert dbus.PROXIES_KEY is _keys.PROXIES_KEY
