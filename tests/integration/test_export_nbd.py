"""``tessera export`` served to real NBD clients nobody here wrote: nbdinfo, nbdcopy,
qemu-img and qemu-io (libnbd and qemu's own client), against a store made with the CLI from
a qcow2 image holding an ext4 filesystem, data written past its end and holes between.

What must hold: the map (nbdinfo --map) says data exactly where the image's slots hold data
and hole,zero where they are all zero; every byte read equals the image (qemu-img compare,
directly and through nbdcopy, with several connections at once) and equals `tessera
restore`; writes need an overlay, go only there, survive serving the overlay again, and
leave the store verified clean and restoring as before; clients that vanish mid-read do not
stop the server; a bad snapshot or disk is exit 2 with a clear message.
"""

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.io.nbd import connect
from engine.io.nbd import protocol as p
from engine.io.nbd.errors import NbdRequestError
from engine.io.nbd.handshake import Handshake
from engine.store.chunk_store import Store
from engine.store.layout import Layout
from tests.cli import Cli
from tests.integration.images import identical, make_fs_qcow2, qemu_io, reference, run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "test-pass"
ENV = {**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE}
CLI = Cli(passphrase=PASSPHRASE)
tessera = CLI.run
ok = CLI.ok

CHUNK = 256 * 1024


