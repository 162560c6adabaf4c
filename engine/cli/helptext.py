"""What ``tessera --help`` and every ``tessera COMMAND --help`` end with: examples, and for
``tessera --help`` the rules a script relies on (exit codes, units, times).

``document(parser)`` runs once the parser is built (``engine.cli.main.build_parser``): it
gives the options every command shares (``--json``, ``--store``, ``--config``, a store's
``path``) one help text, and every command its examples. The examples are real command lines:
``tests/unit/cli/test_cli_help.py`` parses each with the parser it documents, and requires
help text on every option and examples on every command.
"""

import argparse
from pathlib import Path
from typing import Final

from engine.cli.exits import CODES

# One text for the options that mean the same on every command.
COMMON: Final = {
    "json": "machine output: one JSON document on stdout (sizes in bytes, times in UTC ISO 8601)",
    "store": "the store's directory",
    "path": "the store's directory",
    "paths": "qcow2 or raw images, each one a VM unless --vm says otherwise",
    "names": "VM names or shell globs ('web-*'), as the engine knows them",
}

S = "/srv/tessera/store"  # the store in the examples
EXAMPLES: Final[dict[str, tuple[str, ...]]] = {
    "": (
        f"tessera store init {S}",
        f"tessera backup image /var/lib/libvirt/images/web1.qcow2 --store {S}",
        f"tessera snapshots --store {S} --vm web1.qcow2",
        "tessera run --config /etc/tessera/config.yaml",
    ),
    "store": (f"tessera store init {S}", f"tessera store info {S}"),
    "store init": (
        f"tessera store init {S}",
        f"tessera store init {S} --chunk-size 4M --zstd-level 1",
        f"tessera store init {S} --key-file /root/tessera.key --passphrase-file /root/pass",
        f"tessera store init {S} --s3 s3://backups/site-a --s3-endpoint https://rgw.example.net "
        "--cache-size 20G",
        f"tessera store init {S} --s3 s3://locked/site-a --s3-endpoint https://rgw.example.net "
        "--object-lock compliance --lock-for 30d",
    ),
    "store attach": (
        f"tessera store attach {S} --s3 s3://backups/site-a --s3-endpoint https://rgw.example.net",
    ),
    "store break-lock": (f"tessera store break-lock {S}",),
    "store info": (f"tessera store info {S}", f"tessera store info {S} --json"),
    "store rebuild-index": (f"tessera store rebuild-index {S}",),
    "store verify": (
        f"tessera store verify {S}",
        f"tessera store verify {S} --data --percent 10",
    ),
    "store repair": (f"tessera store repair {S}",),
    "store status": (f"tessera store status {S} --snapshots",),
    "backup": (f"tessera backup image /images/vm1.qcow2 --store {S}", "tessera backup vm web1"),
    "backup image": (
        f"tessera backup image /images/vm1.qcow2 --store {S}",
        f"tessera backup image /images/db-os.qcow2 /images/db-data.raw --vm db --store {S} "
        "--level full",
    ),
    "backup vm": (
        "tessera backup vm web1",
        "tessera backup vm 'web-*' --level full --config /etc/tessera/config.yaml",
        "tessera backup vm db1 --flow snapshot-attach --require-quiesce",
        "tessera backup vm 'web-*' --dry-run",
        "tessera backup vm db1 --disk 'db1_os' --disk 'db1_data*'",
    ),
    "snapshots": (
        f"tessera snapshots --store {S}",
        "tessera snapshots --config /etc/tessera/config.yaml --vm web1 --json",
    ),
    "snapshots protect": (f"tessera snapshots protect 3f2a9c1e --store {S}",),
    "snapshots unprotect": (f"tessera snapshots unprotect 3f2a9c1e --store {S}",),
    "snapshots check": (
        f"tessera snapshots check 3f2a9c1e --store {S}",
        f"tessera snapshots check 3f2a9c1e --store {S} --expect /sda1/etc/hostname "
        "--expect /vg0-lv0/var/lib/pgsql",
        f"tessera snapshots check 3f2a9c1e --store {S} --disk web1-data --json",
    ),
    "snapshots removed": (f"tessera snapshots removed --store {S}",),
    "snapshots unremove": (f"tessera snapshots unremove 3f2a9c1e --store {S}",),
    "restore": (
        f"tessera restore 3f2a9c1e --store {S} --to /restore/web1.qcow2",
        f"tessera restore 3f2a9c1e --store {S} --to /restore/ --format raw",
        "tessera restore 3f2a9c1e --config /etc/tessera/config.yaml --name web1-test",
    ),
    "export": (
        f"tessera export 3f2a9c1e --store {S} --socket /run/tessera/web1.sock",
        f"tessera export 3f2a9c1e --store {S} --disk web1-data --listen 127.0.0.1:10809",
        f"tessera export 3f2a9c1e --store {S} --listen 0.0.0.0:10809 --tls-dir /etc/pki/nbd",
        f"tessera export 3f2a9c1e --store {S} --listen [::]:10809 --tls-cert s.pem --tls-key s.key "
        "--tls-ca ca.pem",
        f"tessera export 3f2a9c1e --store {S} --socket /tmp/w.sock --writable-overlay /tmp/w.cow",
        "tessera export 3f2a9c1e --config /etc/tessera/config.yaml --disk web1-data --ttl 8h",
    ),
    "files": (
        f"tessera files ls 3f2a9c1e --store {S} /",
        f"tessera files get 3f2a9c1e --store {S} /sda1/etc/fstab --to /tmp/out",
    ),
    "files ls": (
        f"tessera files ls 3f2a9c1e --store {S} /",
        f"tessera files ls 3f2a9c1e --store {S} /vg0-root/var/log /sda1/etc/fstab",
    ),
    "files find": (
        f"tessera files find 3f2a9c1e --store {S} /sda2 --name '*.conf'",
        f"tessera files find 3f2a9c1e --store {S} --disk web1-data /sdb1/srv",
    ),
    "files get": (
        f"tessera files get 3f2a9c1e --store {S} /sda1/etc/fstab /sda1/etc/hosts --to /tmp/out",
        f"tessera files get 3f2a9c1e --store {S} /sdb1/srv/www --to /restore/www",
        "tessera files get 3f2a9c1e --config /etc/tessera/config.yaml /sda1/etc --to /tmp/out",
    ),
    "mount": (
        f"tessera mount 3f2a9c1e /mnt/web1 --store {S}",
        f"tessera mount 3f2a9c1e /mnt/web1 --store {S} --disk web1-data",
    ),
    "lab": ("tessera lab up --dir /tmp/lab", "tessera lab down --dir /tmp/lab"),
    "lab up": ("tessera lab up --dir /tmp/lab", "tessera lab up --dir /tmp/lab --slow-reads 50"),
    "lab show": ("tessera lab show --dir /tmp/lab --json",),
    "lab down": ("tessera lab down --dir /tmp/lab",),
    "prune": (
        f"tessera prune --store {S} --keep-daily 7 --keep-weekly 4 --dry-run",
        f"tessera prune --store {S} --vm web1 --keep-last 3 --json",
    ),
    "gc": (
        f"tessera gc --store {S} --dry-run",
        f"tessera gc --store {S} --grace 12h --rate-limit 50MiB",
        "tessera gc --config /etc/tessera/config.yaml",
    ),
    "check-config": (
        "tessera check-config",
        "tessera check-config --config ./config.yaml",
        "tessera check-config --deep --config /etc/tessera/config.yaml",
    ),
    "notify": ("tessera notify test", "tessera notify test --webhook ops-chat --no-mail"),
    "notify test": (
        "tessera notify test --config /etc/tessera/config.yaml",
        "tessera notify test --to ops@example.org",
        "tessera notify test --webhook ops-chat --no-mail",
    ),
    "show-config": ("tessera show-config --json",),
    "run": ("tessera run --config /etc/tessera/config.yaml",),
    "vms": ("tessera vms", "tessera vms --engine prod --json"),
    "policies": (
        "tessera policies",
        "tessera policies --run nightly",
        "tessera policies --show-selection nightly --config /etc/tessera/config.yaml",
    ),
    "jobs": ("tessera jobs --running", "tessera jobs --since 2026-12-01 --failed --json"),
    "job": ("tessera job 20261207-021000-ab12 --follow",),
    "replication": ("tessera replication --json",),
    "cancel": ("tessera cancel 20261207-021000-ab12",),
    "peer": ("tessera peer init-ca --dir /etc/tessera/ca",),
    "peer init-ca": ("tessera peer init-ca --dir /etc/tessera/ca",),
    "peer issue": (
        "tessera peer issue --ca-dir /etc/tessera/ca --name site-b --out /etc/tessera/site-b "
        "--dns backup.site-b.example.org",
    ),
    "peer init-store": (f"tessera peer init-store /srv/replica --from-store {S}",),
    "peer serve": (
        "tessera peer serve --store /srv/replica --cert site-b.crt --key site-b.key --ca ca.crt",
    ),
    "replicate": (
        f"tessera replicate --vm web1 --store {S} --peer site-b --config /etc/tessera/config.yaml",
        f"tessera replicate 3f2a9c1e --store {S} --peer-url https://site-b:8950 --cert a.crt "
        "--key a.key --ca ca.crt --bwlimit 50MiB",
    ),
    "standby": ("tessera standby refresh web1 --config /etc/tessera/config.yaml --cluster dr",),
    "standby refresh": (
        "tessera standby refresh web1 --config /etc/tessera/config.yaml --cluster dr",
    ),
}

RULES: Final = """\
sizes and times:
  sizes are binary (KiB, MiB, GiB; 1M = 1 MiB, also where you type them) and rates
  MiB/s; times are shown in the local zone (TZ) with their UTC offset, e.g.
  2026-12-07 11:10:21 +0100. --json output has bytes and UTC ISO 8601 times."""


def _exit_codes() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<3}  {text}" for code, text in CODES)


def _examples(path: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[path])


def document(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give ``parser`` and its subcommands the shared help texts and their examples (the
    top one also the exit codes and the rules for sizes and times). A command without
    examples raises KeyError: every command has them."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _examples(path)
    if not path:
        parser.epilog += f"\n\n{_exit_codes()}\n\n{RULES}"
    for action in parser._actions:
        if action.help is None and action.dest in COMMON:
            action.help = COMMON[action.dest]
        if action.help is None and action.dest == "config":
            default = action.default
            action.help = "the daemon configuration" + (
                f" (default {default})" if isinstance(default, Path) else ""
            )
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                document(sub, f"{path} {name}".strip())
