"""A restore point through the running daemon's API: its disk as an NBD export job, its files
in a browsing session (issue 17: "also as a daemon job with the API", "through the API too,
so a later web page can browse and download").

The store holds a backup (made with the CLI) of the lab's guest disk
(``plugins.lab.guest_disk``: ext4, XFS, NTFS, LVM; built once per session:
``tests.guest_disks``); ``tessera run`` serves it. Exports:
``nbdcopy`` from the daemon's socket equals ``tessera restore`` of the snapshot; a second
export of the same snapshot serves at the same time; ``tessera export --config`` goes
through the daemon; a writable export's overlay lives in the daemon's state directory and
goes with it; cancelling removes the socket; ``ttl_seconds`` ends an export by itself; a
daemon told to stop cancels a running export and exits cleanly.
Files: one session (one appliance boot, ~30 s under TCG) for every assertion — the
filesystems, ``ls``, ``find``, downloads of a file (byte for byte, with its name and length
in the headers) and of a directory as tar, a path with ``..`` (400), a missing path (404), a
client leaving mid-download, a second session beyond ``serve.files_sessions`` (503); a full
state dir (``serve.state_dir`` is a tmpfs here, filled with a file): a download that runs out
of room is cut (the client sees a body short of its Content-Length), the log names the
staging file and ENOSPC, the file is gone, a smaller download then works, and one with no
room at all is an error answer (502 naming the file and ENOSPC) before any byte; its end
leaves no qemu under the daemon. Then ``tessera files get --config`` goes through the
daemon (a session of its own, deleted at the end).

The daemon runs the appliance emulated (``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` in its
environment): this machine's nested KVM hangs booting a guest.
"""

import asyncio
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.core.units import MiB
from plugins.lab.guest_disk import guest_files
from tests.e2e.test_daemon import ENV, Daemon, tessera
from tests.guest_disks import NAME, guest_disk_copy
from tests.integration.images import identical, run
from tests.integration.test_direct_writes import tiny_tmpfs

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TCG_ENV = ENV | {"LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
PASSPHRASE = ENV["TESSERA_PASSPHRASE"]


@dataclass
class Backup:
    store: Path
    snapshot: str
    files: dict[str, bytes]
    restored: Path  # ``tessera restore --to`` of the snapshot's disk


async def ok(*args: str | Path) -> str:
    code, out = await tessera(*args)
    assert code == 0, out
    return out


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    tmp = tmp_path_factory.mktemp("files")
    image = guest_disk_copy(tmp_path_factory, tmp / "files-vm.raw")
    files = guest_files(NAME)

    async def back_up() -> Backup:
        store = tmp / "store"
        await ok("store", "init", store)
        await ok("backup", "image", image, "--store", store, "--vm", "files-vm")
        snapshot = (await ok("snapshots", "--store", store)).splitlines()[1].split()[0]
        restored = tmp / "restored.raw"
        await ok("restore", snapshot, "--store", store, "--to", restored, "--format", "raw")
        return Backup(store, snapshot, files, restored)

    done = asyncio.run(back_up())
    image.unlink()  # the backup is all there is
    return done


@pytest.fixture
async def daemon(tmp_path: Path, backup: Backup) -> AsyncIterator[tuple[Daemon, Path]]:
    """``tessera run`` on the backup's store; ``serve.state_dir`` (overlays, downloads) a
    24 MiB tmpfs at ``tmp_path / "serve"`` (a test can fill it), the rest under ``tmp_path``."""
    (tmp_path / "pass").write_text(PASSPHRASE + "\n")
    (tmp_path / "state").mkdir()
    run_dir = Path(tempfile.mkdtemp(prefix="tsr-", dir="/tmp"))
    serve = tmp_path / "serve"
    config = tmp_path / "config.yaml"
    config.write_text(
        "stores:\n"
        f"  - name: main\n    path: {backup.store}\n    passphrase_file: {tmp_path / 'pass'}\n"
        f"api:\n  socket: {tmp_path / 'api.sock'}\n"
        f"scheduler:\n  state_file: {tmp_path / 'state' / 'scheduler.json'}\n"
        # the export sockets: a short directory (a unix socket's path holds 107 bytes, and
        # tmp_path's can be long)
        f"serve:\n  files_sessions: 1\n  run_dir: {run_dir}\n  state_dir: {serve}\n"
    )
    with tiny_tmpfs(serve, "24m"):
        daemon = Daemon(config, tmp_path / "daemon.log", env=TCG_ENV)
        await daemon.start()
        try:
            yield daemon, tmp_path / "api.sock"
        finally:
            code = await daemon.stop()
            await daemon.kill()
            shutil.rmtree(run_dir, ignore_errors=True)
    assert code == 0, daemon.log.read_text()[-5000:]


class Api:
    def __init__(self, socket: Path) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))

    async def call(
        self, method: str, url: str, body: Any = None, status: int = 200, **query: str
    ) -> Any:
        async with self.session.request(
            method, f"http://tessera{url}", json=body, params=query
        ) as response:
            doc = await response.json()
            assert response.status == status, doc
            return doc

    async def download(self, session: str, path: str) -> tuple[bytes, Any]:
        async with self.session.get(
            f"http://tessera/v1/files/{session}/download", params={"path": path}
        ) as response:
            assert response.status == 200, await response.text()
            return await response.read(), response.headers

    async def ended(self, job: str) -> dict[str, Any]:
        """The job once it has ended (the daemon cancels at once; its cleanup takes a
        moment: an appliance shuts down)."""
        doc: dict[str, Any] = await self.call("GET", f"/v1/jobs/{job}", wait="60")
        assert doc["finished"] is not None, f"job {job} did not end: {doc}"
        return doc


