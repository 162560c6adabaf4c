"""libguestfs's Python bindings, from the system's package, for any Python 3 of its minor.

The bindings (``guestfs.py`` and ``libguestfsmod``) come with the distribution (Debian
``python3-guestfs``, Enterprise Linux ``python3-libguestfs``), built for the system Python; a
virtualenv of the same minor version loads them from there. ``load`` imports them once and
raises ``ConfigError`` naming the package to install when they are missing.
"""

import importlib.util
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Final

from engine.core.errors import ConfigError

# Where distributions put them, besides this interpreter's own paths.
SYSTEM_DIRS: Final = (
    Path("/usr/lib/python3/dist-packages"),  # Debian, Ubuntu
    Path(f"/usr/lib64/python3.{sys.version_info.minor}/site-packages"),  # EL
    Path(f"/usr/lib/python3.{sys.version_info.minor}/site-packages"),
)


def load() -> ModuleType:
    """The ``guestfs`` module; ConfigError when no system package provides it."""
    if "guestfs" in sys.modules:
        return sys.modules["guestfs"]
    try:
        return importlib.import_module("guestfs")  # where this Python has them
    except ImportError:
        pass
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    for directory in SYSTEM_DIRS:
        native = directory / f"libguestfsmod{suffix}"
        source = directory / "guestfs.py"
        if native.is_file() and source.is_file():
            _import("libguestfsmod", native)
            return _import("guestfs", source)
    raise ConfigError(
        message="file-level restore needs libguestfs and its Python bindings for Python "
        f"3.{sys.version_info.minor}: apt install libguestfs-tools python3-guestfs "
        "(Debian), dnf install guestfs-tools python3-libguestfs (Enterprise Linux)"
    )


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(message=f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(message=f"cannot load libguestfs's bindings from {path}: {e}") from e
    return module
