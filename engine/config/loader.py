"""Read YAML configuration into typed models with errors that name file, key and line.

``load`` reads the daemon config (``config.yaml`` + ``conf.d/*.yaml``); ``load_policies``
reads ``policies.d/*.yaml`` (one policy per file); ``load_all`` reads both and checks that
policies name stores, engines and peers that exist. YAML is read with YAML 1.2 booleans
(only ``true``/``false``): ``on:`` (``notifications.on``) stays a key, ``no`` stays a string.

PyYAML is imported by the functions that read a file (``_loader``), not with this module:
every command that may be given a configuration imports it, and a local ``backup image``
reads none (issue 15).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from engine.config.models import Config
from engine.config.policy import Policy
from engine.config.types import dec_hook
from engine.core.errors import ConfigError

if TYPE_CHECKING:
    import yaml

_PATH_PART = re.compile(r"\.(\w+)|\[(\d+)\]")
# Keys that would hold a secret in the file itself, and the key to use instead.
_SECRET_KEYS = {
    "password": "password_file",
    "passphrase": "passphrase_file",
    "token": "tokens_file",
    "tokens": "tokens_file",
}

T = TypeVar("T")


@functools.cache
def _loader() -> type[yaml.SafeLoader]:
    """SafeLoader with YAML 1.2 booleans: ``yes/no/on/off`` are strings (made at the first
    read: the module docstring says why yaml is imported here)."""
    import yaml  # noqa: PLC0415

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return Loader


@dataclass(frozen=True)
class LoadedConfig:
    """The daemon config and its policies, checked against each other."""

    config: Config
    policies: tuple[Policy, ...]
    config_files: tuple[Path, ...]
    policies_dir: Path
    policy_files: dict[str, Path] = field(default_factory=dict)  # policy name → file

    def policy(self, name: str) -> Policy:
        for policy in self.policies:
            if policy.name == name:
                return policy
        raise ConfigError(message=f"no policy named {name!r}")


def _compose(path: Path) -> tuple[Any, yaml.Node | None]:
    import yaml  # noqa: PLC0415 - see _loader

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(message=f"{path}: cannot read: {e.strerror}") from e
    loader = _loader()
    try:
        node = yaml.compose(text, Loader=loader)
        data = yaml.load(text, Loader=loader)  # noqa: S506 - _loader makes a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(message=f"{path}{where}: not valid YAML: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(message=f"{path}: the top level must be a mapping")
    return data or {}, node


def _line(node: yaml.Node | None, json_path: str) -> int | None:
    """The 1-based line of ``$.a[0].b`` in a composed YAML tree (deepest node found)."""
    import yaml  # noqa: PLC0415 - see _loader

    line = None
    for key, index in _PATH_PART.findall(json_path.removeprefix("$")):
        if isinstance(node, yaml.MappingNode) and key:
            match = next((kv for kv in node.value if kv[0].value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and index:
            i = int(index)
            if i >= len(node.value):
                break
            node = node.value[i]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _error(path: Path, node: yaml.Node | None, json_path: str, reason: str) -> ConfigError:
    line = _line(node, json_path)
    unknown = re.search(r"unknown field `(\w+)`", reason)
    if unknown:  # point at the offending key, not at the mapping holding it
        line = _line(node, f"{json_path}.{unknown.group(1)}") or line
    where = json_path.removeprefix("$").lstrip(".") or "(top level)"
    at = f" (line {line})" if line else ""
    return ConfigError(message=f"{path}: {where}{at}: {reason}")


def _convert(data: Any, kind: type[T], path: Path, node: yaml.Node | None) -> T:
    for json_path, key in _secret_keys(data, "$"):
        # A webhook's token (Gotify's, a bearer token) is one token: token_file.
        instead = "token_file" if ".webhooks[" in json_path else _SECRET_KEYS[key]
        raise _error(
            path,
            node,
            json_path,
            f"secrets are never written in the configuration: use {instead}, "
            f"the path of a file holding the {key}",
        )
    try:
        return msgspec.convert(data, kind, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        message = str(e)
        m = re.search(r"at `(\$[^`]*)`", message)
        reason = message.split(" - at `", maxsplit=1)[0]
        raise _error(path, node, m.group(1) if m else "$", reason) from e


def _secret_keys(data: Any, json_path: str) -> Iterator[tuple[str, str]]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in _SECRET_KEYS:
                yield f"{json_path}.{key}", key
            yield from _secret_keys(value, f"{json_path}.{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _secret_keys(value, f"{json_path}[{i}]")


def load(main: Path, drop_in_dir: Path | None = None) -> Config:
    """Load ``main`` and, if present, ``drop_in_dir/*.yaml`` (later files extend list
    sections and replace mapping sections). Raises ConfigError naming file, key and line."""
    return _load_config(main, drop_in_dir)[0]


def _load_config(main: Path, drop_in_dir: Path | None) -> tuple[Config, tuple[Path, ...]]:
    files = [main]
    if drop_in_dir is not None and drop_in_dir.is_dir():
        files += sorted(drop_in_dir.glob("*.yaml"))
    merged: dict[str, Any] = {}
    for path in files:
        data, node = _compose(path)
        _convert(data, Config, path, node)  # each file valid on its own
        for key, value in data.items():
            if isinstance(value, list):
                merged[key] = [*merged.get(key, []), *value]
            else:
                merged[key] = value
    config = _convert(merged, Config, main, None)
    for what, items in (("store", config.stores), ("engine", config.engines)):
        _no_duplicates(what, [item.name for item in items], files)
    _no_duplicates("peer", [peer.name for peer in config.peers], files)
    _no_duplicates("webhook", [hook.name for hook in config.webhooks], files)
    for name in config.maintenance.webhooks:
        if name not in {hook.name for hook in config.webhooks}:
            listed = ", ".join(hook.name for hook in config.webhooks) or "none"
            raise ConfigError(
                message=f"{main}: maintenance.webhooks: no webhook named {name!r} in the "
                f"configuration ({listed})"
            )
    return config, tuple(files)


def _no_duplicates(what: str, names: list[str], files: list[Path]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            shown = ", ".join(str(f) for f in files)
            raise ConfigError(message=f"{shown}: two {what}s named {name!r}")
        seen.add(name)


def _normalize_policy(data: dict[str, Any]) -> dict[str, Any]:
    """Expand the short forms (see ``engine.config.policy``) before typing."""
    data = dict(data)
    if isinstance(data.get("schedule"), str):
        data["schedule"] = [data["schedule"]]
    if isinstance(data.get("level"), str):
        data["level"] = {"default": data["level"]}
    notifications = data.get("notifications")
    if isinstance(notifications, dict) and isinstance(notifications.get("on"), str):
        data["notifications"] = {**notifications, "on": [notifications["on"]]}
    return data


def load_policy(path: Path) -> Policy:
    """One policy file. Raises ConfigError naming file, key and line."""
    return _load_policy(path)[0]


def _load_policy(path: Path) -> tuple[Policy, yaml.Node | None]:
    data, node = _compose(path)
    return _convert(_normalize_policy(data), Policy, path, node), node


def load_policies(directory: Path) -> tuple[tuple[Policy, Path], ...]:
    """Every ``*.yaml`` in ``directory`` (name order), each one policy; names are unique."""
    return tuple((policy, path) for policy, path, _ in _policies(directory))


def _policies(directory: Path) -> list[tuple[Policy, Path, yaml.Node | None]]:
    loaded = []
    by_name: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")):
        policy, node = _load_policy(path)
        if policy.name in by_name:
            raise _error(
                path,
                node,
                "$.name",
                f"policy {policy.name!r} is also defined in {by_name[policy.name]}",
            )
        by_name[policy.name] = path
        loaded.append((policy, path, node))
    return loaded


def load_all(
    main: Path, drop_in_dir: Path | None = None, policies_dir: Path | None = None
) -> LoadedConfig:
    """The daemon config (``main`` + ``drop_in_dir``, default ``conf.d`` beside it) and the
    policies from ``policies_dir`` (else the config's ``policies_dir``, relative to
    ``main``'s directory, else ``policies.d`` beside it; a missing default is empty)."""
    if drop_in_dir is None:
        drop_in_dir = main.parent / "conf.d"
    config, files = _load_config(main, drop_in_dir)
    explicit = policies_dir is not None or config.policies_dir is not None
    if policies_dir is None:
        policies_dir = main.parent / (config.policies_dir or Path("policies.d"))
    if not policies_dir.is_dir():
        if explicit:
            raise ConfigError(message=f"{policies_dir}: no such policy directory")
        return LoadedConfig(config, (), files, policies_dir)
    loaded = _policies(policies_dir)
    for policy, path, node in loaded:
        _check_references(config, policy, path, node)
    return LoadedConfig(
        config,
        tuple(policy for policy, _, _ in loaded),
        files,
        policies_dir,
        {policy.name: path for policy, path, _ in loaded},
    )


def check_all(
    main: Path, drop_in_dir: Path | None = None, policies_dir: Path | None = None
) -> tuple[LoadedConfig | None, list[ConfigError]]:
    """Like ``load_all`` but reports every broken policy file, not only the first: the
    loaded configuration (None if any error) and the errors (``check-config``)."""
    try:
        loaded = load_all(main, drop_in_dir, policies_dir)
    except ConfigError as e:
        first = e
    else:
        return loaded, []
    try:
        config, _ = _load_config(main, drop_in_dir or main.parent / "conf.d")
    except ConfigError:
        return None, [first]  # the daemon config itself is broken: that is the error
    directory = policies_dir or main.parent / (config.policies_dir or Path("policies.d"))
    errors: list[ConfigError] = []
    names: dict[str, Path] = {}
    for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
        try:
            policy, node = _load_policy(path)
            _check_references(config, policy, path, node)
            if policy.name in names:
                raise _error(
                    path,
                    node,
                    "$.name",
                    f"policy {policy.name!r} is also defined in {names[policy.name]}",
                )
            names[policy.name] = path
        except ConfigError as e:
            errors.append(e)
    return None, errors or [first]


def _check_references(config: Config, policy: Policy, path: Path, node: yaml.Node | None) -> None:
    def known(what: str, name: str | None, names: list[str], json_path: str) -> None:
        if name is None:
            if len(names) != 1:
                raise _error(
                    path,
                    node,
                    "$",
                    f"the configuration has {len(names)} {what}s: name one "
                    f"in {json_path.removeprefix('$.')}",
                )
            return
        if name not in names:
            listed = ", ".join(names) or "none"
            raise _error(
                path, node, json_path, f"no {what} named {name!r} in the configuration ({listed})"
            )

    known("store", policy.store, [s.name for s in config.stores], "$.store")
    engines = [e.name for e in config.engines]
    known("engine", policy.selection.engine, engines, "$.selection.engine")
    peers = [p.name for p in config.peers]
    for i, target in enumerate(policy.replication):
        known("peer", target.peer, peers, f"$.replication[{i}].peer")
    if policy.standby is not None:
        known("peer", policy.standby.peer, peers, "$.standby.peer")
    webhooks = [w.name for w in config.webhooks]
    for i, name in enumerate(policy.notifications.webhooks):
        known("webhook", name, webhooks, f"$.notifications.webhooks[{i}]")
