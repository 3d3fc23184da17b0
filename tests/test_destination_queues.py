"""Each [[destinations]] entry's own place in the outbox, on both backends: every event goes
to [upstream] and to each destination; one that is down or slow costs the others nothing; an
event leaves the outbox when every destination has it or has dead-lettered it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from unittest.mock import ANY

import asyncpg
import pytest

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox import DestinationPlan, Mark, NewEvent, Outbox, Replay
from caliper_sidecar.outbox.postgres.room import Footprint
from caliper_sidecar.outbox.postgres.schema import BODIES_SPAN, SCHEMA
from caliper_sidecar.outbox.postgres.writes import store_events
from caliper_sidecar.states import JourneyMark

from .conftest import eventually, new_id
from .outboxes import BACKENDS, fresh_database, open_test_outbox


class OpenBox(Protocol):
    def __call__(self, **settings: Any) -> contextlib.AbstractAsyncContextManager[Outbox]: ...


def events(n: int, size: int = 20) -> list[NewEvent]:
    return [NewEvent(new_id(), b"{" + b"x" * (size - 2) + b"}") for _ in range(n)]


def plans(*names: str, blocks: bool = True) -> list[DestinationPlan]:
    return [DestinationPlan(name, blocks) for name in names]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def open_box(request: pytest.FixtureRequest, tmp_path: Path) -> OpenBox:
    """Open this backend's outbox (the same one each time within a test) with settings."""
    url = request.getfixturevalue("database") if request.param == "postgres" else None
    first = [True]

    @contextlib.asynccontextmanager
    async def opening(**settings: Any) -> Any:
        if request.param == "postgres":
            assert url is not None
            if first[0]:
                async with open_test_outbox("postgres", tmp_path, url, **settings) as box:
                    first[0] = False
                    yield box
                return
            settings["url"] = url
        async with _reopen(tmp_path, **settings) as box:
            yield box

    return opening


@contextlib.asynccontextmanager
async def _reopen(tmp_path: Path, **settings: Any) -> Any:
    """The same outbox again (SQLite: its file; PostgreSQL: its database, not emptied)."""
    from caliper_sidecar.config import OutboxSettings
    from caliper_sidecar.outbox import open_outbox

    lease_s = settings.pop("lease_s", 65.0)
    destinations = settings.pop("destinations", None)
    config = OutboxSettings(path=str(tmp_path / "outbox.db"), synchronous="normal", **settings)
    async with open_outbox(
        config, exclusive=False, lease_s=lease_s, destinations=destinations
    ) as box:
        yield box


async def deliver_all(box: Outbox, name: str | None = None) -> list[str]:
    """Claim and acknowledge everything waiting for [upstream] (None) or a destination; the
    ids, in the order claimed."""
    queue = box if name is None else box.queue(name)
    ids: list[str] = []
    while True:
        batch = await queue.claim_batch(50, 1_000_000)
        if not batch.events:
            return ids
        ids += [e.id for e in batch.events]
        await queue.acknowledge(batch.claim, batch.seqs)


