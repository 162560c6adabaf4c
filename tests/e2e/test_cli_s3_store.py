"""``tessera store init --s3``: a store whose packs live in a bucket of a real Ceph RGW, used
through the command line as a user would (backup, restore, verify, info), and ``tessera store
attach`` of that bucket alone on a new DataMover after the first one is lost."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.io.s3 import S3Endpoint
from tests.cli import Cli
from tests.integration.images import make_fs_qcow2
from tests.s3.rgw import BucketFactory

pytestmark = pytest.mark.e2e

CLI = Cli(passphrase="pw", no_traceback=True)
tessera = CLI.run


def key_env(bucket: S3Endpoint) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": bucket.access_key, "AWS_SECRET_ACCESS_KEY": bucket.secret_key}


def test_backup_restore_verify_through_a_bucket(tmp_path: Path, s3_bucket: S3Endpoint) -> None:
    image = make_fs_qcow2(tmp_path, "disk", size_mib=64)
    store = tmp_path / "store"
    init = [
        "store", "init", store, "--pack-size", "1M", "--cache-size", "2M",
        "--s3", f"s3://{s3_bucket.bucket}/site-a", "--s3-endpoint", s3_bucket.url,
    ]  # fmt: skip
    proc = tessera(*init, env=key_env(s3_bucket))
    assert proc.returncode == 0, proc.stderr
    assert f"packs in s3://{s3_bucket.bucket}/site-a/" in proc.stdout
    assert s3_bucket.secret_key not in proc.stdout + proc.stderr
    assert s3_bucket.secret_key not in (store / "config.json").read_text()
    assert (store / "keys" / "s3.json").stat().st_mode & 0o777 == 0o600

    proc = tessera("backup", "image", image, "--store", store, "--level", "full")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = tessera("store", "info", store)
    assert f"s3://{s3_bucket.bucket}/site-a/" in info.stdout, info.stdout
    doc = json.loads(tessera("store", "info", store, "--json").stdout)
    cached = sum(p.stat().st_size for p in (store / "packs").glob("??/*.pack"))
    assert 0 < cached <= 2 * 1024 * 1024 < doc["pack_bytes"], "the cache holds a part"

    snap = json.loads(tessera("snapshots", "--store", store, "--json").stdout)[0]["id"]
    out = tmp_path / "restored.raw"
    proc = tessera("restore", snap, "--store", store, "--to", out, "--format", "raw")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subprocess.run(["qemu-img", "compare", "-q", image, out], check=True)

    proc = tessera("store", "verify", store, "--data")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = tessera("store", "status", store)
    assert status.returncode == 0, status.stderr
    assert f"s3://{s3_bucket.bucket}/site-a/" in status.stdout and "budget none" in status.stdout

    # The DataMover is lost: a new one attaches the bucket alone and restores the same bytes.
    shutil.rmtree(store)
    again = tmp_path / "attached"
    url = f"s3://{s3_bucket.bucket}/site-a"
    attach = ["store", "attach", again, "--s3", url, "--s3-endpoint", s3_bucket.url]
    proc = tessera(*attach, env=key_env(s3_bucket))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 snapshots" in proc.stdout, proc.stdout
    out.unlink()
    proc = tessera("restore", snap, "--store", again, "--to", out, "--format", "raw")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subprocess.run(["qemu-img", "compare", "-q", image, out], check=True)


def test_init_without_the_key_or_the_endpoint_is_refused(
    tmp_path: Path, s3_bucket: S3Endpoint
) -> None:
    url = f"s3://{s3_bucket.bucket}/x"
    proc = tessera("store", "init", tmp_path / "a", "--s3", url, "--s3-endpoint", s3_bucket.url)
    assert proc.returncode != 0
    assert "AWS_ACCESS_KEY_ID" in proc.stderr
    proc = tessera("store", "init", tmp_path / "b", "--s3", url, env=key_env(s3_bucket))
    assert proc.returncode != 0 and "--s3-endpoint" in proc.stderr
    proc = tessera(
        "store", "init", tmp_path / "c", "--s3", "s3://No_Such", "--s3-endpoint", s3_bucket.url,
        env=key_env(s3_bucket),
    )  # fmt: skip
    assert proc.returncode != 0 and "not an S3 bucket name" in proc.stderr
    missing = f"s3://nosuch-{s3_bucket.bucket}/x"
    proc = tessera(
        "store", "init", tmp_path / "d", "--s3", missing, "--s3-endpoint", s3_bucket.url,
        env=key_env(s3_bucket),
    )  # fmt: skip
    assert proc.returncode != 0 and "does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "d").exists()


def test_an_immutable_store_from_the_command_line(
    tmp_path: Path, s3_buckets: BucketFactory
) -> None:
    """``--object-lock`` with ``--lock-for``: the store says what it promises, backs up and
    restores, and ``prune`` keeps the locked snapshot saying until when."""
    bucket = s3_buckets(object_lock=True)
    store = tmp_path / "store"
    base = [
        "store", "init", store, "--pack-size", "1M",
        "--s3", f"s3://{bucket.bucket}/site-a", "--s3-endpoint", bucket.url,
    ]  # fmt: skip
    proc = tessera(*base, "--object-lock", "governance", env=key_env(bucket))
    assert proc.returncode != 0 and "--lock-for" in proc.stderr, proc.stderr
    proc = tessera(*base, "--object-lock", "governance", "--lock-for", "soon", env=key_env(bucket))
    assert proc.returncode != 0 and "not a duration" in proc.stderr, proc.stderr
    assert not store.exists()
    proc = tessera(*base, "--object-lock", "governance", "--lock-for", "2d", env=key_env(bucket))
    assert proc.returncode == 0, proc.stderr
    assert "object lock GOVERNANCE: every snapshot kept at least 2d" in proc.stdout
    assert "object lock GOVERNANCE 2d" in tessera("store", "info", store).stdout
    image = make_fs_qcow2(tmp_path, "disk", size_mib=64)
    for _ in range(2):
        proc = tessera("backup", "image", image, "--store", store, "--level", "full")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = tessera("prune", "--store", store, "--keep-last", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "locked" in proc.stdout and "object lock: kept in the bucket until" in proc.stdout
    assert "1 kept by object lock" in proc.stdout, proc.stdout
    assert len(json.loads(tessera("snapshots", "--store", store, "--json").stdout)) == 2
