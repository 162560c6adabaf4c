"""``check_path``: what a client may name in a guest tree (the API passes its paths here
before they reach the appliance); ``check_socket_room``: a TMPDIR too deep for the disks'
NBD sockets is named before anything starts."""

import tempfile
from pathlib import Path

import pytest

from engine.core.errors import ConfigError
from engine.restore.files import BadPath, check_path, check_socket_room


@pytest.mark.parametrize(
    ("given", "normal"),
    [("/", "/"), ("/sda1/etc", "/sda1/etc"), ("//sda1/./etc/", "/sda1/etc")],
)
def test_absolute_paths_are_normalised(given: str, normal: str) -> None:
    assert check_path(given) == normal


@pytest.mark.parametrize(
    "given", ["", "sda1/etc", "/sda1/../..", "/sda1/etc/..", "../etc", "/sda1/a\0b"]
)
def test_relative_dotdot_and_nul_paths_are_refused(given: str) -> None:
    with pytest.raises(BadPath, match="give an absolute path of the tree"):
        check_path(given)


def test_a_tmpdir_too_deep_for_the_disk_sockets_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_socket_room(2)  # this machine's TMPDIR fits
    deep = tmp_path / ("d" * 80)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ConfigError, match="set TMPDIR to a shorter directory") as e:
        check_socket_room(2)
    assert f"under the temporary directory {deep};" in str(e.value)
