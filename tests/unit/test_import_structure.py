"""The import structure ``lint-imports`` cannot see by itself.

- A layers contract over a container constrains only the modules it names: a new module left
  out of the list would be free to import anything. Every module of such a container must be
  in one of its layers.
- Packages that are free of import cycles stay so (checked with grimp, the graph library
  import-linter is built on). Imports under ``TYPE_CHECKING`` count: a module that needs
  another's types only for annotations is still coupled to it (the store's cycles hid that
  way). The list grows as the cycles elsewhere are taken apart.
"""

import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
CYCLE_FREE = ["engine", "plugins"]


def _layer_contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    return [c for c in contracts if c["type"] == "layers" and c.get("containers")]


def _submodules(container: str) -> set[str]:
    folder = ROOT.joinpath(*container.split("."))
    return {
        p.stem if p.is_file() else p.name
        for p in folder.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }


@pytest.mark.parametrize("contract", _layer_contracts(), ids=lambda c: str(c["name"]))
def test_every_module_of_a_layered_container_is_in_a_layer(contract: dict[str, object]) -> None:
    layers = contract["layers"]
    assert isinstance(layers, list)
    named = {m.strip() for layer in layers for m in str(layer).replace(":", "|").split("|")}
    containers = contract["containers"]
    assert isinstance(containers, list)
    for container in containers:
        missing = _submodules(container) - named
        assert not missing, f"{container}: modules in no layer of {contract['name']!r}: {missing}"


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative) of the
    direct imports among ``modules``: each one is a set of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                imported = graph.find_modules_directly_imported_by(child) & modules
                work.append((child, iter(sorted(imported))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


@pytest.mark.parametrize("package", CYCLE_FREE)
def test_no_import_cycles(package: str) -> None:
    graph = grimp.build_graph(package.split(".", maxsplit=1)[0])
    modules = {m for m in graph.modules if m == package or m.startswith(f"{package}.")}
    assert not _cycles(graph, modules), f"import cycles in {package}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The finder itself: the store's cycle (taken apart by issue 14) or a made-up one."""
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph, {"a.x", "a.y", "a.z"}) == [["a.x", "a.y", "a.z"]]
    graph.remove_import(importer="a.z", imported="a.x")
    assert _cycles(graph, {"a.x", "a.y", "a.z"}) == []
