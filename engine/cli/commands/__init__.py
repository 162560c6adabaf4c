"""What each ``tessera`` command runs: one module per group of commands, beside the module
that declares the group's options (``engine.cli.<group>.register``; ``store``, ``backup``,
``restore``, ``vm`` and ``lab`` run the commands ``engine.cli.main`` declares).

The parser names a command's function with a ``Handler`` (module and name), and the module
is imported only when that command runs: building the parser — ``--help``, a usage error —
loads none of them, and a command loads what it uses, not every other command's machinery
(issue 15; ``tests/integration/test_cli_imports.py``). Nothing here imports
``engine.cli.main``: a command opens its store with ``stores.open_store``, and talks to a
running daemon through ``service``.
"""

import argparse
import importlib
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]


class Handler:
    """The command ``name`` of ``engine.cli.commands.<module>``, imported when called."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = f"{__name__}.{module}"
        self.name = name

    def resolve(self) -> Command:
        """The command's function (its module imported now)."""
        command: Command = getattr(importlib.import_module(self.module), self.name)
        return command

    def __call__(self, args: argparse.Namespace) -> int:
        return self.resolve()(args)

    def __repr__(self) -> str:
        return f"Handler({self.module}.{self.name})"
