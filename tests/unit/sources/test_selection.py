"""Disk selection (``engine.sources.selection``, a policy's ``selection.disks``): globs of
disk aliases or exact disk ids, empty takes every disk; the error for a selection that takes
none of a VM's disks names the VM, the patterns and its disks, and crosses processes."""

import pickle

import msgspec
import pytest

from engine.config.policy import Policy
from engine.core.errors import ConfigError
from engine.sources.selection import NoDiskSelected, no_disk_selected, not_selected, selects_disk


@pytest.mark.parametrize(
    ("patterns", "name", "disk_id", "taken"),
    [
        ((), "web01_os", "d-1", True),  # no selection: every disk
        (("web01_os",), "web01_os", "d-1", True),
        (("*_os",), "web01_os", "d-1", True),
        (("*_os",), "web01_data", "d-2", False),
        (("*_OS",), "web01_os", "d-1", False),  # case-sensitive, as VM names
        (("d-2",), "web01_data", "d-2", True),  # an id, exactly
        (("d-*",), "web01_data", "d-2", False),  # ids are not globbed
        (("d-2",), "web01_data", None, False),
        (("nope", "web01_d?ta"), "web01_data", "d-2", True),  # any pattern takes it
    ],
)
def test_selects_disk(
    patterns: tuple[str, ...], name: str, disk_id: str | None, taken: bool
) -> None:
    assert selects_disk(patterns, name, disk_id) is taken


def test_the_reason_and_the_error_name_what_was_asked() -> None:
    assert not_selected(["*_os", "d-2"]) == "not selected (disks: *_os, d-2)"
    error = no_disk_selected("web01", ["nope*"], ["web01_os", "web01_data"])
    assert isinstance(error, ConfigError)
    assert str(error) == (
        "VM web01: the disk selection (nope*) takes none of its disks (web01_os, web01_data)"
    )
    again = pickle.loads(pickle.dumps(error))  # errors cross process boundaries
    assert isinstance(again, NoDiskSelected) and str(again) == str(error)
    assert "(it has none)" in str(no_disk_selected("empty", ["x"], []))


def test_a_policys_selection_takes_disks_by_name_glob_or_id() -> None:
    policy = msgspec.yaml.decode(
        "name: nightly\nselection:\n  vms: [web*]\n  disks: ['*_os', d-9]\n", type=Policy
    )
    selection = policy.selection
    assert selection.disks == ("*_os", "d-9")
    assert selection.selects_disk("web01_os")
    assert not selection.selects_disk("web01_data", "d-2")
    assert selection.selects_disk("web01_data", "d-9")