class Export:
    """A running ``tessera export``: its URI; stopped with SIGTERM (by pid) on exit."""

    def __init__(self, *args: str | Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli.main", "export", *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert self.proc.stdout is not None
        self.uri = self.proc.stdout.readline().strip()  # printed once clients can connect
        if not self.uri:
            self.proc.wait(timeout=60)
            assert self.proc.stderr is not None
            pytest.fail(f"export did not start: {self.proc.stderr.read()}")

    def stop(self) -> str:
        """SIGTERM, wait; returns stderr (asserts a clean exit)."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return err


@contextlib.contextmanager
def exported(*args: str | Path) -> Iterator[Export]:
    export = Export(*args)
    try:
        yield export
    finally:
        if export.proc.poll() is None:
            export.stop()


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """A store holding one snapshot of a qcow2 image (ext4 with files, then 1 MiB of data
    at 80 MiB and a short run near the end, zeroes and unallocated space between)."""
    work = tmp_path_factory.mktemp("export")
    image = make_fs_qcow2(work, "disk", size_mib=96)
    run("qemu-img", "resize", "-f", "qcow2", image, "112M")
    qemu_io(image, "write -P 0x5a 80M 1M", "write -P 0xc3 110M 100k", "write -z 30M 4M")
    raw = reference(image, work / "disk.raw")
    store = work / "store"
    ok("store", "init", store, "--chunk-size", "256k", "--pack-size", "8M")
    ok("backup", "image", image, "--store", store)
    (snapshot,) = json.loads(ok("snapshots", "--store", store, "--json"))
    return {"work": work, "image": image, "raw": raw, "store": store, "id": snapshot["id"]}


def nbd_uri(socket_path: Path) -> str:
    return f"nbd+unix:///?socket={socket_path}"


def test_map_reports_data_and_holes_as_the_image_holds_them(
    backed_up: dict[str, Path | str], tmp_path: Path
) -> None:
    sock = tmp_path / "s.sock"
    with exported(backed_up["id"], "--store", backed_up["store"], "--socket", sock) as export:
        assert export.uri == nbd_uri(sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        info = json.loads(run("nbdinfo", "--json", export.uri))
        (desc,) = info["exports"]
        assert desc["export-size"] == 112 * 1024 * 1024
        assert desc["is_read_only"] and desc["can_multi_conn"]
        assert desc["block_size_preferred"] == CHUNK
        assert "base:allocation" in desc["contexts"]
        extents = json.loads(run("nbdinfo", "--map", "--json", export.uri))
    data = Path(backed_up["raw"]).read_bytes()
    expected = [any(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
    got = [False] * len(expected)
    end = 0
    for extent in extents:
        assert extent["offset"] == end
        end += extent["length"]
        is_data = extent["type"] == 0
        assert extent["type"] in (0, 3)  # data, or hole|zero
        for slot in range(extent["offset"] // CHUNK, -(-end // CHUNK)):
            got[slot] = is_data
    assert end == len(data)
    assert got == expected
    assert not all(expected) and any(expected)  # the image has both


def test_nbdcopy_with_four_connections_equals_restore_and_the_image(
    backed_up: dict[str, Path | str], tmp_path: Path
) -> None:
    sock = tmp_path / "s.sock"
    restored = tmp_path / "restored.raw"
    ok(
        "restore",
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--to",
        restored,
        "--format",
        "raw",
    )
    with exported(backed_up["id"], "--store", backed_up["store"], "--socket", sock) as export:
        copy = tmp_path / "copy.raw"
        run("nbdcopy", "--connections=4", export.uri, copy)
        assert identical(copy, restored)
        assert identical(copy, Path(backed_up["image"]))
        # qemu's own NBD client, straight against the export
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", export.uri, backed_up["image"])
        err = export.stop()
    assert "export stopped (SIGTERM)" in err
    assert not sock.exists()


def test_several_clients_at_once_over_tcp(backed_up: dict[str, Path | str], tmp_path: Path) -> None:
    with exported(
        backed_up["id"], "--store", backed_up["store"], "--listen", "127.0.0.1:0"
    ) as export:
        assert export.uri.startswith("nbd://127.0.0.1:")
        copies = [tmp_path / f"copy{i}.raw" for i in range(2)]
        procs = [
            subprocess.Popen(
                ["nbdcopy", "--connections=2", "--requests=8", export.uri, str(c)],
                stderr=subprocess.PIPE,
            )
            for c in copies
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
    for copy in copies:
        assert identical(copy, Path(backed_up["raw"]))


def test_store_read_only_beside_a_writer_and_snapshot_held_while_served(
    backed_up: dict[str, Path | str], tmp_path: Path
) -> None:
    store_path = Path(backed_up["store"])
    sock = tmp_path / "s.sock"
    # A process holding the writer lock (as the daemon does) does not keep export out.
    with Store.open(store_path, passphrase=PASSPHRASE.encode()):
        with exported(backed_up["id"], "--store", store_path, "--socket", sock) as export:
            manifest = Layout(store_path).manifest(str(backed_up["id"]))
            fd = os.open(manifest, os.O_RDONLY)
            try:  # prune's test: an exclusive lock is refused while the export reads it
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            run("qemu-img", "compare", "-f", "raw", export.uri, backed_up["raw"])


def test_read_only_export_refuses_writes_and_survives_clients_vanishing(
    backed_up: dict[str, Path | str], tmp_path: Path
) -> None:
    sock = tmp_path / "s.sock"
    with exported(backed_up["id"], "--store", backed_up["store"], "--socket", sock) as export:
        # A client that asks for 32 MiB and hangs up before the reply.
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(sock))
        hs = Handshake("", ())
        while not hs.done:
            hs.receive_data(raw.recv(65536))
            raw.sendall(hs.data_to_send())
        raw.sendall(p.encode_request(p.CMD_READ, 1, 0, p.MAX_REQUEST))
        raw.close()
        # nbdcopy killed in the middle of a copy
        copy = subprocess.Popen(["nbdcopy", export.uri, str(tmp_path / "partial.raw")])
        copy.send_signal(signal.SIGKILL)
        copy.wait(timeout=60)

        async def write_refused() -> int:
            async with await connect(sock) as client:
                with pytest.raises(NbdRequestError) as failed:
                    await client.write(0, b"x" * 4096)
                return failed.value.errno

        assert asyncio.run(write_refused()) == 1  # EPERM
        run("qemu-img", "compare", "-f", "raw", export.uri, backed_up["raw"])


def test_writable_overlay_keeps_writes_out_of_the_store(
    backed_up: dict[str, Path | str], tmp_path: Path
) -> None:
    store = backed_up["store"]
    sock, cow = tmp_path / "w.sock", tmp_path / "w.cow"
    expected = bytearray(Path(backed_up["raw"]).read_bytes())
    with exported(
        backed_up["id"], "--store", store, "--socket", sock, "--writable-overlay", cow
    ) as export:
        info = json.loads(run("nbdinfo", "--json", export.uri))["exports"][0]
        assert not info["is_read_only"] and info["can_zero"] and info["can_trim"]
        run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1000 5000",  # unaligned: copy-on-write of one block
            "-c",
            "write -z 80M 512k",  # half of the data at 80 MiB becomes zero
            "-c",
            "write -P 0x42 50M 300k",  # into a hole
            export.uri,
        )
        expected[1000:6000] = b"\x77" * 5000
        expected[80 * 2**20 : 80 * 2**20 + 512 * 1024] = bytes(512 * 1024)
        expected[50 * 2**20 : 50 * 2**20 + 300 * 1024] = b"\x42" * (300 * 1024)
        run("qemu-io", "-f", "raw", "-c", "read -P 0x77 1000 5000", export.uri)
        copy = tmp_path / "copy.raw"
        run("nbdcopy", export.uri, copy)
        assert copy.read_bytes() == bytes(expected)
    (tmp_path / "expected.raw").write_bytes(bytes(expected))
    # Served again, the same overlay still holds the writes.
    with exported(
        backed_up["id"], "--store", store, "--socket", sock, "--writable-overlay", cow
    ) as export:
        run("qemu-img", "compare", "-f", "raw", export.uri, tmp_path / "expected.raw")
    # The store never changed.
    ok("store", "verify", store)
    restored = tmp_path / "restored.raw"
    ok("restore", backed_up["id"], "--store", store, "--to", restored, "--format", "raw")
    assert identical(restored, Path(backed_up["raw"]))


def test_unknown_snapshot_disk_or_foreign_overlay_exit_2(
    backed_up: dict[str, Path | str], tmp_path: Path
) -> None:
    sock = tmp_path / "s.sock"
    proc = tessera("export", "ffffffff", "--store", backed_up["store"], "--socket", sock)
    assert proc.returncode == 2
    assert "snapshot ffffffff: no such snapshot" in proc.stderr
    proc = tessera(
        "export",
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--disk",
        "nope",
        "--socket",
        sock,
    )
    assert proc.returncode == 2
    assert "no disk 'nope'" in proc.stderr
    cow = tmp_path / "other.cow"
    cow.write_bytes(b"")
    (tmp_path / "other.cow.tessera-map").write_bytes(b'{"snapshot": "x"}')
    proc = tessera(
        "export",
        backed_up["id"],
        "--store",
        backed_up["store"],
        "--socket",
        sock,
        "--writable-overlay",
        cow,
    )
    assert proc.returncode == 2, proc.stderr
    assert "belongs to" in proc.stderr
    assert not sock.exists()
