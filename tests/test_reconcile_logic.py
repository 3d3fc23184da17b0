"""The reconciler's sorting, without an outbox or HTTP: a listing held in memory that pages,
filters and answers as Beyond AI's does (tests/test_reconcile.py runs it for real)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from caliper_sidecar import codec
from caliper_sidecar.delivery.reconcile import (
    PAGE_SIZE,
    PAGE_TRIES,
    WINDOW_EVENTS,
    Delivered,
    ListingUnavailable,
    Reconciler,
    event_time,
    windows,
)
from caliper_sidecar.exceptions import RetryLater

T0 = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)


class Listing:
    """A platform's store, listed a page at a time; `answers` go before the listing."""

    def __init__(self, held: list[Delivered]) -> None:
        self.held = held
        self.queries: list[dict[str, str]] = []
        self.answers: list[tuple[int, float | None, str] | Exception] = []

    async def page(self, query: dict[str, str]) -> tuple[int, float | None, str]:
        self.queries.append(query)
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def moment(text: str) -> datetime:
            return datetime.fromisoformat(text.replace("Z", "+00:00"))

        since, until = moment(query["startDate"]), moment(query["endDate"])
        found = [
            e
            for e in self.held
            if e.sensor == query["sensor"] and e.event_time and since <= e.event_time <= until
        ]
        offset, limit = int(query["offset"]), int(query["limit"])
        page = [{"externalId": e.id, "id": 1} for e in found[offset : offset + limit]]
        return (
            200,
            None,
            codec.dumps({"events": page, "pagination": {"total": len(found)}}).decode(),
        )


def sent(n: int, sensor: str = "s", missing_for_s: float | None = None) -> list[Delivered]:
    return [
        Delivered(f"urn:uuid:{sensor}-{i}", sensor, T0 + timedelta(seconds=i), missing_for_s)
        for i in range(n)
    ]


async def no_sleep(_: float) -> None:
    return None


async def test_what_the_platform_lists_is_held_and_the_rest_missing() -> None:
    events = sent(250) + sent(30, sensor="other")
    platform = Listing([e for i, e in enumerate(events) if i % 10])
    found = await Reconciler(platform.page, give_up_s=3600).sort(events)
    assert sorted(found.missing) == sorted(e.id for i, e in enumerate(events) if i % 10 == 0)
    assert len(found.held) == len(events) - len(found.missing)
    assert found.given_up == []
    assert found.checked == len(events)
    # paged: the 225 held of sensor s take 3 pages, the other sensor one
    assert all(q["limit"] == str(PAGE_SIZE) for q in platform.queries)
    assert {q["sensor"] for q in platform.queries} == {"s", "other"}
    assert len(platform.queries) == 4


async def test_a_missing_event_is_given_up_after_give_up_s() -> None:
    """Found missing long enough ago: reported, not sent again; recently: sent again."""
    platform = Listing([])
    recent = sent(3, missing_for_s=499.0)
    found = await Reconciler(platform.page, give_up_s=500).sort(recent)
    assert found.missing == [e.id for e in recent]
    assert found.given_up == []
    old = sent(3, missing_for_s=500.0)
    found = await Reconciler(platform.page, give_up_s=500).sort(old)
    assert found.given_up == [e.id for e in old]
    assert found.missing == []


async def test_windows_hold_one_sensor_in_time_order_and_are_bounded() -> None:
    events = sent(WINDOW_EVENTS + 1)[::-1] + sent(2, sensor="t")
    split = windows(events)
    assert [len(w) for w in split] == [WINDOW_EVENTS, 1, 2]
    assert all(len({e.sensor for e in w}) == 1 for w in split)
    first = split[0]
    assert [e.event_time for e in first] == sorted(e.event_time for e in first if e.event_time)


async def test_the_window_holds_its_first_and_last_event_to_the_microsecond() -> None:
    """Bounds are rounded outward: an event at .123456 is inside a window asked in ms."""
    e = Delivered("urn:uuid:x", "s", T0 + timedelta(microseconds=123456))
    platform = Listing([e])
    found = await Reconciler(platform.page, give_up_s=1).sort([e])
    assert found.held == ["urn:uuid:x"]
    assert platform.queries[0]["startDate"] == "2026-12-05T08:00:00.123Z"


async def test_a_busy_platform_is_waited_for_as_it_asks() -> None:
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    events = sent(2)
    platform = Listing(events)
    platform.answers = [(429, 7.0, "{}"), RetryLater("no answer"), (503, None, "{}")]
    found = await Reconciler(platform.page, give_up_s=1, sleep=sleep).sort(events)
    assert found.held == [e.id for e in events]
    assert waits == [7.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "answers",
    [
        [(401, None, '{"error": "invalid_token"}')],
        [(200, None, "<html>blocked</html>")],
        [(200, None, '{"data": []}')],
        [(429, None, "{}")] * PAGE_TRIES,
        [(429, 3600.0, "{}")],
    ],
    ids=["refused", "not-json", "no-events-list", "always-busy", "retry-after-too-long"],
)
async def test_a_platform_that_does_not_list_decides_nothing(answers: list[Any]) -> None:
    platform = Listing(sent(1))
    platform.answers = list(answers)
    with pytest.raises(ListingUnavailable):
        await Reconciler(platform.page, give_up_s=1, sleep=no_sleep).sort(sent(1))


def test_event_time_reads_the_events_own_time() -> None:
    assert event_time(b'{"eventTime": "2026-12-05T08:00:00.5Z"}') == T0 + timedelta(seconds=0.5)
    assert event_time(b'{"eventTime": "2026-12-05T09:00:00+01:00"}') == T0
    assert event_time(b'{"eventTime": 5}') is None
    assert event_time(b"{}") is None
