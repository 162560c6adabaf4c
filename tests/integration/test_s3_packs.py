"""What only packs on S3 have (``engine.store.objects.S3Packs``, ``engine.io.s3``), against
a real Ceph RGW (``tests.s3.rgw``): probing at open, object lock detection, batched deletes,
paginated listing, and errors that name endpoint, bucket, key and S3 code. What both
implementations share is the contract suite (tests/contract/test_pack_objects.py)."""

import dataclasses
import hashlib
import socket
from typing import Any

import pytest

from engine.core.errors import ObjectStoreError, ObjectStoreUnfit, ObjectStoreUnreachable
from engine.io.s3 import S3Client, S3Endpoint
from engine.store.objects import PROBE_PREFIX, S3Packs
from engine.store.pack import new_pack_name
from tests.s3.rgw import BucketFactory, Rgw

pytestmark = pytest.mark.integration


def requests(packs: S3Packs) -> dict[str, int]:
    return {k: v.requests for k, v in packs.counters.snapshot().items()}


def versions(admin: Any, bucket: str, prefix: str = "") -> list[str]:
    r = admin.list_object_versions(Bucket=bucket, Prefix=prefix)
    return [v["Key"] for v in [*r.get("Versions", []), *r.get("DeleteMarkers", [])]]


def test_open_probes_the_bucket_and_leaves_nothing(s3_bucket: S3Endpoint, rgw_admin: Any) -> None:
    packs = S3Packs.open(s3_bucket, prefix="a/b")
    try:
        assert packs.capabilities is not None
        assert packs.capabilities.conditional_create
        assert packs.capabilities.ranged_get
        assert packs.capabilities.object_lock is None
        assert packs.capabilities.versioning is None
        # HeadBucket, GetObjectLockConfiguration, GetBucketVersioning; two create-only PUTs
        # (the second refused), one ranged GET, one DeleteObjects
        assert requests(packs) == {
            "put": 2,
            "get": 1,
            "head": 0,
            "list": 0,
            "delete": 1,
            "other": 3,
        }
    finally:
        packs.close()
    assert versions(rgw_admin, s3_bucket.bucket) == []


def test_open_refuses_a_missing_bucket_naming_endpoint_bucket_and_capability(
    rgw: Rgw,
) -> None:
    endpoint = rgw.endpoint("no-such-bucket-here")
    with pytest.raises(ObjectStoreUnfit) as e:
        S3Packs.open(endpoint)
    message = str(e.value)
    assert rgw.url in message
    assert "no-such-bucket-here" in message
    assert "bucket: it does not exist" in message