class TestEveryEventEverywhere:
    async def test_every_event_goes_to_upstream_and_each_destination(
        self, open_box: OpenBox
    ) -> None:
        """Each destination claims every accepted event, bodies as received."""
        async with open_box(destinations=plans("lrs", "archive")) as box:
            sent = events(5)
            await box.append(sent)
            want = [(e.id, e.body) for e in sent]
            for queue in (box, box.queue("lrs"), box.queue("archive")):
                batch = await queue.claim_batch(10, 1_000_000)
                assert [(e.id, e.body) for e in batch.events] == want
                await queue.acknowledge(batch.claim, batch.seqs)
            assert (await box.stats()).events == 0
            for name in ("lrs", "archive"):
                stats = await box.destination_stats(name)
                assert (stats.waiting, stats.delivered_total) == (0, 5)

    async def test_a_destination_down_holds_back_no_other(self, open_box: OpenBox) -> None:
        """While one destination takes nothing, [upstream] and another deliver everything;
        the one that was down catches up alone, bodies intact."""
        async with open_box(destinations=plans("lrs", "down")) as box:
            sent = events(230)
            for i in range(0, 230, 23):
                await box.append(sent[i : i + 23])
            assert await deliver_all(box) == [e.id for e in sent]
            assert await deliver_all(box, "lrs") == [e.id for e in sent]
            assert (await box.stats()).events == 0
            down = await box.destination_stats("down")
            assert down.waiting == 230
            assert down.oldest_received_at is not None
            batch = await box.queue("down").claim_batch(1000, 10_000_000)
            assert [(e.id, e.body) for e in batch.events] == [(e.id, e.body) for e in sent]
            await box.queue("down").acknowledge(batch.claim, batch.seqs)
            assert (await box.destination_stats("down")).waiting == 0

    async def test_destination_acks_out_of_order_survive_a_restart(self, open_box: OpenBox) -> None:
        """A later batch acknowledged before an earlier one: after a restart only the
        earlier one is sent again."""
        async with open_box(destinations=plans("lrs")) as box:
            sent = events(6)
            await box.append(sent)
            queue = box.queue("lrs")
            first = await queue.claim_batch(2, 1_000_000)
            second = await queue.claim_batch(2, 1_000_000)
            third = await queue.claim_batch(2, 1_000_000)
            await queue.acknowledge(second.claim, second.seqs)
            await queue.acknowledge(third.claim, third.seqs[:1])
            assert (await box.destination_stats("lrs")).waiting == 3
        async with open_box(destinations=plans("lrs")) as box:
            again = await deliver_all(box, "lrs")
            assert again == [sent[0].id, sent[1].id, sent[5].id]
            assert [e.id for e in first.events] == again[:2]

    async def test_a_failure_counts_only_where_it_happened(self, open_box: OpenBox) -> None:
        """A failed attempt at a destination is counted there, not for [upstream]."""
        async with open_box(destinations=plans("lrs")) as box:
            (event,) = events(1)
            await box.append([event])
            queue = box.queue("lrs")
            batch = await queue.claim_batch(10, 1_000_000)
            await queue.record_failure(batch.claim, batch.seqs, "503 from the LRS")
            again = await queue.claim_batch(10, 1_000_000)
            assert [(e.id, e.attempts) for e in again.events] == [(event.id, 1)]
            mine = await box.claim_batch(10, 1_000_000)
            assert [e.attempts for e in mine.events] == [0]
            journey = (await box.journeys([event.id]))[event.id]
            assert journey.attempts == 0
            part = journey.destinations["lrs"]
            assert (part.state, part.attempts, part.last_error) == (
                "waiting",
                1,
                "503 from the LRS",
            )
            await queue.acknowledge(again.claim, again.seqs)
            journey = (await box.journeys([event.id]))[event.id]
            assert journey.destinations["lrs"].state == "delivered"


class TestRowsOutliveUpstream:
    async def test_rows_outlive_the_dedupe_window_while_a_destination_needs_them(
        self, open_box: OpenBox
    ) -> None:
        """Pruning after the dedupe window never takes an event a destination has not
        passed, and an event stored after everything was pruned still reaches it."""
        async with open_box(destinations=plans("lrs"), dedupe_window_s=0.05) as box:
            box.prune_every_s = 0
            sent = events(30)
            await box.append(sent)
            await deliver_all(box)
            await asyncio.sleep(0.2)
            await box.append(events(1))
            await deliver_all(box)  # an acknowledgement prunes
            got = await box.queue("lrs").claim_batch(100, 1_000_000)
            assert [(e.id, e.body) for e in got.events][:30] == [(e.id, e.body) for e in sent]
            await box.queue("lrs").acknowledge(got.claim, got.seqs)
            await asyncio.sleep(0.2)
            for _ in range(3):
                await box.append(events(1))
                await deliver_all(box)  # prunes everything every destination has
            assert len(await deliver_all(box, "lrs")) == 3
            after = events(1)
            await box.append(after)
            assert await deliver_all(box, "lrs") == [after[0].id]

    async def test_an_event_after_pruning_is_never_taken_for_one_already_passed(
        self, open_box: OpenBox
    ) -> None:
        """The newest event pruned (delivered first, acknowledged out of order) must not
        give its place in the queue to the next event a destination has already passed."""
        async with open_box(destinations=plans("lrs"), dedupe_window_s=0.05) as box:
            box.prune_every_s = 0
            await box.append(events(2))
            assert len(await deliver_all(box, "lrs")) == 2
            first = await box.claim_batch(1, 1_000_000)
            second = await box.claim_batch(1, 1_000_000)
            await box.acknowledge(second.claim, second.seqs)
            await asyncio.sleep(0.2)
            await box.acknowledge(first.claim, first.seqs)  # prunes what is old enough
            after = events(1)
            await box.append(after)
            assert await deliver_all(box, "lrs") == [after[0].id]


