"""Policies and the service sections: the examples load; bad files give exact errors."""

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.config.loader import load, load_all, load_policies, load_policy
from engine.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_POLICIES = ROOT / "examples" / "policies.d"


def test_example_config_and_policy_load_together() -> None:
    loaded = load_all(ROOT / "config.example.yaml", policies_dir=EXAMPLE_POLICIES)
    config = loaded.config
    assert config.scheduler.timezone == ZoneInfo("Europe/Berlin")
    assert config.scheduler.misfire_grace.delta == timedelta(hours=1)
    assert config.smtp is not None
    assert config.smtp.sender == "tessera@example.com"
    assert config.peer("site-b").bandwidth_limit == 100 * 1024 * 1024
    assert config.limits.concurrent_vms == 4
    assert config.api.socket == Path("/run/tessera/api.sock")
    policy = loaded.policy("daily-prod")
    assert [str(s) for s in policy.schedule] == ["mon..sat 02:00", "sun 04:00"]
    assert len(policy.calendars) == 2
    assert policy.level.full_every is not None
    assert policy.level.full_every.delta == timedelta(days=7)
    assert policy.retention.keep_within == "2d"
    assert policy.notifications.on == ("failure", "integrity")
    assert policy.notifications.webhooks == ("ops-chat",)
    assert config.webhook("ops-chat").format == "slack"
    assert config.maintenance.webhooks == ("ops-chat",)
    assert config.maintenance.restore_check == "sun 05:00"
    assert policy.standby is not None
    assert policy.standby.cluster == "DR"
    assert policy.restore_check is not None
    assert policy.restore_check.after_backup
    assert policy.restore_check.expect == ("/sda1/etc/hostname",)
    assert loaded.policy_files == {"daily-prod": EXAMPLE_POLICIES / "daily.yaml"}


def test_every_example_policy_loads_on_its_own() -> None:
    assert [p.name for p, _ in load_policies(EXAMPLE_POLICIES)] == ["daily-prod"]


CONFIG = """\
stores:
  - name: main
    path: /srv/store
engines:
  - name: lab
    url: https://127.0.0.1:1/ovirt-engine/api
    username: admin@internal
    password_file: /etc/tessera/engine-password
peers:
  - name: b
    url: https://b:8444
    cert_file: /c
    key_file: /k
    ca_file: /ca
"""

POLICY = """\
name: nightly
selection:
  vms: [web01]
schedule: daily 02:00
level: {default: incremental, full_every: 7d}
retention:
  keep_daily: 7
  keep_within: 30d
replication:
  - peer: b
notifications:
  on: failure
  to: [ops@example.com]
"""


def write(tmp_path: Path, config: str = CONFIG, policy: str | None = POLICY) -> Path:
    main = tmp_path / "config.yaml"
    main.write_text(config)
    if policy is not None:
        (tmp_path / "policies.d").mkdir(exist_ok=True)
        (tmp_path / "policies.d" / "nightly.yaml").write_text(policy)
    return main


def test_short_forms_and_defaults(tmp_path: Path) -> None:
    loaded = load_all(write(tmp_path))
    policy = loaded.policy("nightly")
    assert policy.schedule == ("daily 02:00",)
    assert policy.level.default == "incremental"
    assert policy.notifications.on == ("failure",)
    assert policy.flow == "auto"
    assert policy.store is None
    assert policy.retention.keep_last is None
    assert loaded.config.scheduler.timezone is None
    with pytest.raises(ConfigError, match="no policy named 'x'"):
        loaded.policy("x")


def test_webhooks_and_warning_events(tmp_path: Path) -> None:
    config = CONFIG + (
        "webhooks:\n"
        "  - {name: chat, url_file: /etc/tessera/secrets/slack-url, format: slack}\n"
        "  - name: phone\n    url: https://gotify.example.com/message\n    format: gotify\n"
        "    token_file: /etc/tessera/secrets/gotify-token\n    timeout: 5\n"
    )
    policy = POLICY.replace(
        "  on: failure\n", "  on: [failure, warning]\n  webhooks: [chat, phone]\n"
    )
    loaded = load_all(write(tmp_path, config, policy))
    chat, phone = loaded.config.webhooks
    assert (chat.url, chat.url_file, chat.format, chat.timeout) == (
        None,
        Path("/etc/tessera/secrets/slack-url"),
        "slack",
        10.0,
    )
    assert loaded.config.webhook("phone") == phone and phone.timeout == 5
    assert phone.token_file == Path("/etc/tessera/secrets/gotify-token")
    notifications = loaded.policy("nightly").notifications
    assert notifications.on == ("failure", "warning")
    assert notifications.webhooks == ("chat", "phone")
    assert load_all(write(tmp_path)).policy("nightly").notifications.webhooks == ()


