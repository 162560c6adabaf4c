"""``tessera check-config`` and ``tessera show-config`` through the CLI entry."""

import json
from pathlib import Path

import pytest
import yaml

from engine.cli.main import main
from engine.config.models import LimitsSection
from engine.pipeline.defaults import DEFAULT_DISKS_AT_ONCE

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ["--config", str(ROOT / "config.example.yaml")]
EXAMPLE_POLICIES = ["--policies-dir", str(ROOT / "examples" / "policies.d")]

CONFIG = """\
stores:
  - name: main
    path: /srv/store
engines:
  - name: lab
    url: https://127.0.0.1:1/ovirt-engine/api
    username: admin@internal
    password_file: {secret}
scheduler:
  timezone: UTC
"""
POLICY = "name: {name}\nselection:\n  vms: [web*]\nschedule: daily 02:00\n"


def setup(tmp_path: Path) -> Path:
    secret = tmp_path / "engine-password"
    secret.write_text("hunter2-never-printed\n")
    main_file = tmp_path / "config.yaml"
    main_file.write_text(CONFIG.format(secret=secret))
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "50-limits.yaml").write_text("limits:\n  concurrent_vms: 2\n")
    (tmp_path / "policies.d").mkdir()
    (tmp_path / "policies.d" / "a.yaml").write_text(POLICY.format(name="a"))
    return main_file


def test_check_config_on_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", *EXAMPLE, *EXAMPLE_POLICIES]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {ROOT / 'config.example.yaml'}, 1 policy in ")
    assert "  policy daily-prod: mon..sat 02:00; sun 04:00; next " in out
    assert "incremental, full every 7d, full on sun" in out


def test_check_config_summary_and_drop_ins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(setup(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "(+ 1 drop-in), 1 policy in" in out
    assert "  time zone UTC, misfire grace 1h" in out
    assert "  policy a: daily 02:00; next " in out


def test_check_config_reports_every_broken_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_file = setup(tmp_path)
    (tmp_path / "policies.d" / "b.yaml").write_text(POLICY.format(name="b") + "colour: red\n")
    (tmp_path / "policies.d" / "c.yaml").write_text(
        POLICY.format(name="c").replace("daily 02:00", "daily 26:00")
    )
    assert main(["check-config", "--config", str(main_file)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {tmp_path / 'policies.d' / 'b.yaml'}: (top level) (line 5): Object contains "
        "unknown field `colour`",
        f"error: {tmp_path / 'policies.d' / 'c.yaml'}: schedule[0] (line 4): schedule "
        "'daily 26:00': hour out of range 0..23: '26'",
        "2 errors",
    ]


def test_check_config_reports_a_broken_daemon_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_file = setup(tmp_path)
    main_file.write_text(main_file.read_text().replace("password_file:", "password:"))
    assert main(["check-config", "--config", str(main_file)]) == 1
    err = capsys.readouterr().err
    assert f"error: {main_file}: engines[0].password (line 8): secrets are never written" in err
    assert "use password_file" in err


def test_show_config_merges_and_never_prints_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_file = setup(tmp_path)
    assert main(["show-config", "--config", str(main_file)]) == 0
    text = capsys.readouterr().out
    assert "hunter2" not in text
    doc = yaml.safe_load(text)
    assert doc["limits"]["concurrent_vms"] == 2  # from conf.d
    assert doc["engines"][0]["password_file"] == str(tmp_path / "engine-password")
    assert doc["policies"][0]["schedule"] == ["daily 02:00"]
    assert doc["policies"][0]["file"] == str(tmp_path / "policies.d" / "a.yaml")
    assert main(["show-config", "--json", "--config", str(main_file)]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json == doc


def test_show_config_of_a_broken_config_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main_file = setup(tmp_path)
    (tmp_path / "policies.d" / "b.yaml").write_text("name: b\n")
    assert main(["show-config", "--config", str(main_file)]) == 2
    assert (
        "b.yaml: (top level): Object missing required field `selection`" in capsys.readouterr().err
    )


def test_restore_disks_defaults_to_the_restores_default() -> None:
    """``limits.restore_disks`` states its default as a literal (config cannot import the
    restore, its sibling in the layers); it must be the restore's own."""
    assert LimitsSection().restore_disks == DEFAULT_DISKS_AT_ONCE