class TestDeadLettersNameTheirDestination:
    async def test_destination_dead_letter_is_its_own(self, open_box: OpenBox) -> None:
        """Dead-lettered at a destination: listed under its name, [upstream] unaffected,
        replayed to that destination only."""
        async with open_box(destinations=plans("lrs")) as box:
            bad, good = events(2)
            await box.append([bad, good])
            queue = box.queue("lrs")
            batch = await queue.claim_batch(10, 1_000_000)
            await queue.dead_letter(batch.claim, batch.seqs[:1], "refused", 422, "no")
            await queue.acknowledge(batch.claim, batch.seqs[1:])
            assert await deliver_all(box) == [bad.id, good.id]
            (dead,) = await box.dead_letters(10, destination="lrs")
            assert (dead.id, dead.destination, dead.body) == (bad.id, "lrs", bad.body)
            assert await box.dead_letters(10, destination="upstream") == []
            stats = await box.destination_stats("lrs")
            assert (stats.waiting, stats.dead_letters, stats.dead_lettered_total) == (0, 1, 1)
            assert (await box.stats()).dead_letters == 0
            journey = (await box.journeys([bad.id]))[bad.id]
            assert journey.state == "delivered"
            assert journey.destinations["lrs"].state == "dead_lettered"
            assert journey.destinations["lrs"].reason == "refused"

            assert await box.replay_dead_letters(None, destination="lrs") == 1
            replayed = await queue.claim_batch(10, 1_000_000)
            assert [(e.id, e.body) for e in replayed.events] == [(bad.id, bad.body)]
            assert (await box.claim_batch(10, 1_000_000)).events == []
            await queue.acknowledge(replayed.claim, replayed.seqs)
            assert (await box.destination_stats("lrs")).dead_letters == 0

    async def test_upstream_dead_letter_still_goes_to_destinations(self, open_box: OpenBox) -> None:
        """An event [upstream] refuses is dead-lettered there and still delivered to each
        destination; replayed, it goes to [upstream] only."""
        async with open_box(destinations=plans("lrs")) as box:
            (event,) = events(1)
            await box.append([event])
            batch = await box.claim_batch(10, 1_000_000)
            await box.dead_letter(batch.claim, batch.seqs, "refused", 422, "no")
            (dead,) = await box.dead_letters(10)
            assert dead.destination == "upstream"
            theirs = await box.queue("lrs").claim_batch(10, 1_000_000)
            assert [(e.id, e.body) for e in theirs.events] == [(event.id, event.body)]
            await box.queue("lrs").acknowledge(theirs.claim, theirs.seqs)
            assert await box.replay_dead_letters([event.id], destination="upstream") == 1
            assert await deliver_all(box) == [event.id]
            assert (await box.queue("lrs").claim_batch(10, 1_000_000)).events == []

    async def test_purge_names_its_destination(self, open_box: OpenBox) -> None:
        """Purging one destination's dead letters leaves the others'."""
        async with open_box(destinations=plans("lrs")) as box:
            (event,) = events(1)
            await box.append([event])
            batch = await box.claim_batch(10, 1_000_000)
            await box.dead_letter(batch.claim, batch.seqs, "refused", 422, "no")
            theirs = await box.queue("lrs").claim_batch(10, 1_000_000)
            await box.queue("lrs").dead_letter(theirs.claim, theirs.seqs, "refused", 400, "")
            assert len(await box.dead_letters(10)) == 2
            assert await box.purge_dead_letters(None, destination="lrs") == 1
            assert [d.destination for d in await box.dead_letters(10)] == ["upstream"]


