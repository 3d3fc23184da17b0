"""Telling events the platform refuses from a platform that refuses everything.

A refused batch is split in halves, each half sent again, until the event the platform refuses
is alone (`SplitSearch`, one per batch). But a refusal that every event gets is the platform's
failure, not the events' (a wrong `edApp`, an API that changed, a proxy's error page): taken at
its word it would dead-letter the whole backlog at full speed. So a single event's refusal is
not final until something tells it apart: another event accepted, or refused with another
answer. When `REFUSING_AFTER` single events in a row are refused with the same status and
answer (`Refusals`, kept across batches), delivery stops as `refusing` and the events stay
queued; only when that same refusal has lasted `retry.refusing_grace_s` are the events it
refuses dead-lettered, so that a truly bad backlog never stalls delivery for good.

Pure: no outbox, no HTTP; the caller passes the monotonic time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

from caliper_sidecar.exceptions import Refused

#: single events refused alike, in a row, that make a refusal the platform's failure
REFUSING_AFTER: Final = 8


class Identified(Protocol):
    @property
    def id(self) -> str: ...


E = TypeVar("E", bound=Identified)


@dataclass
class RefusalStreak:
    """Single events refused in a row with one answer: which, and since when (monotonic)."""

    status: int
    body: str
    ids: set[str]
    since: float

    def matches(self, refusal: Refused) -> bool:
        return refusal.status == self.status and refusal.body == self.body


class Refusals:
    """The streak of single events refused alike, across batches (one per destination)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.streak: RefusalStreak | None = None

    def matches(self, refusal: Refused) -> bool:
        """True when this refusal continues the current streak."""
        return self.streak is not None and self.streak.matches(refusal)

    def count(self, event_id: str, refusal: Refused, now: float) -> bool:
        """Count a single event's refusal; True when REFUSING_AFTER events in a row got it."""
        if self.streak is None or not self.streak.matches(refusal):
            self.streak = RefusalStreak(refusal.status, refusal.body, set(), now)
        self.streak.ids.add(event_id)
        return len(self.streak.ids) >= REFUSING_AFTER

    def grace_over(self, now: float) -> bool:
        """True when the current refusal has lasted `retry.refusing_grace_s`."""
        streak = self.streak
        return (
            streak is not None
            and len(streak.ids) >= REFUSING_AFTER
            and now - streak.since >= self.grace_s
        )

    def reset(self) -> None:
        """Another event was accepted: refusals so far were the events' own."""
        self.streak = None


@dataclass
class Verdict(Generic[E]):
    """What a single event's refusal settled: refusals now known to be the events' own (to
    dead-letter), and, when every event is refused alike, the events that stay queued while
    delivery stops as `refusing` (None otherwise). `given_up`: the same refusal outlasted
    the grace, so the platform is taken at its word."""

    dead: list[tuple[E, Refused]] = field(default_factory=list)
    refusing: list[E] | None = None
    given_up: bool = False


class SplitSearch(Generic[E]):
    """One batch's way through refusals: the parts still to send (the halves of a refused part
    go first, so receive order is kept), and the single events refused whose refusal is not yet
    told apart from the platform's failure (`held`)."""

    def __init__(self, events: list[E], refusals: Refusals) -> None:
        self._parts: list[list[E]] = [events] if events else []
        self._refusals = refusals
        self.held: list[tuple[E, Refused]] = []

    def next_part(self) -> list[E] | None:
        """The next part to send, or None when every part was answered."""
        return self._parts.pop(0) if self._parts else None

    def accepted(self) -> list[tuple[E, Refused]]:
        """A part was accepted: the refusals held so far were the events' own (returned, to
        dead-letter)."""
        self._refusals.reset()
        return self._release_held()

    def refused(self, part: list[E], refusal: Refused, now: float) -> Verdict[E] | None:
        """A part was refused. Several events: split in halves, sent next (None). One event:
        held until told apart, and the verdict says what is settled."""
        if len(part) > 1:
            middle = len(part) // 2
            self._parts[:0] = [part[:middle], part[middle:]]
            return None
        verdict: Verdict[E] = Verdict()
        if self.held and not self._refusals.matches(refusal):
            # Refused with another answer: the refusals so far were the events' own.
            verdict.dead += self._release_held()
        self.held.append((part[0], refusal))
        if self._refusals.count(part[0].id, refusal, now):
            if not self._refusals.grace_over(now):
                # Everything refused alike: the platform's failure, not the events'.
                verdict.refusing = self.unsettled()
                return verdict
            verdict.given_up = True
            verdict.dead += self._release_held()
        return verdict

    def finished(self) -> list[tuple[E, Refused]]:
        """Every part answered: fewer than REFUSING_AFTER alike, and nothing else to tell them
        apart by: as the platform said, the held events are refused (returned, to
        dead-letter)."""
        return self._release_held()

    def unsettled(self) -> list[E]:
        """Every event without an outcome yet (held, and the parts not sent), taken out of the
        search: a failure or a shutdown gives them back to the queue."""
        events = [event for event, _ in self.held] + [e for part in self._parts for e in part]
        self.held, self._parts = [], []
        return events

    def _release_held(self) -> list[tuple[E, Refused]]:
        held, self.held = self.held, []
        return held
