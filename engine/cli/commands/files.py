"""What ``tessera files``, ``tessera mount`` and ``tessera snapshots check`` run (their
options: ``engine.cli.files``): the store opened read-only (so they run beside the daemon),
the snapshot share-locked while its disks are read (prune skips it), the disks served to an
appliance VM (``engine.restore.files.GuestTree``; for check, ``engine.restore.check``).

``files`` with ``--config`` goes through the daemon when one answers on the configuration's
socket, as ``backup vm`` does (``--direct`` reads here anyway): a browsing session of its API
(``POST /v1/snapshots/{id}/files``), its ``ls``/``find``/``download`` (a directory comes as a
tar stream, unpacked into ``--to`` with tarfile's ``tar`` filter: nothing lands outside it),
the session deleted at the end, also on an error or Ctrl-C."""

import argparse
import asyncio
import contextlib
import json
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from engine.app.check import CheckRequest, check_lines, check_restore_point, not_saved_line
from engine.cli.commands.stores import open_store
from engine.cli.exits import EXIT_FAILED, EXIT_OK
from engine.core.errors import ConfigError, SnapshotNotFound
from engine.core.units import human_bytes
from engine.jobs.restore import select_disks
from engine.restore.check import check_expected
from engine.restore.files import GuestTree
from engine.restore.record import RecordNotSaved
from engine.restore.tree import Entry, Filesystem
from engine.store.chunk_store import Store
from engine.store.manifest import DiskEntry, Manifest
from engine.util import aio
from engine.workers import make_cpu_pool

if TYPE_CHECKING:
    from engine.cli.client import ApiClient

SESSION_WAIT = 240  # seconds one wait for the appliance holds the request (the client: 300)


def _open(args: argparse.Namespace, store: Store) -> tuple[str, Manifest, list[DiskEntry]]:
    try:
        snapshot_id = store.resolve(args.snapshot)
        manifest = store.manifest(snapshot_id)
        disks = [] if args.disk else list(manifest.disks)
        for wanted in args.disk or []:
            disks += [d for d in select_disks(manifest, wanted) if d not in disks]
    except SnapshotNotFound as e:
        raise ConfigError(message=f"{args.command_name}: {e}") from None
    return snapshot_id, manifest, disks


def cmd_files(args: argparse.Namespace) -> int:
    args.command_name = f"files {args.action}"
    if args.action == "get" and not args.to.is_dir():  # before the appliance boots
        raise ConfigError(message=f"files get: --to {args.to} is not a directory")
    if args.config is not None and not args.direct:
        from engine.cli.commands import service as cli_service  # noqa: PLC0415

        if (socket := cli_service.daemon_socket(args.config)) is not None:
            return aio.run(_through_daemon(args, socket, cli_service.client(socket)))
    with open_store(args, writable=False) as store:
        snapshot_id, manifest, disks = _open(args, store)
        with store.reading_snapshot(snapshot_id):
            return aio.run(_files(args, store, manifest, disks))


def cmd_mount(args: argparse.Namespace) -> int:
    args.command_name = "mount"
    if not args.directory.is_dir() or any(args.directory.iterdir()):
        raise ConfigError(message=f"mount: {args.directory} is not an empty directory")
    with open_store(args, writable=False) as store:
        snapshot_id, manifest, disks = _open(args, store)
        with store.reading_snapshot(snapshot_id):
            return aio.run(_mount(args, store, manifest, disks))


@contextlib.asynccontextmanager
async def _tree(
    args: argparse.Namespace, store: Store, manifest: Manifest, disks: list[DiskEntry]
) -> AsyncIterator[GuestTree]:
    """The snapshot's tree (its own CPU pool), filesystems it could not mount on stderr."""
    pool = make_cpu_pool(store.keys, manifest.chunk_size)
    try:
        async with GuestTree.open(
            store, pool, manifest, disks, launch_timeout=args.launch_timeout
        ) as tree:
            for fs in tree.filesystems:
                if not fs.mounted:
                    print(
                        f"{fs.name} ({fs.fstype} on {fs.device}): not mounted: {fs.problem}",
                        file=sys.stderr,
                    )
            yield tree
    finally:
        await pool.aclose()


async def _files(
    args: argparse.Namespace, store: Store, manifest: Manifest, disks: list[DiskEntry]
) -> int:
    async with _tree(args, store, manifest, disks) as tree:
        if args.action == "ls":
            for i, path in enumerate(args.paths):
                if len(args.paths) > 1:  # as ls(1): a heading per path
                    print(f"{'' if i == 0 else chr(10)}{path}:")
                if path.rstrip("/") == "":
                    _print_filesystems(tree.filesystems)
                else:
                    for entry in await tree.ls(path):
                        print(_ls_line(entry))
        elif args.action == "find":
            for path in await tree.find(args.path, args.name):
                print(path)
        else:
            total = 0
            for path in args.paths:
                total += await tree.get(path, args.to)
            print(f"copied {total} files from snapshot {manifest.snapshot_id} into {args.to}")
    return EXIT_OK


