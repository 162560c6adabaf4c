"""The appliance helper: a process that holds one libguestfs handle and answers the requests
of ``engine.restore.files.GuestTree``, one JSON document per line on stdin and stdout.

Why a process of its own: libguestfs's Python calls keep the GIL while they run, and each of
them may wait for the NBD server that serves the snapshot's disks to the appliance; in the
process running that server (on its event loop) every such call would wait for itself. Here
a call blocks only this process. Killing it (a launch past its timeout, a cancelled command)
takes the appliance with it: it runs in its own process group, qemu too.

Requests and answers::

    {"op": "launch", "sockets": [PATH…], "disks": [NAME…]}
                                  → {"ok": {"qemu": PID, "filesystems": [filesystem…]}}
    {"op": "ls", "path": P}                                 → {"ok": [entry…]}
    {"op": "find", "path": P, "pattern": GLOB|null}         → {"ok": [path…]}
    {"op": "get", "path": P, "dest": DIR}                   → {"ok": files written}
    {"op": "stat", "path": P}                               → {"ok": entry}
    {"op": "download", "path": P, "file": F}   → {"ok": bytes}  (a regular file into F)
    {"op": "tar", "path": P, "file": F}        → {"ok": bytes}  (a directory as tar into F)
    {"op": "mount", "dir": DIR}  → {"event": "mounted"}, then {"ok": null} once unmounted
    {"op": "check", "filesystems": [filesystem…], "expect": [P…]}
                                  → {"ok": {"filesystems": [fscheck…], "paths": [path…]}}
    {"op": "quit"}                                          → {"ok": null}, exit

``check`` runs each filesystem's own checker in its no-write mode (``engine.restore.fsck``) on
the unmounted filesystem, then mounts it read-only again, and looks up the expected paths.

A failed request answers ``{"error": TEXT, "errno": N}`` (``errno``: ENOENT or ENOTDIR for
a path that is not there, else 0) and the helper goes on; end of input ends it.
``download`` and ``tar`` write into a file the caller named (in its private directory), never
through stdout: a file of any size passes without being held in memory.

    python -m engine.restore.appliance
"""

import contextlib
import errno
import fnmatch
import json
import os
import stat as stat_mod
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from engine.core.errors import ConfigError
from engine.io import guestfs as guestfs_bindings
from engine.restore import fsck
from engine.restore.tree import Entry, Filesystem, kind_of

COPY_SIZE = 1 << 20  # bytes moved per read of a download's pipe


def main() -> int:
    guestfs = guestfs_bindings.load()
    g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
    out = sys.stdout
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            if op == "quit":
                _answer(out, {"ok": None})
                break
            try:
                result = _serve(g, op, request, out)
            except Exception as e:  # noqa: BLE001 - every failure is the request's answer
                code = _errno_of(str(e)) if isinstance(e, RuntimeError) else 0
                _answer(out, {"error": str(e) or repr(e), "errno": code})
            else:
                _answer(out, {"ok": result})
    finally:
        _shutdown(g)
    return 0


def _errno_of(message: str) -> int:
    """The errno a libguestfs error names: its Python bindings raise RuntimeError with the
    appliance's ``strerror`` text at the end and do not expose ``guestfs_last_errno``."""
    for code in (errno.ENOENT, errno.ENOTDIR):
        if message.endswith(os.strerror(code)):
            return code
    return 0


def _answer(out: Any, document: object) -> None:
    out.write(json.dumps(document) + "\n")
    out.flush()


def _serve(g: Any, op: str, request: dict[str, Any], out: Any) -> object:
    if op == "launch":
        for sock in request["sockets"]:
            g.add_drive_opts(
                "", format="raw", protocol="nbd", server=[f"unix:{sock}"], readonly=True
            )
        g.launch()
        found = _mount_all(g, request["disks"])
        return {"qemu": g.get_pid(), "filesystems": [asdict(f) for f in found]}
    if op in _READS:
        return _READS[op](g, request)
    if op == "mount":
        g.mount_local(request["dir"], readonly=True)
        _answer(out, {"event": "mounted"})
        g.mount_local_run()  # until unmounted
        return None
    if op == "check":
        filesystems = [Filesystem(**f) for f in request["filesystems"]]
        return {
            "filesystems": [asdict(fsck.check(g, f)) for f in filesystems],
            "paths": [asdict(fsck.lookup(g, p)) for p in request["expect"]],
        }
    raise ConfigError(message=f"unknown request {op!r}")


