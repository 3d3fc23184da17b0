"""The values that cross the outbox's interface, and the rules they follow on both backends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.states import JourneyState

log = structlog.get_logger("sidecar.outbox")


# Not frozen, this and StoredEvent: one is made for every event ingested and every event
# claimed, on the event loop, and a frozen dataclass's __init__ sets each field through
# object.__setattr__ (502 -> 137 ns for this one). Neither is changed after it is made.
@dataclass(slots=True)
class NewEvent:
    """An event to append: its Caliper id, its serialized JSON, the `sensor` of the envelope
    the app sent it in (None: sent bare, the configured sensor goes with it), and the label of
    the sender token it came with (None: none, or unlabelled)."""

    id: str
    body: bytes
    sensor: str | None = None
    sender: str | None = None


#: an append: the events of one request, and the job id an app is answered with
Append = tuple[Sequence[NewEvent], str | None]


@dataclass(frozen=True, slots=True)
class AppendResult:
    """How many events of one append were new, and how many were already known."""

    accepted: int
    duplicates: int


@dataclass(slots=True)
class StoredEvent:
    """A waiting event as the dispatcher sees it. `age_s` is how long it had waited when it
    was claimed, as the sidecar observed it (what `retry.max_age_s` counts): never from this
    process's wall clock, which NTP may step by days (SQLite: the process's steady clock;
    PostgreSQL: the database's)."""

    seq: int
    id: str
    body: bytes
    received_at: float
    attempts: int
    first_attempt_at: float | None
    sensor: str | None = None
    age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Claim:
    """A lease on claimed events: who holds them (`id`) and until when (`expires_at`, on the
    backend's clock). Every outcome names its claim; one for a claim that expired and was
    taken over by another sender is refused, not applied."""

    id: str
    expires_at: float


#: the claim of an empty batch: it holds nothing
NO_CLAIM: Final = Claim("", 0.0)

#: an acknowledgement: the claim, its events, the platform job and why it cannot be confirmed
Ack = tuple[Claim, list[int], str | None, str | None]


@dataclass(frozen=True, slots=True)
class Batch:
    """Events claimed together under one claim; `full` when a limit, not the backlog, ended the
    batch. An empty batch says when (`ready_in` seconds) one may be worth claiming: the
    oldest event waits `linger` for company, unless a full batch is there."""

    events: list[StoredEvent]
    full: bool
    claim: Claim = NO_CLAIM
    ready_in: float | None = None

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]


def new_per_append(
    appends: Sequence[Sequence[NewEvent]],
    known: set[str],
    depth: int,
    size: int,
    max_events: int,
    max_bytes: int,
) -> list[list[NewEvent] | OutboxUnavailable]:
    """For each append of a group commit, in order: its events to store (ids neither `known`
    nor earlier in the group), or, when they would take the outbox past its limits
    (`depth` events and `size` bytes stored now), the refusal of the whole append."""
    out: list[list[NewEvent] | OutboxUnavailable] = []
    for events in appends:
        fresh = []
        for event in events:
            if event.id not in known:
                known.add(event.id)
                fresh.append(event)
        added = sum(len(e.body) for e in fresh)
        if depth + len(fresh) > max_events or size + added > max_bytes:
            for event in fresh:  # not stored: a retry must not count them as duplicates
                known.discard(event.id)
            out.append(
                OutboxUnavailable(
                    "outbox_full", f"the outbox is full ({depth} events, {size} bytes)"
                )
            )
            continue
        depth, size = depth + len(fresh), size + added
        out.append(fresh)
    return out


#: dead letters replayed or purged per transaction (one over 100,000 stalled ingest for seconds)
DEAD_CHUNK: Final = 1000
#: how often delivered events older than the dedupe window are pruned, and how many at a time
PRUNE_EVERY_S: Final = 60.0
PRUNE_CHUNK: Final = 5000


