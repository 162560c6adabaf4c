"""The import structure ``lint-imports`` cannot see by itself.

- A layers contract over a container constrains only the modules it names: a new module left
  out of the list would be free to import anything. Every module of such a container must be
  in one of its layers.
- Packages that are free of import cycles stay so (checked with grimp, the graph library
  import-linter is built on). Imports under ``TYPE_CHECKING`` count: a module that needs
  another's types only for annotations is still coupled to it (the store's cycles hid that
  way). The list grows as the cycles elsewhere are taken apart.
"""

import itertools
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
CYCLE_FREE = ["engine.store", "plugins.ovirt"]


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


@pytest.mark.parametrize("package", CYCLE_FREE)
def test_no_import_cycles(package: str) -> None:
    graph = grimp.build_graph(package.split(".", maxsplit=1)[0])
    modules = sorted(m for m in graph.modules if m == package or m.startswith(f"{package}."))
    cycles = [
        (a, b)
        for a, b in itertools.combinations(modules, 2)
        if graph.chain_exists(a, b) and graph.chain_exists(b, a)
    ]
    assert not cycles, f"import cycles in {package}: {cycles}"