def _op_stat(g: Any, request: dict[str, Any]) -> object:
    path = request["path"]
    return asdict(_entry(g, path, PurePosixPath(path).name, g.lstatns(path)))


def _op_download(g: Any, request: dict[str, Any]) -> object:
    if not stat_mod.S_ISREG(g.lstatns(request["path"])["st_mode"]):
        raise ConfigError(message=f"{request['path']} is not a regular file")
    return _stage(g.download, request["path"], Path(request["file"]))


def _op_tar(g: Any, request: dict[str, Any]) -> object:
    if not stat_mod.S_ISDIR(g.lstatns(request["path"])["st_mode"]):
        raise ConfigError(message=f"{request['path']} is not a directory")
    return _stage(g.tar_out, request["path"], Path(request["file"]))


def _stage(send: Callable[[str, str], None], src: str, file: Path) -> int:
    """``send(src, DEST)`` (libguestfs ``download`` or ``tar_out``) into ``file``, the
    daemon's staging file of a download (``engine.daemon.browse``); returns its size. A
    failing write of ``file`` (its filesystem full) is our own error naming ``file`` and the
    errno; what was written stays for the daemon's reader (it sends it, then cuts the
    stream) and the daemon removes the file."""
    try:
        _receive(send, src, file)
    except (RuntimeError, OSError) as e:
        raise ApplianceRequestError(f"copying {src} to {file}: {_why(e)}") from None
    return file.stat().st_size


_READS: dict[str, Callable[[Any, dict[str, Any]], object]] = {  # requests that only read
    "ls": lambda g, r: [asdict(e) for e in _ls(g, r["path"])],
    "find": lambda g, r: _find(g, r["path"], r.get("pattern")),
    "get": lambda g, r: _get(g, r["path"], Path(r["dest"])),
    "stat": _op_stat,
    "download": _op_download,
    "tar": _op_tar,
}


def _shutdown(g: Any) -> None:
    with contextlib.suppress(RuntimeError):
        g.shutdown()
    g.close()


def _mount_all(g: Any, disk_names: list[str]) -> list[Filesystem]:
    """Mount every filesystem the appliance finds read-only at /<name>."""
    devices = g.list_devices()  # /dev/sda, /dev/sdb … in the order the disks were added
    disk_of = {dev: disk_names[i] for i, dev in enumerate(devices) if i < len(disk_names)}
    partitions = set(g.list_partitions())
    found = []
    for device, fstype in sorted(g.list_filesystems().items()):
        if fstype in ("swap", "unknown", "LVM2_member", "crypto_LUKS"):
            continue
        name = device.removeprefix("/dev/").replace("/", "-")
        if device in partitions:
            parent = g.part_to_dev(device)
        elif g.is_lv(device):
            parent = _disk_of_lv(g, device, partitions) or device
        else:
            parent = device
        found.append((name, device, fstype, disk_of.get(parent, parent)))
    for name, *_ in found:
        g.mkmountpoint(f"/{name}")
    out = []
    for name, device, fstype, disk in found:
        try:
            g.mount_ro(device, f"/{name}")
        except RuntimeError as e:
            out.append(Filesystem(name, device, fstype, disk, False, str(e)))
            continue
        out.append(Filesystem(name, device, fstype, disk, True))
    return out


def _disk_of_lv(g: Any, lv: str, partitions: set[str]) -> str | None:
    """The device of the first physical volume of ``lv``'s volume group."""
    vg = g.lvm_canonical_lv_name(lv).split("/")[2]  # /dev/VG/LV
    first = next(iter(g.vgpvuuids(vg)), None)
    for pv in g.pvs():
        if g.pvuuid(pv) == first:
            return str(g.part_to_dev(pv) if pv in partitions else pv)
    return None


def _entry(g: Any, path: str, name: str, st: dict[str, int]) -> Entry:
    mode = st["st_mode"]
    target = g.readlink(path) if stat_mod.S_ISLNK(mode) else ""
    return Entry(name, kind_of(mode), st["st_size"], mode, st["st_mtime_sec"], target)


