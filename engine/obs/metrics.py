"""Prometheus metrics of the service, in a registry of their own (never the process-global
one, so tests and several daemons in one process do not collide).

=============================================  =========  ====================================
metric                                         type       labels
=============================================  =========  ====================================
tessera_jobs_finished_total                    counter    kind, state
tessera_jobs_running                           gauge      kind
tessera_bytes_read_total                       counter    kind   (bytes read from sources)
tessera_bytes_stored_total                     counter    kind   (record bytes written)
tessera_new_chunks_total                       counter    kind
tessera_job_duration_seconds                   histogram  kind
tessera_last_success_timestamp_seconds         gauge      vm     (unix time of the last
                                                                  succeeded backup)
tessera_store_used_bytes                       gauge      store  (bytes of pack files)
tessera_store_dedup_ratio                      gauge      store  (logical / unique)
tessera_store_compression_ratio                gauge      store  (unique / stored)
tessera_object_store_requests_total            counter    store, kind (HTTP requests sent to
                                                                  the bucket: put, get, head,
                                                                  list, delete, other)
tessera_object_store_bytes_total               counter    store, kind (payload bytes)
tessera_store_cache_bytes                      gauge      store  (packs cached locally)
tessera_store_cache_fetches_total              counter    store  (packs fetched into it)
tessera_object_store_month_requests            gauge      store  (this month, UTC)
tessera_object_store_month_budget              gauge      store  (0: no budget)
=============================================  =========  ====================================

The ``object_store`` and ``cache`` families exist for stores whose packs live in a bucket
(``watch_object_store``), read from the store's own counters at each scrape.

Counters kept elsewhere (syslog drops, mail failures) are exported with ``watch_counter``,
read at each scrape. ``render()`` returns the body and content type for an aiohttp handler::

    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})
"""

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SUCCEEDED = "succeeded"  # engine.jobs.states.State.SUCCEEDED (obs sits below jobs)
# Backup jobs last seconds (a small VM, incremental) to a day (a full of many TiB).
DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)


class _Watched(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.read())

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation)


@dataclass(frozen=True)
class ObjectStoreCounts:
    """What ``watch_object_store`` reads: requests and payload bytes by kind, the cache."""

    requests: dict[str, int]
    bytes: dict[str, int]
    cache_bytes: int
    fetches: int
    month_requests: int = 0  # sent this calendar month (UTC), by every process
    month_budget: int = 0  # requests_per_month; 0: none


class _ObjectStores(Collector):
    def __init__(self) -> None:
        self.stores: dict[str, Callable[[], ObjectStoreCounts]] = {}

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "tessera_object_store_requests",
            "HTTP requests sent to the store's bucket, retries and probes included",
            labels=["store", "kind"],
        )
        moved = CounterMetricFamily(
            "tessera_object_store_bytes", "Payload bytes put to and read from the bucket",
            labels=["store", "kind"],
        )  # fmt: skip
        cache = GaugeMetricFamily(
            "tessera_store_cache_bytes", "Bytes of packs cached locally", labels=["store"]
        )
        fetches = CounterMetricFamily(
            "tessera_store_cache_fetches", "Packs fetched from the bucket into the cache",
            labels=["store"],
        )  # fmt: skip
        month = GaugeMetricFamily(
            "tessera_object_store_month_requests",
            "Requests sent to the bucket this calendar month (UTC), by every process",
            labels=["store"],
        )
        budget = GaugeMetricFamily(
            "tessera_object_store_month_budget",
            "The store's monthly request budget (0: none)",
            labels=["store"],
        )
        for store, read in sorted(self.stores.items()):
            counts = read()
            for kind, n in sorted(counts.requests.items()):
                requests.add_metric([store, kind], n)
            for kind, n in sorted(counts.bytes.items()):
                moved.add_metric([store, kind], n)
            cache.add_metric([store], counts.cache_bytes)
            fetches.add_metric([store], counts.fetches)
            month.add_metric([store], counts.month_requests)
            budget.add_metric([store], counts.month_budget)
        yield from (requests, moved, cache, fetches, month, budget)


