"""`tessera lab up/show/down`: the lab runs in the background and the real SDK can use it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

ROOT = Path(__file__).resolve().parents[2]


def tessera(*args: str | Path, passphrase: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TESSERA_PASSPHRASE": passphrase} if passphrase else None
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.mark.integration
async def test_up_show_down(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    up = tessera("lab", "up", "--dir", lab, "--sso-idle-timeout", "900", "--sso-lifetime", "7200")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "tessera-datamover" in up.stdout
        doc = json.loads(tessera("lab", "show", "--dir", lab, "--json").stdout)
        assert doc["sso"] == {"idle_timeout": 900, "lifetime": 7200}
        assert doc["imageio"]["ca_file"] == doc["engine"]["ca_file"]
        assert tessera("lab", "up", "--dir", lab).returncode == 0  # idempotent while running
        assert (
            json.loads(tessera("lab", "show", "--dir", lab, "--json").stdout)["pid"] == doc["pid"]
        )
        engine = doc["engine"]
        for vm in doc["vms"]:
            for disk in vm["disks"]:
                if disk.get("storage_type") == "lun":  # db01's direct LUN has no image
                    assert disk["path"] is None
                    continue
                assert Path(disk["path"]).exists()
        assert "password_file: " in (lab / "tessera.yaml").read_text()

        def list_vms() -> list[str]:
            conn = sdk.Connection(
                url=engine["url"],
                username=engine["username"],
                password=Path(engine["password_file"]).read_text().strip(),
                ca_file=engine["ca_file"],
            )
            try:
                return sorted(vm.name for vm in conn.system_service().vms_service().list())
            finally:
                conn.close()

        import asyncio

        assert await asyncio.to_thread(list_vms) == sorted(vm["name"] for vm in doc["vms"])
    finally:
        down = tessera("lab", "down", "--dir", lab)
    assert down.returncode == 0 and "lab stopped" in down.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(doc["pid"], 0)
    shown = tessera("lab", "show", "--dir", lab)
    assert shown.returncode == 2 and "no lab is running" in shown.stderr


@pytest.mark.integration
def test_show_lists_what_a_restore_created(tmp_path: Path) -> None:
    """`lab show` asks the engine: a VM and disk a restore made are listed, with the image
    the engine wrote; lab.json (the generated inventory) does not change."""
    lab = tmp_path / "lab"
    up = tessera("lab", "up", "--dir", lab)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        generated = json.loads((lab / "lab.json").read_text())
        config = lab / "tessera.yaml"
        passphrase = (lab / "store-passphrase").read_text().strip()
        for args in (
            ("store", "init", lab / "store"),
            ("backup", "vm", "web02", "--config", config),
        ):
            done = tessera(*args, passphrase=passphrase)
            assert done.returncode == 0, done.stdout + done.stderr
        snaps = tessera("snapshots", "--config", config, "--json", passphrase=passphrase)
        snapshot = json.loads(snaps.stdout)[0]["id"]
        done = tessera(
            "restore", snapshot, "--config", config, "--name", "web02-copy", passphrase=passphrase
        )
        assert done.returncode == 0, done.stdout + done.stderr

        shown = tessera("lab", "show", "--dir", lab, "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        vms = {vm["name"]: vm for vm in doc["vms"]}
        assert set(vms) == {vm["name"] for vm in generated["vms"]} | {"web02-copy"}
        (original,) = vms["web02"]["disks"]
        (copy,) = vms["web02-copy"]["disks"]
        assert copy["id"] != original["id"]
        assert (copy["alias"], copy["format"], copy["size"]) == (
            original["alias"],
            original["format"],
            original["size"],
        )
        assert copy["status"] == "ok"
        assert Path(copy["path"]).parent == lab / "engine" / "images"
        assert Path(copy["path"]).exists()
        assert doc["floating_disks"] == []
        assert json.loads((lab / "lab.json").read_text()) == generated

        table = tessera("lab", "show", "--dir", lab)
        assert table.returncode == 0 and "web02-copy" in table.stdout, table.stdout
    finally:
        down = tessera("lab", "down", "--dir", lab)
    assert down.returncode == 0, down.stdout + down.stderr


def test_up_help_documents_the_token_knobs() -> None:
    result = tessera("lab", "up", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--sso-idle-timeout SECONDS" in text and "--sso-lifetime SECONDS" in text
    assert "UserSessionTimeOutInterval" in text and "UserSessionHardLimit" in text
    bad = tessera("lab", "up", "--dir", "/nonexistent", "--sso-lifetime", "0")
    assert bad.returncode == 2 and "more than 0" in bad.stderr


def test_lab_up_help_documents_the_timing_and_fault_knobs() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "lab", "up", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    options = (
        "--inactivity-timeout",
        "--slow-reads",
        "--phase-seconds",
        "--disk-seconds",
        "--ticket-timeout",
    )
    for option in options:
        assert option in out, out
