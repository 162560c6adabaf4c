"""Metrics in their own registry, read back through the exposition text parser."""

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from engine.obs.metrics import Metrics, ObjectStoreCounts


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_jobs_bytes_durations_and_last_success() -> None:
    metrics = Metrics(clock=lambda: 1_800_000_000.0)
    metrics.job_started("backup")
    metrics.job_started("backup")
    metrics.job_started("restore")
    running = samples(metrics)
    assert running["tessera_jobs_running", (("kind", "backup"),)] == 2
    metrics.job_finished("backup", "succeeded", "vm01", 1000, 400, 42.0, new_chunks=3)
    metrics.job_finished("backup", "failed", "vm02", 10, 0, 5.0)
    metrics.job_finished("restore", "succeeded", None, 0, 0, 20.0)
    s = samples(metrics)
    assert s["tessera_jobs_running", (("kind", "backup"),)] == 0
    assert s["tessera_jobs_running", (("kind", "restore"),)] == 0
    assert s["tessera_jobs_finished_total", (("kind", "backup"), ("state", "succeeded"))] == 1
    assert s["tessera_jobs_finished_total", (("kind", "backup"), ("state", "failed"))] == 1
    assert s["tessera_jobs_finished_total", (("kind", "restore"), ("state", "succeeded"))] == 1
    assert s["tessera_bytes_read_total", (("kind", "backup"),)] == 1010
    assert s["tessera_bytes_stored_total", (("kind", "backup"),)] == 400
    assert s["tessera_new_chunks_total", (("kind", "backup"),)] == 3
    assert s["tessera_job_duration_seconds_count", (("kind", "backup"),)] == 2
    assert s["tessera_job_duration_seconds_sum", (("kind", "backup"),)] == 47.0
    assert s["tessera_job_duration_seconds_bucket", (("kind", "backup"), ("le", "10.0"))] == 1
    assert s["tessera_job_duration_seconds_bucket", (("kind", "backup"), ("le", "60.0"))] == 2
    last = {k: v for k, v in s.items() if k[0] == "tessera_last_success_timestamp_seconds"}
    assert last == {("tessera_last_success_timestamp_seconds", (("vm", "vm01"),)): 1.8e9}


def test_store_gauges_and_watched_counters() -> None:
    metrics = Metrics()
    dropped = [0]
    metrics.watch_counter("tessera_syslog_dropped", "Syslog messages dropped", lambda: dropped[0])
    metrics.set_store_usage("main", used_bytes=5 << 30, dedup_ratio=3.5, compression_ratio=1.8)
    dropped[0] = 7
    s = samples(metrics)
    assert s["tessera_store_used_bytes", (("store", "main"),)] == 5 << 30
    assert s["tessera_store_dedup_ratio", (("store", "main"),)] == 3.5
    assert s["tessera_store_compression_ratio", (("store", "main"),)] == 1.8
    assert s["tessera_syslog_dropped_total", ()] == 7


def test_registries_are_private() -> None:
    first, second = Metrics(), Metrics()  # no "Duplicated timeseries" from a shared registry
    first.job_started("backup")
    assert samples(second).get(("tessera_jobs_running", (("kind", "backup"),))) is None
    global_names = {m.name for m in REGISTRY.collect()}
    assert not any(name.startswith("tessera_") for name in global_names)


def test_object_store_counters_are_read_at_each_scrape() -> None:
    metrics = Metrics()
    counts = {"put": 3, "get": 0}
    metrics.watch_object_store(
        "site-a",
        lambda: ObjectStoreCounts(
            requests=dict(counts), bytes={"put": 3 << 26}, cache_bytes=1 << 27, fetches=2
        ),
    )
    counts["get"] = 5
    s = samples(metrics)
    assert s["tessera_object_store_requests_total", (("kind", "put"), ("store", "site-a"))] == 3
    assert s["tessera_object_store_requests_total", (("kind", "get"), ("store", "site-a"))] == 5
    assert s["tessera_object_store_bytes_total", (("kind", "put"), ("store", "site-a"))] == 3 << 26
    assert s["tessera_store_cache_bytes", (("store", "site-a"),)] == 1 << 27
    assert s["tessera_store_cache_fetches_total", (("store", "site-a"),)] == 2
