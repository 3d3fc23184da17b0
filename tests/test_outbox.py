"""The SQLite outbox, what only it does: the file, its mode and durability settings, its
migrations, pruning, the one-process lock. What every backend does is in
test_outbox_contract.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxLocked, OutboxUnavailable, SchemaTooNew
from caliper_sidecar.outbox import NewEvent, Outbox, OutboxLock, open_outbox, sqlite_outbox
from caliper_sidecar.outbox.grouping import GroupCommit
from caliper_sidecar.outbox.sqlite import storage as sqlite_storage
from caliper_sidecar.outbox.sqlite.schema import VERSION
from caliper_sidecar.outbox.sqlite.storage import (
    CHECKPOINT_AFTER_BYTES,
    CHECKPOINT_AFTER_CHANGES,
    CHECKPOINT_AT_LEAST_EVERY_S,
    SqliteStorage,
    checkpoint_due,
)

from .conftest import eventually, new_id


def events(n: int, size: int = 10) -> list[NewEvent]:
    return [NewEvent(new_id(), b"{" + b"x" * (size - 2) + b"}") for _ in range(n)]


def path_of(box: Outbox) -> Path:
    """The file of an outbox over SQLite."""
    assert isinstance(box.storage, SqliteStorage)
    return box.storage.path


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with sqlite_outbox(
        OutboxSettings(path=str(tmp_path / "outbox.db"), synchronous="normal")
    ) as box:
        yield box


class TestFile:
    async def test_created_owner_only(self, tmp_path: Path) -> None:
        """The outbox file (and its WAL) is readable by its owner only."""
        path = tmp_path / "sub" / "outbox.db"
        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            await box.append(events(1))
            for f in (path, Path(f"{path}-wal")):
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    async def test_wal_and_schema_version(self, outbox: Outbox) -> None:
        """The file is in WAL mode and carries the schema version."""
        conn = sqlite3.connect(path_of(outbox))
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        conn.close()

    @pytest.mark.parametrize(("mode", "level"), [("full", 2), ("normal", 1)])
    async def test_synchronous_applied_to_every_write(
        self, tmp_path: Path, mode: Literal["full", "normal"], level: int
    ) -> None:
        """outbox.synchronous governs every commit: ingest, and delivery outcomes (so that a
        power cut re-sends only what was in flight); reads and checkpoints run at NORMAL.
        (Read on the outbox's own connections, on purpose: a connection's pragmas are seen
        nowhere else, and a power cut cannot be staged in a test.)"""
        async with sqlite_outbox(
            OutboxSettings(path=str(tmp_path / "o.db"), synchronous=mode)
        ) as box:
            storage = box.storage
            assert isinstance(storage, SqliteStorage)
            writer = await storage._writer.run(lambda c: c.execute("PRAGMA synchronous").fetchone())
            assert writer == (level,)
            connections = (
                (storage._reader, 1),
                (storage._checkpointer, 1),
            )
            for conn, expected in connections:
                assert conn is not None
                cur = await conn.execute("PRAGMA synchronous")
                assert (await cur.fetchone()) == (expected,)

    async def test_writes_after_close_say_closed(self, tmp_path: Path) -> None:
        """Every write goes through the writer; once the outbox is closed, each one (a
        delivery outcome, a dead letter, an operator's replay) is refused as `closed`, not as
        a storage error."""
        box = await sqlite_outbox(OutboxSettings(path=str(tmp_path / "o.db"))).open()
        await box.append([NewEvent(new_id(), b"{}")])
        batch = await box.claim_batch(10, 1 << 20)
        await box.close()
        writes = [
            box.record_failure(batch.claim, batch.seqs, "timeout"),
            box.dead_letter(batch.claim, batch.seqs, "refused", 422, "no"),
            box.replay_dead_letters(None),
            box.give_up_platform_job("job", "gone"),
        ]
        for write in writes:
            with pytest.raises(OutboxUnavailable) as refused:
                await write
            assert refused.value.reason == "closed"

    async def test_refuses_a_newer_schema(self, tmp_path: Path) -> None:
        """A file written by a newer release is not touched."""
        path = tmp_path / "o.db"
        conn = sqlite3.connect(path)
        conn.execute(f"PRAGMA user_version = {VERSION + 1}")
        conn.close()
        with pytest.raises(SchemaTooNew, match="newer release"):
            await sqlite_outbox(OutboxSettings(path=str(path))).open()

    async def test_reopen_keeps_events(self, tmp_path: Path) -> None:
        path = tmp_path / "o.db"
        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            await box.append(events(3))
        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            assert (await box.stats()).events == 3


class TestMigration:
    async def test_version_1_file_keeps_everything(self, tmp_path: Path) -> None:
        """A file written by the first release opens in this one: waiting events, dead
        letters, totals and the ids remembered for deduplication all survive."""
        from caliper_sidecar.outbox.sqlite.schema import migrate

        path = tmp_path / "v1.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, upto=1)
        waiting = events(3)
        conn.executemany(
            "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)",
            [(e.id, e.body, len(e.body), time.time()) for e in waiting],
        )
        delivered = new_id()
        conn.execute("INSERT INTO delivered VALUES (?, ?)", (delivered, time.time()))
        conn.close()

        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            stats = await box.stats()
            assert (stats.events, stats.bytes) == (3, sum(len(e.body) for e in waiting))
            assert (await box.append([NewEvent(delivered, b"{}")])).duplicates == 1
            batch = await box.claim_batch(10, 10_000)
            assert [e.id for e in batch.events] == [e.id for e in waiting]
            await box.acknowledge(batch.claim, batch.seqs)
            stats = await box.stats()
            assert (stats.events, stats.bytes, stats.delivered_total) == (0, 0, 3)
            assert (await box.append(waiting[:1])).duplicates == 1
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()

    async def test_version_4_file_gains_destinations(self, tmp_path: Path) -> None:
        """A file of the release before [[destinations]] migrates in place: waiting events,
        dead letters and totals kept, then every destination added gets new events."""
        from caliper_sidecar.outbox import DestinationPlan, open_outbox
        from caliper_sidecar.outbox.sqlite.schema import migrate

        path = tmp_path / "v4.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, upto=4)
        waiting, dead = events(3), events(1)[0]
        conn.executemany(
            "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)",
            [(e.id, e.body, len(e.body), time.time()) for e in waiting],
        )
        conn.execute(
            "INSERT INTO dead_letters (id, body, received_at, reason, attempts, "
            "dead_lettered_at) VALUES (?, ?, ?, 'refused', 1, ?)",
            (dead.id, dead.body, time.time(), time.time()),
        )
        conn.execute("UPDATE totals SET dead_letters = 1, dead_lettered_total = 1")
        conn.close()

        settings = OutboxSettings(path=str(path))
        plans = [DestinationPlan("lrs")]
        async with open_outbox(settings, exclusive=False, destinations=plans) as box:
            stats = await box.stats()
            assert (stats.events, stats.dead_letters, stats.dead_lettered_total) == (3, 1, 1)
            (letter,) = await box.dead_letters(10)
            assert (letter.id, letter.destination) == (dead.id, "upstream")
            assert (await box.append([dead])).duplicates == 1
            later = events(2)
            await box.append(later)
            batch = await box.queue("lrs").claim_batch(10, 10_000)
            assert [e.id for e in batch.events] == [e.id for e in later]
            assert (await box.destination_stats("lrs")).dead_letters == 0
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()

    async def test_version_5_file_gains_marks(self, tmp_path: Path) -> None:
        """A file of the release before marks migrates in place: waiting events (for
        [upstream] and a destination), dead letters and totals kept; then events are
        replayed and marked, and their journeys show it."""
        from caliper_sidecar.outbox import DestinationPlan, Replay, open_outbox
        from caliper_sidecar.outbox.sqlite.schema import migrate

        path = tmp_path / "v5.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, upto=5)
        waiting, dead = events(3), events(1)[0]
        conn.executemany(
            "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)",
            [(e.id, e.body, len(e.body), time.time()) for e in waiting],
        )
        conn.execute("INSERT INTO destinations (name, position) VALUES ('lrs', 0)")
        conn.execute(
            "INSERT INTO dead_letters (id, body, received_at, reason, attempts, "
            "dead_lettered_at) VALUES (?, ?, ?, 'refused', 1, ?)",
            (dead.id, dead.body, time.time(), time.time()),
        )
        conn.close()

        settings = OutboxSettings(path=str(path))
        plans = [DestinationPlan("lrs")]
        async with open_outbox(settings, exclusive=False, destinations=plans) as box:
            stats = await box.stats()
            assert (stats.events, stats.dead_letters, stats.dead_lettered_total) == (3, 1, 1)
            assert (await box.destination_stats("lrs")).waiting == 3
            batch = await box.claim_batch(10, 10_000)
            assert [e.id for e in batch.events] == [e.id for e in waiting]
            theirs = await box.queue("lrs").claim_batch(10, 10_000)
            assert [e.id for e in theirs.events] == [e.id for e in waiting]
            await box.replay([Replay(dead.id, dead.body, ("upstream",))])
            journey = (await box.journeys([dead.id]))[dead.id]
            assert [(m.what, m.destination) for m in journey.marks] == [("replayed", "upstream")]
            assert (await box.stats()).dead_letters == 0
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION == 7
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()

    async def test_version_6_file_drops_the_unique_id_index(self, tmp_path: Path) -> None:
        """A file of the release before ids were indexed late migrates in place: the events
        table loses its UNIQUE index on id, every row's id is in `event_ids`, and what the
        index served still works (deduplication of waiting, delivered and dead-lettered
        ids, journeys with their marks, acknowledgements)."""
        from caliper_sidecar.outbox.sqlite.schema import migrate

        path = tmp_path / "v6.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, upto=6)
        waiting, delivered, dead = events(3), events(1)[0], events(1)[0]
        now = time.time()
        conn.executemany(
            "INSERT INTO events (id, body, size, received_at, delivered_at) VALUES (?, ?, ?, ?, ?)",
            [(e.id, e.body, len(e.body), now, None) for e in waiting]
            + [(delivered.id, b"", 0, now, now)],
        )
        conn.execute(
            "INSERT INTO dead_letters (id, body, received_at, reason, attempts, "
            "dead_lettered_at) VALUES (?, ?, ?, 'refused', 1, ?)",
            (dead.id, dead.body, now, now),
        )
        conn.execute(
            "INSERT INTO marks (id, at, what, destination) VALUES (?, ?, 'verified', 'upstream')",
            (delivered.id, now),
        )
        schema = "SELECT type, name FROM sqlite_schema WHERE type IN ('index', 'trigger')"
        before = set(conn.execute(schema)) - {("index", "sqlite_autoindex_events_1")}
        conn.close()

        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            assert (await box.stats()).events == 3
            for known in (waiting[0], delivered, dead):
                assert (await box.append([known])).duplicates == 1, known.id
            journey = (await box.journeys([delivered.id]))[delivered.id]
            assert [m.what for m in journey.marks] == ["verified"]
            batch = await box.claim_batch(10, 10_000)
            assert [e.id for e in batch.events] == [e.id for e in waiting]
            await box.acknowledge(batch.claim, batch.seqs)
            assert (await box.stats()).events == 0
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert before <= set(conn.execute(schema))  # every index and trigger made again
        indexes = [row[1] for row in conn.execute("PRAGMA index_list(events)")]
        assert not [name for name in indexes if name.startswith("sqlite_autoindex")], indexes
        assert {r[0] for r in conn.execute("SELECT id FROM event_ids")} == {
            e.id for e in [*waiting, delivered]
        }
        conn.close()

    async def test_version_6_file_on_a_disk_too_small_stays_as_it_was(self, tmp_path: Path) -> None:
        """The rebuild of schema 7 needs room about the file's size: without it the start
        fails, naming the outbox and the full disk, and the file is left as it was (one
        transaction); with room again, it migrates."""
        from caliper_sidecar.exceptions import OutboxUnusable
        from caliper_sidecar.outbox.sqlite.schema import migrate

        from .disks import fill_disk, tmpfs

        with tmpfs(tmp_path, "6m", "test_version_6_file_drops_the_unique_id_index") as disk:
            path = disk / "outbox.db"
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA page_size = 1024")
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn, upto=6)
            waiting = events(1000, size=1000)
            conn.executemany(
                "INSERT INTO events (id, body, size, received_at) VALUES (?, ?, ?, ?)",
                [(e.id, e.body, len(e.body), time.time()) for e in waiting],
            )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            filler = disk / "filler"
            fill_disk(filler)
            with filler.open("r+b") as f:  # room for the WAL's first pages, not the rebuild
                f.truncate(filler.stat().st_size - 512 * 1024)

            with pytest.raises(OutboxUnusable, match="full") as failed:
                await sqlite_outbox(OutboxSettings(path=str(path))).open()
            assert str(path) in str(failed.value)
            conn = sqlite3.connect(path)
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
            assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1000
            conn.close()

            filler.unlink()
            async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
                assert (await box.stats()).events == 1000
            conn = sqlite3.connect(path)
            assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
            conn.close()

    async def test_a_command_does_not_migrate_a_file_an_older_run_holds(
        self, tmp_path: Path
    ) -> None:
        """A command of this release (`outbox stats`, say) opening a version-6 file while a
        `run` of the earlier release holds it would rebuild the events table under that
        process: refused, naming the holder; once it has stopped, the file migrates."""
        import sys

        from caliper_sidecar.exceptions import OutboxLocked
        from caliper_sidecar.outbox import open_outbox
        from caliper_sidecar.outbox.sqlite.schema import migrate

        path = tmp_path / "v6.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, upto=6)
        conn.close()
        older_run = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(path),
            stdout=asyncio.subprocess.PIPE,
        )
        settings = OutboxSettings(path=str(path))
        try:
            assert older_run.stdout is not None
            assert await older_run.stdout.readline() == b"held\n"
            with pytest.raises(OutboxLocked, match="earlier release"):
                async with open_outbox(settings, exclusive=False):
                    pass
            conn = sqlite3.connect(path)
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
            conn.close()
        finally:
            older_run.kill()
            await older_run.wait()
        async with open_outbox(settings, exclusive=False) as box:
            assert (await box.stats()).events == 0
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION
        conn.close()


class TestIdsIndexedLate:
    """`events.id` has no index of its own: ingest's rows reach `event_ids` with each
    checkpoint (event_ids.py), and nothing may tell the difference meanwhile."""

    @staticmethod
    def indexed(path: Path) -> set[str]:
        conn = sqlite3.connect(path)
        try:
            return {row[0] for row in conn.execute("SELECT id FROM event_ids")}
        finally:
            conn.close()

    async def test_a_retry_before_its_ids_are_indexed_is_a_duplicate(self, outbox: Outbox) -> None:
        sent = events(3)
        assert (await outbox.append(sent)).accepted == 3
        assert not self.indexed(path_of(outbox)) & {e.id for e in sent}, "indexed already"
        assert (await outbox.append(sent)).duplicates == 3
        assert (await outbox.stats()).events == 3

    async def test_a_journey_finds_an_event_not_yet_indexed(self, outbox: Outbox) -> None:
        (sent,) = events(1)
        await outbox.append([sent])
        assert sent.id not in self.indexed(path_of(outbox)), "indexed already"
        assert (await outbox.journeys([sent.id]))[sent.id].received_at is not None

    async def test_the_index_catches_up(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A quiet outbox's ids are indexed with its checkpoint, at the latest after
        CHECKPOINT_AT_LEAST_EVERY_S (a second here)."""
        monkeypatch.setattr(sqlite_storage, "CHECKPOINT_AT_LEAST_EVERY_S", 1.0)
        sent = events(5)
        await outbox.append(sent)
        await eventually(lambda: {e.id for e in sent} <= self.indexed(path_of(outbox)))

    async def test_a_command_beside_run_leaves_its_tail_alone(self, tmp_path: Path) -> None:
        """A command (stats, journeys: `open_outbox(exclusive=False)`) opened beside a quiet
        `run` finds run's unindexed events without indexing them: that would be a write to
        the card at every look, and a wait for run's write lock."""
        path = tmp_path / "o.db"
        settings = OutboxSettings(path=str(path))
        async with sqlite_outbox(settings) as run:
            sent = events(3)
            await run.append(sent)
            async with open_outbox(settings, exclusive=False) as command:
                assert (await command.stats()).events == 3
                found = await command.journeys([e.id for e in sent])
                assert all(found[e.id].received_at is not None for e in sent)
            assert not {e.id for e in sent} & self.indexed(path), "the command indexed them"
            assert (await run.append(sent)).duplicates == 3

    async def test_a_busy_outbox_is_indexed_within_a_second(
        self, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """CHECKPOINT_AFTER_CHANGES rows make the checkpoint due at the next look, whatever
        the time bound (an hour here)."""
        monkeypatch.setattr(sqlite_storage, "CHECKPOINT_AT_LEAST_EVERY_S", 3600.0)
        sent = events(sqlite_storage.CHECKPOINT_AFTER_CHANGES)
        for i in range(0, len(sent), 100):
            await outbox.append(sent[i : i + 100])
        await eventually(lambda: {e.id for e in sent} <= self.indexed(path_of(outbox)))

    async def test_ids_a_stopped_process_left_unindexed_still_count(self, tmp_path: Path) -> None:
        """A process that stops before indexing (killed, or stopped within the second) leaves
        rows `event_ids` lacks; the next open indexes them before anything else."""
        path = tmp_path / "o.db"
        sent = events(4)
        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            await box.append(sent)
        assert not self.indexed(path) & {e.id for e in sent}, "indexed before the stop"
        async with sqlite_outbox(OutboxSettings(path=str(path))) as box:
            assert {e.id for e in sent} <= self.indexed(path)
            assert (await box.append(sent)).duplicates == 4

    def test_a_row_after_the_newest_was_deleted_is_indexed(self, tmp_path: Path) -> None:
        """SQLite gives a new row the highest seq plus one; had the newest indexed row been
        deleted, the next one would take a seq at or below `upto` and never be indexed.
        `upto` comes down with the deleted rows instead (the trigger ids_indexed_down)."""
        from caliper_sidecar.outbox.sqlite import writes
        from caliper_sidecar.outbox.sqlite.event_ids import index_tail
        from caliper_sidecar.outbox.sqlite.schema import migrate

        conn = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
        migrate(conn)
        first, second = events(1), events(1)
        with writes.immediate(conn):
            writes.insert_appends(conn, [(first, None)], time.time(), 60, 100, 10**6)
            index_tail(conn)
            conn.execute("DELETE FROM events")
        with writes.immediate(conn):
            writes.insert_appends(conn, [(second, None)], time.time(), 60, 100, 10**6)
            index_tail(conn)
        assert [r[0] for r in conn.execute("SELECT id FROM event_ids")] == [second[0].id]
        conn.close()

    async def test_an_id_erased_before_it_was_indexed_is_taken_again(self, outbox: Outbox) -> None:
        """An id the writer still holds as unindexed, whose row is gone (erased, or purged
        from the dead letters), is new: counted as a duplicate it would be lost."""
        (sent,) = events(1)
        await outbox.append([sent])
        await outbox.erase(None, [sent.id])
        assert sent.id not in self.indexed(path_of(outbox)), "indexed already"
        assert (await outbox.append([sent])).accepted == 1
        assert (await outbox.stats()).events == 1

    def test_a_destination_added_after_the_newest_rows_went_counts_no_gap(
        self, tmp_path: Path
    ) -> None:
        """The newest rows delivered and pruned (the table empty), then a destination
        added: the next event is the one it waits for, not every seq ever indexed (which
        would shed real events as lagging, or hold ingest as full)."""
        from caliper_sidecar.outbox import DestinationPlan
        from caliper_sidecar.outbox.sqlite import destinations, writes
        from caliper_sidecar.outbox.sqlite.event_ids import index_tail
        from caliper_sidecar.outbox.sqlite.schema import migrate

        conn = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
        migrate(conn)
        now = time.time()
        with writes.immediate(conn):
            writes.insert_appends(conn, [(events(50), None)], now, 60, 100, 10**6)
            index_tail(conn)
        with writes.immediate(conn):
            conn.execute("UPDATE events SET delivered_at = ?", (now - 1000,))
            writes.prune_delivered(conn, now - 60)
            destinations.set_destinations(conn, [DestinationPlan("lrs", False)])
        for _ in range(2):
            with writes.immediate(conn):
                writes.insert_appends(
                    conn, [(events(1), None)], now, 60, 10, 10**6, claimed={"lrs": set()}
                )
        assert destinations.lags(conn) == [("lrs", 2)]
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
        conn.close()

    async def test_the_window_holds_before_indexing_too(self, tmp_path: Path) -> None:
        """An id delivered longer ago than a short window is new again, indexed or not."""
        path = tmp_path / "o.db"
        async with sqlite_outbox(OutboxSettings(path=str(path), dedupe_window_s=0.05)) as box:
            sent = events(1)
            await box.append(sent)
            batch = await box.claim_batch(10, 10_000)
            await box.acknowledge(batch.claim, batch.seqs)
            await asyncio.sleep(0.1)
            assert sent[0].id not in self.indexed(path), "indexed already"
            assert (await box.append(sent)).accepted == 1

    async def test_an_id_sent_after_the_window_replaces_its_delivered_row(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a UNIQUE index to take it out of the way, the old delivered row goes when
        the id is stored again: one row per id, as before."""
        monkeypatch.setattr(sqlite_storage, "CHECKPOINT_AT_LEAST_EVERY_S", 1.0)
        path = tmp_path / "o.db"
        async with sqlite_outbox(OutboxSettings(path=str(path), dedupe_window_s=0.2)) as box:
            box.prune_every_s = 3600
            sent = events(1)
            await box.append(sent)
            batch = await box.claim_batch(10, 10_000)
            await box.acknowledge(batch.claim, batch.seqs)
            await eventually(lambda: sent[0].id in self.indexed(path))
            await asyncio.sleep(0.3)
            assert (await box.append(sent)).accepted == 1
        conn = sqlite3.connect(path)
        rows = conn.execute("SELECT delivered_at FROM events WHERE id = ?", (sent[0].id,))
        assert rows.fetchall() == [(None,)]
        conn.close()


class TestReadsInOneHop:
    """Every read of the reader connection takes one hop to its thread. Between two hops
    (`execute`, then a fetch) the statement holds the connection's read transaction open,
    and any read run in that gap sees its old snapshot: an [upstream] claim made so after an
    acknowledgement saw the acknowledged events as waiting, their claims released, and sent
    them again (twice in full-suite runs: a batch delivered twice)."""

    class OneHop:
        """The reader connection, with `execute` (the first of two hops) refused."""

        def __init__(self, conn: object) -> None:
            self._conn = conn

        async def execute_fetchall(self, sql: str, parameters: object = ()) -> object:
            return await self._conn.execute_fetchall(sql, parameters)  # type: ignore[attr-defined]

        async def close(self) -> None:
            await self._conn.close()  # type: ignore[attr-defined]

    async def test_every_read_takes_one_hop(self, outbox: Outbox) -> None:
        storage = outbox.storage
        assert isinstance(storage, SqliteStorage)
        storage._reader = self.OneHop(storage._reader)  # type: ignore[assignment]
        sent = events(3)
        await outbox.append(sent)
        batch = await outbox.claim_batch(10, 10_000)
        assert len(batch.seqs) == 3
        await outbox.acknowledge(batch.claim, batch.seqs)
        assert (await outbox.claim_batch(10, 10_000)).seqs == []
        await outbox.stats()
        await outbox.journeys([e.id for e in sent])
        await storage.dead_letters(10, None, None)
        await storage.mark_rows([e.id for e in sent])
        await storage.pending_platform_jobs()
        await storage.job_ids_sent_in("job")
        await storage.job_event_ids("job")


class TestCheckpointsOfAQuietOutbox:
    """A relay taking a few events a second is not checkpointed every second: each
    checkpoint copies the same few pages (the table's last leaf, the queue's, the totals,
    the header) into the file again, bytes an SD card pays for."""

    BOUND = CHECKPOINT_AT_LEAST_EVERY_S

    def test_a_few_changes_wait_for_the_time_bound(self) -> None:
        assert not checkpoint_due(5, 5_000, 1.0, self.BOUND)
        assert not checkpoint_due(5, 5_000, self.BOUND - 1, self.BOUND)
        assert checkpoint_due(5, 5_000, self.BOUND, self.BOUND)

    def test_many_changes_do_not_wait(self) -> None:
        assert checkpoint_due(CHECKPOINT_AFTER_CHANGES, 0, 0.5, self.BOUND)

    def test_large_events_do_not_wait(self) -> None:
        """Few rows, many bytes: the WAL's size is what the bound is for."""
        assert checkpoint_due(4, CHECKPOINT_AFTER_BYTES, 0.5, self.BOUND)

    def test_a_count_started_again_does_not_wait(self) -> None:
        assert checkpoint_due(-3, 0, 0.5, self.BOUND)

    async def test_an_outbox_at_normal_is_checkpointed_every_second(self, tmp_path: Path) -> None:
        """With `synchronous = "normal"` only checkpoints sync the WAL: a quiet outbox of that
        kind keeps its checkpoint every second, or a power cut could take 30 s of events."""
        path = tmp_path / "o.db"
        settings = OutboxSettings(path=str(path), synchronous="normal")
        async with sqlite_outbox(settings) as box:
            sent = events(3)
            await box.append(sent)
            await eventually(lambda: {e.id for e in sent} <= TestIdsIndexedLate.indexed(path), 5)


class TestPruning:
    async def test_delivered_rows_pruned_after_the_window(self, tmp_path: Path) -> None:
        """Delivered events are kept (bodies emptied) for the dedupe window, then removed."""
        async with sqlite_outbox(
            OutboxSettings(path=str(tmp_path / "o.db"), dedupe_window_s=0.2)
        ) as box:
            box.prune_every_s = 0  # every acknowledgement prunes
            first = events(3, size=500)
            await box.append(first)
            batch = await box.claim_batch(10, 100_000)
            await box.acknowledge(batch.claim, batch.seqs)
            conn = sqlite3.connect(path_of(box))
            rows = conn.execute("SELECT length(body), delivered_at IS NOT NULL FROM events")
            assert rows.fetchall() == [(0, 1)] * 3
            kept = "SELECT count(*) FROM events WHERE id IN (SELECT value FROM json_each(?))"

            async def pruned() -> bool:
                await box.append(events(1))
                batch = await box.claim_batch(1, 10_000)
                await box.acknowledge(batch.claim, batch.seqs)
                ids = json.dumps([e.id for e in first])
                return bool(conn.execute(kept, (ids,)).fetchone() == (0,))

            await eventually(pruned)
            conn.close()


class TestLock:
    def test_second_owner_refused(self, tmp_path: Path) -> None:
        """Only one process (or owner) holds an outbox's run lock at a time."""
        path = tmp_path / "o.db"
        with OutboxLock(path), pytest.raises(OutboxLocked, match="in use"):
            OutboxLock(path).acquire()
        with OutboxLock(path):  # released on exit
            pass


class TestGroupCommit:
    """Callers that go away (a client that hangs up mid-request) never stop a commit that
    others share; what they submitted is committed all the same."""

    async def test_callers_that_go_away_leave_the_commit_to_the_others(self) -> None:
        committed: list[int] = []
        release = asyncio.Event()

        async def commit(items: list[int]) -> list[str | OutboxUnavailable]:
            await release.wait()
            committed.extend(items)
            return [f"stored {i}" for i in items]

        group: GroupCommit[int, str] = GroupCommit(commit, "test")
        group.start()
        committing = asyncio.create_task(group.submit(1))
        await asyncio.sleep(0.01)  # its group is being committed
        queued = [asyncio.create_task(group.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        committing.cancel()
        queued[0].cancel()
        release.set()
        assert await queued[1] == "stored 3"
        for gone in (committing, queued[0]):
            with pytest.raises(asyncio.CancelledError):
                await gone
        assert committed == [1, 2, 3]
        await group.close()
