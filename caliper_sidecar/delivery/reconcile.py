"""Proof at the destination: events the platform answered for, checked against what it lists.

A platform that said it took an event can still lose it (a restore from a backup, a store
that drops writes), and TimeBack's XP and time-spent figures come from these events. Beyond AI
lists what it holds (`GET /caliper/events`, `startDate`/`endDate` on the event's time, `sensor`,
`limit`/`offset`); LearnWith.AI lists nothing, so there is nothing to check against.

A check takes events delivered upstream, groups them by sensor and by time into windows of at
most WINDOW_EVENTS, lists each window a page at a time (one request at a time, waiting out a
`Retry-After`: a reconciliation never floods the platform), and sorts each event into:

- `held`: the platform lists it; it is verified and its body may go;
- `missing`: it does not, and is sent again (`resent`) unless the first time it was found
  missing is more than `give_up_s` ago: then it is `given_up` — reported, never resent.

What to check and what to do with the answer belong to the caller (`ReconcileStore`: the outbox
in `run` and in `caliper-sidecar reconcile`); this module only lists and sorts.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Protocol

from caliper_sidecar import codec
from caliper_sidecar.exceptions import RetryLater

#: events checked with one listing window: bounds a window's pages when the platform holds
#: many events of the same sensor around the same time
WINDOW_EVENTS: Final = 500
#: events per page asked of the platform (the SDK's own default)
PAGE_SIZE: Final = 100
#: how often one page is asked again after a 429/503 or no answer, before the check stops
PAGE_TRIES: Final = 5
#: the longest wait a Retry-After is honoured for before the check stops (and tries later)
MAX_RETRY_AFTER_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class Delivered:
    """An event the platform answered for: its id, sensor and time as sent, and how long ago
    a check first found it missing (None: never; counted on the outbox's clock)."""

    id: str
    sensor: str
    event_time: datetime | None
    missing_for_s: float | None = None


@dataclass(slots=True)
class Sorted:
    """What one check found."""

    held: list[str] = field(default_factory=list)
    #: missing, to be sent again
    missing: list[str] = field(default_factory=list)
    #: missing for longer than give_up_s: reported, not sent again
    given_up: list[str] = field(default_factory=list)
    #: ids whose time could not be read: they cannot be looked up by time (never expected:
    #: the validator requires eventTime), left as they are
    unreadable: list[str] = field(default_factory=list)

    @property
    def checked(self) -> int:
        return len(self.held) + len(self.missing) + len(self.given_up)

    def add(self, other: Sorted) -> None:
        self.held += other.held
        self.missing += other.missing
        self.given_up += other.given_up
        self.unreadable += other.unreadable


class ListingUnavailable(Exception):
    """The platform cannot list (no listing, a refusal, no answer): nothing is decided."""


#: one page of the platform's listing: (status, Retry-After seconds or None, body)
Page = Callable[[dict[str, str]], Awaitable[tuple[int, float | None, str]]]


class ReconcileStore(Protocol):
    """What a check is done for: the caller's record of delivered events."""

    async def record_held(self, ids: Sequence[str]) -> None: ...
    async def record_missing(self, ids: Sequence[str], resend: bool) -> None: ...
    async def record_given_up(self, ids: Sequence[str]) -> None: ...


def event_time(body: bytes) -> datetime | None:
    """An event's `eventTime` as a UTC time, or None when it has none that reads."""
    try:
        value = codec.loads(body).get("eventTime")
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def windows(events: Iterable[Delivered]) -> list[list[Delivered]]:
    """Events grouped by sensor, in time order, at most WINDOW_EVENTS a window."""
    by_sensor: dict[str, list[Delivered]] = defaultdict(list)
    for e in events:
        if e.event_time is not None:
            by_sensor[e.sensor].append(e)
    out = []
    for group in by_sensor.values():
        group.sort(key=lambda e: e.event_time or datetime.min)
        out += [group[i : i + WINDOW_EVENTS] for i in range(0, len(group), WINDOW_EVENTS)]
    return out


def _bound(moment: datetime, up: bool) -> str:
    """A time in the platform's form, to the millisecond, rounded outward so the window
    holds its first and last event."""
    ms = moment.astimezone(UTC).timestamp() * 1000
    ms = math.ceil(ms) if up else math.floor(ms)
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class Reconciler:
    """Sorts delivered events by what the platform lists; see the module's docstring."""

    def __init__(
        self,
        page: Page,
        give_up_s: float,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._page = page
        self._give_up_s = give_up_s
        self._sleep = sleep
        #: pages asked of the platform, for the caller's report
        self.pages = 0

    async def sort(self, events: Sequence[Delivered]) -> Sorted:
        """Sort these events; raises ListingUnavailable when the platform cannot list."""
        out = Sorted(unreadable=[e.id for e in events if e.event_time is None])
        for window in windows(events):
            times = [e.event_time for e in window if e.event_time is not None]
            held = await self.held(window[0].sensor, min(times), max(times))
            for e in window:
                if e.id in held:
                    out.held.append(e.id)
                elif e.missing_for_s is not None and e.missing_for_s >= self._give_up_s:
                    out.given_up.append(e.id)
                else:
                    out.missing.append(e.id)
        return out

    async def held(self, sensor: str, since: datetime, until: datetime) -> set[str]:
        """The ids the platform lists for this sensor from `since` to `until`, both included."""
        query = {
            "sensor": sensor,
            "startDate": _bound(since, up=False),
            # a millisecond of slack past the last: a platform may keep fewer digits
            "endDate": _bound(until + timedelta(milliseconds=1), up=True),
            "limit": str(PAGE_SIZE),
        }
        held: set[str] = set()
        offset = 0
        while True:
            listing = await self._listing({**query, "offset": str(offset)})
            events = listing.get("events")
            if not isinstance(events, list):
                raise ListingUnavailable("the platform's listing has no `events` list")
            held.update(
                str(e["externalId"]) for e in events if isinstance(e, dict) and "externalId" in e
            )
            offset += len(events)
            pagination = listing.get("pagination")
            total = pagination.get("total") if isinstance(pagination, dict) else None
            if not events or not isinstance(total, int) or offset >= total:
                return held

    async def _listing(self, query: dict[str, str]) -> dict[str, object]:
        """One page, asked again (after its Retry-After, or a second) while the platform is
        busy or does not answer, PAGE_TRIES times at most."""
        for _ in range(PAGE_TRIES):
            self.pages += 1
            try:
                code, retry_after, text = await self._page(query)
            except RetryLater as e:
                reason, wait = str(e), 1.0
            else:
                if code == 200:
                    try:
                        body = codec.loads(text.encode())
                    except ValueError:
                        body = None
                    if not isinstance(body, dict):
                        raise ListingUnavailable("the platform's listing is not a JSON object")
                    return body
                if code not in (408, 425, 429, 500, 502, 503, 504):
                    raise ListingUnavailable(
                        f"the platform's listing answered {code}: {text[:200]}"
                    )
                reason, wait = f"the platform's listing answered {code}", retry_after or 1.0
            if wait > MAX_RETRY_AFTER_S:
                break
            await self._sleep(wait)
        raise ListingUnavailable(reason)
