"""``check_path``: what a client may name in a guest tree (the API passes its paths here
before they reach the appliance)."""

import pytest

from engine.restore.files import BadPath, check_path


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