class TestDestinationsComeAndGo:
    async def test_new_destination_starts_at_the_newest_event(self, open_box: OpenBox) -> None:
        """A destination added later gets what arrives from then on, not the history."""
        async with open_box(destinations=[]) as box:
            await box.append(events(3))
        async with open_box(destinations=plans("lrs")) as box:
            assert (await box.destination_stats("lrs")).waiting == 0
            later = events(2)
            await box.append(later)
            assert await deliver_all(box, "lrs") == [e.id for e in later]

    async def test_removed_destination_is_forgotten(self, open_box: OpenBox) -> None:
        """A destination removed from the configuration holds nothing back, and one of the
        same name added again starts afresh."""
        async with open_box(destinations=plans("lrs")) as box:
            await box.append(events(3))
            await deliver_all(box)
        async with open_box(destinations=[]) as box:
            assert box.queues == {}
        async with open_box(destinations=plans("lrs")) as box:
            assert (await box.destination_stats("lrs")).waiting == 0

    async def test_inspection_leaves_destinations_as_they_are(self, open_box: OpenBox) -> None:
        """The inspection commands (no plans) neither add nor drop a destination's state."""
        async with open_box(destinations=plans("lrs")) as box:
            await box.append(events(3))
        async with open_box() as box:
            assert (await box.stats()).events == 3
        async with open_box(destinations=plans("lrs")) as box:
            assert (await box.destination_stats("lrs")).waiting == 3


class TestLimits:
    async def test_a_blocking_destination_counts_against_the_limits(
        self, open_box: OpenBox
    ) -> None:
        """when_full = "block": events waiting only for a destination fill the outbox; they
        are never lost, and its deliveries make room again."""
        async with open_box(destinations=plans("lrs"), max_events=4) as box:
            await box.append(events(4))
            await deliver_all(box)
            with pytest.raises(OutboxUnavailable, match="full"):
                await box.append(events(1))
            assert await box.ping() == "outbox_full"
            await deliver_all(box, "lrs")
            assert (await box.append(events(1))).accepted == 1

    async def test_a_lagging_destination_is_dead_lettered_when_it_does_not_block(
        self, open_box: OpenBox
    ) -> None:
        """when_full = "dead_letter": ingest goes on; the lagging destination's oldest
        events are dead-lettered for it with reason destination_lagging."""
        async with open_box(destinations=plans("lrs", blocks=False), max_events=4) as box:
            first = events(4)
            await box.append(first)
            await deliver_all(box)
            assert (await box.append(events(2))).accepted == 2
            assert await box.ping() is None
            dead = await box.dead_letters(10, destination="lrs")
            assert dead
            assert all(d.reason == "destination_lagging" for d in dead)
            assert {d.id for d in dead} <= {e.id for e in first}
            stats = await box.destination_stats("lrs")
            assert stats.waiting + len(dead) == 6

    async def test_shedding_takes_the_oldest_given_back_and_leaves_what_is_in_flight(
        self, open_box: OpenBox
    ) -> None:
        """A destination that does not block, down: the events it failed and gave back are
        its oldest, shed first (their failed attempt kept on the dead letter), never the
        events just received; what it has in flight stays."""
        async with open_box(destinations=plans("lrs", blocks=False), max_events=4) as box:
            first = events(4)
            await box.append(first)
            await deliver_all(box)
            queue = box.queue("lrs")
            failed = await queue.claim_batch(2, 1_000_000)
            flying = await queue.claim_batch(1, 1_000_000)
            await queue.record_failure(failed.claim, failed.seqs, "503 from the LRS")
            assert (await box.append(events(2))).accepted == 2
            dead = await box.dead_letters(10, destination="lrs")
            assert [(d.id, d.reason, d.attempts) for d in dead] == [
                (e.id, "destination_lagging", 1) for e in first[:2]
            ]
            await queue.acknowledge(flying.claim, flying.seqs)
            assert [e.id for e in flying.events] == [first[2].id]
            assert (await box.destination_stats("lrs")).waiting == 3


async def deliver_everywhere(box: Outbox, *names: str) -> None:
    """Every destination named, then [upstream] (whose acknowledgements prune), takes all."""
    for name in names:
        await deliver_all(box, name)
    await deliver_all(box)


