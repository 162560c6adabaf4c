"""Read YAML configuration into ``models.Config`` with errors that name file, key and line."""

import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from engine.config.models import Config
from engine.core.errors import ConfigError

_PATH_PART = re.compile(r"\.(\w+)|\[(\d+)\]")


def _compose(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(message=f"{path}: cannot read: {e.strerror}") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(message=f"{path}{where}: not valid YAML: {e}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(message=f"{path}: the top level must be a mapping")
    return data or {}, node


def _line(node: yaml.Node | None, json_path: str) -> int | None:
    """The 1-based line of ``$.a[0].b`` in a composed YAML tree (deepest node found)."""
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


def load(main: Path, drop_in_dir: Path | None = None) -> Config:
    """Load ``main`` and, if present, ``drop_in_dir/*.yaml`` (later files extend list
    sections and replace mapping sections). Raises ConfigError naming file, key and line."""
    files = [main]
    if drop_in_dir is not None and drop_in_dir.is_dir():
        files += sorted(drop_in_dir.glob("*.yaml"))
    merged: dict[str, Any] = {}
    for path in files:
        data, node = _compose(path)
        try:
            msgspec.convert(data, Config, dec_hook=_decode)  # each file valid on its own
        except msgspec.ValidationError as e:
            message = str(e)
            m = re.search(r"at `(\$[^`]*)`", message)
            json_path = m.group(1) if m else "$"
            line = _line(node, json_path)
            where = json_path.removeprefix("$").lstrip(".") or "(top level)"
            at = f" (line {line})" if line else ""
            reason = message.split(" - at `", maxsplit=1)[0]
            raise ConfigError(message=f"{path}: {where}{at}: {reason}") from e
        for key, value in data.items():
            if isinstance(value, list):
                merged[key] = [*merged.get(key, []), *value]
            else:
                merged[key] = value
    return msgspec.convert(merged, Config, dec_hook=_decode)


def _decode(kind: type, obj: Any) -> Any:
    if kind is Path and isinstance(obj, str):
        return Path(obj)
    raise TypeError(f"expected {kind.__name__}, got {type(obj).__name__}")
