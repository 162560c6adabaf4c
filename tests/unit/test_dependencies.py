"""Every runtime dependency ``pyproject.toml`` declares is imported by ``engine`` or
``plugins``: a dependency nobody imports is installed on every machine for nothing (issue
16 found ``aiofiles``). The distributions' module names come from the installed metadata,
so a dependency whose module is named differently (``ovirtsdk4``, ``yaml``) is found too."""

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [_normal(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) for d in project["dependencies"]]


def _imported() -> set[str]:
    """Top-level names of every module ``engine`` and ``plugins`` import, at any depth."""
    names = set()
    for package in ("engine", "plugins"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_declared_dependency_is_imported() -> None:
    modules: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules.setdefault(_normal(dist), set()).add(module)
    imported = _imported()
    unused = [d for d in _declared() if not modules.get(d, {d.replace("-", "_")}) & imported]
    assert unused == [], f"declared in pyproject.toml, imported nowhere: {unused}"
