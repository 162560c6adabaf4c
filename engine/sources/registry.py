"""The plugin registry: plugins are found through the ``tessera.plugins`` entry point group
(``pyproject.toml``; read by ``entry_points``, as importlib.metadata reads them), or
registered in-process with ``register`` (a test, an embedding program): the engine never
imports a plugin module, and finds plugins by the capability it needs (``capabilities``),
not by their names.

A plugin's entry point is a ``Plugin``: its name, a ``recover`` coroutine that undoes or
finishes what a killed job of that plugin left (from the resources it recorded; a job's
journal names its plugin), and what it provides: a ``Hypervisor``, ``ImageIO``, commands of
its own for the command line (``commands``, e.g. the lab's ``up``/``show``/``down``).

``hypervisor(section)``: the plugin serving an engine section of the configuration: the one
its ``plugin`` key names, else the only installed plugin that provides a hypervisor.
"""

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from engine.core.errors import ConfigError
from engine.sources.capabilities import Hypervisor, ImageIO
from engine.sources.entry_points import entry_points, load

GROUP = "tessera.plugins"
_registered: dict[str, "Plugin"] = {}


@dataclass(frozen=True)
class Plugin:
    name: str
    # recover(resources, committed): committed=True when the job's snapshot exists.
    recover: Callable[[Mapping[str, Any], bool], Awaitable[list[str]]]
    hypervisor: Hypervisor | None = None
    images: ImageIO | None = None
    # Commands of the plugin's own for the command line (e.g. the lab's up/show/down).
    commands: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def command(self, name: str) -> Callable[..., Any]:
        try:
            return self.commands[name]
        except KeyError:
            raise ConfigError(message=f"plugin {self.name} has no command {name!r}") from None


def plugins() -> dict[str, Plugin]:
    """Every installed plugin by name; a registered one replaces an entry point's."""
    found = {}
    for name, value in entry_points(GROUP):
        plugin = load(value)
        if not isinstance(plugin, Plugin):
            raise ConfigError(message=f"entry point {name} ({value}) is not a Plugin")
        found[plugin.name] = plugin
    return found | _registered


@contextmanager
def register(plugin: Plugin) -> Iterator[Plugin]:
    """``plugin`` installed while the context lasts (beside the entry points)."""
    before = _registered.get(plugin.name)
    _registered[plugin.name] = plugin
    try:
        yield plugin
    finally:
        if before is None:
            del _registered[plugin.name]
        else:
            _registered[plugin.name] = before


def get(name: str) -> Plugin:
    try:
        return plugins()[name]
    except KeyError:
        raise ConfigError(
            message=f"no plugin named {name!r} is installed (have: {sorted(plugins())})"
        ) from None


def hypervisor(section: Any) -> tuple[str, Hypervisor]:
    """(plugin name, its ``Hypervisor``) serving the configuration's engine ``section``
    (module docstring). ConfigError when none, or several and the section names none."""
    wanted = getattr(section, "plugin", None)
    offered = {n: p.hypervisor for n, p in plugins().items() if p.hypervisor is not None}
    if wanted is not None:
        if wanted not in offered:
            raise ConfigError(
                message=f"engine {section.name}: plugin {wanted!r} provides no hypervisor "
                f"(installed: {sorted(offered) or 'none'})"
            )
        return wanted, offered[wanted]
    if len(offered) != 1:
        raise ConfigError(
            message=f"engine {section.name}: "
            + (
                f"several hypervisor plugins are installed ({', '.join(sorted(offered))}); "
                "name one with `plugin:`"
                if offered
                else "no installed plugin provides a hypervisor"
            )
        )
    ((name, found),) = offered.items()
    return name, found


def images() -> tuple[str, ImageIO]:
    """(plugin name, its ``ImageIO``): the installed plugin for local disk images."""
    offered = {n: p.images for n, p in plugins().items() if p.images is not None}
    if len(offered) != 1:
        raise ConfigError(
            message="local images need exactly one plugin providing them; installed: "
            f"{sorted(offered) or 'none'}"
        )
    ((name, found),) = offered.items()
    return name, found
