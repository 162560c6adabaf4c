"""``exports.sweep``: what a killed daemon's exports and browsing sessions left is removed at
the next start; nothing else in those directories is touched."""

from pathlib import Path

import pytest

from engine.config.models import ApiSection, Config, SchedulerSection
from engine.core.errors import ConfigError
from engine.daemon.exports import check_socket_dir, overlay_dir, socket_dir, sweep


def test_sweep_removes_sockets_overlays_and_download_dirs_only(tmp_path: Path) -> None:
    config = Config(
        api=ApiSection(socket=tmp_path / "run" / "api.sock"),
        scheduler=SchedulerSection(state_file=tmp_path / "lib" / "scheduler.json"),
    )
    sockets, overlays = socket_dir(config), overlay_dir(config)
    downloads = tmp_path / "lib" / "files" / "20261207T010203-abcdef"
    for d in (sockets, overlays, downloads):
        d.mkdir(parents=True)
    left = [
        sockets / "20261207T010203-aaaaaa.sock",
        overlays / "20261207T010203-bbbbbb.cow",
        overlays / "20261207T010203-bbbbbb.cow.tessera-map",
        downloads / "download-0123",
    ]
    for path in left:
        path.write_bytes(b"x")
    kept = [tmp_path / "run" / "api.sock", tmp_path / "lib" / "scheduler.json"]
    for path in kept:
        path.write_bytes(b"keep")

    removed = sweep(config)

    assert sorted(removed) == sorted([*left[:3], downloads])
    assert not any(p.exists() for p in [*left, downloads])
    assert all(p.read_bytes() == b"keep" for p in kept)
    assert sweep(config) == []


def test_a_socket_dir_too_long_for_a_unix_socket_is_refused_naming_the_setting() -> None:

    check_socket_dir(Path("/run/tessera/exports"))  # fits
    long = Path("/srv/" + "d" * 80 + "/exports")
    with pytest.raises(ConfigError) as info:
        check_socket_dir(long)
    assert "set serve.run_dir to a shorter directory" in str(info.value)
    assert str(long) in str(info.value)
