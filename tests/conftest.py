"""Shared fixtures. Stores in tests use a cheap scrypt cost; everything else is real."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.store.chunk_store import Store
from engine.store.keys import KdfParams

CHEAP_KDF = KdfParams(n=2**10, r=8, p=1)  # the real default costs ~0.3 s per open
PASSPHRASE = b"correct horse battery staple"

StoreFactory = Callable[..., Store]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[StoreFactory]:
    """Create and open stores; all are closed at teardown."""
    opened: list[Store] = []

    def factory(
        name: str = "store",
        encryption: str = "aes-256-gcm",
        chunk_size: int = 64 * 1024,
        pack_size: int = 1024 * 1024,
    ) -> Store:
        path = tmp_path / name
        Store.init(
            path,
            chunk_size=chunk_size,
            encryption=encryption,
            pack_size=pack_size,
            passphrase=PASSPHRASE,
            kdf=CHEAP_KDF,
        )
        store = Store.open(path, passphrase=PASSPHRASE)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
