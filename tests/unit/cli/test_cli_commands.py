"""Every command the parser declares names a function that exists.

The parser refers to each command's function by module and name (``engine.cli.commands``
``Handler``), imported only when the command runs; a misspelt name would otherwise show
only when someone runs that command."""

import argparse
from collections.abc import Iterator

import pytest

from engine.cli.commands import Handler
from engine.cli.main import build_parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(words, parser) of every command and action: each parser with a ``func`` default,
    or no subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if parser.get_default("func") is not None or not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from commands(child, (*path, name))


ALL = list(commands(build_parser()))


def test_the_parser_declares_the_commands() -> None:
    words = {" ".join(path) for path, _ in ALL}
    assert {"backup image", "restore", "store init", "gc", "run", "snapshots protect"} <= words
    assert len(ALL) > 30


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_command_names_a_function(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    handler = parser.get_default("func")
    assert isinstance(handler, Handler), f"{' '.join(path)} names no command function"
    assert callable(handler.resolve())
