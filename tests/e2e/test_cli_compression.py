"""A store's zstd level, chosen at ``tessera store init``: kept in config.json (only when not
the default), used by every writer of the store, refused outside the levels a store may use."""

import json
from pathlib import Path

import pytest

from engine.store.chunk_store import Store
from engine.store.layout import DEFAULT_ZSTD_LEVEL, MAX_ZSTD_LEVEL
from tests.cli import Cli
from tests.integration.images import make_fs_qcow2

pytestmark = pytest.mark.e2e

CLI = Cli(passphrase="pw")
tessera = CLI.run


def stored_bytes(store: Path) -> int:
    proc = tessera("store", "info", store, "--json")
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["stored_bytes"])


def test_each_store_compresses_at_its_own_level(tmp_path: Path) -> None:
    image = make_fs_qcow2(tmp_path, "disk", size_mib=64)
    sizes = {}
    for level in (-7, DEFAULT_ZSTD_LEVEL, 19):
        store = tmp_path / f"store{level}"
        proc = tessera("store", "init", store, "--zstd-level", str(level))
        assert proc.returncode == 0, proc.stderr
        assert f"zstd level {level}" in proc.stdout
        config = json.loads((store / "config.json").read_text())
        assert config.get("zstd_level") == (None if level == DEFAULT_ZSTD_LEVEL else level)
        proc = tessera("backup", "image", image, "--store", store, "--level", "full")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sizes[level] = stored_bytes(store)
        assert f"zstd level {level}" in tessera("store", "info", store).stdout
        with Store.open(store, passphrase=b"pw") as opened:  # every record reads back
            assert opened.config.zstd_level == level
    assert sizes[-7] > sizes[DEFAULT_ZSTD_LEVEL] > sizes[19], sizes


def test_a_level_outside_the_range_is_refused(tmp_path: Path) -> None:
    proc = tessera("store", "init", tmp_path / "s", "--zstd-level", str(MAX_ZSTD_LEVEL + 1))
    assert proc.returncode != 0
    assert f"zstd level {MAX_ZSTD_LEVEL + 1} is not in -7..{MAX_ZSTD_LEVEL}" in proc.stderr
    assert not (tmp_path / "s" / "config.json").exists()
    # and a config.json edited by hand to an impossible level names the store
    good = tmp_path / "good"
    assert tessera("store", "init", good).returncode == 0
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps(config | {"zstd_level": "max"}))
    proc = tessera("store", "info", good)
    assert proc.returncode != 0 and "zstd level 'max' is not in" in proc.stderr, proc.stderr
