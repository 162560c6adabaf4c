"""``tessera lab up | show | down``: the whole lab started in the background, in one directory.

::

    tessera lab up --dir D     builds D/images/* (first time), starts `python -m plugins.lab
                               run --dir D` detached, waits for D/lab.json, returns
    D/lab.json                 engine URL, user, password file, CA file, every VM with its disks
                               and their image files — what tests and people read
    D/tessera.yaml             a daemon config pointing at the lab (store in D/store)
    tessera lab show --dir D   prints lab.json (``--json``) or a table, with the VMs and disks
                               the engine has now (restores add some)
    tessera lab down --dir D   SIGTERM to the lab process (pid in D/lab.pid), waits, cleans up
                               (unmounts whatever a killed lab left under D/devices)

The lab process owns the fake engine, an ovirt-imageio daemon (its data URL base is in
lab.json) and the qemu-nbd exports the engine starts for image transfers of D/images/*; it
stops them all on SIGTERM. Everything listens on 127.0.0.1 only.

As on a real engine, imageio speaks TLS only, with a certificate from the engine CA
(D/engine/ca.pem, the ``ca_file`` of lab.json and tessera.yaml, also served at
``/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA``), and SSO
tokens expire: ``up(sso_idle_timeout=…, sso_lifetime=…)`` (``tessera lab up
--sso-idle-timeout/--sso-lifetime``) shortens the engine's 30-minute idle timeout and
10-hour lifetime to try long jobs against expiring tokens.

The DataMover VM (``tessera-datamover``) has local devices: a disk attached to it through the
API appears under D/devices/by-id as udev would name it (FUSE mounts in D/devices/mnt,
``engine.devices``); tessera.yaml points ``datamover.by_id_dir`` there, so the LAN-free flow
(``--flow snapshot-attach``, ``restore --flow attach``) runs against the lab as it is.
"""

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import ovirtsdk4 as sdk
from ovirtsdk4 import types

from engine.core.errors import ConfigError
from engine.core.units import GiB
from plugins.lab.disks import DiskRequest, build_disks
from plugins.lab.engine import sso
from plugins.lab.engine.devices import unmount_all
from plugins.lab.engine.server import FakeEngine
from plugins.lab.engine.state import DiskSeed, Inventory, Seed, VmSeed, demo_seed
from plugins.lab.imageio import ImageioDaemon

START_TIMEOUT: Final = 120.0  # seconds for `up` to see lab.json: first run builds the images
STOP_TIMEOUT: Final = 30.0  # seconds for the lab process to exit after SIGTERM
SHOW_TIMEOUT: Final = 30  # seconds per engine request of `show` (a loopback fake: instant)
DATAMOVER: Final = "tessera-datamover"
SECONDS_KNOBS: Final = frozenset({"phase_seconds", "disk_seconds"})  # floats; the rest ints


def lab_seed() -> Seed:
    """The demo inventory with small disks (quick to build and back up) and a DataMover VM."""
    base = demo_seed()
    vms = tuple(
        replace(vm, disks=tuple(replace(d, size=min(d.size, 2 * GiB)) for d in vm.disks))
        for vm in base.vms
    )
    datamover = VmSeed(name=DATAMOVER, disks=(DiskSeed(f"{DATAMOVER}_os", 2 * GiB, bootable=True),))
    return replace(base, vms=(*vms, datamover))


def _paths(directory: Path) -> dict[str, Path]:
    return {
        "json": directory / "lab.json",
        "pid": directory / "lab.pid",
        "log": directory / "lab.log",
        "config": directory / "tessera.yaml",
        "password": directory / "engine-password",
        "images": directory / "images",
        "engine": directory / "engine",
        "work": directory / "work",
        "imageio": directory / "imageio",
        "devices": directory / "devices",
    }


