"""A real Ceph RGW (S3) for the tests: one per xdist worker, started on first use.

``rgw`` (session fixture) runs ``start-local-s3.sh`` (copied beside this file from the shared
test tooling) in a fresh directory under the temporary directory, and ``stop-local-s3.sh``
at the end of the session, whatever happened; ``s3_bucket`` gives a test an empty bucket of
its own and empties and removes it afterwards.

Why one per worker and not one shared behind a file lock: the fixture starts lazily, and
``make test`` schedules by file (``--dist loadfile``), so today the S3 test files run on the
worker(s) that pick them and usually one cluster starts (~7 s; ~1 GB RSS at most, mostly
ceph-mgr). A shared cluster would need a reference count across processes to know which
worker stops it last, and a worker killed by the watchdog would leave the count wrong and
the daemons running; per worker, each session stops what it started.

An RGW that cannot start is an ERROR of the tests that need it, with the script's output and
the daemons' log tails: ``make check`` tests S3 for real or fails, never skips. The Ceph
packages come from ``make sysdeps``; the fixture never installs them (``S3_NO_INSTALL=1``).

Known limit: a worker killed outright (SIGKILL) runs no finalizer, so its cluster keeps
running in ``$TMPDIR/tessera-rgw-*`` until ``stop-local-s3.sh DIR`` is run on it.
"""

import os
import secrets
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.config import Config

from engine.io.s3 import S3Endpoint

HERE = Path(__file__).parent
START = HERE / "start-local-s3.sh"
STOP = HERE / "stop-local-s3.sh"
# Unix admin sockets live under the state directory: its path must be ≤ 70 characters.
MAX_DIR_LEN = 70
START_TIMEOUT = 240  # seconds for the whole script (each daemon: S3_START_TIMEOUT)
STOP_TIMEOUT = 60  # the script SIGKILLs after 20 s


class RgwFailed(Exception):
    """The local RGW did not start (or stop); the message carries its output and logs."""


@dataclass(frozen=True)
class Rgw:
    dir: Path
    url: str
    access_key: str
    secret_key: str
    region: str

    def endpoint(self, bucket: str) -> S3Endpoint:
        return S3Endpoint(self.url, bucket, self.access_key, self.secret_key, self.region)

    def botocore(self) -> Any:
        """A plain botocore client, for what a test sets up beside the code under test."""
        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def _state_dir() -> Path:
    base = tempfile.gettempdir()
    if len(base) > MAX_DIR_LEN - 25:
        base = "/tmp"
    path = Path(tempfile.mkdtemp(prefix="tessera-rgw-", dir=base))
    assert len(str(path)) <= MAX_DIR_LEN, path
    return path


def _log_tail(directory: Path, lines: int = 25) -> str:
    out = []
    for log in sorted((directory / "log").glob("*")):
        try:
            text = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if text:
            out.append(f"--- {log.name} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(out) or "(no logs)"


def _stop(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(STOP), str(directory)],
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT,
        check=False,
    )


def start_rgw(**env_overrides: str) -> Rgw:
    """Start a cluster; raises RgwFailed with the script's stderr and the log tails.
    ``env_overrides``: the script's knobs (``S3_OBJECTSTORE``…)."""
    directory = _state_dir()
    env = {**os.environ, "S3_NO_INSTALL": "1", "S3_START_TIMEOUT": "90", **env_overrides}
    try:
        proc = subprocess.run(
            ["bash", str(START), str(directory)],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        logs = _log_tail(directory)
        _stop(directory)
        raise RgwFailed(f"start-local-s3.sh took over {START_TIMEOUT}s\n{e.stderr}\n{logs}") from e
    if proc.returncode != 0:
        logs = _log_tail(directory)
        _stop(directory)
        raise RgwFailed(
            f"start-local-s3.sh {directory} failed (exit {proc.returncode}); run `make sysdeps` "
            f"if the Ceph packages are missing\n{proc.stderr[-4000:]}\n{logs}"
        )
    exports: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            exports[name] = value
    return Rgw(
        dir=directory,
        url=exports["S3_ENDPOINT_URL"],
        access_key=exports["AWS_ACCESS_KEY_ID"],
        secret_key=exports["AWS_SECRET_ACCESS_KEY"],
        region=exports.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def stop_rgw(rgw: Rgw) -> None:
    proc = _stop(rgw.dir)
    if proc.returncode != 0:
        raise RgwFailed(f"stop-local-s3.sh {rgw.dir} failed: {proc.stderr[-2000:]}")
    if "SIGKILL" in proc.stderr:  # a daemon ignored SIGTERM for 20 s: say so (pytest -s)
        print(proc.stderr, file=sys.stderr)


@pytest.fixture(scope="session")
def rgw() -> Iterator[Rgw]:
    cluster = start_rgw()
    try:
        yield cluster
    finally:
        stop_rgw(cluster)


def empty_and_remove_bucket(client: Any, bucket: str) -> None:
    """Delete every object version and the bucket. Tests lock objects in GOVERNANCE mode
    only, which this bypasses (COMPLIANCE could not be undone)."""
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
        for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
            client.delete_object(
                Bucket=bucket,
                Key=v["Key"],
                VersionId=v["VersionId"],
                BypassGovernanceRetention=True,
            )
    client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def rgw_admin(rgw: Rgw) -> Iterator[Any]:
    """One plain botocore client for the session's setup and cleanup (making a client loads
    botocore's service model: ~0.4 s each)."""
    client = rgw.botocore()
    try:
        yield client
    finally:
        client.close()


BucketFactory = Callable[..., S3Endpoint]


@pytest.fixture
def s3_buckets(rgw: Rgw, rgw_admin: Any) -> Iterator[BucketFactory]:
    """Make empty buckets (``object_lock=True``: with object lock, so versioned); each is
    removed with its contents afterwards."""
    made: list[str] = []

    def make(object_lock: bool = False) -> S3Endpoint:
        bucket = "t-" + secrets.token_hex(8)
        rgw_admin.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=object_lock)
        made.append(bucket)
        return rgw.endpoint(bucket)

    try:
        yield make
    finally:
        for bucket in made:
            empty_and_remove_bucket(rgw_admin, bucket)


@pytest.fixture
def s3_bucket(s3_buckets: BucketFactory) -> S3Endpoint:
    """An empty bucket of this test's own, removed with its contents afterwards."""
    return s3_buckets()
