"""Store keys and the key file.

A store has three 32-byte secrets:

- ``id_key``   keys BLAKE3 for chunk ids, so ids reveal nothing about plaintext;
- ``data_key`` AES-256-GCM key for record payloads (absent when encryption is ``none``);
- ``mac_key``  keys BLAKE3 for manifest authentication, so tampering is detected.

They live in a JSON key file, by default ``STORE/keys/key`` (or anywhere with ``--key-file``).
For an encrypted store the keys are wrapped with AES-256-GCM under a key derived from a
passphrase with scrypt; the store id is in the associated data so a key file cannot be swapped
between stores unnoticed. For ``encryption: none`` the keys are kept unwrapped: such a store
still dedups with keyed ids and detects accidental damage, but offers no secrecy.

Sites that replicate share these keys, so ids compare and records ship as stored.
"""

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from engine.core.errors import KeyFileError
from engine.util.fs import atomic_write

KEY_SIZE: Final = 32
KEYFILE_FORMAT: Final = 1


@dataclass(frozen=True)
class KdfParams:
    """scrypt cost; a key file records its own, so changing the default changes new keys
    only. The default, N=2^16, r=8, p=2: 64 MiB of memory for ~0.3 s here — the same work as
    N=2^17, p=1 (what keys had before), with half the memory: the derivation was the whole
    of a backup's peak memory beyond ~80 MiB (128 MiB of 180 MiB), and 64 MiB stays above
    restic's cap for its scrypt keys (``crypto.Calibrate(500 ms, 60 MiB)``). Tests pass a
    cheaper one."""

    n: int = 2**16
    r: int = 8
    p: int = 2

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        return Scrypt(salt=salt, length=KEY_SIZE, n=self.n, r=self.r, p=self.p).derive(passphrase)


@dataclass(frozen=True, repr=False)
class StoreKeys:
    id_key: bytes
    mac_key: bytes
    data_key: bytes | None

    def __repr__(self) -> str:  # never print secrets
        return f"StoreKeys(encrypted={self.data_key is not None})"

    @classmethod
    def generate(cls, encrypted: bool) -> "StoreKeys":
        return cls(
            id_key=secrets.token_bytes(KEY_SIZE),
            mac_key=secrets.token_bytes(KEY_SIZE),
            data_key=secrets.token_bytes(KEY_SIZE) if encrypted else None,
        )

    def mac(self, data: bytes) -> bytes:
        """Keyed BLAKE3 MAC (distinct key from chunk ids)."""
        return blake3.blake3(data, key=self.mac_key).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, path: Path, field: str) -> bytes:
    if not isinstance(text, str):
        raise KeyFileError(path=path, reason=f"field {field!r} is missing or not a string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise KeyFileError(path=path, reason=f"field {field!r} is not base64") from e


def _aad(store_id: str) -> bytes:
    return b"tessera-keyfile-v1|" + store_id.encode()


def write_key_file(
    path: Path,
    keys: StoreKeys,
    store_id: str,
    passphrase: bytes | None,
    kdf: KdfParams | None = None,
) -> None:
    """Write the key file; wrapped with ``passphrase`` when the store is encrypted."""
    inner = json.dumps(
        {
            "id_key": _b64(keys.id_key),
            "mac_key": _b64(keys.mac_key),
            "data_key": _b64(keys.data_key) if keys.data_key else None,
        }
    ).encode()
    doc: dict[str, object] = {"format": KEYFILE_FORMAT, "store_id": store_id}
    if keys.data_key is None:
        doc["kdf"] = {"name": "none"}
        doc["keys"] = _b64(inner)
    else:
        if not passphrase:
            raise KeyFileError(path=path, reason="an encrypted store needs a non-empty passphrase")
        kdf = kdf or KdfParams()
        salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
        kek = kdf.derive(passphrase, salt)
        doc["kdf"] = {"name": "scrypt", "n": kdf.n, "r": kdf.r, "p": kdf.p, "salt": _b64(salt)}
        doc["nonce"] = _b64(nonce)
        doc["wrapped"] = _b64(AESGCM(kek).encrypt(nonce, inner, _aad(store_id)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2).encode() + b"\n", "keys.write")
    os.chmod(path, 0o600)


def read_key_file(path: Path, store_id: str, passphrase: bytes | None) -> StoreKeys:
    """Read and unlock the key file of store ``store_id``.

    Raises KeyFileError naming the file for: unreadable, not a key file, another store's key,
    a missing or wrong passphrase (indistinguishable from a damaged wrapped key, by design).
    """
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise KeyFileError(path=path, reason="does not exist") from e
    except (OSError, ValueError) as e:
        raise KeyFileError(path=path, reason=f"unreadable or not JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != KEYFILE_FORMAT:
        raise KeyFileError(path=path, reason="not a Tessera key file (format 1)")
    if doc.get("store_id") != store_id:
        raise KeyFileError(
            path=path, reason=f"belongs to store {doc.get('store_id')!r}, not {store_id!r}"
        )
    kdf = doc.get("kdf")
    if not isinstance(kdf, dict):
        raise KeyFileError(path=path, reason="field 'kdf' is missing")
    if kdf.get("name") == "none":
        inner = _unb64(doc.get("keys"), path, "keys")
    elif kdf.get("name") == "scrypt":
        if not passphrase:
            raise KeyFileError(path=path, reason="the store is encrypted and needs a passphrase")
        try:
            params = KdfParams(n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KeyFileError(path=path, reason="bad scrypt parameters") from e
        kek = params.derive(passphrase, _unb64(kdf.get("salt"), path, "kdf.salt"))
        try:
            inner = AESGCM(kek).decrypt(
                _unb64(doc.get("nonce"), path, "nonce"),
                _unb64(doc.get("wrapped"), path, "wrapped"),
                _aad(store_id),
            )
        except InvalidTag as e:
            raise KeyFileError(
                path=path, reason="wrong passphrase (or the wrapped key is damaged)"
            ) from e
    else:
        raise KeyFileError(path=path, reason=f"unknown kdf {kdf.get('name')!r}")
    try:
        fields = json.loads(inner)
        data_key = fields["data_key"]
        keys = StoreKeys(
            id_key=_unb64(fields["id_key"], path, "id_key"),
            mac_key=_unb64(fields["mac_key"], path, "mac_key"),
            data_key=_unb64(data_key, path, "data_key") if data_key is not None else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise KeyFileError(path=path, reason="the key material is malformed") from e
    if any(len(k) != KEY_SIZE for k in (keys.id_key, keys.mac_key, keys.data_key or bytes(32))):
        raise KeyFileError(path=path, reason="a key has the wrong length")
    return keys
