"""The registry's entry points are importlib.metadata's: for this environment, and for
made-up ones with a third-party plugin, a shadowed copy of a distribution, an egg-info, a
zip on ``sys.path`` (which importlib.metadata reads itself)."""

import importlib.metadata
import sys
import zipfile
from pathlib import Path

import pytest

from engine.sources import entry_points as eps
from engine.sources.registry import GROUP

ENTRY_POINTS = """\
[console_scripts]
tool = {module}:main

[tessera.plugins]
# a comment
{name} = {module}:PLUGIN
spare={module}.sub:Thing.PLUGIN [extra]
"""


def stdlib(group: str) -> list[tuple[str, str]]:
    return [(ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group)]


def distribution(root: Path, dirname: str, name: str | None, module: str = "x") -> None:
    info = root / dirname
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dirname.partition('-')[0]}\n")
    if name is not None:
        (info / "entry_points.txt").write_text(ENTRY_POINTS.format(name=name, module=module))


def test_this_environment() -> None:
    groups = {ep.group for d in importlib.metadata.distributions() for ep in d.entry_points}
    assert GROUP in groups
    for group in groups:
        assert eps.entry_points(group) == stdlib(group), group


@pytest.fixture
def path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Two directories as the whole ``sys.path``."""
    roots = [tmp_path / "first", tmp_path / "second"]
    for root in roots:
        root.mkdir()
    monkeypatch.setattr(sys, "path", [str(r) for r in roots])
    return roots


def test_made_up_environment(path: list[Path]) -> None:
    first, second = path
    distribution(first, "Third_Party.Plugin-1.0.dist-info", "third", "third_party")
    distribution(first, "quiet-2.0.dist-info", None)  # no entry points at all
    distribution(first, "legacy-0.1-py3.11.egg-info", "legacy", "legacy_mod")
    # the same distributions again, later on the path: shadowed
    distribution(second, "third_party_plugin-0.9.dist-info", "old_third", "old")
    distribution(second, "QUIET-1.0.dist-info", "loud", "loud")
    distribution(second, "other-3.dist-info", "other", "other_mod")
    (second / "not-a-dist.txt").write_text("")
    found = eps.entry_points(GROUP)
    assert found == stdlib(GROUP)
    assert {name for name, _ in found} == {"third", "spare", "legacy", "other"}
    assert eps.entry_points("console_scripts") == stdlib("console_scripts")


def test_a_zip_on_the_path_is_read_by_importlib(path: list[Path], tmp_path: Path) -> None:
    archive = tmp_path / "dists.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(
            "zipped-1.0.dist-info/entry_points.txt",
            ENTRY_POINTS.format(name="zipped", module="zipped"),
        )
        z.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\n")
    sys.path.append(str(archive))
    found = eps.entry_points(GROUP)
    assert ("zipped", "zipped:PLUGIN") in found
    assert found == stdlib(GROUP)


def test_load_names_module_and_attributes() -> None:
    assert eps.load("engine.sources.registry:GROUP") == GROUP
    assert eps.load("engine.sources.registry : Plugin.command [extra]") is not None
    assert eps.load("engine.sources.entry_points") is eps