def test_open_refuses_a_versioned_bucket_where_create_only_does_not_hold(
    s3_buckets: BucketFactory, rgw_admin: Any
) -> None:
    # Ceph RGW 16 ignores If-None-Match: * once versioning is on: probing must catch it
    endpoint = s3_buckets()
    rgw_admin.put_bucket_versioning(
        Bucket=endpoint.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    with pytest.raises(ObjectStoreUnfit) as e:
        S3Packs.open(endpoint)
    message = str(e.value)
    assert endpoint.bucket in message
    assert endpoint.url in message
    assert "conditional create (If-None-Match: * on PutObject)" in message
    assert "the bucket is versioned" in message
    assert versions(rgw_admin, endpoint.bucket) == []  # every version of the probe removed


def test_a_suspended_versioning_bucket_is_fit_and_reported(
    s3_buckets: BucketFactory, rgw_admin: Any
) -> None:
    endpoint = s3_buckets()
    for status in ("Enabled", "Suspended"):
        rgw_admin.put_bucket_versioning(
            Bucket=endpoint.bucket, VersioningConfiguration={"Status": status}
        )
    packs = S3Packs.open(endpoint)
    packs.close()
    assert packs.capabilities is not None
    assert packs.capabilities.versioning == "Suspended"
    assert packs.capabilities.object_lock is None
    assert versions(rgw_admin, endpoint.bucket) == []


def test_object_lock_is_detected_and_named_in_the_refusal(
    s3_buckets: BucketFactory, rgw_admin: Any
) -> None:
    endpoint = s3_buckets(object_lock=True)
    rgw_admin.put_object_lock_configuration(
        Bucket=endpoint.bucket,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    with pytest.raises(ObjectStoreUnfit) as e:
        S3Packs.open(endpoint, prefix="s")
    assert "object lock: GOVERNANCE 1 days, which turns versioning on" in str(e.value)
    # the probe is locked by the default retention: it stays, under probe/, until its date
    kept = versions(rgw_admin, endpoint.bucket)
    assert kept
    assert all(k.startswith("s/" + PROBE_PREFIX) for k in kept)


def test_deletes_go_in_batches_of_1000(s3_bucket: S3Endpoint) -> None:
    packs = S3Packs.open(s3_bucket)
    try:
        before = requests(packs)["delete"]
        packs.delete([new_pack_name() for _ in range(2500)])  # missing: not an error
        assert requests(packs)["delete"] - before == 3
    finally:
        packs.close()


def test_listing_is_paginated(s3_bucket: S3Endpoint) -> None:
    sent: list[str] = []
    client = S3Client(s3_bucket, on_send=sent.append)
    try:
        for i in range(5):
            client.put(f"p/{i}", b"x" * i)
        sent.clear()
        listed = [(o.key, o.size) for o in client.list_objects("p/", page_size=2)]
        assert listed == [(f"p/{i}", i) for i in range(5)]
        assert sent == ["ListObjectsV2"] * 3
    finally:
        client.close()


def test_an_error_names_endpoint_bucket_key_and_code(rgw: Rgw) -> None:
    client = S3Client(rgw.endpoint("no-such-bucket-here"))
    try:
        with pytest.raises(ObjectStoreError) as e:
            client.get_range("packs/ab/x.pack", 0, 10)
    finally:
        client.close()
    message = str(e.value)
    assert rgw.url in message
    assert "no-such-bucket-here" in message
    assert "packs/ab/x.pack" in message
    assert "NoSuchBucket" in message
    assert not e.value.retryable


def test_an_endpoint_that_does_not_answer_is_unreachable_and_retryable() -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = S3Endpoint(f"http://127.0.0.1:{port}", "bucket-x", "AK", "SK")
    client = S3Client(endpoint, attempts=1)
    try:
        with pytest.raises(ObjectStoreUnreachable) as e:
            client.head("packs/k")
    finally:
        client.close()
    assert e.value.retryable
    assert f"127.0.0.1:{port}" in str(e.value)
    assert "bucket-x" in str(e.value)
    assert "connection" in str(e.value)


class _Stop(Exception):
    """Raised by a ``before-send`` hook: the request is looked at, never sent."""


def test_bodies_are_signed_over_http_and_left_to_tls_over_https(s3_bucket: S3Endpoint) -> None:
    """Over plain http the SigV4 signature covers the body's SHA-256 (its only end-to-end
    check); over https it is ``UNSIGNED-PAYLOAD`` (TLS protects it, and hashing it costs
    both ends a SHA-256 pass)."""
    body = b"x" * 1000
    seen: list[str] = []

    def look(request: Any, **_: object) -> None:
        seen.append(request.headers["X-Amz-Content-SHA256"].decode())

    client = S3Client(s3_bucket)
    client._s3.meta.events.register("before-send.s3.PutObject", look)
    try:
        assert client.put_new("signed", body, len(body)) is not None
    finally:
        client.close()
    assert seen == [hashlib.sha256(body).hexdigest()]

    def stop(request: Any, **kw: object) -> None:
        look(request)
        raise _Stop

    tls = S3Client(dataclasses.replace(s3_bucket, url="https://127.0.0.1:9"), attempts=1)
    tls._s3.meta.events.register("before-send.s3.PutObject", stop)
    try:
        with pytest.raises(_Stop):
            tls.put_new("unsigned", body, len(body))
    finally:
        tls.close()
    assert seen[1:] == ["UNSIGNED-PAYLOAD"]