class TestReplays:
    async def test_delivered_everywhere_goes_again_only_where_named(
        self, open_box: OpenBox
    ) -> None:
        """An event every queue has delivered, replayed for [upstream]: [upstream] sends it
        again, once, body as given, and counts it waiting, then delivered, once more; the
        destinations are left alone; its journey marks it replayed for upstream."""
        async with open_box(destinations=plans("lrs", "archive")) as box:
            sent = events(3)
            await box.append(sent)
            await deliver_everywhere(box, "lrs", "archive")
            again = sent[1]
            await box.replay([Replay(again.id, again.body, ("upstream",))])
            stats = await box.stats()
            assert (stats.events, stats.delivered_total) == (1, 2)
            batch = await box.claim_batch(10, 1_000_000)
            assert [(e.id, e.body) for e in batch.events] == [(again.id, again.body)]
            await box.acknowledge(batch.claim, batch.seqs)
            assert (await deliver_all(box, "lrs"), await deliver_all(box, "archive")) == ([], [])
            stats = await box.stats()
            assert (stats.events, stats.delivered_total) == (0, 3)
            journey = (await box.journeys([again.id]))[again.id]
            assert journey.state == "delivered"
            assert [(m.what, m.destination, m.detail) for m in journey.marks] == [
                ("replayed", "upstream", None)
            ]
            assert journey.marks[0].at is not None
            assert (await box.journeys([sent[0].id]))[sent[0].id].marks == ()

    async def test_delivered_at_a_destination_goes_there_again(self, open_box: OpenBox) -> None:
        """Replayed for a destination that has it, the destination sends it again, once;
        [upstream] is left alone. The mark says what the replay was for (reconciliation
        sends what a destination lost again as `resent`)."""
        async with open_box(destinations=plans("lrs", "archive")) as box:
            sent = events(3)
            await box.append(sent)
            await deliver_everywhere(box, "lrs", "archive")
            await box.replay([Replay(sent[0].id, sent[0].body, ("lrs",))], JourneyMark.RESENT)
            assert await deliver_all(box, "lrs") == [sent[0].id]
            assert (await deliver_all(box), await deliver_all(box, "archive")) == ([], [])
            assert (await box.destination_stats("lrs")).delivered_total == 4
            journey = (await box.journeys([sent[0].id]))[sent[0].id]
            assert [(m.what, m.destination) for m in journey.marks] == [("resent", "lrs")]

    async def test_an_event_gone_is_stored_again_for_the_named_queues_alone(
        self, open_box: OpenBox
    ) -> None:
        """An event pruned from the outbox, replayed for [upstream] and a destination: each
        sends it once, body as given; the other destination never."""
        async with open_box(destinations=plans("lrs", "archive"), dedupe_window_s=0.05) as box:
            box.prune_every_s = 0
            (event,) = events(1)
            await box.append([event])
            await deliver_everywhere(box, "lrs", "archive")
            await asyncio.sleep(0.2)
            await box.append(events(1))
            await deliver_everywhere(box, "lrs", "archive")  # prunes the first
            assert await box.journeys([event.id]) == {}
            await box.replay([Replay(event.id, event.body, ("upstream", "lrs"))])
            batch = await box.claim_batch(10, 1_000_000)
            assert [(e.id, e.body) for e in batch.events] == [(event.id, event.body)]
            await box.acknowledge(batch.claim, batch.seqs)
            assert await deliver_all(box, "lrs") == [event.id]
            assert await deliver_all(box, "archive") == []
            journey = (await box.journeys([event.id]))[event.id]
            assert [(m.what, m.destination) for m in journey.marks] == [
                ("replayed", "upstream"),
                ("replayed", "lrs"),
            ]

    async def test_an_event_on_its_way_is_sent_once(self, open_box: OpenBox) -> None:
        """Replayed while still waiting everywhere, an event is sent once to each queue."""
        async with open_box(destinations=plans("lrs")) as box:
            sent = events(2)
            await box.append(sent)
            await box.replay([Replay(e.id, e.body, ("upstream", "lrs")) for e in sent])
            assert await deliver_all(box) == [e.id for e in sent]
            assert await deliver_all(box, "lrs") == [e.id for e in sent]
            assert (await box.stats()).events == 0

    async def test_a_dead_letter_there_goes_back_and_is_taken(self, open_box: OpenBox) -> None:
        """An event a destination dead-lettered, replayed for it: sent there again, and its
        dead letter there is gone (it is on its way again)."""
        async with open_box(destinations=plans("lrs")) as box:
            (event,) = events(1)
            await box.append([event])
            await deliver_all(box)
            theirs = await box.queue("lrs").claim_batch(10, 10_000)
            await box.queue("lrs").dead_letter(theirs.claim, theirs.seqs, "refused", 400, "")
            await box.replay([Replay(event.id, event.body, ("lrs",))])
            assert await box.dead_letters(10) == []
            assert await deliver_all(box, "lrs") == [event.id]
            assert await deliver_all(box) == []

    async def test_marks_go_with_the_event(self, open_box: OpenBox) -> None:
        """Marks show in the journey, oldest first, until the event leaves the outbox; then
        they are deleted with it."""
        async with open_box(destinations=plans("lrs"), dedupe_window_s=0.05) as box:
            box.prune_every_s = 0
            (event,) = events(1)
            await box.append([event])
            await deliver_everywhere(box, "lrs")
            await box.add_marks(
                [Mark(event.id, "verified", "upstream"), Mark(event.id, "missing", "lrs", "why")]
            )
            journey = (await box.journeys([event.id]))[event.id]
            assert [(m.what, m.destination, m.detail) for m in journey.marks] == [
                ("verified", "upstream", None),
                ("missing", "lrs", "why"),
            ]
            await asyncio.sleep(0.2)
            await box.append(events(1))
            await deliver_everywhere(box, "lrs")  # prunes the first
            assert await box.journeys([event.id]) == {}
            assert await box.storage.mark_rows([event.id]) == []

    @pytest.mark.parametrize("first", [None, "lrs"])
    async def test_both_dead_letters_of_a_pruned_event_go_back_once_each(
        self, open_box: OpenBox, first: str | None
    ) -> None:
        """An event dead-lettered by [upstream] and by a destination, its row pruned since:
        replayed (together, or the destination's first), each gets it again once (the second
        queue takes over the row stored again for the first), and a third destination
        never."""
        async with open_box(destinations=plans("lrs", "other"), dedupe_window_s=0.05) as box:
            box.prune_every_s = 0
            (event,) = events(1)
            await box.append([event])
            mine = await box.claim_batch(10, 10_000)
            await box.dead_letter(mine.claim, mine.seqs, "refused", 422, "no")
            theirs = await box.queue("lrs").claim_batch(10, 10_000)
            await box.queue("lrs").dead_letter(theirs.claim, theirs.seqs, "refused", 400, "")
            await deliver_all(box, "other")
            await asyncio.sleep(0.2)
            await box.append(events(1))
            await deliver_everywhere(box, "lrs", "other")  # prunes: every queue passed it
            assert await box.journeys([event.id]) == {event.id: ANY}  # its dead letters
            if first is not None:
                assert await box.replay_dead_letters(None, destination=first) == 1
                assert await box.replay_dead_letters(None) == 1
            else:
                assert await box.replay_dead_letters(None) == 2
            assert await deliver_all(box) == [event.id]
            assert await deliver_all(box, "lrs") == [event.id]
            assert event.id not in await deliver_all(box, "other")
            assert (await box.stats()).events == 0