class WriteHealth:
    """Whether appends are failing now, and why: logged once per episode (a full disk can last
    hours), and reported for a Retry-After after the last failure only: with no traffic there
    is no write to prove the disk has room again, so readiness must not stay down forever."""

    def __init__(self, **where: str) -> None:
        self._where = where
        self.reason: str | None = None
        self._until = 0.0

    def failed(self, error: OutboxUnavailable) -> None:
        if self.reason != error.reason:
            log.error("outbox_write_failing", reason=error.reason, error=str(error), **self._where)
        self.reason = error.reason
        self._until = time.monotonic() + error.retry_after_s

    def succeeded(self) -> None:
        if self.reason is not None:
            log.info("outbox_writable_again", previous=self.reason)
            self.reason = None

    def current(self) -> str | None:
        return self.reason if self.reason and time.monotonic() < self._until else None


#: the columns of a dead letter, in the order of DeadLetter's fields
DEAD_LETTER_COLUMNS: Final = (
    "id, body, reason, status, response, attempts, received_at, "
    "first_attempt_at, last_attempt_at, dead_lettered_at, destination"
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the platform will never accept, or that ran out of attempts, with the reason."""

    id: str
    body: bytes
    reason: str
    status: int | None
    response: str
    attempts: int
    received_at: float
    first_attempt_at: float | None
    last_attempt_at: float | None
    dead_lettered_at: float
    #: where it could not go: "upstream", or a [[destinations]] name
    destination: str = "upstream"


@dataclass(frozen=True, slots=True)
class DestinationPlan:
    """A [[destinations]] entry as the outbox needs it: its name, and whether its waiting
    events count against the outbox's limits (`when_full = "block"`). One that does not
    block has its oldest waiting events dead-lettered for it (reason `destination_lagging`)
    when they would reach the limits, so that ingest goes on."""

    name: str
    blocks: bool = True


@dataclass(frozen=True, slots=True)
class DestinationStats:
    """One destination's part of the outbox (status page, metrics, `outbox stats`)."""

    waiting: int
    oldest_received_at: float | None
    oldest_age_s: float | None
    delivered_total: int
    dead_lettered_total: int
    dead_letters: int


@dataclass(frozen=True, slots=True)
class DestinationPart:
    """One destination's part of an event's journey: "waiting", "delivered" or
    "dead_lettered" (with the dead letter's reason), and the failed attempts there."""

    state: str
    attempts: int = 0
    last_error: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """An event to queue again for some queues ("upstream", [[destinations]] names), id
    unchanged and never refused as a duplicate: a dead letter replayed for its own
    destination, or an event replayed from an archive. Where its row is gone it is stored
    again, received now unless `received_at` says when; `sensor` and `sender` are what was
    kept with it (an archive keeps neither)."""

    id: str
    body: bytes
    queues: tuple[str, ...]
    received_at: float | None = None
    sensor: str | None = None
    sender: str | None = None


#: the columns of a mark, in the order of Mark's fields
MARK_COLUMNS: Final = "id, what, destination, detail, at"


@dataclass(frozen=True, slots=True)
class Mark:
    """Something that happened to an event at a destination beside its delivery (`what`, a
    JourneyMark: replayed from an archive; verified, missing, resent, given up by
    reconciliation), shown in its journey; `destination` is "upstream" or a [[destinations]]
    name. `at` is when, on the backend's clock (None for a mark not stored yet: the storage
    stamps it)."""

    id: str
    what: str
    destination: str
    detail: str | None = None
    at: float | None = None


@dataclass(frozen=True, slots=True)
class DeliveredUpstream:
    """An event delivered upstream (and confirmed, where the platform confirms), as
    reconciliation checks it: the sensor its envelope carried (None: upstream.sensor), and how
    long ago a check first found it missing (None: never), on the outbox's clock."""

    seq: int
    id: str
    body: bytes
    sensor: str | None
    missing_for_s: float | None = None


#: a destination's acknowledgement: the claim and its events
DestinationAck = tuple[Claim, list[int]]


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counts for status pages and `outbox stats`."""

    events: int
    bytes: int
    oldest_received_at: float | None
    dead_letters: int
    delivered_total: int
    dead_lettered_total: int
    #: platform jobs by state: "waiting"/"active" (followed), "unconfirmed" (given up on)
    platform_jobs: dict[str, int] = field(default_factory=dict)
    #: how long the oldest waiting event has waited, on the clock its times are stored on
    #: (a wall-clock step while it waits does not age it)
    oldest_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class Journey:
    """One event's way through the sidecar, as `GET /v1/events/{id}` shows it.

    `state`: "waiting" (stored, not yet accepted by the platform), "awaiting_confirmation" (in a
    platform job not finished yet), "unconfirmed" (its job was followed as long as allowed and
    never finished, or the platform accepted it without naming a job: `unconfirmed_reason`),
    "delivered" (accepted; the platform has no jobs), "confirmed" (its job completed), or
    "dead_lettered". `attempts` counts every send, the one that succeeded included.
    """

    id: str
    state: JourneyState
    received_at: float
    attempts: int
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    platform_job: str | None = None
    platform_id: str | None = None
    confirmed_at: float | None = None
    unconfirmed_reason: str | None = None
    sensor: str | None = None
    sender: str | None = None
    dead_letter: DeadLetter | None = None
    #: each [[destinations]] entry's part, by name (empty without destinations)
    destinations: dict[str, DestinationPart] = field(default_factory=dict)
    #: what happened to it at its destinations beside delivery, oldest first
    marks: tuple[Mark, ...] = ()


def journey_state(
    delivered_at: float | None,
    job: str | None,
    confirmed_at: float | None,
    job_state: str | None,
    unconfirmed: str | None = None,
) -> JourneyState:
    """Where an event still in the queue table is (see `Journey`)."""
    if delivered_at is None:
        return JourneyState.WAITING
    if job is None:
        return JourneyState.UNCONFIRMED if unconfirmed else JourneyState.DELIVERED
    if confirmed_at is not None:
        return JourneyState.CONFIRMED
    if job_state in (None, "unconfirmed"):
        return JourneyState.UNCONFIRMED
    return JourneyState.AWAITING_CONFIRMATION


#: the columns `journey_of` takes, in its order, from `events e LEFT JOIN platform_jobs p`
JOURNEY_COLUMNS: Final = (
    "e.id, e.received_at, e.attempts, e.first_attempt_at, e.last_attempt_at, e.last_error, "
    "e.delivered_at, e.platform_job, e.platform_id, e.confirmed_at, p.state, p.last_error, "
    "e.unconfirmed, e.sensor, e.sender"
)


def journey_of(
    id: str,
    received_at: float,
    attempts: int,
    first_attempt_at: float | None,
    last_attempt_at: float | None,
    last_error: str | None,
    delivered_at: float | None,
    platform_job: str | None,
    platform_id: str | None,
    confirmed_at: float | None,
    job_state: str | None,
    job_error: str | None,
    unconfirmed: str | None,
    sensor: str | None,
    sender: str | None,
) -> Journey:
    """The journey of an event still in the queue table, from a row of JOURNEY_COLUMNS."""
    state = journey_state(delivered_at, platform_job, confirmed_at, job_state, unconfirmed)
    if state == JourneyState.UNCONFIRMED and unconfirmed is None:
        unconfirmed = job_error or "its platform job was never found finished"
    return Journey(
        id=id,
        state=state,
        received_at=received_at,
        attempts=attempts,
        first_attempt_at=first_attempt_at,
        last_attempt_at=last_attempt_at,
        last_error=last_error,
        delivered_at=delivered_at,
        platform_job=platform_job,
        platform_id=platform_id,
        confirmed_at=confirmed_at,
        unconfirmed_reason=unconfirmed if state == JourneyState.UNCONFIRMED else None,
        sensor=sensor,
        sender=sender,
    )


def dead_journey(dead: DeadLetter, sensor: str | None, sender: str | None) -> Journey:
    """The journey of an event that ended in the dead letters."""
    return Journey(
        sensor=sensor,
        sender=sender,
        id=dead.id,
        state=JourneyState.DEAD_LETTERED,
        received_at=dead.received_at,
        attempts=dead.attempts,
        first_attempt_at=dead.first_attempt_at,
        last_attempt_at=dead.last_attempt_at,
        dead_letter=dead,
    )


#: what `Storage.erase_events` found, one row per place: (event id, "event" or
#: "dead_letter", destination ("upstream" or a [[destinations]] name), state there:
#: "waiting", "in_flight" (waiting, in a batch a sender had claimed: it may still go, where
#: the storage can see others' claims), "delivered" or "dead_lettered"); an event in the queue
#: table has a row for each queue it is meant for
ErasedRow = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Erasure:
    """What erasing one learner's events found in the outbox (and removed, unless a dry run):
    the events' ids; how many were in the queue table still waiting for some queue, and how
    many only kept there after delivery (for deduplication and the journeys); dead letters
    by destination; how many each destination, [upstream] included, had already taken
    (those must be erased there too); and how many of the waiting ones a sender had claimed
    at that instant (they may still go: PostgreSQL's leases say so; SQLite's claims live in
    `run`'s memory, where another process cannot count them)."""

    ids: frozenset[str] = frozenset()
    waiting: int = 0
    kept: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    delivered_to: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0

    @classmethod
    def of(cls, rows: Sequence[ErasedRow]) -> Erasure:
        """Counted from the rows `Storage.erase_events` returns."""
        queued: dict[str, set[str]] = {}
        dead: dict[str, int] = {}
        delivered: dict[str, int] = {}
        for id_, place, destination, state in rows:
            if place == "dead_letter":
                dead[destination] = dead.get(destination, 0) + 1
                continue
            queued.setdefault(id_, set()).add(state)
            if state == "delivered":
                delivered[destination] = delivered.get(destination, 0) + 1
        waiting = sum(1 for states in queued.values() if states & {"waiting", "in_flight"})
        return cls(
            ids=frozenset(r[0] for r in rows),
            waiting=waiting,
            kept=len(queued) - waiting,
            dead_letters=dead,
            delivered_to=delivered,
            in_flight=sum(1 for states in queued.values() if "in_flight" in states),
        )

    def __add__(self, other: Erasure) -> Erasure:
        """Both erasures' counts (of disjoint events: an id pass after the actor's)."""

        def summed(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in sorted({*a, *b})}

        return Erasure(
            ids=self.ids | other.ids,
            waiting=self.waiting + other.waiting,
            kept=self.kept + other.kept,
            dead_letters=summed(self.dead_letters, other.dead_letters),
            delivered_to=summed(self.delivered_to, other.delivered_to),
            in_flight=self.in_flight + other.in_flight,
        )

    @property
    def events(self) -> int:
        """Events found in the queue table."""
        return self.waiting + self.kept


@dataclass(frozen=True, slots=True)
class PlatformJobOutcome:
    """What a finished platform job said: the events it processed (id -> the platform's own id;
    None when its results name no event), and, when it failed, the events it names as failing
    (None: it did not say which)."""

    failed: bool
    reason: str = ""
    processed: dict[str, str] | None = None
    failing: frozenset[str] | None = None

    def split(self, events: Sequence[tuple[int, str]]) -> JobSplit:
        """What this outcome means for each event (seq, id) the job was sent with: confirmed
        (with the platform's id for it) when the job's results name it, or when it completed
        and its results name no event at all; dead-lettered when the job failed and names it,
        or names none; otherwise sent again in a new envelope (a completed job that left it
        out of the results it lists, or a failed one that neither processed it nor names
        it)."""
        split = JobSplit([], [], [])
        named = self.processed or {}
        for seq, event_id in events:
            if event_id in named:
                split.confirmed.append((seq, named[event_id]))
            elif not self.failed:
                if self.processed is None:
                    split.confirmed.append((seq, None))
                else:
                    split.again.append(seq)
            elif self.failing is None or event_id in self.failing:
                split.failing.append(seq)
            else:
                split.again.append(seq)
        return split


@dataclass(frozen=True, slots=True)
class JobSplit:
    """A finished platform job's events by fate (seqs; confirmed ones with the platform's id)."""

    confirmed: list[tuple[int, str | None]]
    failing: list[int]
    again: list[int]