async def _mount(
    args: argparse.Namespace, store: Store, manifest: Manifest, disks: list[DiskEntry]
) -> int:
    loop = asyncio.get_running_loop()
    directory = args.directory.resolve()

    def unmount(signame: str) -> None:
        print(f"{signame}: unmounting {directory}", file=sys.stderr)
        subprocess.run(["fusermount", "-u", str(directory)], check=False, capture_output=True)

    async with _tree(args, store, manifest, disks) as tree:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, unmount, sig.name)
        names = ", ".join(f"{f.name} ({f.fstype})" for f in tree.filesystems if f.mounted)
        size = human_bytes(sum(d.size for d in disks))
        started = time.monotonic()

        def ready() -> None:
            print(
                f"mounted snapshot {manifest.snapshot_id} ({len(disks)} disks, {size}) "
                f"read-only at {directory}: {names}; unmount with Ctrl-C or "
                f"fusermount -u {directory}",
                flush=True,
            )

        try:
            await tree.mount(directory, ready)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        print(f"unmounted {directory} after {time.monotonic() - started:.0f} s")
    return EXIT_OK


async def _through_daemon(args: argparse.Namespace, socket: Path, client: "ApiClient") -> int:
    body = {"disks": args.disk} if args.disk else {}
    async with client:
        doc = await client.request("POST", f"/v1/snapshots/{args.snapshot}/files", body)
        session = doc["id"]
        try:
            print(f"files session {session} of the daemon: starting the appliance", file=sys.stderr)
            while doc["state"] == "starting":
                doc = await client.request("GET", f"/v1/files/{session}", wait=str(SESSION_WAIT))
            if doc["state"] != "ready":
                raise ConfigError(
                    message=f"{args.command_name}: {doc.get('error') or doc['state']}"
                )
            filesystems = [Filesystem(**f) for f in doc["filesystems"]]
            for fs in filesystems:
                if not fs.mounted:
                    print(
                        f"{fs.name} ({fs.fstype} on {fs.device}): not mounted: {fs.problem}",
                        file=sys.stderr,
                    )
            base = f"/v1/files/{session}"
            if args.action == "ls":
                for i, path in enumerate(args.paths):
                    if len(args.paths) > 1:
                        print(f"{'' if i == 0 else chr(10)}{path}:")
                    if path.rstrip("/") == "":
                        _print_filesystems(filesystems)
                    else:
                        found = await client.request("GET", f"{base}/ls", path=path)
                        for e in found["entries"]:
                            print(_ls_line(Entry(**e)))
            elif args.action == "find":
                query = {"path": args.path} | ({"name": args.name} if args.name else {})
                for path in (await client.request("GET", f"{base}/find", **query))["paths"]:
                    print(path)
            else:
                total = 0
                for path in args.paths:
                    total += await _download(client, base, path, args.to)
                print(f"copied {total} files from snapshot {doc['snapshot']} into {args.to}")
        finally:
            with contextlib.suppress(Exception):
                await client.request("DELETE", f"/v1/files/{session}")
    return EXIT_OK


async def _download(client: "ApiClient", base: str, path: str, to: Path) -> int:
    """``path`` of the session into ``to`` as ``files get`` puts it (a file by its name, a
    directory as a directory of that name); returns the files written."""
    name = PurePosixPath(path).name or "root"
    partial = to / f".{name}.tessera-partial"
    try:
        kind, _ = await client.download(f"{base}/download", partial, path=path)
        if not kind.startswith("application/x-tar"):
            partial.replace(to / name)
            return 1
        target = to / name
        target.mkdir(exist_ok=True)
        with tarfile.open(partial) as tar:
            members = tar.getmembers()
            tar.extractall(target, filter="tar")  # no path outside ``target``
        return sum(m.isfile() for m in members)
    finally:
        partial.unlink(missing_ok=True)


def _print_filesystems(filesystems: "list[Filesystem]") -> None:
    for fs in filesystems:
        state = "" if fs.mounted else "  (not mounted)"
        print(f"{fs.name:<16} {fs.fstype:<8} {fs.device:<20} {fs.disk}{state}")


def _ls_line(entry: Entry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime))
    link = f" -> {entry.target}" if entry.target else ""
    return f"{stat.filemode(entry.mode)} {entry.size:>12} {when} {entry.name}{link}"


def cmd_check(args: argparse.Namespace) -> int:
    """``snapshots check``: exit 0 when the check passed, 1 when it failed or could not run
    (the record says which; it is written either way), and 1 when its record could not be
    written: the verdict is printed all the same, the error (naming the file and the errno)
    on standard error."""
    check_expected(args.expect)  # before the store opens and the appliance boots
    not_saved: RecordNotSaved | None = None
    with open_store(args, writable=False) as store:
        try:
            request = CheckRequest(
                args.snapshot, tuple(args.disk or ()), tuple(args.expect), args.launch_timeout
            )
            record = aio.run(check_restore_point(store, request))
        except SnapshotNotFound as e:
            raise ConfigError(message=f"snapshots check: {e}") from None
        except RecordNotSaved as e:
            record, not_saved = e.record, e
    if args.json:
        print(json.dumps(record.doc(), indent=2))
    else:
        for line in check_lines(record):
            print(line)
    if not_saved is not None:
        sys.stdout.flush()  # the verdict first, then why it is not on the snapshot
        print(f"tessera: {not_saved_line(not_saved)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if record.outcome == "passed" else EXIT_FAILED