def test_level_shorthand_and_yes_stays_a_string(tmp_path: Path) -> None:
    text = POLICY.replace("level: {default: incremental, full_every: 7d}", "level: differential")
    policy = load_policy(_policy_file(tmp_path, text))
    assert policy.level.default == "differential"
    with pytest.raises(ConfigError) as e:
        load_policy(_policy_file(tmp_path, POLICY + "require_quiesce: yes\n"))
    assert str(e.value).endswith("require_quiesce (line 14): Expected `bool`, got `str`")


def _policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("  vms: [web01]\n", "  vms: [web01]\n  colour: red\n"),
            "selection (line 4): Object contains unknown field `colour`",
        ),
        (
            ("keep_daily: 7", "keep_daily: seven"),
            "retention.keep_daily (line 7): Expected `int | null`, got `str`",
        ),
        (("keep_daily: 7", "keep_daily: -1"), "retention.keep_daily (line 7): Expected `int` >= 0"),
        (
            ("schedule: daily 02:00", "schedule: [daily 02:00, mon..fry 22:30]"),
            "schedule[1] (line 4): schedule 'mon..fry 22:30': not a weekday: 'fry'",
        ),
        (
            ("schedule: daily 02:00", "schedule: daily 25:00"),
            "schedule[0] (line 4): schedule 'daily 25:00': hour out of range 0..23: '25'",
        ),
        (
            ("keep_within: 30d", "keep_within: 30x"),
            "retention.keep_within (line 8): not a duration: '30x' "
            "(a number and a unit w, d, h, m or s: 30d, 12h, 1d12h)",
        ),
        (
            ("full_every: 7d", "full_every: 7"),
            "level.full_every (line 5): expected a duration such as 30d, got int",
        ),
        (
            ("  vms: [web01]\n", "  tags: []\n"),
            "selection (line 2): the selection needs clusters, vms or tags",
        ),
        (
            ("  - peer: b\n", "  - peer: b\n    mode: both\n"),
            "replication[0].mode (line 11): Invalid",
        ),
        (
            ("on: failure", "on: sometimes"),
            "notifications.on[0] (line 12): Invalid enum value 'sometimes'",
        ),
        (
            ("to: [ops@example.com]", "to: [ops]"),
            "notifications (line 11): not an e-mail address: 'ops'",
        ),
        (("flow: x\n", ""), "flow (line 14): Invalid enum value 'x'"),
        (
            ("name: nightly\n", "name: nightly\npassword: hunter2\n"),
            "password (line 2): secrets are never written in the configuration: use "
            "password_file, the path of a file holding the password",
        ),
        (("name: nightly\n", ""), "(top level): Object missing required field `name`"),
        (
            ("name: nightly\n", "name: nightly\nrestore_check:\n  expect: [etc/hostname]\n"),
            "restore_check (line 2): expect: 'etc/hostname' is not a path of the tree "
            "(/sda1/etc/hostname)",
        ),
    ],
)
def test_bad_policy_files(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    text = POLICY + "flow: x\n" if old == "flow: x\n" else POLICY.replace(old, new)
    assert text != POLICY
    path = _policy_file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("    password_file: /etc/tessera/engine-password\n", "    password: secret\n"),
            "engines[0].password (line 8): secrets are never written in the configuration: "
            "use password_file, the path of a file holding the password",
        ),
        (
            ("    ca_file: /ca\n", "    ca_file: /ca\n    bandwidth_limit: lots\n"),
            "peers[0].bandwidth_limit (line 15): not a size: 'lots'",
        ),
        (
            ("    ca_file: /ca\n", "    ca_file: /ca\n    streams: 0\n"),
            "peers[0].streams (line 15): Expected `int` >= 1",
        ),
        (
            ("peers:\n", "scheduler:\n  timezone: Mars/Olympus\npeers:\n"),
            "scheduler.timezone (line 10): unknown time zone 'Mars/Olympus'",
        ),
        (
            ("peers:\n", "scheduler:\n  misfire_grace: soon\npeers:\n"),
            "scheduler.misfire_grace (line 10): not a duration: 'soon'",
        ),
        (
            ("peers:\n", "smtp:\n  host: mail\n  from: a@b\n  username: u\npeers:\n"),
            "smtp (line 9): smtp username and password_file go together",
        ),
        (
            (
                "peers:\n",
                "api:\n  tcp:\n    listen: '8443'\n    cert_file: /c\n"
                "    key_file: /k\n    tokens_file: /t\npeers:\n",
            ),
            "api.tcp (line 10): tcp.listen must be HOST:PORT, got '8443'",
        ),
        (
            ("peers:\n", "syslog:\n  host: log\n  protocol: smoke\npeers:\n"),
            "syslog.protocol (line 11): Invalid enum value 'smoke'",
        ),
        (
            ("peers:\n", "logging:\n  level: loud\npeers:\n"),
            "logging.level (line 10): Invalid enum value 'loud'",
        ),
        (
            ("peers:\n", "limits:\n  concurrent_vms: 0\npeers:\n"),
            "limits.concurrent_vms (line 10): Expected `int` >= 1",
        ),
        (
            ("peers:\n", "webhooks:\n  - name: chat\n    format: slack\npeers:\n"),
            "webhooks[0] (line 10): webhook 'chat': give url or url_file, one of them",
        ),
        (
            ("peers:\n", "webhooks:\n  - name: chat\n    url: hooks.example/x\npeers:\n"),
            "webhook 'chat': url must start with https:// or http://",
        ),
        (
            ("peers:\n", "webhooks:\n  - {name: c, url: 'https://h/x', format: xml}\npeers:\n"),
            "webhooks[0].format (line 10): Invalid enum value 'xml'",
        ),
        (
            ("peers:\n", "webhooks:\n  - {name: c, url: 'https://h/x', timeout: 600}\npeers:\n"),
            "webhook timeout: more than 0, at most 120 s",
        ),
        (
            ("peers:\n", "webhooks:\n  - {name: c, url: 'https://h/x', token: abc}\npeers:\n"),
            "webhooks[0].token (line 10): secrets are never written in the configuration: use "
            "token_file, the path of a file holding the token",
        ),
        (
            ("peers:\n", "maintenance:\n  webhooks: [gone]\npeers:\n"),
            "maintenance.webhooks: no webhook named 'gone' in the configuration (none)",
        ),
    ],
)
def test_bad_config_files(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    text = CONFIG.replace(old, new)
    assert text != CONFIG
    main = write(tmp_path, text, policy=None)
    with pytest.raises(ConfigError) as e:
        load(main)
    assert str(e.value).startswith(f"{main}: ")
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("  - peer: b\n", "  - peer: c\n"),
            "replication[0].peer (line 10): no peer named 'c' in the configuration (b)",
        ),
        (("selection:\n", "store: other\nselection:\n"), "store (line 2): no store named 'other'"),
        (
            ("  vms: [web01]\n", "  vms: [web01]\n  engine: x\n"),
            "selection.engine (line 4): no engine named 'x' in the configuration (lab)",
        ),
        (
            ("notifications:\n", "standby:\n  peer: z\n  cluster: DR\nnotifications:\n"),
            "standby.peer (line 12): no peer named 'z' in the configuration (b)",
        ),
        (
            ("  to: [ops@example.com]\n", "  to: [ops@example.com]\n  webhooks: [chat]\n"),
            "notifications.webhooks[0] (line 14): no webhook named 'chat' in the configuration "
            "(none)",
        ),
    ],
)
def test_policies_must_name_known_objects(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    main = write(tmp_path, policy=POLICY.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_all(main)
    assert str(e.value).startswith(f"{tmp_path / 'policies.d' / 'nightly.yaml'}: ")
    assert message in str(e.value)


def test_two_stores_need_a_named_one(tmp_path: Path) -> None:
    config = CONFIG.replace("engines:\n", "  - name: second\n    path: /x\nengines:\n")
    with pytest.raises(
        ConfigError, match=r"nightly.yaml: \(top level\): the configuration has 2 stores"
    ):
        load_all(write(tmp_path, config))


def test_duplicate_policy_names_name_both_files(tmp_path: Path) -> None:
    main = write(tmp_path)
    (tmp_path / "policies.d" / "other.yaml").write_text(POLICY)
    with pytest.raises(ConfigError) as e:
        load_all(main)
    assert str(e.value) == (
        f"{tmp_path / 'policies.d' / 'other.yaml'}: name (line 1): policy 'nightly' is also "
        f"defined in {tmp_path / 'policies.d' / 'nightly.yaml'}"
    )


def test_policies_dir_from_config_and_override(tmp_path: Path) -> None:
    main = write(tmp_path, CONFIG + "policies_dir: custom\n", policy=None)
    with pytest.raises(ConfigError, match="custom: no such policy directory"):
        load_all(main)
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "a.yaml").write_text(POLICY)
    assert [p.name for p in load_all(main).policies] == ["nightly"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_all(main, policies_dir=empty).policies == ()
    # The default directory may be missing: no policies.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert load_all(write(fresh, policy=None)).policies == ()


def test_drop_in_conflicts(tmp_path: Path) -> None:
    main = write(tmp_path, policy=None)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10.yaml").write_text("stores:\n  - name: main\n    path: /y\n")
    with pytest.raises(ConfigError, match="two stores named 'main'"):
        load_all(main)
    (tmp_path / "conf.d" / "10.yaml").write_text("smtp:\n  host: m\n  password: x\n")
    with pytest.raises(ConfigError, match=r"10.yaml: smtp.password \(line 3\): secrets are never"):
        load_all(main)
