"""Shared fixtures. Stores in tests use a cheap scrypt cost; everything else is real."""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.store.chunk_store import Store
from engine.store.keys import KdfParams
from tests.faults.harness import TOTALS_ENV, read_totals

pytest_plugins = [
    "tests.watchdog",  # names a hung test, with its stacks, before CI's limit
    "tests.s3.rgw",  # a real Ceph RGW per worker, started by the first test that needs it
]

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


# --- the fault-injection suite's totals (tests/faults) ---------------------------------------
# Each case appends its counts to a directory named by ``TESSERA_FAULT_TOTALS``, set here
# before xdist starts its workers (they inherit it); the summary adds them up per suite.


_made_totals: list[str] = []  # the directory this run made (removed at its end)


def pytest_configure(config: pytest.Config) -> None:
    if TOTALS_ENV not in os.environ and not hasattr(config, "workerinput"):
        os.environ[TOTALS_ENV] = tempfile.mkdtemp(prefix="tessera-fault-totals-")
        _made_totals.append(os.environ[TOTALS_ENV])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    directory = os.environ.get(TOTALS_ENV)
    if not directory or not Path(directory).is_dir():
        return
    totals = read_totals(Path(directory))
    if not totals:
        return
    tr = terminalreporter
    tr.section("fault injection totals")
    keys = ("cases", "injected", "detected", "committed", "lost", "undetected")
    tr.write_line(f"{'suite':<28}" + "".join(f"{k:>12}" for k in keys))
    grand = dict.fromkeys(keys, 0)
    for suite, counts in sorted(totals.items()):
        tr.write_line(f"{suite:<28}" + "".join(f"{counts[k]:>12}" for k in keys))
        for k in keys:
            grand[k] += counts[k]
    tr.write_line(f"{'all':<28}" + "".join(f"{grand[k]:>12}" for k in keys))


def pytest_unconfigure(config: pytest.Config) -> None:
    for directory in _made_totals:
        shutil.rmtree(directory, ignore_errors=True)
        os.environ.pop(TOTALS_ENV, None)
