"""Prometheus metrics, one registry per sidecar (so several can live in one test process).

Counters are counted where things happen. What describes the state (the outbox's depth and
age, its capacity, the upstream's state, the token's expiry) is not stored in gauges that a
handler sets: a collector reads it from the parts when Prometheus scrapes, from a snapshot of
the outbox taken for that scrape. `_created` series are off: they doubled the output and no
alert uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from caliper_sidecar import __version__
from caliper_sidecar.states import DeadLetterReason, JobOutcome, UpstreamState

disable_created_metrics()  # type: ignore[no-untyped-call]

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

#: histogram buckets of a request to the platform, from a loopback fake to a timeout
REQUEST_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state the scrape-time collector reports: taken once per scrape."""

    events: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    dead_letters: int = 0
    platform_jobs: tuple[tuple[str, int], ...] = ()
    upstream_state: str = "ok"
    token_expires_at: float | None = None
    capacity_events: int = 0
    capacity_bytes: int = 0


class _StateCollector(Collector):
    """The sidecar's state at scrape time, from the last snapshot."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        for name, doc, value in (
            ("caliper_sidecar_outbox_events", "Events waiting", s.events),
            ("caliper_sidecar_outbox_bytes", "Bytes of events waiting", s.bytes),
            (
                "caliper_sidecar_outbox_oldest_age_seconds",
                "Age of the oldest waiting event",
                s.oldest_age_s,
            ),
            (
                "caliper_sidecar_outbox_dead_letters",
                "Events in the dead-letter table",
                s.dead_letters,
            ),
            (
                "caliper_sidecar_outbox_capacity_events",
                "Events the outbox holds at most (outbox.max_events)",
                s.capacity_events,
            ),
            (
                "caliper_sidecar_outbox_capacity_bytes",
                "Bytes of events the outbox holds at most (outbox.max_bytes)",
                s.capacity_bytes,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        up = GaugeMetricFamily(
            "caliper_sidecar_upstream_state",
            "1 for the upstream's current state (ok, backing_off, auth_failed, endpoint_failed, "
            "refusing, unexpected_answer), 0 for the others",
            labels=["state"],
        )
        for state in UpstreamState:
            up.add_metric([state], 1.0 if s.upstream_state == state else 0.0)
        yield up
        jobs = GaugeMetricFamily(
            "caliper_sidecar_platform_jobs_open",
            "Platform jobs by state: waiting/active (followed), unconfirmed (given up on)",
            labels=["state"],
        )
        counts = dict(s.platform_jobs)
        for job_state in ("waiting", "active", "unconfirmed"):
            jobs.add_metric([job_state], counts.get(job_state, 0))
        yield jobs
        if s.token_expires_at is not None:
            yield GaugeMetricFamily(
                "caliper_sidecar_token_expiry_timestamp_seconds",
                "When the upstream access token expires (Unix time)",
                value=s.token_expires_at,
            )


class _ObservedCounter(Collector):
    """A counter whose value lives elsewhere and is read when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class Metrics:
    """Every metric the sidecar exports, by the names docs/app-developers.md fixes."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        # `sender`: the label of the sender token in receiver.tokens_file ("" without one):
        # bounded, the labels come only from that file.
        self.events_received = Counter(
            "caliper_sidecar_events_received",
            "Events committed to the outbox",
            ["sender"],
            registry=r,
        )
        self.events_duplicate = Counter(
            "caliper_sidecar_events_duplicate",
            "Events received again and not stored twice",
            ["sender"],
            registry=r,
        )
        # Exported at 0 from the start (for alerts and rates), as unlabelled senders.
        self.events_received.labels(sender="")
        self.events_duplicate.labels(sender="")
        self.events_rejected = Counter(
            "caliper_sidecar_events_rejected",
            "Events refused at the door, by reason",
            ["reason"],
            registry=r,
        )
        self.events_delivered = Counter(
            "caliper_sidecar_events_delivered", "Events the platform accepted", registry=r
        )
        self.events_unconfirmed = Counter(
            "caliper_sidecar_events_unconfirmed",
            "Events the platform accepted without a job to confirm them (jobs_url is set)",
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "caliper_sidecar_events_dead_lettered",
            "Events moved to the dead-letter table",
            ["reason"],
            registry=r,
        )
        # Exported at 0 from the start, so that alerts on them see a series before the first
        # dead letter.
        for reason in DeadLetterReason:
            self.events_dead_lettered.labels(reason=reason)
        self.state = _StateCollector()
        r.register(self.state)
        self.build_info = Gauge(
            "caliper_sidecar_build_info", "The running version (always 1)", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.in_flight = Gauge(
            "caliper_sidecar_events_in_flight", "Events in requests to the platform", registry=r
        )
        self.upstream_requests = Counter(
            "caliper_sidecar_upstream_requests",
            "Requests to the Caliper endpoint, by status code",
            ["code"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "caliper_sidecar_upstream_request_seconds",
            "Duration of requests to the Caliper endpoint",
            buckets=REQUEST_SECONDS,
            registry=r,
        )
        # Reads for apps (GET /caliper/events) are not delivery: counted apart, so that a slow
        # or refused listing never shows as the Caliper endpoint failing.
        self.platform_reads = Counter(
            "caliper_sidecar_platform_reads",
            "Reads of the platform's stored events for apps (GET /caliper/events), by status "
            "code (timeout, error: no answer)",
            ["code"],
            registry=r,
        )
        self.platform_read_seconds = Histogram(
            "caliper_sidecar_platform_read_seconds",
            "Duration of reads of the platform's stored events for apps",
            buckets=REQUEST_SECONDS,
            registry=r,
        )
        self.platform_jobs = Counter(
            "caliper_sidecar_platform_jobs",
            "Platform processing jobs finished: completed (events confirmed), failed (events "
            "dead-lettered or sent again), unconfirmed (never finished; given up on)",
            ["outcome"],
            registry=r,
        )
        for outcome in JobOutcome:
            self.platform_jobs.labels(outcome=outcome)
        self.token_requests_refused = Counter(
            "caliper_sidecar_token_requests_refused",
            "Requests to the sidecar's own token endpoint refused: invalid_client (a wrong "
            "client secret), slowed_down (an address that kept failing, not checked)",
            ["reason"],
            registry=r,
        )
        for refusal in ("invalid_client", "slowed_down"):
            self.token_requests_refused.labels(reason=refusal)
        self.token_refreshes = Counter(
            "caliper_sidecar_token_refreshes",
            "Tokens fetched from the OAuth token endpoint",
            registry=r,
        )

    def observe_commits(self, read: Callable[[], int]) -> None:
        """Export the outbox's group-commit count (kept by the outbox, read at scrape time):
        far fewer commits than ingest requests is the group commit working."""
        self.registry.register(
            _ObservedCounter(
                "caliper_sidecar_outbox_commits", "Group commits of ingested events", read
            )
        )

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when the scraper asks for it
        (Prometheus does, by its Accept header), the classic text format otherwise."""
        if "application/openmetrics-text" in accept:
            return generate_openmetrics(self.registry), OPENMETRICS  # type: ignore[no-untyped-call]
        return generate_latest(self.registry), PROMETHEUS_TEXT
