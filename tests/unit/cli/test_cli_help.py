"""Help a script writer can rely on (issue 16): every option of every command has help text,
every command has examples, each example is a command line the parser accepts for that very
command, and ``tessera --help`` lists every exit code ``exits`` defines."""

import argparse
import shlex
from collections.abc import Iterator

import pytest

from engine.cli import exits
from engine.cli.helptext import EXAMPLES
from engine.cli.main import build_parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


ALL = list(commands(build_parser()))
IDS = [" ".join(path) or "tessera" for path, _ in ALL]


@pytest.mark.parametrize(("path", "parser"), ALL, ids=IDS)
def test_every_option_has_help(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    missing = [
        action.option_strings[0] if action.option_strings else action.dest
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert missing == [], f"tessera {' '.join(path)}: options without help"


@pytest.mark.parametrize(("path", "parser"), ALL, ids=IDS)
def test_every_command_has_examples_that_parse(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    examples = EXAMPLES[" ".join(path)]
    assert examples and "examples:" in parser.format_help()
    for example in examples:
        argv = shlex.split(example)
        assert argv[0] == "tessera"
        args = build_parser().parse_args(argv[1:])  # a usage error exits: the test fails
        # A group's examples run its actions; a command's run that command.
        assert argv[1 : 1 + len(path)] == list(path), example
        assert callable(args.func)


def test_examples_document_only_commands_that_exist() -> None:
    assert set(EXAMPLES) == {" ".join(path) for path, _ in ALL}


def test_help_lists_every_exit_code() -> None:
    text = build_parser().format_help()
    codes = {v for k, v in vars(exits).items() if k.startswith("EXIT_")}
    assert {code for code, _ in exits.CODES} == codes
    for code, meaning in exits.CODES:
        assert f"  {code:<3}  {meaning}" in text