@pytest.fixture
async def api(daemon: tuple[Daemon, Path]) -> AsyncIterator[Api]:
    client = Api(daemon[1])
    try:
        yield client
    finally:
        await client.session.close()


async def test_export_jobs_serve_the_snapshot_until_cancelled(
    backup: Backup, daemon: tuple[Daemon, Path], api: Api, tmp_path: Path
) -> None:
    proc, _ = daemon
    doc = await api.call("POST", "/v1/exports", {"snapshot": backup.snapshot}, status=202)
    first = doc["export"]
    socket = Path(first["socket"])
    assert first["uri"] == f"nbd+unix:///?socket={socket}"
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
    assert doc["jobs"][0]["kind"] == "export"
    assert doc["jobs"][0]["params"]["socket"] == str(socket)

    copy = tmp_path / "copy.raw"
    await asyncio.to_thread(run, "nbdcopy", "--connections=4", first["uri"], str(copy))
    assert identical(copy, backup.restored)
    copy.unlink()

    # a second export of the same snapshot, by the CLI through the daemon, at the same time
    out = await ok("export", backup.snapshot, "--config", proc.config, "--writable")
    second_uri = out.strip().splitlines()[-1]
    listed = await api.call("GET", "/v1/exports")
    assert [e["uri"] for e in listed] == [first["uri"], second_uri]
    second = listed[1]
    assert second["writable"] is True
    overlay = tmp_path / "serve" / "overlays" / f"{second['job']}.cow"
    assert overlay.exists()
    info = json.loads(await asyncio.to_thread(run, "nbdinfo", "--json", second_uri))
    assert info["exports"][0]["export-size"] == backup.restored.stat().st_size
    assert info["exports"][0]["is_read_only"] is False

    # cancel: the API for one, `tessera cancel` for the other; sockets and overlay go
    await api.call("POST", f"/v1/jobs/{first['job']}/cancel", status=202)
    await ok("cancel", second["job"], "--config", proc.config)
    for job in (first["job"], second["job"]):
        ended = await api.ended(job)
        assert ended["state"] == "cancelled", ended
    assert not socket.exists()
    assert not Path(second["socket"]).exists()
    assert not overlay.exists()
    assert not list(overlay.parent.iterdir())
    assert await api.call("GET", "/v1/exports") == []
    summary = (await api.call("GET", f"/v1/jobs/{first['job']}"))["summary"]
    assert summary["ended"] == "cancelled"
    assert summary["connections"] >= 1
    # data only: nbdcopy skips what block status calls holes
    assert 0 < summary["bytes_read"] <= backup.restored.stat().st_size

    # ttl_seconds ends an export by itself (succeeded), its socket removed
    doc = await api.call(
        "POST", "/v1/exports", {"snapshot": backup.snapshot, "ttl_seconds": 5}, status=202
    )
    timed = doc["export"]
    assert timed["expires"] is not None
    ended = await api.ended(timed["job"])
    assert (ended["state"], ended["summary"]["ended"]) == ("succeeded", "ttl"), ended
    assert not Path(timed["socket"]).exists()

    # the daemon stopping (SIGTERM) does not wait for an export: it is cancelled, its socket
    # removed, and the daemon exits cleanly (the fixture checks the exit status)
    doc = await api.call("POST", "/v1/exports", {"snapshot": backup.snapshot}, status=202)
    left = Path(doc["export"]["socket"])
    assert left.exists()
    await api.session.close()
    assert await proc.stop() == 0, proc.log.read_text()[-5000:]
    assert not left.exists()
    assert not list(left.parent.iterdir())