@contextlib.asynccontextmanager
async def postgres_box(database: str, **settings: Any) -> Any:
    """An emptied PostgreSQL outbox of the module's database, with its raw connection."""
    async with open_test_outbox("postgres", Path("/nonexistent"), database, **settings) as box:
        conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
        try:
            yield box, conn
        finally:
            await conn.close()


async def partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT relid::regclass::text AS name FROM pg_partition_tree('bodies') WHERE isleaf"
    )
    return {r["name"].rsplit(".", 1)[-1] for r in rows}


class TestPostgresPlaces:
    """How the PostgreSQL outbox keeps what a destination still needs, and gives it back."""

    async def test_a_lagging_destination_keeps_the_bodies_partitions(self, database: str) -> None:
        """[upstream] has delivered a whole partition of bodies: it stays while a destination
        has not passed it, and is dropped once it has."""
        async with postgres_box(database, destinations=plans("lrs"), max_events=10**6) as (
            box,
            conn,
        ):
            sent = events(BODIES_SPAN + 10)
            for i in range(0, len(sent), 5000):
                await box.append(sent[i : i + 5000])
            while (batch := await box.claim_batch(2000, 10**8)).events:
                await box.acknowledge(batch.claim, batch.seqs)
            await asyncio.sleep(1.1)  # bodies.DROP_EVERY_S
            await box.claim_batch(10, 10**8)  # nothing: looks for finished partitions
            assert "bodies_0" in await partitions(conn)
            got: list[NewEvent] = []
            queue = box.queue("lrs")
            while (batch := await queue.claim_batch(2000, 10**8)).events:
                got += [NewEvent(e.id, e.body) for e in batch.events]
                await queue.acknowledge(batch.claim, batch.seqs)
            assert got == sent

            async def dropped() -> bool:
                await queue.claim_batch(10, 10**8)
                return "bodies_0" not in await partitions(conn)

            await eventually(dropped, timeout=10)

    @pytest.mark.parametrize("blocks", [True, False])
    async def test_bodies_only_a_destination_that_does_not_block_holds_never_fill_it(
        self, database: str, blocks: bool
    ) -> None:
        """The bodies a lagging destination holds weigh in the outbox's real size (what
        max_bytes limits), unless it does not block: its backlog is shed by count, and must
        never make ingest refuse."""
        async with postgres_box(
            database, destinations=plans("lrs", blocks=blocks), max_events=10**6
        ) as (box, conn):
            sent = events(BODIES_SPAN + 10, size=300)
            for i in range(0, len(sent), 5000):
                await box.append(sent[i : i + 5000])
            while (batch := await box.claim_batch(2000, 10**8)).events:
                await box.acknowledge(batch.claim, batch.seqs)
            held = await conn.fetchval("SELECT pg_total_relation_size('bodies_0')")
            assert held > BODIES_SPAN * 300
            counted = await Footprint().read(conn)
            assert (counted >= held) is blocks

    async def test_a_dead_letter_replayed_in_place_gets_its_body_back(self, database: str) -> None:
        """A destination's dead letter whose row is still there (delivered to [upstream]
        within the dedupe window) but whose bodies' partition was dropped: replayed, the
        partition is made again and the destination gets the event, body and all; [upstream]
        does not get it again."""
        async with postgres_box(database, destinations=plans("lrs")) as (box, conn):
            bad, good = events(2)
            await box.append([bad, good])
            queue = box.queue("lrs")
            batch = await queue.claim_batch(10, 10_000)
            await queue.dead_letter(batch.claim, batch.seqs[:1], "refused", 422, "no")
            await queue.acknowledge(batch.claim, batch.seqs[1:])
            await deliver_all(box)
            await conn.execute("DROP TABLE bodies_0")  # as a drop after a long drain would
            assert await box.replay_dead_letters(None, destination="lrs") == 1
            again = await queue.claim_batch(10, 10_000)
            assert [(e.id, e.body) for e in again.events] == [(bad.id, bad.body)]
            await queue.acknowledge(again.claim, again.seqs)
            assert await deliver_all(box) == []
            assert (await box.journeys([bad.id]))[bad.id].destinations["lrs"].state == ("delivered")

    async def test_upstream_dead_letter_kept_for_a_destination_then_pruned(
        self, database: str
    ) -> None:
        """An event [upstream] dead-letters is not waiting there any more (totals), its row
        kept until the destination has it, then pruned; replayed then, it is stored again for
        [upstream] alone."""
        async with postgres_box(database, destinations=plans("lrs"), dedupe_window_s=0.05) as (
            box,
            conn,
        ):
            box.prune_every_s = 0
            (event,) = events(1)
            await box.append([event])
            batch = await box.claim_batch(10, 10_000)
            await box.dead_letter(batch.claim, batch.seqs, "refused", 422, "no")
            assert (await box.stats()).events == 0
            assert await conn.fetchval("SELECT upstream_dead FROM events") is True
            assert await deliver_all(box, "lrs") == [event.id]
            await box.append(events(1))
            await deliver_all(box)  # the acknowledgement prunes
            assert await conn.fetchval("SELECT count(*) FROM events WHERE id = $1", event.id) == 0
            stats = await box.stats()
            assert (stats.events, stats.dead_letters) == (0, 1)
            assert await box.replay_dead_letters(None) == 1
            assert (await box.stats()).events == 1
            assert await deliver_all(box) == [event.id]
            assert event.id not in await deliver_all(box, "lrs")
            assert (await box.stats()).events == 0

    async def test_both_dead_letters_of_a_pruned_event_go_back_once_each(
        self, database: str
    ) -> None:
        """An event dead-lettered by [upstream] and by the destination, its row pruned since:
        replayed, each gets it again once; replayed for the destination first, [upstream]
        takes that row over and the destination still gets it once."""
        for first in (None, "lrs"):
            async with postgres_box(
                database, destinations=plans("lrs", "other"), dedupe_window_s=0.05
            ) as (box, conn):
                box.prune_every_s = 0
                (event,) = events(1)
                await box.append([event])
                mine = await box.claim_batch(10, 10_000)
                await box.dead_letter(mine.claim, mine.seqs, "refused", 422, "no")
                theirs = await box.queue("lrs").claim_batch(10, 10_000)
                await box.queue("lrs").dead_letter(theirs.claim, theirs.seqs, "refused", 400, "")
                await deliver_all(box, "other")
                await box.append(events(1))
                await deliver_all(box)  # prunes: every destination has passed it
                gone = "SELECT count(*) FROM events WHERE id = $1"
                assert await conn.fetchval(gone, event.id) == 0
                if first is not None:
                    assert await box.replay_dead_letters(None, destination=first) == 1
                    assert await box.replay_dead_letters(None) == 1
                else:
                    assert await box.replay_dead_letters(None) == 2
                assert await deliver_all(box) == [event.id]
                got = await deliver_all(box, "lrs")
                assert got.count(event.id) == 1
                assert event.id not in await deliver_all(box, "other")
                assert (await box.stats()).events == 0

    async def test_seqs_no_event_took_are_not_waiting(self, database: str) -> None:
        """Seqs drawn by an ingest that never committed (a replica killed mid-commit), and a
        row stored for another queue alone, are never counted as waiting once the
        destination has the events there are."""
        async with postgres_box(database, destinations=plans("lrs")) as (box, conn):
            await box.append(events(3))
            lost = conn.transaction()
            await lost.start()
            await store_events(conn, [new_id()], [b"{}"], [None], [None], None)
            await lost.rollback()
            await store_events(conn, [new_id()], [b"{}"], [None], [None], None, ["upstream"])
            assert (await box.destination_stats("lrs")).waiting == 3
            assert len(await deliver_all(box, "lrs")) == 3
            assert (await box.destination_stats("lrs")).waiting == 0

    async def test_dead_letters_of_a_removed_destination_are_not_replayed(
        self, database: str
    ) -> None:
        """A destination removed: its state is gone, its dead letters stay, listed, and are
        not replayed (nowhere to go); they can be purged."""
        async with postgres_box(database, destinations=plans("lrs")) as (box, conn):
            await box.append(events(1))
            batch = await box.queue("lrs").claim_batch(10, 10_000)
            await box.queue("lrs").dead_letter(batch.claim, batch.seqs, "refused", 400, "")
        async with open_box_again(database, destinations=[]) as box:
            assert await box.replay_dead_letters(None) == 0
            assert [d.destination for d in await box.dead_letters(10)] == ["lrs"]
            assert await box.purge_dead_letters(None, destination="lrs") == 1
        conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
        try:
            for table in ("destinations", "destination_batches", "destination_attempts"):
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
        finally:
            await conn.close()

    async def test_replicas_starting_together_agree_on_a_new_destination(
        self, database: str
    ) -> None:
        """Replicas that start at once with the same new destination set it up once: one
        head, whatever the order."""
        async with postgres_box(database) as (box, conn):
            await box.append(events(3))
            openings = [open_box_again(database, destinations=plans("lrs")) for _ in range(3)]
            async with contextlib.AsyncExitStack() as stack:
                boxes = await asyncio.gather(*(stack.enter_async_context(o) for o in openings))
                assert await conn.fetchval("SELECT next FROM destinations") == 4
                later = events(2)
                await boxes[0].append(later)
                assert await deliver_all(boxes[1], "lrs") == [e.id for e in later]


def open_box_again(
    database: str, **settings: Any
) -> contextlib.AbstractAsyncContextManager[Outbox]:
    """The PostgreSQL outbox of this database again, as another replica would (not emptied)."""
    return _reopen(Path("/nonexistent"), url=database, **settings)
