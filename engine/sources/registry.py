"""The plugin registry: plugins are found through the ``tessera.plugins`` entry point group
(``pyproject.toml``), so the engine never imports a plugin module by name.

A plugin's entry point is a ``Plugin``: its name and a ``recover`` coroutine that undoes or
finishes what a killed job of that plugin left (from the resources it recorded).
"""

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from engine.core.errors import ConfigError

GROUP = "tessera.plugins"


@dataclass(frozen=True)
class Plugin:
    name: str
    # recover(resources, committed): committed=True when the job's snapshot exists.
    recover: Callable[[Mapping[str, Any], bool], Awaitable[list[str]]]
    # Optional factories the CLI uses for plugin-specific commands (e.g. backup image).
    factories: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def factory(self, name: str) -> Callable[..., Any]:
        try:
            return self.factories[name]
        except KeyError:
            raise ConfigError(message=f"plugin {self.name} has no {name!r}") from None


def plugins() -> dict[str, Plugin]:
    found = {}
    for ep in entry_points(group=GROUP):
        plugin = ep.load()
        if not isinstance(plugin, Plugin):
            raise ConfigError(message=f"entry point {ep.name} ({ep.value}) is not a Plugin")
        found[plugin.name] = plugin
    return found


def get(name: str) -> Plugin:
    try:
        return plugins()[name]
    except KeyError:
        raise ConfigError(
            message=f"no plugin named {name!r} is installed (have: {sorted(plugins())})"
        ) from None
