"""The conformance suite's fixtures: the SDK's examples, fetched as pip fetches any package,
and a lab for them to talk to.

- ``sdk_examples``: ``pip download --no-binary :all: --no-deps ovirt-engine-sdk-python==<the
  pinned version>`` into pytest's cache directory (once; later sessions reuse the file), then
  unpacked per session. Its ``examples/`` run unchanged; a failed download fails the tests
  with pip's own words (the suite is meaningless without them).
- ``lab``: the lab process ``tessera lab up`` runs (``plugins.lab.lab.run``), with one more
  VM, ``myvm``, that the older examples search for (``lab_process``). Stopped at the end.
- ``examples``: runs one example as a subprocess with ``HOME`` pointing at a directory whose
  ``.config/ovirt.conf`` section ``lab`` names the lab's engine URL, user, password and CA
  file (``examples/helpers/common.py`` reads it; the CA is the lab's ``ca_file``, so the
  examples follow the lab when its imageio moves to TLS). The older examples hard-code
  ``https://engine4x.example.com`` and a password instead: for them a ``sitecustomize`` on
  ``PYTHONPATH`` points ``ovirtsdk4.Connection`` for ``*.example.com`` at the lab — their
  code is not touched, only where the connection goes.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plugins.lab import lab as lab_cli

ROOT = Path(__file__).resolve().parents[2]
SDK = "ovirt-engine-sdk-python"
DOWNLOAD_TIMEOUT = 300  # seconds for pip to fetch the sdist (one small file)
LAB_START_TIMEOUT = 120  # seconds: the first start builds the disk images
EXAMPLE_TIMEOUT = 180  # seconds per example (2 GiB sparse disks on loopback: a few seconds)

SITECUSTOMIZE = '''\
"""Points the SDK examples that hard-code engine4x.example.com at the lab (conformance)."""
import os
import ovirtsdk4

_init = ovirtsdk4.Connection.__init__


def _to_lab(self, *args, **kwargs):
    if ".example.com" in kwargs.get("url", ""):
        kwargs["url"] = os.environ["TESSERA_LAB_URL"]
        kwargs["password"] = os.environ["TESSERA_LAB_PASSWORD"]
        kwargs["ca_file"] = os.environ["TESSERA_LAB_CA"]
    _init(self, *args, **kwargs)


ovirtsdk4.Connection.__init__ = _to_lab
'''


def pinned_sdk_version() -> str:
    """The exact version pyproject.toml pins the SDK to (``==``)."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(rf'"{SDK}==([0-9.]+)"', text)
    if m is None:
        raise AssertionError(f"pyproject.toml must pin {SDK}==<version>")
    return m.group(1)


@pytest.fixture(scope="session")
def sdk_examples(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = pinned_sdk_version()
    store = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = Path(store.mkdir("sdk-sdist")) if store else tmp_path_factory.mktemp("sdk-sdist")
    found = sorted(cache.glob(f"ovirt_engine_sdk_python-{version}.tar.gz"))
    if not found:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--disable-pip-version-check", "-d", str(cache), f"{SDK}=={version}"],
            capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False,
        )  # fmt: skip
        found = sorted(cache.glob(f"ovirt_engine_sdk_python-{version}.tar.gz"))
        if proc.returncode != 0 or not found:
            pytest.fail(
                f"cannot download the {SDK} {version} source distribution "
                f"(pip exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
                pytrace=False,
            )
    out = tmp_path_factory.mktemp("sdk")
    with tarfile.open(found[0]) as tar:
        tar.extractall(out, filter="data")
    (examples,) = out.glob("*/examples")
    return examples


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A running lab; its lab.json (``engine``, ``vms`` with each disk's image ``path``)."""
    directory = tmp_path_factory.mktemp("lab")
    with (directory / "lab.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.conformance.lab_process", str(directory)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    (directory / "lab.pid").write_text(f"{proc.pid}\n")
    try:
        deadline = time.monotonic() + LAB_START_TIMEOUT
        while not (directory / "lab.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the lab did not start:\n{(directory / 'lab.log').read_text()}")
            time.sleep(0.1)
        doc = json.loads((directory / "lab.json").read_text())
        doc["dir"] = str(directory)
        yield doc
    finally:
        lab_cli.down(directory)
        proc.wait(timeout=lab_cli.STOP_TIMEOUT)


@dataclass
class Examples:
    """Runs the SDK's examples against the lab; ``home`` holds ``.config/ovirt.conf``."""

    directory: Path
    home: Path
    env: dict[str, str]
    lab: dict[str, Any]

    def run(self, name: str, *args: str | Path, cwd: Path | None = None) -> str:
        """Run ``examples/<name>``; its stdout. A non-zero exit fails the test with output."""
        proc = subprocess.run(
            [sys.executable, str(self.directory / name), *map(str, args)],
            cwd=cwd or self.home, env=self.env, capture_output=True, text=True,
            timeout=EXAMPLE_TIMEOUT, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, (
            f"{name} {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout

    def vm(self, name: str) -> dict[str, Any]:
        return next(v for v in self.lab["vms"] if v["name"] == name)


@pytest.fixture(scope="session")
def examples(
    sdk_examples: Path, lab: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Examples:
    home = tmp_path_factory.mktemp("home")
    engine = lab["engine"]
    password = Path(engine["password_file"]).read_text().strip()
    base_url = engine["url"].removesuffix("/ovirt-engine/api")
    (home / ".config").mkdir()
    (home / ".config" / "ovirt.conf").write_text(
        f"[lab]\nengine_url = {base_url}\nusername = {engine['username']}\n"
        f"password = {password}\ncafile = {engine['ca_file']}\n"
    )
    shim = home / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": str(shim),
        "TESSERA_LAB_URL": engine["url"],
        "TESSERA_LAB_PASSWORD": password,
        "TESSERA_LAB_CA": engine["ca_file"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return Examples(sdk_examples, home, env, lab)
