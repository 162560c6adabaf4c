"""Key files: wrapping, unwrapping and every refusal names the file."""

import json
from pathlib import Path

import pytest

from engine.core.errors import KeyFileError
from engine.store.keys import KdfParams, StoreKeys, read_key_file, write_key_file

KDF = KdfParams(n=2**10)


def test_wrapped_round_trip(tmp_path: Path) -> None:
    keys = StoreKeys.generate(encrypted=True)
    path = tmp_path / "key"
    write_key_file(path, keys, "store1", b"pw", KDF)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert keys.data_key is not None and keys.data_key.hex() not in text
    assert read_key_file(path, "store1", b"pw") == keys
    assert "pw" not in repr(keys) and keys.id_key.hex() not in repr(keys)


def test_unencrypted_needs_no_passphrase(tmp_path: Path) -> None:
    keys = StoreKeys.generate(encrypted=False)
    write_key_file(tmp_path / "key", keys, "s", None)
    assert read_key_file(tmp_path / "key", "s", None) == keys


@pytest.mark.parametrize(
    ("store_id", "passphrase", "reason"),
    [
        ("store1", b"wrong", "wrong passphrase"),
        ("store1", None, "needs a passphrase"),
        ("store2", b"pw", "belongs to store 'store1'"),
    ],
)
def test_refusals(tmp_path: Path, store_id: str, passphrase: bytes | None, reason: str) -> None:
    path = tmp_path / "key"
    write_key_file(path, StoreKeys.generate(True), "store1", b"pw", KDF)
    with pytest.raises(KeyFileError, match=reason) as e:
        read_key_file(path, store_id, passphrase)
    assert str(path) in str(e.value)


def test_damaged_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "key"
    with pytest.raises(KeyFileError, match="does not exist"):
        read_key_file(path, "s", b"pw")
    path.write_text("not json")
    with pytest.raises(KeyFileError, match="not JSON"):
        read_key_file(path, "s", b"pw")
    write_key_file(path, StoreKeys.generate(True), "s", b"pw", KDF)
    doc = json.loads(path.read_text())
    doc["wrapped"] = doc["wrapped"][:-8] + "AAAAAAA="
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        read_key_file(path, "s", b"pw")


def test_encrypted_store_needs_passphrase_to_create(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="non-empty passphrase"):
        write_key_file(tmp_path / "key", StoreKeys.generate(True), "s", b"", KDF)