async def run(
    directory: Path,
    seed: Seed | None = None,
    knobs: dict[str, float] | None = None,
    *,
    sso_idle_timeout: float = sso.IDLE_TIMEOUT,
    sso_lifetime: float = sso.LIFETIME,
) -> None:
    """The lab process: build images, serve until SIGTERM, then stop everything.

    ``seed`` (default ``lab_seed()``) lets a test serve another inventory the same way;
    ``knobs`` are ``Faults`` fields set on the engine before it serves."""
    p = _paths(directory)
    seed = seed or lab_seed()
    p["images"].mkdir(parents=True, exist_ok=True)
    p["engine"].mkdir(parents=True, exist_ok=True)
    p["imageio"].mkdir(parents=True, exist_ok=True)
    inventory = Inventory.from_seed(seed)
    images: dict[str, Path] = {}
    requests, vms = [], []
    for vm in inventory.vms.values():
        disks = []
        for attachment in vm.attachments:
            disk = inventory.disks[attachment.disk_id]
            if disk.storage_type != "image":
                continue  # a direct LUN: storage outside every domain, no image
            fmt = "qcow2" if disk.format == "cow" else "raw"
            path = p["images"] / f"{disk.id}.{fmt}"
            images[disk.id] = path
            if not path.exists():
                requests.append(
                    DiskRequest(
                        disk.alias,
                        path,
                        fmt,
                        disk.provisioned_size,
                        attachment.bootable,
                        vm.name,
                        disk.layout,
                    )
                )
            disks.append(
                {
                    "id": disk.id,
                    "alias": disk.alias,
                    "storage_type": "image",
                    "shareable": disk.shareable,
                    "format": fmt,
                    "size": disk.provisioned_size,
                    "path": str(path),
                }
            )
        vms.append({"id": vm.id, "name": vm.name, "disks": disks})
    await build_disks(requests, p["work"])
    await unmount_all(p["devices"])  # a killed lab's devices
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with (
        ImageioDaemon(p["imageio"]) as daemon,
        FakeEngine(
            seed,
            p["engine"],
            images=images,
            imageio=daemon,
            datamover=DATAMOVER,
            devices_dir=p["devices"],
            sso_idle_timeout=sso_idle_timeout,
            sso_lifetime=sso_lifetime,
        ) as engine,
    ):
        for name, value in (knobs or {}).items():
            getattr(engine.faults, name)  # AttributeError: not a knob
            setattr(engine.faults, name, value if name in SECONDS_KNOBS else int(value))
        p["password"].write_text(seed.password + "\n")
        os.chmod(p["password"], 0o600)
        doc = {
            "pid": os.getpid(),
            "engine": {
                "url": engine.url,
                "username": seed.username,
                "password_file": str(p["password"]),
                "ca_file": str(engine.ca_file),
            },
            "imageio": {
                "control_url": daemon.control_url,
                "log": str(daemon.log_path),
                "ca_file": str(engine.ca_file),  # the same CA as the engine's
            },
            "sso": {"idle_timeout": sso_idle_timeout, "lifetime": sso_lifetime},
            "datamover": DATAMOVER,
            "by_id_dir": str(p["devices"] / "by-id"),
            "vms": vms,
        }
        passphrase = directory / "store-passphrase"
        if not passphrase.exists():
            passphrase.write_text(secrets.token_urlsafe(24) + "\n")
            os.chmod(passphrase, 0o600)
        p["config"].write_text(_config(directory, doc))
        tmp = p["json"].with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.rename(p["json"])  # appears whole: `up` waits for it
        await stop.wait()
    p["json"].unlink(missing_ok=True)


def _config(directory: Path, doc: dict[str, Any]) -> str:
    engine = doc["engine"]
    return (
        "# Written by `tessera lab up`: a daemon configuration pointing at the lab.\n"
        "stores:\n"
        f"  - name: main\n    path: {directory / 'store'}\n    encryption: aes-256-gcm\n"
        f"    passphrase_file: {directory / 'store-passphrase'}\n"
        "engines:\n"
        f"  - name: lab\n    url: {engine['url']}\n    username: {engine['username']}\n"
        f"    password_file: {engine['password_file']}\n    ca_file: {engine['ca_file']}\n"
        f"datamover:\n  vm_name: {doc['datamover']}\n  by_id_dir: {doc['by_id_dir']}\n"
        "  device_timeout: 30\n"
        "# `tessera run --config` on this file: the API socket, schedule state and policies\n"
        "# live in the lab directory (policies.d/ beside this file; empty at first).\n"
        f"api:\n  socket: {directory / 'api.sock'}\n"
        f"scheduler:\n  state_file: {directory / 'scheduler.json'}\n"
        "logging:\n  level: info\n"
    )


def up(
    directory: Path,
    knobs: dict[str, float] | None = None,
    *,
    sso_idle_timeout: float | None = None,
    sso_lifetime: float | None = None,
) -> dict[str, Any]:
    """Start the lab in the background (idempotent while it runs: a running lab keeps its
    settings); returns lab.json.

    ``knobs``: ``Faults`` fields to set in the lab engine (``tessera lab up --help``: the
    transfer inactivity timeout, slow reads, phase time, new-disk time, ticket timeout). The
    SSO knobs default to the engine's (``sso``)."""
    directory.mkdir(parents=True, exist_ok=True)
    p = _paths(directory)
    if _alive(p):
        return dict(json.loads(p["json"].read_text()))
    p["json"].unlink(missing_ok=True)
    command = [sys.executable, "-m", "plugins.lab", "run", "--dir", str(directory)]
    if sso_idle_timeout is not None:
        command += ["--sso-idle-timeout", str(sso_idle_timeout)]
    if sso_lifetime is not None:
        command += ["--sso-lifetime", str(sso_lifetime)]
    with p["log"].open("ab") as log:
        proc = subprocess.Popen(
            [*command, *(f"--knob={k}={v}" for k, v in (knobs or {}).items())],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # survives the CLI; `down` stops it
        )
    p["pid"].write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while not p["json"].exists():
        if proc.poll() is not None:
            raise ConfigError(message=f"the lab failed to start; see {p['log']}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise ConfigError(
                message=f"the lab did not start within {START_TIMEOUT:.0f} s; see {p['log']}"
            )
        time.sleep(0.1)
    return dict(json.loads(p["json"].read_text()))