class Metrics:
    """The service's metrics. Call ``job_started`` once when a job starts and
    ``job_finished`` once when it ends (whatever the state); both are cheap and
    thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        r = self.registry
        self.jobs_finished = Counter(
            "tessera_jobs_finished", "Jobs that ended, by kind and final state",
            ["kind", "state"], registry=r,
        )  # fmt: skip
        self.jobs_running = Gauge("tessera_jobs_running", "Jobs running now", ["kind"], registry=r)
        self.bytes_read = Counter(
            "tessera_bytes_read", "Bytes read from sources by finished jobs", ["kind"], registry=r
        )
        self.bytes_stored = Counter(
            "tessera_bytes_stored", "Record bytes written to the store", ["kind"], registry=r
        )
        self.new_chunks = Counter(
            "tessera_new_chunks", "Chunks new to the store", ["kind"], registry=r
        )
        self.job_duration = Histogram(
            "tessera_job_duration_seconds", "Job duration", ["kind"],
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            "tessera_last_success_timestamp_seconds",
            "Unix time of the VM's last succeeded job", ["vm"], registry=r,
        )  # fmt: skip
        self.store_used = Gauge(
            "tessera_store_used_bytes", "Bytes of the store's pack files", ["store"], registry=r
        )
        self.store_dedup = Gauge(
            "tessera_store_dedup_ratio", "Logical bytes / unique bytes", ["store"], registry=r
        )
        self.store_compression = Gauge(
            "tessera_store_compression_ratio", "Unique / stored bytes", ["store"], registry=r
        )
        self._object_stores = _ObjectStores()
        r.register(self._object_stores)

    def job_started(self, kind: str) -> None:
        self.jobs_running.labels(kind=kind).inc()

    def job_finished(
        self,
        kind: str,
        state: str,
        vm: str | None,
        bytes_read: int = 0,
        bytes_stored: int = 0,
        seconds: float = 0.0,
        new_chunks: int = 0,
        finished_at: float | None = None,
    ) -> None:
        """``state`` is the final job state (``succeeded``, ``failed``, ``cancelled``);
        a succeeded job with a ``vm`` sets that VM's last-success time to ``finished_at``
        (unix time; default now)."""
        self.jobs_running.labels(kind=kind).dec()
        self.jobs_finished.labels(kind=kind, state=state).inc()
        self.bytes_read.labels(kind=kind).inc(bytes_read)
        self.bytes_stored.labels(kind=kind).inc(bytes_stored)
        self.new_chunks.labels(kind=kind).inc(new_chunks)
        self.job_duration.labels(kind=kind).observe(seconds)
        if state == SUCCEEDED and vm is not None:
            self.last_success.labels(vm=vm).set(
                finished_at if finished_at is not None else self._clock()
            )

    def restore_last_success(self, vm: str, finished_at: float) -> None:
        """The last success of a VM as a previous daemon recorded it (the job history), so
        an alert on its age keeps working across a restart."""
        self.last_success.labels(vm=vm).set(finished_at)

    def set_store_usage(
        self, store: str, used_bytes: int, dedup_ratio: float, compression_ratio: float
    ) -> None:
        """From ``StoreInfo`` (``pack_bytes``, ``dedup_ratio``, ``compression_ratio``)."""
        self.store_used.labels(store=store).set(used_bytes)
        self.store_dedup.labels(store=store).set(dedup_ratio)
        self.store_compression.labels(store=store).set(compression_ratio)

    def watch_counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a counter kept elsewhere (``read`` is called at each scrape; it must be
        cheap and never raise), e.g. ``SyslogForwarder.dropped``, ``Notifier.failed``."""
        self.registry.register(_Watched(name, documentation, read))

    def watch_object_store(self, store: str, read: Callable[[], ObjectStoreCounts]) -> None:
        """Export a bucket's request counters and its store's cache (``read`` at each
        scrape: cheap, never raising)."""
        self._object_stores.stores[store] = read

    def render(self) -> tuple[bytes, str]:
        """(exposition body, its content type) for the ``/metrics`` handler."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
