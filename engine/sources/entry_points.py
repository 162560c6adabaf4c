"""The entry points of one group, of every installed distribution, as (name, value) pairs —
what ``importlib.metadata.entry_points(group=...)`` gives — read without importing
``importlib.metadata``.

The registry needs them at the start of every command that uses a plugin, a local backup
included; importing ``importlib.metadata`` (email, zipfile, csv) took ~10 ms of that start,
reading the files ~1 ms (issue 15). Distributions are found as importlib.metadata's path
finder finds them: each ``*.dist-info`` / ``*.egg-info`` directory in each directory on
``sys.path``, in that order, the first of a (normalised) name winning; their
``entry_points.txt`` parsed the same way. Where distributions may come from anywhere else —
a zip or an egg on ``sys.path``, a finder on ``sys.meta_path`` that offers its own — this
asks importlib.metadata instead.
"""

import os
import re
import sys
from functools import reduce
from importlib import import_module
from importlib.machinery import PathFinder
from typing import Any

_INFO_SUFFIXES = (".dist-info", ".egg-info")
_SEPARATORS = re.compile(r"[-_.]+")


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, value) of the entry points in ``group``, in the order importlib.metadata
    gives them."""
    if not _plain_path():
        return _from_importlib(group)
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for root in sys.path:
        try:
            children = os.listdir(root or ".")
        except OSError:
            continue  # missing, or not a directory (_plain_path ruled out files)
        for child in children:
            low = child.lower()
            if not low.endswith(_INFO_SUFFIXES):
                continue
            name = _SEPARATORS.sub("_", low.rpartition(".")[0].partition("-")[0])
            if name in seen:
                continue  # an earlier distribution of that name shadows this one
            seen.add(name)
            found += _group(os.path.join(root or ".", child, "entry_points.txt"), group)
    return found


def load(value: str) -> Any:
    """The object an entry point's value names: ``module:attr.attr [extras]``."""
    module, _, attrs = value.partition("[")[0].partition(":")
    return reduce(getattr, filter(None, attrs.strip().split(".")), import_module(module.strip()))


def _plain_path() -> bool:
    """Whether every distribution is in a directory on ``sys.path`` (the case read here)."""
    if any(
        finder is not PathFinder and hasattr(finder, "find_distributions")
        for finder in sys.meta_path
    ):
        return False
    return not any(
        os.path.isfile(root) or root.lower().endswith(".egg") for root in sys.path if root
    )


def _group(path: str, group: str) -> list[tuple[str, str]]:
    """The ``group`` section of one ``entry_points.txt`` (none when it is missing)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return []
    pairs = []
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
        elif section == group and "=" in line:
            name, _, value = line.partition("=")
            pairs.append((name.strip(), value.strip()))
    return pairs


def _from_importlib(group: str) -> list[tuple[str, str]]:
    from importlib.metadata import entry_points as installed  # noqa: PLC0415 - module doc

    return [(ep.name, ep.value) for ep in installed(group=group)]
