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
    """Add ``files`` (ls, find, get) and ``mount`` to the parser."""
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
