"""Prometheus metrics, one registry per sidecar (so several can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector


class _ObservedCounter(Collector):
    """A counter whose value lives elsewhere and is read when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


DEAD_LETTER_REASONS = ("refused", "max_attempts", "max_age", "platform_failed")
PLATFORM_JOB_OUTCOMES = ("completed", "failed", "unconfirmed")


class Metrics:
    """Every metric the sidecar exports, by the names SPEC §4 fixes."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.events_received = Counter(
            "sidecar_events_received", "Events committed to the outbox", registry=r
        )
        self.events_duplicate = Counter(
            "sidecar_events_duplicate", "Events received again and not stored twice", registry=r
        )
        self.events_rejected = Counter(
            "sidecar_events_rejected",
            "Events refused at the door, by reason",
            ["reason"],
            registry=r,
        )
        self.events_delivered = Counter(
            "sidecar_events_delivered", "Events the platform accepted", registry=r
        )
        self.events_dead_lettered = Counter(
            "sidecar_events_dead_lettered",
            "Events moved to the dead-letter table",
            ["reason"],
            registry=r,
        )
        # Exported at 0 from the start, so that alerts on them see a series before the first
        # dead letter.
        for reason in DEAD_LETTER_REASONS:
            self.events_dead_lettered.labels(reason=reason)
        self.outbox_events = Gauge("sidecar_outbox_events", "Events waiting", registry=r)
        self.outbox_bytes = Gauge("sidecar_outbox_bytes", "Bytes of events waiting", registry=r)
        self.outbox_oldest_age = Gauge(
            "sidecar_outbox_oldest_age_seconds", "Age of the oldest waiting event", registry=r
        )
        self.outbox_dead_letters = Gauge(
            "sidecar_outbox_dead_letters", "Events in the dead-letter table", registry=r
        )
        self.in_flight = Gauge(
            "sidecar_events_in_flight", "Events in requests to the platform", registry=r
        )
        self.upstream_requests = Counter(
            "sidecar_upstream_requests",
            "Requests to the Caliper endpoint, by status code",
            ["code"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "sidecar_upstream_request_seconds",
            "Duration of requests to the Caliper endpoint",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.platform_jobs = Counter(
            "sidecar_platform_jobs",
            "Platform processing jobs finished: completed (events confirmed), failed (events "
            "dead-lettered or sent again), unconfirmed (never finished; given up on)",
            ["outcome"],
            registry=r,
        )
        for outcome in PLATFORM_JOB_OUTCOMES:
            self.platform_jobs.labels(outcome=outcome)
        self.platform_jobs_open = Gauge(
            "sidecar_platform_jobs_open",
            "Platform jobs by state: waiting/active (followed), unconfirmed (given up on)",
            ["state"],
            registry=r,
        )
        self.token_refreshes = Counter(
            "sidecar_token_refreshes", "Tokens fetched from the OAuth token endpoint", registry=r
        )

    def observe_commits(self, read: Callable[[], int]) -> None:
        """Export the outbox's group-commit count (kept by the outbox, read at scrape time):
        far fewer commits than ingest requests is the group commit working."""
        self.registry.register(
            _ObservedCounter("sidecar_outbox_commits", "Group commits of ingested events", read)
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
