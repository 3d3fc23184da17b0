"""Prometheus metrics, one registry per sidecar (so several can live in one test process).

Counters are counted where things happen. What describes the state (the outbox's depth and
age, its capacity, each destination's state, its token's expiry) is not stored in gauges that a
handler sets: a collector reads it from the parts when Prometheus scrapes, from a snapshot of
the outbox taken for that scrape. `_created` series are off: they doubled the output and no
alert uses them.

The delivery series carry a `destination` label (`upstream` for [upstream], a destination's
`name` for each of [[destinations]]): the parts that deliver to one destination count through
`Metrics.for_destination(name)`, which binds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Final, Protocol

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
from caliper_sidecar.config import UPSTREAM
from caliper_sidecar.states import DeadLetterReason, JobOutcome, ReconcileResult, UpstreamState
from caliper_sidecar.tap import Tap

disable_created_metrics()  # type: ignore[no-untyped-call]

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

#: histogram buckets of a request to the platform, from a loopback fake to a timeout
REQUEST_SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True, slots=True)
class DestinationSnapshot:
    """One of [[destinations]] at scrape time: its state, and when its token expires (None
    without OAuth)."""

    name: str
    state: str = "ok"
    token_expires_at: float | None = None
    #: its own backlog: events waiting for it, and how long the oldest has waited
    waiting: int = 0
    oldest_age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state the scrape-time collector reports: taken once per scrape. `upstream_state`
    and `token_expires_at` are [upstream]'s; `destinations` the others'."""

    events: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    dead_letters: int = 0
    platform_jobs: tuple[tuple[str, int], ...] = ()
    upstream_state: str = "ok"
    token_expires_at: float | None = None
    capacity_events: int = 0
    capacity_bytes: int = 0
    destinations: tuple[DestinationSnapshot, ...] = ()

    def by_destination(self) -> tuple[DestinationSnapshot, ...]:
        """Every destination's state, [upstream]'s first."""
        upstream = DestinationSnapshot(UPSTREAM, self.upstream_state, self.token_expires_at)
        return (upstream, *self.destinations)


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
        destinations = s.by_destination()
        up = GaugeMetricFamily(
            "caliper_sidecar_upstream_state",
            "1 for each destination's current state (ok, backing_off, auth_failed, "
            "endpoint_failed, refusing, unexpected_answer), 0 for the others",
            labels=["destination", "state"],
        )
        for d in destinations:
            for state in UpstreamState:
                up.add_metric([d.name, state], 1.0 if d.state == state else 0.0)
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
        expiry = GaugeMetricFamily(
            "caliper_sidecar_token_expiry_timestamp_seconds",
            "When each destination's access token expires (Unix time)",
            labels=["destination"],
        )
        for d in destinations:
            if d.token_expires_at is not None:
                expiry.add_metric([d.name], d.token_expires_at)
        if expiry.samples:  # none without OAuth: no series, rather than a made-up expiry
            yield expiry
        # Each of [[destinations]]'s own backlog ([upstream]'s is the outbox gauges above).
        waiting = GaugeMetricFamily(
            "caliper_sidecar_destination_events",
            "Events waiting for each of [[destinations]]",
            labels=["destination"],
        )
        oldest = GaugeMetricFamily(
            "caliper_sidecar_destination_oldest_age_seconds",
            "Age of the oldest event waiting for each of [[destinations]]",
            labels=["destination"],
        )
        for d in s.destinations:
            waiting.add_metric([d.name], d.waiting)
            oldest.add_metric([d.name], d.oldest_age_s)
        if s.destinations:
            yield waiting
            yield oldest


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
        #: each sender's (received, duplicate) counters, looked up once: `labels()` takes a
        #: lock and builds a key on every call, twice per ingest request
        self._by_sender: dict[str, tuple[Counter, Counter]] = {}
        # Exported at 0 from the start (for alerts and rates), as unlabelled senders.
        self._of_sender("")
        self.events_rejected = Counter(
            "caliper_sidecar_events_rejected",
            "Events refused at the door, by reason",
            ["reason"],
            registry=r,
        )
        # The delivery series: by destination (DestinationMetrics binds it).
        self.events_delivered = Counter(
            "caliper_sidecar_events_delivered",
            "Events the destination accepted",
            ["destination"],
            registry=r,
        )
        self.events_unconfirmed = Counter(
            "caliper_sidecar_events_unconfirmed",
            "Events the platform accepted without a job to confirm them (jobs_url is set)",
            ["destination"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "caliper_sidecar_events_dead_lettered",
            "Events moved to the dead-letter table",
            ["destination", "reason"],
            registry=r,
        )
        self.state = _StateCollector()
        r.register(self.state)
        self.build_info = Gauge(
            "caliper_sidecar_build_info", "The running version (always 1)", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.in_flight = Gauge(
            "caliper_sidecar_events_in_flight",
            "Events in requests to the destination",
            ["destination"],
            registry=r,
        )
        self.concurrency_limit = Gauge(
            "caliper_sidecar_concurrency_limit",
            "Envelopes the destination may have in flight at once now: the adaptive limit, "
            "at most its concurrency",
            ["destination"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "caliper_sidecar_upstream_requests",
            "Requests to the destination's Caliper endpoint, by status code",
            ["destination", "code"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "caliper_sidecar_upstream_request_seconds",
            "Duration of requests to the destination's Caliper endpoint",
            ["destination"],
            buckets=REQUEST_SECONDS,
            registry=r,
        )
        # Reads for apps (GET /caliper/events) are not delivery: counted apart, so that a slow
        # or refused listing never shows as the Caliper endpoint failing.
        self.platform_reads = Counter(
            "caliper_sidecar_platform_reads",
            "Reads of the platform's stored events (apps' GET /caliper/events, and "
            "reconciliation's listings), by status code (timeout, error: no answer)",
            ["code"],
            registry=r,
        )
        self.platform_read_seconds = Histogram(
            "caliper_sidecar_platform_read_seconds",
            "Duration of reads of the platform's stored events for apps",
            buckets=REQUEST_SECONDS,
            registry=r,
        )
        self.reconcile_events = Counter(
            "caliper_sidecar_reconcile_events",
            "Delivered events checked against what the platform holds (reconcile): held, "
            "missing (not held), resent (sent again), given_up (missing for longer than "
            "reconcile.give_up_s: reported, not sent again)",
            ["result"],
            registry=r,
        )
        for result in ReconcileResult:
            self.reconcile_events.labels(result=result)
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
            "Tokens fetched from the destination's OAuth token endpoint",
            ["destination"],
            registry=r,
        )
        #: what happens to events, for whoever watches (GET /v1/tail): beside the counts,
        #: since everything that counts an event passes here
        self.tap = Tap()
        self._destinations: dict[str, DestinationMetrics] = {}
        self.for_destination(UPSTREAM)

    def received(self, sender: str, accepted: int, duplicates: int) -> None:
        """Count one ingest request's outcome for its sender."""
        received, duplicate = self._of_sender(sender)
        received.inc(accepted)
        if duplicates:
            duplicate.inc(duplicates)

    def _of_sender(self, sender: str) -> tuple[Counter, Counter]:
        children = self._by_sender.get(sender)
        if children is None:
            children = self._by_sender[sender] = (
                self.events_received.labels(sender=sender),
                self.events_duplicate.labels(sender=sender),
            )
        return children

    def for_destination(self, name: str) -> DestinationMetrics:
        """The delivery series of this destination (`upstream` for [upstream]), its label
        bound; the same one for the same name."""
        view = self._destinations.get(name)
        if view is None:
            view = self._destinations[name] = DestinationMetrics(self, name)
        return view

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


class LabelledCounter(Protocol):
    """A counter family whose remaining labels a call site names (`code`, `reason`): a
    prometheus Counter, or a destination's with its label bound."""

    def labels(self, **labels: str) -> Counter: ...


class _Bound:
    """A family with `destination` bound: `labels(reason=...)` names the rest."""

    __slots__ = ("_destination", "_family")

    def __init__(self, family: Counter, destination: str) -> None:
        self._family, self._destination = family, destination

    def labels(self, **labels: str) -> Counter:
        return self._family.labels(destination=self._destination, **labels)


class DestinationMetrics:
    """One destination's delivery series, by the attribute names of `Metrics`, so that the
    dispatcher, its client and its tokens count alike whichever destination they serve.

    What every destination has (delivered, dead-lettered by reason, in flight, unconfirmed,
    its concurrency limit) is exported from the start, at 0 (the limit: where its dispatcher
    starts it), for alerts and rates; what only a destination with a Caliper endpoint or a
    token has (request durations, token refreshes) from when the client or the
    token source that counts them is made, so that an archive exports no request series.
    """

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._metrics = metrics
        self.tap = metrics.tap
        self.events_delivered = metrics.events_delivered.labels(destination=name)
        self.events_unconfirmed = metrics.events_unconfirmed.labels(destination=name)
        self.events_dead_lettered: LabelledCounter = _Bound(metrics.events_dead_lettered, name)
        for reason in DeadLetterReason:
            self.events_dead_lettered.labels(reason=reason)
        self.in_flight = metrics.in_flight.labels(destination=name)
        self.concurrency_limit = metrics.concurrency_limit.labels(destination=name)
        self.upstream_requests: LabelledCounter = _Bound(metrics.upstream_requests, name)

    @cached_property
    def upstream_seconds(self) -> Histogram:
        return self._metrics.upstream_seconds.labels(destination=self.name)

    @cached_property
    def token_refreshes(self) -> Counter:
        return self._metrics.token_refreshes.labels(destination=self.name)

    def __repr__(self) -> str:
        return f"DestinationMetrics({self.name!r})"