@pytest.mark.timeout(900)
async def test_a_files_session_browses_and_downloads_then_ends_with_its_appliance(
    backup: Backup, daemon: tuple[Daemon, Path], api: Api
) -> None:
    proc, _ = daemon
    opened = await api.call("POST", f"/v1/snapshots/{backup.snapshot}/files", {}, status=202)
    session = opened["id"]
    assert opened["state"] == "starting"
    # at most serve.files_sessions (1 here): refused before a second appliance boots
    await api.call("POST", f"/v1/snapshots/{backup.snapshot}/files", {}, status=503)
    doc = await api.call("GET", f"/v1/files/{session}", wait="300")
    assert doc["state"] == "ready", doc
    found = {f["name"]: (f["fstype"], f["mounted"]) for f in doc["filesystems"]}
    assert found == {
        "sda1": ("ext4", True),
        "sda2": ("xfs", True),
        "sda3": ("ntfs", True),
        "vg0-lv0": ("ext4", True),
    }
    base = f"/v1/files/{session}"

    root = await api.call("GET", f"{base}/ls", path="/")
    assert sorted(e["name"] for e in root["entries"]) == ["sda1", "sda2", "sda3", "vg0-lv0"]
    etc = {e["name"]: e for e in (await api.call("GET", f"{base}/ls", path="/sda1/etc"))["entries"]}
    assert set(etc) == {"hostname", "name-link"}
    assert etc["hostname"]["kind"] == "file"
    assert etc["hostname"]["size"] == len(backup.files["/sda1/etc/hostname"])
    assert (etc["name-link"]["kind"], etc["name-link"]["target"]) == ("link", "hostname")
    assert stat.S_ISLNK(etc["name-link"]["mode"])
    assert etc["hostname"]["mtime"] > 0

    paths = await api.call("GET", f"{base}/find", path="/sda2", name="*.bin")
    assert paths == {"paths": ["/sda2/srv/www/big.bin"]}

    data, headers = await api.download(session, "/sda1/data/random.bin")
    assert data == backup.files["/sda1/data/random.bin"]
    assert headers["Content-Length"] == str(len(data))
    assert headers["Content-Disposition"] == (
        "attachment; filename=\"random.bin\"; filename*=UTF-8''random.bin"
    )

    data, headers = await api.download(session, "/sda2/srv/www")
    assert headers["Content-Type"] == "application/x-tar"
    assert "filename*=UTF-8''www.tar" in headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        got = {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    assert got == {
        "big.bin": backup.files["/sda2/srv/www/big.bin"],
        "index.html": backup.files["/sda2/srv/www/index.html"],
    }

    refused = await api.call("GET", f"{base}/ls", status=400, path="/sda1/../../etc")
    assert "give an absolute path" in refused["error"]
    await api.call("GET", f"{base}/download", status=400, path="sda1/etc/hostname")
    missing = await api.call("GET", f"{base}/ls", status=404, path="/sda1/nope")
    assert "/sda1/nope" in missing["error"]
    await api.call("GET", f"{base}/download", status=404, path="/sda3/Users/nope.txt")
    # the session is still usable after its errors; nothing left in its download directory
    assert (await api.call("GET", f"{base}/ls", path="/sda3/Users"))["entries"][0]["name"] == (
        "doc.txt"
    )
    downloads = proc.config.parent / "serve" / "files" / session
    assert list(downloads.iterdir()) == []
    # a client that leaves in the middle of a download: the session goes on (the next request
    # waits for that transfer to end), and the transfer leaves nothing behind
    async with api.session.get(
        f"http://tessera{base}/download", params={"path": "/sda2/srv/www/big.bin"}
    ) as response:
        assert response.status == 200
        assert await response.content.readany()
        response.close()
    www = await api.call("GET", f"{base}/ls", path="/sda2/srv/www")
    assert sorted(e["name"] for e in www["entries"]) == ["big.bin", "index.html"]
    assert list(downloads.iterdir()) == []

    # a full state dir: a download that runs out of room mid-way is cut short, visibly
    serve = proc.config.parent / "serve"
    filler = _fill(serve / "filler", leave=1 * MiB)
    big = backup.files["/sda2/srv/www/big.bin"]
    async with api.session.get(
        f"http://tessera{base}/download", params={"path": "/sda2/srv/www/big.bin"}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(big))
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (failed,) = proc.events("files.download_failed")
    assert failed["path"] == "/sda2/srv/www/big.bin", failed
    assert failed["file"].startswith(f"{downloads}/download-"), failed
    assert f"copying /sda2/srv/www/big.bin to {failed['file']}: " in failed["error"], failed
    assert "No space left on device (ENOSPC)" in failed["error"], failed
    assert list(downloads.iterdir()) == []  # the partial file is gone
    # the session goes on: a smaller download fits, whole
    data, _ = await api.download(session, "/sda1/etc/hostname")
    assert data == backup.files["/sda1/etc/hostname"]
    # no room at all: an error answer before any byte, naming the file and the errno
    more = _fill(serve / "filler2", leave=0)
    refused = await api.call("GET", f"{base}/download", status=502, path="/sda1/etc/hostname")
    assert f"to {downloads}/download-" in refused["error"], refused
    assert "No space left on device (ENOSPC)" in refused["error"], refused
    assert list(downloads.iterdir()) == []
    filler.unlink()
    more.unlink()
    data, _ = await api.download(session, "/sda1/data/random.bin")
    assert data == backup.files["/sda1/data/random.bin"]

    assert proc.proc is not None
    assert _qemus_under(proc.proc.pid), "the appliance runs under the daemon"
    ended = await api.call("DELETE", base, status=202)
    assert ended["kind"] == "files"
    job = await api.ended(session)
    assert job["state"] == "cancelled", job
    assert job["summary"] == {"requests": 14}, job  # those that reached the appliance
    assert not _qemus_under(proc.proc.pid), "the appliance's qemu outlived its session"
    assert not downloads.exists()
    assert (await api.call("GET", base))["state"] == "ended"
    await api.call("GET", f"{base}/ls", status=409, path="/")
    await api.call("DELETE", base, status=409)

    # `tessera files get --config` goes through the daemon's API (a session of its own)
    out_dir = proc.config.parent / "out"
    out_dir.mkdir()
    out = await ok(
        "files", "get", backup.snapshot, "--config", proc.config,
        "/sda1/etc", "/vg0-lv0/var/log/app.log", "--to", out_dir,
    )  # fmt: skip
    assert "copied 2 files" in out, out
    assert (out_dir / "etc" / "hostname").read_bytes() == backup.files["/sda1/etc/hostname"]
    assert (out_dir / "etc" / "name-link").readlink() == Path("hostname")
    assert (out_dir / "app.log").read_bytes() == backup.files["/vg0-lv0/var/log/app.log"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["app.log", "etc"]
    jobs = [j for j in await api.call("GET", "/v1/jobs") if j["kind"] == "files"]
    assert len(jobs) == 2 and jobs[0]["id"] == session, jobs
    # the CLI deleted its session on the way out; the appliance shuts down meanwhile
    assert (await api.ended(jobs[1]["id"]))["state"] == "cancelled"
    assert not _qemus_under(proc.proc.pid)


def _fill(path: Path, leave: int) -> Path:
    """A file at ``path`` taking all but ``leave`` bytes of its filesystem's free space."""
    st = os.statvfs(path.parent)
    size = st.f_bavail * st.f_frsize - leave
    with path.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return path


def _qemus_under(pid: int) -> list[int]:
    """Running qemu processes descending from ``pid``."""
    parent: dict[int, int] = {}
    comm: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            fields = text.rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            parent[int(entry.name)] = int(fields[1])
            comm[int(entry.name)] = text[text.index("(") + 1 : text.rindex(")")]
    found = []
    for child, name in comm.items():
        if not name.startswith("qemu"):
            continue
        up = child
        while up in parent and up != pid:
            up = parent[up]
        if up == pid:
            found.append(child)
    return found
