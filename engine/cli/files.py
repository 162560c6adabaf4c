"""``tessera files ls|find|get SNAPSHOT`` and ``tessera mount SNAPSHOT DIR``: files out of a
restore point through an appliance VM (``engine.restore.files``): their options. What they
run is ``engine.cli.commands.files``.

The tree has one directory per guest filesystem, named from its device (``/sda1``,
``/vg0-lv0``); ``tessera files ls SNAPSHOT`` lists them::

    tessera files ls 3f2a9c1e --store /srv/tessera/store /
    tessera files ls 3f2a9c1e --store /srv/tessera/store /sda1/etc
    tessera files get 3f2a9c1e --store /srv/tessera/store /sda1/etc/fstab --to /tmp/out
    tessera mount 3f2a9c1e /mnt/web1 --store /srv/tessera/store
    tessera files get 3f2a9c1e --config /etc/tessera/config.yaml /sda1/etc --to /tmp/out

With ``--config``, ``files`` goes through the daemon when it answers (a browsing session of
its API), else reads the configuration's store here; ``mount`` always runs here.

``tessera snapshots check SNAPSHOT`` checks a restore point through the same appliance
(``engine.restore.check``): each filesystem's checker in no-write mode, expected paths, the
verdict recorded beside the snapshot and shown by ``tessera snapshots``.
"""

import argparse
from collections.abc import Callable
from pathlib import Path

from engine.cli.commands import Handler


def _common(p: argparse.ArgumentParser, daemon: bool = True) -> None:
    p.add_argument("snapshot", metavar="SNAPSHOT_ID", help="id or unique prefix")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path, help="the store's directory (read here)")
    where.add_argument(
        "--config",
        type=Path,
        help="the daemon's configuration: "
        + (
            "through its daemon when it runs (a browsing session), else its store read here"
            if daemon
            else "its store, read here"
        ),
    )
    if daemon:
        p.add_argument("--direct", action="store_true", help="run here even when a daemon runs")
    p.add_argument(
        "--disk",
        action="append",
        help="only this disk (id or name; repeatable); default every disk of the snapshot",
    )
    p.add_argument(
        "--launch-timeout",
        type=float,
        metavar="SECONDS",
        help="give up when the appliance VM has not started by then (default 300: a VM "
        "booted without KVM takes 15-30 s)",
    )


def register(
    sub: "argparse._SubParsersAction[argparse.ArgumentParser]",
    add_key_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add ``files`` (ls, find, get), ``mount`` and ``snapshots check`` to the parser."""
    files = sub.add_parser(
        "files",
        help="list, find and copy out files of a restore point without restoring the VM "
        "(read-only, in an appliance VM: libguestfs)",
    )
    actions = files.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser(
        "ls", help="a directory's entries (/ lists the filesystems: one directory each)"
    )
    _common(ls)
    ls.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="directories or files of the tree; / lists the filesystems",
    )
    add_key_options(ls)
    ls.set_defaults(func=Handler("files", "cmd_files"))
    find = actions.add_parser("find", help="every path under PATH, or those whose name matches")
    _common(find)
    find.add_argument("path", metavar="PATH", help="where to look (/sda1, /sda1/etc)")
    find.add_argument("--name", metavar="GLOB", help="only names matching this shell glob")
    add_key_options(find)
    find.set_defaults(func=Handler("files", "cmd_files"))
    get = actions.add_parser(
        "get", help="copy files or whole directories out, byte for byte, into --to"
    )
    _common(get)
    get.add_argument("paths", nargs="+", metavar="PATH", help="files or directories of the tree")
    get.add_argument("--to", type=Path, required=True, metavar="DIR", help="an existing directory")
    add_key_options(get)
    get.set_defaults(func=Handler("files", "cmd_files"))

    mount = sub.add_parser(
        "mount",
        help="show a restore point's filesystems read-only at DIR (FUSE) until Ctrl-C, "
        "SIGTERM or fusermount -u DIR",
    )
    _common(mount, daemon=False)
    mount.add_argument("directory", type=Path, metavar="DIR", help="an empty directory")
    add_key_options(mount)
    mount.set_defaults(func=Handler("files", "cmd_mount"))

    check = _actions_of(sub.choices["snapshots"]).add_parser(
        "check",
        help="prove a restore point usable: check its filesystems read-only in an appliance "
        "VM (fsck in no-write mode) and that expected paths exist; the result is recorded "
        "on the snapshot (shown by `tessera snapshots`)",
        description="Boots an appliance VM (libguestfs) on the snapshot's disks served "
        "read-only from the store, runs each filesystem's own checker in no-write mode "
        "(e2fsck -f -n, xfs_repair -n, ntfsfix --no-action, fsck.fat -n, btrfs check "
        "--readonly) and looks up each --expect path. Nothing of the backup is written: the "
        "verdict is a file beside the snapshot (restore-check.json). Exit status 0 when the "
        "check passed, 1 when it failed or could not run.",
    )
    _common(check, daemon=False)
    check.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="PATH",
        help="a path of the tree that must exist, e.g. /sda1/etc/hostname (repeatable)",
    )
    check.add_argument("--json", action="store_true")
    add_key_options(check)
    check.set_defaults(func=Handler("files", "cmd_check"))


def _actions_of(
    parser: argparse.ArgumentParser,
) -> "argparse._SubParsersAction[argparse.ArgumentParser]":
    """The ACTION subparsers of ``parser`` (``snapshots``: made by ``engine.cli.maint``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="snapshots_command", metavar="ACTION")
