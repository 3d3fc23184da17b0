"""The SQLite outbox: durability settings, group commit, deduplication, claims, dead letters."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.exceptions import OutboxLocked, OutboxUnavailable
from sidecar.outbox import NewEvent, OutboxLock, PlatformJobOutcome, SqliteOutbox
from sidecar.outbox.schema import VERSION, SchemaTooNew

from .conftest import new_id


def events(n: int, size: int = 10) -> list[NewEvent]:
    return [NewEvent(new_id(), b"{" + b"x" * (size - 2) + b"}") for _ in range(n)]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[SqliteOutbox]:
    async with SqliteOutbox(tmp_path / "outbox.db", synchronous="normal") as box:
        yield box


class TestFile:
    async def test_created_owner_only(self, tmp_path: Path) -> None:
        """The outbox file (and its WAL) is readable by its owner only."""
        path = tmp_path / "sub" / "outbox.db"
        async with SqliteOutbox(path) as box:
            await box.append(events(1))
            for f in (path, Path(f"{path}-wal")):
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    async def test_wal_and_schema_version(self, outbox: SqliteOutbox) -> None:
        """The file is in WAL mode and carries the schema version."""
        conn = sqlite3.connect(outbox.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        conn.close()

    @pytest.mark.parametrize(("mode", "level"), [("full", 2), ("normal", 1)])
    async def test_synchronous_applied_to_every_write(
        self, tmp_path: Path, mode: str, level: int
    ) -> None:
        """outbox.synchronous governs every commit: ingest, and delivery outcomes (so that a
        power cut re-sends only what was in flight); reads and checkpoints run at NORMAL."""
        async with SqliteOutbox(tmp_path / "o.db", synchronous=mode) as box:
            connections = (
                (box._ingest, level),
                (box._dispatch, level),
                (box._reader, 1),
                (box._checkpointer, 1),
            )
            for conn, expected in connections:
                assert conn is not None
                cur = await conn.execute("PRAGMA synchronous")
                assert (await cur.fetchone()) == (expected,)

    async def test_refuses_a_newer_schema(self, tmp_path: Path) -> None:
        """A file written by a newer release is not touched."""
        path = tmp_path / "o.db"
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {VERSION + 1}")
        conn.close()
        with pytest.raises(SchemaTooNew, match="newer release"):
            await SqliteOutbox(path).open()

    async def test_reopen_keeps_events(self, tmp_path: Path) -> None:
        path = tmp_path / "o.db"
        async with SqliteOutbox(path) as box:
            await box.append(events(3))
        async with SqliteOutbox(path) as box:
            assert (await box.stats()).events == 3


class TestAppend:
    async def test_counts_new_and_duplicate(self, outbox: SqliteOutbox) -> None:
        """Known ids, and ids repeated within one append, are counted, not stored twice."""
        first = events(3)
        assert (await outbox.append(first)).accepted == 3
        again = [first[0], *events(1), first[1]]
        result = await outbox.append([*again, again[1]])
        assert (result.accepted, result.duplicates) == (1, 3)
        assert (await outbox.stats()).events == 4

    async def test_delivered_ids_are_duplicates_within_the_window(self, tmp_path: Path) -> None:
        """An id delivered within dedupe_window_s is still a duplicate; after it, it is new."""
        async with SqliteOutbox(tmp_path / "o.db", dedupe_window_s=0.3) as box:
            batch = events(1)
            await box.append(batch)
            claimed = await box.claim_batch(10, 10_000)
            await box.acknowledge(claimed.seqs)
            assert (await box.append(batch)).duplicates == 1
            await asyncio.sleep(0.35)
            assert (await box.append(batch)).accepted == 1

    async def test_dead_lettered_ids_are_duplicates(self, outbox: SqliteOutbox) -> None:
        batch = events(1)
        await outbox.append(batch)
        claimed = await outbox.claim_batch(10, 10_000)
        await outbox.dead_letter(claimed.seqs, "refused", 422, "no")
        assert (await outbox.append(batch)).duplicates == 1

    async def test_group_commit(self, outbox: SqliteOutbox) -> None:
        """Concurrent appends share transactions: far fewer commits than requests."""
        requests = 200
        before = outbox.commits
        results = await asyncio.gather(*(outbox.append(events(1)) for _ in range(requests)))
        assert all(r.accepted == 1 for r in results)
        assert (await outbox.stats()).events == requests
        commits = outbox.commits - before
        assert 1 <= commits <= requests // 10, commits

    async def test_full_by_events(self, tmp_path: Path) -> None:
        """Past max_events an append is refused whole (outbox_full) and nothing of it stored."""
        async with SqliteOutbox(tmp_path / "o.db", max_events=5) as box:
            await box.append(events(4))
            with pytest.raises(OutboxUnavailable) as caught:
                await box.append(events(2))
            assert caught.value.reason == "outbox_full"
            assert (await box.stats()).events == 4
            # Duplicates of stored events cost no room; a fitting append still goes in.
            assert (await box.append(events(1))).accepted == 1

    async def test_full_by_bytes_then_room_again(self, tmp_path: Path) -> None:
        """Past max_bytes appends are refused until deliveries make room."""
        async with SqliteOutbox(tmp_path / "o.db", max_bytes=100) as box:
            await box.append(events(2, size=40))
            with pytest.raises(OutboxUnavailable, match="full"):
                await box.append(events(1, size=40))
            claimed = await box.claim_batch(1, 10_000)
            await box.acknowledge(claimed.seqs)
            assert (await box.append(events(1, size=40))).accepted == 1

    async def test_refused_when_closing(self, tmp_path: Path) -> None:
        box = await SqliteOutbox(tmp_path / "o.db").open()
        await box.close()
        with pytest.raises(OutboxUnavailable, match="shutting down"):
            await box.append(events(1))

    async def test_close_commits_what_is_queued(self, tmp_path: Path) -> None:
        """Appends queued when close() is called are committed before it returns."""
        box = await SqliteOutbox(tmp_path / "o.db").open()
        pending = [asyncio.ensure_future(box.append(events(1))) for _ in range(20)]
        await asyncio.sleep(0)
        await box.close()
        assert all(p.result().accepted == 1 for p in pending)
        async with SqliteOutbox(tmp_path / "o.db") as again:
            assert (await again.stats()).events == 20


class TestClaims:
    async def test_oldest_first_within_count(self, outbox: SqliteOutbox) -> None:
        stored = events(5)
        await outbox.append(stored)
        batch = await outbox.claim_batch(3, 10_000)
        assert [e.id for e in batch.events] == [e.id for e in stored[:3]]
        assert batch.full

    async def test_byte_budget_counts_commas(self, outbox: SqliteOutbox) -> None:
        """A batch's serialized events (with the commas between them) fit max_bytes."""
        await outbox.append(events(5, size=10))
        batch = await outbox.claim_batch(100, 32)  # 10 + 1 + 10 + 1 + 10 = 32
        assert len(batch.events) == 3
        assert batch.full

    async def test_one_oversized_event_still_goes_alone(self, outbox: SqliteOutbox) -> None:
        await outbox.append(events(2, size=50))
        batch = await outbox.claim_batch(100, 10)
        assert len(batch.events) == 1

    async def test_no_event_in_two_batches(self, outbox: SqliteOutbox) -> None:
        """Claimed events are not claimed again until released or failed."""
        await outbox.append(events(4))
        a = await outbox.claim_batch(2, 10_000)
        b = await outbox.claim_batch(2, 10_000)
        assert not set(a.seqs) & set(b.seqs)
        assert not (await outbox.claim_batch(2, 10_000)).events
        await outbox.release(a.seqs)
        assert (await outbox.claim_batch(2, 10_000)).seqs == a.seqs

    async def test_partial_batch_is_not_full(self, outbox: SqliteOutbox) -> None:
        await outbox.append(events(2))
        batch = await outbox.claim_batch(10, 10_000)
        assert len(batch.events) == 2
        assert not batch.full

    async def test_failure_counts_attempts_and_releases(self, outbox: SqliteOutbox) -> None:
        await outbox.append(events(1))
        batch = await outbox.claim_batch(1, 10_000)
        await outbox.record_failure(batch.seqs, "HTTP 503")
        again = await outbox.claim_batch(1, 10_000)
        assert again.events[0].attempts == 1
        assert again.events[0].first_attempt_at is not None

    async def test_acknowledge_removes_and_counts(self, outbox: SqliteOutbox) -> None:
        await outbox.append(events(3))
        batch = await outbox.claim_batch(2, 10_000)
        await outbox.acknowledge(batch.seqs)
        stats = await outbox.stats()
        assert (stats.events, stats.delivered_total) == (1, 2)

    async def test_wait_appended_wakes_on_commit(self, outbox: SqliteOutbox) -> None:
        await outbox.claim_batch(1, 100)
        waiter = asyncio.ensure_future(outbox.wait_appended(5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        started = time.monotonic()
        await outbox.append(events(1))
        await waiter
        assert time.monotonic() - started < 5


class TestDeadLetters:
    async def test_dead_letter_list_replay_purge(self, outbox: SqliteOutbox) -> None:
        """Dead letters keep the reason; replay puts them back; purge deletes them."""
        stored = events(3)
        await outbox.append(stored)
        batch = await outbox.claim_batch(3, 10_000)
        await outbox.dead_letter(batch.seqs, "refused", 422, '{"error": "bad"}')
        dead = await outbox.dead_letters(10)
        assert [d.id for d in dead] == [e.id for e in stored]
        assert dead[0].status == 422
        assert dead[0].attempts == 1
        assert dead[0].body == stored[0].body
        assert [d.id for d in await outbox.dead_letters(10, after=stored[0].id)] == [
            e.id for e in stored[1:]
        ]
        assert await outbox.replay_dead_letters([stored[0].id]) == 1
        stats = await outbox.stats()
        assert (stats.events, stats.dead_letters, stats.dead_lettered_total) == (1, 2, 3)
        assert await outbox.purge_dead_letters(None) == 2
        assert (await outbox.stats()).dead_letters == 0


class TestMigration:
    async def test_version_1_file_keeps_everything(self, tmp_path: Path) -> None:
        """A file written by the first release opens in this one: waiting events, dead
        letters, totals and the ids remembered for deduplication all survive."""
        from sidecar.outbox.schema import MIGRATIONS, _statements

        path = tmp_path / "v1.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in _statements(MIGRATIONS[0]):
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        waiting = events(3)
        conn.executemany(
            "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)",
            [(e.id, e.body, len(e.body), time.time()) for e in waiting],
        )
        delivered = new_id()
        conn.execute("INSERT INTO delivered VALUES (?, ?)", (delivered, time.time()))
        conn.close()

        async with SqliteOutbox(path) as box:
            stats = await box.stats()
            assert (stats.events, stats.bytes) == (3, sum(len(e.body) for e in waiting))
            assert (await box.append([NewEvent(delivered, b"{}")])).duplicates == 1
            batch = await box.claim_batch(10, 10_000)
            assert [e.id for e in batch.events] == [e.id for e in waiting]
            await box.acknowledge(batch.seqs)
            stats = await box.stats()
            assert (stats.events, stats.bytes, stats.delivered_total) == (0, 0, 3)
            assert (await box.append(waiting[:1])).duplicates == 1
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()


class TestPruning:
    async def test_delivered_rows_pruned_after_the_window(self, tmp_path: Path) -> None:
        """Delivered events are kept (bodies emptied) for the dedupe window, then removed."""
        async with SqliteOutbox(tmp_path / "o.db", dedupe_window_s=0.2) as box:
            await box.append(events(3, size=500))
            batch = await box.claim_batch(10, 100_000)
            await box.acknowledge(batch.seqs)
            conn = sqlite3.connect(box.path)
            rows = conn.execute("SELECT length(body), delivered_at IS NOT NULL FROM events")
            assert rows.fetchall() == [(0, 1)] * 3
            await asyncio.sleep(0.25)
            box._last_prune = float("-inf")  # the next acknowledgement prunes
            await box.append(events(1))
            await box.acknowledge((await box.claim_batch(1, 10_000)).seqs)
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
            conn.close()


class TestLock:
    def test_second_owner_refused(self, tmp_path: Path) -> None:
        """Only one process (or owner) holds an outbox's run lock at a time."""
        path = tmp_path / "o.db"
        with OutboxLock(path), pytest.raises(OutboxLocked, match="in use"):
            OutboxLock(path).acquire()
        with OutboxLock(path):  # released on exit
            pass


class TestPlatformJobs:
    """Events the platform took into a processing job, until the job's word is applied."""

    async def test_acknowledged_into_a_job_keeps_the_body(self, outbox: SqliteOutbox) -> None:
        """An event acknowledged with a platform job waits for it with its body, out of the
        queue's counts but never pruned while the job is followed."""
        await outbox.append(events(2))
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.seqs, "job-1")
        assert (await outbox.stats()).events == 0
        assert await outbox.pending_platform_jobs() == ["job-1"]
        journeys = await outbox.journeys([e.id for e in batch.events])
        assert {j.state for j in journeys.values()} == {"awaiting_confirmation"}
        assert await outbox.job_ids_sent_in("job-1") == [e.id for e in batch.events]

    async def test_failed_job_dead_letters_named_requeues_the_rest(
        self, outbox: SqliteOutbox
    ) -> None:
        """A failed job: processed events confirmed, the named one dead-lettered (body kept),
        the one neither processed nor named back in the queue, counts restored."""
        await outbox.append(events(3))
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.seqs, "job-2")
        done, bad, again = (e.id for e in batch.events)
        outcome = PlatformJobOutcome(True, f"{bad} broke", {done: "41"}, frozenset({bad}))
        assert await outbox.finish_platform_job("job-2", outcome) == 1
        journeys = await outbox.journeys([done, bad, again])
        assert journeys[done].state == "confirmed"
        assert journeys[done].platform_id == "41"
        assert journeys[bad].state == "dead_lettered"
        assert journeys[again].state == "waiting"
        stats = await outbox.stats()
        assert (stats.events, stats.dead_letters, stats.platform_jobs) == (1, 1, {})
        (dead,) = await outbox.dead_letters(10)
        assert (dead.reason, dead.response, dead.body) == (
            "platform_failed",
            f"{bad} broke",
            b"{xxxxxxxx}",
        )
        (resent,) = (await outbox.claim_batch(10, 10_000)).events
        assert resent.id == again

    async def test_failed_job_naming_none_dead_letters_all_unprocessed(
        self, outbox: SqliteOutbox
    ) -> None:
        await outbox.append(events(2))
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.seqs, "job-3")
        outcome = PlatformJobOutcome(True, "the job crashed")
        assert await outbox.finish_platform_job("job-3", outcome) == 2

    async def test_given_up_jobs_are_counted_and_not_followed(self, outbox: SqliteOutbox) -> None:
        await outbox.append(events(1))
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.seqs, "job-4")
        await outbox.give_up_platform_job("job-4", "never finished")
        assert await outbox.pending_platform_jobs() == []
        assert (await outbox.stats()).platform_jobs == {"unconfirmed": 1}
        (journey,) = (await outbox.journeys([batch.events[0].id])).values()
        assert journey.state == "unconfirmed"

    async def test_app_jobs_list_the_request_s_ids(self, outbox: SqliteOutbox) -> None:
        """A job recorded with an append lists every event of the request, duplicates too."""
        first = events(2)
        await outbox.append(first)
        await outbox.append([first[0], *events(1)], job="app-job")
        ids = await outbox.job_event_ids("app-job")
        assert ids is not None
        assert ids[0] == first[0].id
        assert len(ids) == 2
        assert await outbox.job_event_ids("unknown") is None