def _ls(g: Any, path: str) -> list[Entry]:
    st = g.lstatns(path)
    if not stat_mod.S_ISDIR(st["st_mode"]):
        return [_entry(g, path, PurePosixPath(path).name, st)]
    names = sorted(g.ls(path))
    stats = g.lstatnslist(path, names) if names else []
    return [
        _entry(g, str(PurePosixPath(path) / n), n, s) for n, s in zip(names, stats, strict=True)
    ]


def _find(g: Any, path: str, pattern: str | None) -> list[str]:
    base = PurePosixPath(path)
    out = []
    for rel in (r.lstrip("/") for r in g.find(path)):
        full = base / rel
        if pattern is None or fnmatch.fnmatchcase(full.name, pattern):
            out.append(str(full))
    return out


def _get(g: Any, path: str, dest: Path) -> int:
    st = g.lstatns(path)
    name = PurePosixPath(path).name or "root"
    if stat_mod.S_ISREG(st["st_mode"]):
        _download(g, path, dest / name, 0)
        return 1
    if not stat_mod.S_ISDIR(st["st_mode"]):
        raise ConfigError(message=f"{path} is neither a file nor a directory")
    written = 0
    base = PurePosixPath(path)
    (dest / name).mkdir(exist_ok=True)
    for rel in (r.lstrip("/") for r in g.find(path)):
        src = base / rel
        out = dest / name / rel
        mode = g.lstatns(str(src))["st_mode"]
        if stat_mod.S_ISDIR(mode):
            out.mkdir(parents=True, exist_ok=True)
        elif stat_mod.S_ISREG(mode):
            out.parent.mkdir(parents=True, exist_ok=True)
            _download(g, str(src), out, written)
            written += 1
        elif stat_mod.S_ISLNK(mode):
            out.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                out.symlink_to(g.readlink(str(src)))
    return written


def _download(g: Any, src: str, out: Path, written: int) -> None:
    """Copy the file ``src`` of the tree to ``out``, through ``.NAME.partial`` beside it
    renamed when complete: a file that is there is whole. When the copy fails (a full or
    failing destination, a read error from the snapshot) the partial copy is removed and the
    error names both ends; a helper killed mid-copy leaves only the ``.partial`` file."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        _receive(g.download, src, partial)
        partial.rename(out)
    except (RuntimeError, OSError) as e:
        with contextlib.suppress(OSError):
            partial.unlink()
        before = f"; {written} files were copied before it" if written else ""
        raise ApplianceRequestError(
            f"copying {src} to {out}: {_why(e)}; nothing of it kept{before}"
        ) from None


def _receive(send: Callable[[str, str], None], src: str, file: Path) -> None:
    """``send(src, DEST)`` written into ``file`` (made or truncated). libguestfs writes into
    a pipe and a thread here writes the file: a failing destination is then our own
    ``OSError`` with its errno (libguestfs would say only "file receive cancelled"), and
    closing the pipe stops the transfer. Raises that OSError, or libguestfs's RuntimeError
    (a read error in the appliance)."""
    failed: list[OSError] = []
    r, w = os.pipe()

    def write_out() -> None:
        try:
            with os.fdopen(r, "rb", buffering=0) as pipe, file.open("wb") as f:
                while data := pipe.read(COPY_SIZE):
                    f.write(data)
        except OSError as e:  # the pipe is closed with it: libguestfs's writes fail
            failed.append(e)

    writer = threading.Thread(target=write_out, name="download")
    writer.start()
    try:
        try:
            send(src, f"/dev/fd/{w}")
        finally:
            os.close(w)
            writer.join()
    except RuntimeError:
        if failed:  # libguestfs's error is only the echo of ours
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]


def _why(error: BaseException) -> str:
    """An error's text: an OSError's ``strerror (ENAME)``, libguestfs's message as it is."""
    if isinstance(error, OSError) and error.strerror:
        name = errno.errorcode.get(error.errno or 0, "")
        return f"{error.strerror} ({name})" if name else error.strerror
    return str(error)


class ApplianceRequestError(Exception):
    """A request failed; its text is the answer's error."""


if __name__ == "__main__":
    sys.exit(main())
