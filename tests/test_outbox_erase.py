"""`Outbox.erase` and `Outbox.forget_erased` on both backends (docs/guarantees.md, "Erasing a
learner"): a learner's events found by actor (the string, or `actor.id`) or by id, wherever
they wait, were kept or died; removed with what journeys are built from; counted per queue;
and, on SQLite, overwritten in the file and its WAL. Real parts: a SQLite file in a temporary
folder, a database of its own on the local PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from caliper_sidecar.outbox import DestinationPlan, Erasure, NewEvent, Outbox
from caliper_sidecar.outbox.records import Erasure as ErasureRecord
from caliper_sidecar.outbox.sqlite.storage import SqliteStorage

from .conftest import make_event
from .outboxes import BACKENDS, fresh_database, open_test_outbox, relation_files_holding

LEARNER = "https://sis.example.edu/users/learner-QX7-erase-me"
CANARY = b"ZEBRA-CANARY-4471"


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def learner_event(as_object: bool = True, **fields: Any) -> NewEvent:
    """An event of the learner (its actor an object with that id, or the bare string), with
    the canary in its content."""
    actor: Any = {"id": LEARNER, "type": "Person"} if as_object else LEARNER
    event = make_event(actor=actor, extensions={"note": CANARY.decode()}, **fields)
    return NewEvent(event["id"], json.dumps(event).encode())


def other_event() -> NewEvent:
    event = make_event(actor={"id": "https://sis.example.edu/users/someone-else"})
    return NewEvent(event["id"], json.dumps(event).encode())


def holding_the_learner(directory: Path, pattern: str) -> list[str]:
    """The names of the files there that hold the learner's id or its events' canary."""
    paths = sorted(directory.glob(pattern))
    return [p.name for p in paths if CANARY in (data := p.read_bytes()) or LEARNER.encode() in data]


async def opened(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, **settings: Any
) -> Any:
    database = request.getfixturevalue("database") if backend == "postgres" else None
    return open_test_outbox(backend, tmp_path, database, **settings)


class TestErase:
    async def test_finds_by_actor_string_and_object_and_removes_them_everywhere(
        self, backend: str, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """The learner's events, whether its actor is a string or an object, are found
        waiting, delivered (body kept) and dead-lettered, counted per queue, and removed;
        the other actor's stay and are sent as before."""
        async with await opened(backend, tmp_path, request) as outbox:
            box: Outbox = outbox
            mine = [learner_event(True), learner_event(False), learner_event(True)]
            others = [other_event(), other_event()]
            await box.append([mine[0], others[0], mine[1]])
            batch = await box.claim_batch(2, 1 << 20)  # mine[0], others[0]
            await box.dead_letter(batch.claim, [batch.seqs[0]], "refused", 422, "no")
            await box.acknowledge(batch.claim, [batch.seqs[1]])
            await box.append([mine[2], others[1]])

            dry = await box.erase(LEARNER, dry_run=True)
            assert dry == ErasureRecord(
                ids=frozenset(e.id for e in mine),
                waiting=2,
                kept=0,
                dead_letters={"upstream": 1},
                delivered_to={},
            )
            assert (await box.journeys([e.id for e in mine])).keys() == {e.id for e in mine}

            erased = await box.erase(LEARNER)
            assert erased == dry
            assert await box.journeys([e.id for e in mine]) == {}
            assert await box.dead_letters(10) == []
            assert await box.erase(LEARNER) == Erasure()
            stats = await box.stats()
            assert (stats.events, stats.dead_letters) == (1, 0)
            left = await box.claim_batch(10, 1 << 20)
            assert [e.id for e in left.events] == [others[1].id]

    async def test_counts_per_destination_and_new_events_still_reach_destinations(
        self, backend: str, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """With a destination, each event counts as delivered, or waiting, in each queue;
        erasing the newest event, which the destination has done, never makes a later event
        take a seq the destination has passed (SQLite: the row stays as a tombstone)."""
        plans = [DestinationPlan("district")]
        async with await opened(backend, tmp_path, request, destinations=plans) as outbox:
            box: Outbox = outbox
            queue = box.queue("district")
            first, third, second, other = (
                learner_event(),
                learner_event(),
                learner_event(False),
                other_event(),
            )
            await box.append([first])
            up = await box.claim_batch(10, 1 << 20)
            await box.acknowledge(up.claim, up.seqs)
            there = await queue.claim_batch(10, 1 << 20)
            await queue.acknowledge(there.claim, there.seqs)
            await box.append([third, other, second])
            up = await box.claim_batch(10, 1 << 20)
            await box.acknowledge(up.claim, up.seqs)
            there = await queue.claim_batch(10, 1 << 20)
            assert [e.id for e in there.events] == [third.id, other.id, second.id]
            await queue.acknowledge(there.claim, there.seqs[1:])
            await queue.release(there.claim, there.seqs[:1])

            found = await box.erase(LEARNER, dry_run=True)
            assert found == ErasureRecord(
                ids=frozenset({first.id, second.id, third.id}),
                waiting=1,
                kept=2,
                dead_letters={},
                delivered_to={"district": 2, "upstream": 3},
            )
            assert await box.erase(LEARNER) == found
            assert await box.journeys([first.id, second.id, third.id]) == {}
            newer = other_event()
            await box.append([newer])
            there = await queue.claim_batch(10, 1 << 20)
            assert [e.id for e in there.events] == [newer.id]
            up = await box.claim_batch(10, 1 << 20)
            assert [e.id for e in up.events] == [newer.id]

    async def test_an_empty_actor_is_refused(self, tmp_path: Path) -> None:
        """An empty actor would match events without one: refused before anything runs."""
        async with open_test_outbox("sqlite", tmp_path) as box:
            with pytest.raises(ValueError, match="empty actor"):
                await box.erase("")

    async def test_an_apps_job_no_longer_lists_erased_ids(
        self, backend: str, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """A job id an app was answered with keeps only its other events' ids."""
        async with await opened(backend, tmp_path, request) as outbox:
            box: Outbox = outbox
            mine, other = learner_event(), other_event()
            await box.append([mine, other], job="job-1")
            await box.erase(LEARNER)
            assert await box.job_event_ids("job-1") == [other.id]


async def without_secure_delete(box: Outbox) -> None:
    """Make the outbox's writer overwrite nothing it deletes, as a SQLite built without
    SQLITE_SECURE_DELETE does (Debian's build has it on by default, which would hide what
    these tests are about)."""
    storage = box.storage
    assert isinstance(storage, SqliteStorage)
    await storage._writer.run(lambda conn: conn.execute("PRAGMA secure_delete = OFF"))


class TestSqliteFiles:
    async def test_the_writes_after_an_erase_zero_as_little_as_before(self, tmp_path: Path) -> None:
        """Erasing overwrites what it deletes, then gives the writer back its own mode
        (FAST: read back as 2, which set as a number would mean ON and write every freed page
        again)."""
        async with open_test_outbox("sqlite", tmp_path) as box:
            storage = box.storage
            assert isinstance(storage, SqliteStorage)
            await box.append([learner_event(), other_event()])
            await box.erase(LEARNER)
            mode = await storage._writer.run(
                lambda conn: conn.execute("PRAGMA secure_delete").fetchone()
            )
            assert mode == (2,)

    async def test_deleted_bodies_are_overwritten_in_the_file_and_the_wal(
        self, tmp_path: Path
    ) -> None:
        """Erasing overwrites what it deletes (secure_delete): checkpointed and truncated,
        neither the file nor the WAL holds the learner's bytes, even without a VACUUM."""
        async with open_test_outbox("sqlite", tmp_path) as box:
            await without_secure_delete(box)
            await box.append([learner_event() for _ in range(20)] + [other_event()])
            assert await box.storage.truncate_log()  # the events are in the file itself
            assert holding_the_learner(tmp_path, "outbox.db") == ["outbox.db"]
            await box.erase(LEARNER)
            assert await box.storage.truncate_log()
            assert holding_the_learner(tmp_path, "outbox.db*") == []

    async def test_bodies_emptied_on_delivery_are_gone_after_forget_erased(
        self, tmp_path: Path
    ) -> None:
        """A delivered event's body is emptied by the sender without overwriting it: only
        compacting the file (forget_erased) takes its bytes out of the free space."""
        async with open_test_outbox("sqlite", tmp_path) as box:
            await without_secure_delete(box)
            events = [learner_event() for _ in range(20)]
            await box.append(events)
            assert await box.storage.truncate_log()  # in the file: the emptying frees pages
            batch = await box.claim_batch(100, 1 << 22)
            await box.acknowledge(batch.claim, batch.seqs)
            await box.append([other_event()])  # the acknowledgement's group is committed
            assert await box.storage.truncate_log()
            assert holding_the_learner(tmp_path, "outbox.db") == ["outbox.db"]
            erased = await box.erase(None, [e.id for e in events])
            assert erased.kept == 20
            assert await box.forget_erased()
            assert holding_the_learner(tmp_path, "outbox.db*") == []

    async def test_a_reader_that_keeps_the_wal_makes_forget_erased_say_so(
        self, tmp_path: Path
    ) -> None:
        """A reader holding a snapshot (as `run` may) keeps the WAL from being truncated:
        forget_erased says so (False) after its tries; once the reader is gone it succeeds."""
        async with open_test_outbox("sqlite", tmp_path) as box:
            await box.append([learner_event(), other_event()])
            await box.erase(LEARNER)
            reader = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
            try:
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM events").fetchone()
                await box.append([other_event()])  # the WAL now has frames the reader lacks
                assert not await box.forget_erased(tries=2, pause_s=0.05)
            finally:
                reader.close()
            assert await box.forget_erased(tries=2, pause_s=0.05)


class TestPostgresFiles:
    async def test_a_batch_a_replica_holds_counts_in_flight(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """Events in a batch a sender has claimed (a live lease) may still be sent: counted
        in flight, for [upstream] and for a destination alike; given back, they are not."""
        url = request.getfixturevalue("database")
        plans = [DestinationPlan("district")]
        async with open_test_outbox("postgres", tmp_path, url, destinations=plans) as box:
            await box.append([learner_event() for _ in range(4)])
            up = await box.claim_batch(2, 1 << 22)
            there = await box.queue("district").claim_batch(3, 1 << 22)
            found = await box.erase(LEARNER, dry_run=True)
            assert (found.waiting, found.in_flight) == (4, 3)
            await box.release(up.claim, up.seqs)
            await box.queue("district").release(there.claim, there.seqs)
            assert (await box.erase(LEARNER)).in_flight == 0

    async def test_rows_a_transaction_still_sees_are_not_copied_by_the_rewrite(
        self, tmp_path: Path, request: pytest.FixtureRequest
    ) -> None:
        """A session that took its snapshot before the erase (a replica's claim under way)
        still sees the deleted rows: the rewrite waits for it to end, and then no relation
        file holds the learner's bytes."""
        url = request.getfixturevalue("database")
        async with open_test_outbox("postgres", tmp_path, url) as box:
            await box.append([learner_event() for _ in range(5)] + [other_event()])
            batch = await box.claim_batch(100, 1 << 22)
            await box.dead_letter(batch.claim, batch.seqs[:2], "refused", 422, "no")
            await box.release(batch.claim, batch.seqs[2:])
            assert await relation_files_holding(url, CANARY)
            older = await asyncpg.connect(url)
            try:
                reading = older.transaction(isolation="repeatable_read")
                await reading.start()
                await older.fetchval("SELECT count(*) FROM caliper_sidecar.dead_letters")
                assert len((await box.erase(LEARNER)).ids) == 5
                forgetting = asyncio.create_task(box.forget_erased())
                await asyncio.sleep(1)
                assert not forgetting.done()
                await reading.commit()
                assert await forgetting
            finally:
                await older.close()
            assert await relation_files_holding(url, CANARY, LEARNER.encode()) == []
