"""`tessera lab up/show/down`: the lab runs in the background and the real SDK can use it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ovirtsdk4 as sdk
import pytest

ROOT = Path(__file__).resolve().parents[2]


def tessera(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.daemon.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.integration
async def test_up_show_down(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    up = tessera("lab", "up", "--dir", lab)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "tessera-datamover" in up.stdout
        doc = json.loads(tessera("lab", "show", "--dir", lab, "--json").stdout)
        assert tessera("lab", "up", "--dir", lab).returncode == 0  # idempotent while running
        assert (
            json.loads(tessera("lab", "show", "--dir", lab, "--json").stdout)["pid"] == doc["pid"]
        )
        engine = doc["engine"]
        for vm in doc["vms"]:
            for disk in vm["disks"]:
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