def show(directory: Path) -> dict[str, Any]:
    """lab.json, with ``vms`` (and ``floating_disks``) read from the running engine: what a
    restore created is listed too, and what was deleted is not. Each disk has its image
    ``path`` (a generated one, or one the engine made in D/engine/images; None if neither
    exists). Raises ``ConfigError`` when no lab runs or its engine does not answer."""
    p = _paths(directory)
    if not _alive(p):
        raise ConfigError(
            message=f"no lab is running in {directory} (start it with `tessera lab up`)"
        )
    doc = dict(json.loads(p["json"].read_text()))
    doc["vms"], doc["floating_disks"] = _engine_state(doc, p)
    return doc


def _engine_state(
    doc: dict[str, Any], p: dict[str, Path]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(VMs with their disks, disks attached to no VM) as the lab's engine lists them now."""
    engine = doc["engine"]
    known = {d["id"]: d["path"] for vm in doc["vms"] for d in vm["disks"]}

    def disk_doc(disk: Any) -> dict[str, Any]:
        fmt = "qcow2" if disk.format == types.DiskFormat.COW else "raw"
        path: str | None = known.get(disk.id)
        made = p["engine"] / "images" / f"{disk.id}.{fmt}"  # restore.create_disk's name
        if path is None and made.exists():
            path = str(made)
        status = disk.status.value if disk.status else None
        if disk.storage_type == types.DiskStorageType.LUN:  # storage outside the lab's images
            return {
                "id": disk.id,
                "alias": disk.alias,
                "storage_type": "lun",
                "shareable": bool(disk.shareable),
                "format": "lun",
                "size": _lun_size(disk),
                "status": None,
                "path": None,
            }
        return {
            "id": disk.id,
            "alias": disk.alias,
            "storage_type": "image",
            "shareable": bool(disk.shareable),
            "format": fmt,
            "size": disk.provisioned_size,
            "status": status,
            "path": path,
        }

    try:
        conn = sdk.Connection(
            url=engine["url"],
            username=engine["username"],
            password=Path(engine["password_file"]).read_text().strip(),
            ca_file=engine["ca_file"],
            timeout=SHOW_TIMEOUT,
        )
        try:
            system = conn.system_service()
            disks = {d.id: d for d in system.disks_service().list()}
            vms, attached = [], set()
            for vm in system.vms_service().list():
                service = system.vms_service().vm_service(vm.id)
                ids = [a.disk.id for a in service.disk_attachments_service().list()]
                attached.update(ids)
                vms.append(
                    {
                        "id": vm.id,
                        "name": vm.name,
                        "status": vm.status.value if vm.status else None,
                        "disks": [disk_doc(disks[i]) for i in ids if i in disks],
                    }
                )
            floating = [disk_doc(d) for i, d in disks.items() if i not in attached]
        finally:
            conn.close()
    except (sdk.Error, OSError) as e:
        raise ConfigError(message=f"the lab's engine {engine['url']} does not answer: {e}") from e
    return vms, floating


def down(directory: Path) -> bool:
    """Stop the lab; False if none was running."""
    p = _paths(directory)
    if not p["pid"].exists():
        return False
    pid = int(p["pid"].read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        p["pid"].unlink(missing_ok=True)
        asyncio.run(unmount_all(p["devices"]))  # a killed lab's devices
        return False
    deadline = time.monotonic() + STOP_TIMEOUT
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p["pid"].unlink(missing_ok=True)
    p["json"].unlink(missing_ok=True)
    asyncio.run(unmount_all(p["devices"]))  # only if the lab could not (killed)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this process still "exists": reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def _alive(p: dict[str, Path]) -> bool:
    if not (p["pid"].exists() and p["json"].exists()):
        return False
    return _pid_alive(int(p["pid"].read_text()))


def _lun_size(disk: Any) -> int | None:
    units = disk.lun_storage.logical_units if disk.lun_storage is not None else None
    return int(units[0].size) if units else None
