"""Where a store passphrase comes from, in order: ``--passphrase-file``, the
``TESSERA_PASSPHRASE`` environment variable, a prompt when stdin is a terminal. Otherwise a
ConfigError says how to supply one. Passphrases are bytes and never logged.
"""

import getpass
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from engine.core.errors import ConfigError

ENV_VAR = "TESSERA_PASSPHRASE"


def resolve_passphrase(
    passphrase_file: Path | None,
    *,
    confirm: bool = False,
    environ: Mapping[str, str] = os.environ,
    interactive: bool | None = None,
) -> bytes:
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_bytes()
        except OSError as e:
            raise ConfigError(message=f"passphrase file {passphrase_file}: {e.strerror}") from e
        text = text.removesuffix(b"\n").removesuffix(b"\r")
        if not text:
            raise ConfigError(message=f"passphrase file {passphrase_file} is empty")
        return text
    if environ.get(ENV_VAR):
        return environ[ENV_VAR].encode()
    if interactive is None:
        interactive = sys.stdin.isatty()
    if not interactive:
        raise ConfigError(
            message="the store is encrypted: give --passphrase-file FILE or set "
            f"{ENV_VAR} (no terminal to prompt on)"
        )
    first = getpass.getpass("Store passphrase: ").encode()
    if not first:
        raise ConfigError(message="empty passphrase")
    if confirm and getpass.getpass("Repeat passphrase: ").encode() != first:
        raise ConfigError(message="the passphrases do not match")
    return first
