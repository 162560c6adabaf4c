"""The daemon configuration as frozen msgspec structs (unknown keys rejected).

Secrets are never values: only ``*_file`` paths (a literal ``password:`` is rejected by the
loader). Defaults are the values a fresh install runs with; each limit says why.
"""

from pathlib import Path
from typing import Literal, Protocol, TypeVar
from zoneinfo import ZoneInfo

import msgspec

from engine.config.types import ByteSize, Duration, Port, PositiveInt, Schedule
from engine.core.errors import ConfigError
from engine.store.layout import DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, ENCRYPTION_AES

DEFAULT_SOCKET = Path("/run/tessera/api.sock")
DEFAULT_STATE_FILE = Path("/var/lib/tessera/scheduler.json")
DEFAULT_MISFIRE_GRACE = Duration("1h")
# A webhook is sent after a run, one target after the other: a slow target may hold the
# next run's notifications, never longer than this per target.
MAX_WEBHOOK_TIMEOUT = 120.0


class StoreSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    path: Path
    chunk_size: int | str = DEFAULT_CHUNK_SIZE  # used by `store init`; "1MiB" accepted
    pack_size: int | str = DEFAULT_PACK_SIZE
    encryption: str = ENCRYPTION_AES
    key_file: Path | None = None
    passphrase_file: Path | None = None


class EngineSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    url: str
    username: str
    password_file: Path
    ca_file: Path | None = None
    # The plugin that serves this engine (``engine.sources.registry.hypervisor``); None:
    # the only installed one that provides a hypervisor (``ovirt``).
    plugin: str | None = None


class DataMoverSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The VM Tessera runs in, for the LAN-free flow (disks attached to it): found by
    ``vm_name`` or ``host_uuid`` (default: this machine's SMBIOS UUID). Attached disks are
    found under ``by_id_dir`` by their serial (the disk id); one that has not appeared there
    ``device_timeout`` seconds after the attachment fails the disk."""

    vm_name: str | None = None
    host_uuid: str | None = None
    by_id_dir: Path = Path("/dev/disk/by-id")
    device_timeout: float = 60.0


class LimitsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How much runs at once. Every limit is a named semaphore in the job runner."""

    concurrent_vms: PositiveInt = 4  # VMs backed up at the same time
    transfers_per_host: PositiveInt = 4  # imageio transfers served by one hypervisor
    transfers_per_storage_domain: PositiveInt = 8  # reads hitting one storage domain
    cpu_tasks: PositiveInt | None = None  # chunks encoded at once; None: max(8, 4 per core)
    api_calls: PositiveInt = 8  # concurrent engine REST calls (the engine is easily overrun)
    # Disks of one VM a restore into the engine writes at once, sharing the CPU pool (whose
    # buffers bound memory); each holds one image transfer or DataMover attachment while it
    # runs. The default is engine.pipeline.defaults.DEFAULT_DISKS_AT_ONCE (config sits beside
    # the pipelines in the layers and cannot import it; a test keeps the two equal).
    restore_disks: PositiveInt = 2


class TcpSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The optional TCP listener: always TLS, always bearer tokens."""

    listen: str  # "HOST:PORT", e.g. "0.0.0.0:8443" or "[::]:8443"
    cert_file: Path
    key_file: Path
    tokens_file: Path

    def __post_init__(self) -> None:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"tcp.listen must be HOST:PORT, got {self.listen!r}")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class ApiSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    socket: Path = DEFAULT_SOCKET  # root-only unix socket the CLI talks to
    tcp: TcpSection | None = None


class LoggingSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json: bool = True  # JSON lines on stdout (journald); False: human-readable


class SyslogSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """RFC 5424 forwarding to a central syslog server."""

    host: str
    port: Port | None = None  # default 514 (udp, tcp) or 6514 (tls)
    protocol: Literal["udp", "tcp", "tls"] = "udp"
    ca_file: Path | None = None  # tls only; None: the system's CA bundle

    def __post_init__(self) -> None:
        if self.ca_file is not None and self.protocol != "tls":
            raise ValueError("syslog ca_file needs protocol: tls")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 6514 if self.protocol == "tls" else 514


class SmtpSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str
    sender: str = msgspec.field(name="from")
    port: Port = 587
    starttls: bool = True
    username: str | None = None
    password_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("smtp username and password_file go together")


class WebhookSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A webhook target policies and maintenance name in ``notifications.webhooks``: one
    POST with a JSON body per policy run (or maintenance finding), in the shape ``format``
    says (``engine.obs.webhook``). The URL is ``url``, or read from ``url_file`` when it is
    a secret (Slack's and Teams' URLs are); ``token_file``: Gotify's application token, a
    bearer token for ``json``."""

    name: str
    url: str | None = None
    url_file: Path | None = None
    format: Literal["json", "slack", "teams", "gotify"] = "json"
    token_file: Path | None = None
    ca_file: Path | None = None  # None: the system's CA bundle
    timeout: float = 10.0  # seconds for the whole request; a target that is slower fails

    def __post_init__(self) -> None:
        if (self.url is None) == (self.url_file is None):
            raise ValueError(f"webhook {self.name!r}: give url or url_file, one of them")
        if self.url is not None and not self.url.startswith(("https://", "http://")):
            raise ValueError(f"webhook {self.name!r}: url must start with https:// or http://")
        if not 0 < self.timeout <= MAX_WEBHOOK_TIMEOUT:
            raise ValueError(f"webhook timeout: more than 0, at most {MAX_WEBHOOK_TIMEOUT:g} s")


class PeerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Another Tessera site, reached over HTTPS with mutual TLS."""

    name: str
    url: str
    cert_file: Path
    key_file: Path
    ca_file: Path
    bandwidth_limit: ByteSize | None = None  # bytes per second ("50MiB"); None: unlimited
    streams: PositiveInt = 4  # parallel record streams per session


class MaintenanceSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Store maintenance the daemon schedules (every configured store); None: never.
    Findings (a failed verify, a GC error) are e-mailed to ``notify`` and posted to the
    ``webhooks`` named."""

    gc: Schedule | None = None  # e.g. "sun 03:00"
    gc_grace: Duration = Duration("7d")  # retired packs and pruned snapshots kept this long
    repack_threshold: float = 0.5  # repack packs whose live share is below this
    verify: Schedule | None = None  # e.g. "sat 04:00"
    verify_percent: float = 10.0  # share of the packs read per run, oldest-verified first
    # restore verification of the newest snapshot of every VM (engine.daemon.checks), e.g.
    # "sun 05:00"; each with its policy's restore_check.expect
    restore_check: Schedule | None = None
    notify: tuple[str, ...] = ()  # e-mail addresses for findings
    webhooks: tuple[str, ...] = ()  # names of ``webhooks`` entries for findings


class PeerServerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """This site as a replication receiver: HTTPS with mutual TLS (client certificates
    signed by ``ca_file``; the certificate's common name is the sending site's peer name)."""

    listen: str  # "HOST:PORT", e.g. "0.0.0.0:8444"
    cert_file: Path
    key_file: Path
    ca_file: Path
    store: str | None = None  # the store replicas go into; None: the only one


class SchedulerSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    timezone: ZoneInfo | None = None  # zone of calendar expressions; None: the host's
    misfire_grace: Duration = DEFAULT_MISFIRE_GRACE  # catch up a missed run this late at most
    state_file: Path = DEFAULT_STATE_FILE  # last run times, to detect misfires over restarts


class ServeSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Restore points the daemon serves (``POST /v1/exports``, ``POST /v1/snapshots/{id}/files``):
    NBD exports on unix sockets and file browsing sessions, each an appliance VM."""

    run_dir: Path | None = None  # export sockets go in <run_dir>/exports; None: the API's dir
    state_dir: Path | None = None  # overlays, downloads; None: scheduler.state_file's dir
    # Browsing sessions at once: each is an appliance VM (~1 GiB of RAM, a CPU while busy).
    files_sessions: PositiveInt = 2
    files_idle: Duration = Duration("10m")  # a session nobody used this long ends
    files_launch_timeout: Duration = Duration("5m")  # an appliance boot under TCG takes ~30 s

    def sockets(self, api_socket: Path) -> Path:
        return (self.run_dir or api_socket.parent) / "exports"

    def state(self, scheduler_state: Path) -> Path:
        return self.state_dir or scheduler_state.parent


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    stores: tuple[StoreSection, ...] = ()
    engines: tuple[EngineSection, ...] = ()
    datamover: DataMoverSection = DataMoverSection()
    limits: LimitsSection = LimitsSection()
    api: ApiSection = ApiSection()
    logging: LoggingSection = LoggingSection()
    syslog: SyslogSection | None = None
    smtp: SmtpSection | None = None
    webhooks: tuple[WebhookSection, ...] = ()
    peers: tuple[PeerSection, ...] = ()
    scheduler: SchedulerSection = SchedulerSection()
    maintenance: MaintenanceSection = MaintenanceSection()
    serve: ServeSection = ServeSection()
    peer_server: PeerServerSection | None = None
    policies_dir: Path | None = None  # relative to the config file; default: policies.d/

    def store(self, name: str | None = None) -> StoreSection:
        return _pick(self.stores, name, "store")

    def engine(self, name: str | None = None) -> EngineSection:
        return _pick(self.engines, name, "engine")

    def peer(self, name: str) -> PeerSection:
        return _pick(self.peers, name, "peer")

    def webhook(self, name: str) -> WebhookSection:
        return _pick(self.webhooks, name, "webhook")


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def _pick(items: tuple[N, ...], name: str | None, what: str) -> N:
    if name is None:
        if len(items) == 1:
            return items[0]
        raise ConfigError(message=f"the configuration has {len(items)} {what}s: name one")
    for item in items:
        if item.name == name:
            return item
    raise ConfigError(message=f"no {what} named {name!r} in the configuration")
