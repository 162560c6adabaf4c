"""Which disks of a VM a backup takes: ``disks`` patterns (a policy's ``selection.disks``,
``tessera backup vm --disk``, the API's ``disks``) are names/globs of disk aliases or disk
ids; none means every disk. A hypervisor plugin applies them where it picks the disks it
reads: a disk not taken is skipped with ``not_selected(patterns)`` as its reason (recorded
in the snapshot as the plugin's other skipped disks are), and a VM none of whose disks the
patterns take fails its backup with ``NoDiskSelected`` before anything is created."""

from collections.abc import Collection, Sequence
from fnmatch import fnmatchcase

from engine.core.errors import ConfigError


def selects_disk(patterns: Collection[str], name: str, disk_id: str | None = None) -> bool:
    """Whether ``patterns`` (empty: every disk) take the disk ``name`` (its alias, matched
    as a glob, case-sensitive) with id ``disk_id`` (matched exactly)."""
    return (
        not patterns
        or any(fnmatchcase(name, pattern) for pattern in patterns)
        or (disk_id is not None and disk_id in patterns)
    )


def not_selected(patterns: Sequence[str]) -> str:
    """The reason a disk the patterns do not take is skipped."""
    return f"not selected (disks: {', '.join(patterns)})"


class NoDiskSelected(ConfigError):
    """The ``disks`` patterns take none of the VM's disks: its backup would hold nothing
    (made by ``no_disk_selected``)."""

    template = "VM {vm}: the disk selection ({patterns}) takes none of its disks ({names})"


def no_disk_selected(vm: str, patterns: Sequence[str], names: Sequence[str]) -> NoDiskSelected:
    return NoDiskSelected(
        vm=vm, patterns=", ".join(patterns), names=", ".join(names) if names else "it has none"
    )
