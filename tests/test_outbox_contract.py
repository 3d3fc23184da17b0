"""The outbox contract: what every backend (SQLite, PostgreSQL) promises the receiver and the
dispatcher. Each test runs against each backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox import (
    NewEvent,
    Outbox,
    PlatformJobOutcome,
    open_outbox,
)
from caliper_sidecar.outbox.postgres import bodies
from caliper_sidecar.outbox.postgres.listen import LISTENER_NAME
from caliper_sidecar.outbox.postgres.schema import BODIES_SPAN, INGEST_LOCK, SCHEMA
from caliper_sidecar.outbox.postgres.sessions import session_settings
from caliper_sidecar.outbox.postgres.storage import PostgresStorage
from caliper_sidecar.outbox.postgres.writes import store_events

from .conftest import eventually, new_id
from .outboxes import BACKENDS, fresh_database, open_test_outbox


def events(n: int, size: int = 10) -> list[NewEvent]:
    return [NewEvent(new_id(), b"{" + b"x" * (size - 2) + b"}") for _ in range(n)]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """One PostgreSQL database for this module's tests (emptied before each)."""
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
async def outbox(
    request: pytest.FixtureRequest, tmp_path: Any, database_if_needed: str | None
) -> AsyncIterator[Outbox]:
    async with open_test_outbox(request.param, tmp_path, database_if_needed) as box:
        yield box


@pytest.fixture
async def database_if_needed(request: pytest.FixtureRequest) -> str | None:
    """The module's database for PostgreSQL tests; SQLite ones need none (and run without a
    server)."""
    params = request.node.callspec.params
    backend = params.get("outbox") or params.get("outbox_limited") or params.get("open_box")
    if backend != "postgres":
        return None
    url: str = request.getfixturevalue("database")
    return url


class TestAppend:
    async def test_append_then_claim_in_order(self, outbox: Outbox) -> None:
        """Appended events are claimed oldest first, bodies as appended."""
        new = events(5)
        assert (await outbox.append(new)).accepted == 5
        batch = await outbox.claim_batch(10, 10_000)
        assert [e.id for e in batch.events] == [e.id for e in new]
        assert [e.body for e in batch.events] == [e.body for e in new]

    async def test_duplicates_are_counted_not_stored(self, outbox: Outbox) -> None:
        """An id already waiting, or in the same request twice, is a duplicate."""
        first = events(3)
        await outbox.append(first)
        again = [first[0], *events(1), first[1]]
        result = await outbox.append(again)
        assert (result.accepted, result.duplicates) == (1, 2)
        assert (await outbox.stats()).events == 4

    async def test_delivered_ids_stay_duplicates(self, outbox: Outbox) -> None:
        new = events(2)
        await outbox.append(new)
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.claim, batch.seqs)
        assert (await outbox.append(new)).duplicates == 2

    async def test_dead_lettered_ids_stay_duplicates(self, outbox: Outbox) -> None:
        new = events(1)
        await outbox.append(new)
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.dead_letter(batch.claim, batch.seqs, "refused", 422, "no")
        assert (await outbox.append(new)).duplicates == 1

    async def test_concurrent_appends_all_commit(self, outbox: Outbox) -> None:
        """Many appends at once (a group commit) each get their own answer."""
        results = await asyncio.gather(*(outbox.append(events(3)) for _ in range(20)))
        assert sum(r.accepted for r in results) == 60
        assert (await outbox.stats()).events == 60

    async def test_full_outbox_refuses_whole_appends(self, outbox_limited: Outbox) -> None:
        await outbox_limited.append(events(4))
        with pytest.raises(OutboxUnavailable) as refused:
            await outbox_limited.append(events(2))
        assert refused.value.reason == "outbox_full"
        assert (await outbox_limited.stats()).events == 4


@pytest.fixture(params=BACKENDS)
async def outbox_limited(
    request: pytest.FixtureRequest, tmp_path: Any, database_if_needed: str | None
) -> AsyncIterator[Outbox]:
    async with open_test_outbox(request.param, tmp_path, database_if_needed, max_events=5) as box:
        yield box


class TestClaims:
    async def test_claimed_events_are_not_claimed_twice(self, outbox: Outbox) -> None:
        await outbox.append(events(4))
        a = await outbox.claim_batch(2, 10_000)
        b = await outbox.claim_batch(2, 10_000)
        assert set(a.seqs).isdisjoint(b.seqs)
        assert not (await outbox.claim_batch(2, 10_000)).events
        await outbox.release(a.claim, a.seqs)
        assert (await outbox.claim_batch(2, 10_000)).seqs == a.seqs

    async def test_byte_limit_and_at_least_one(self, outbox: Outbox) -> None:
        """A batch stays within the byte limit (commas counted), but holds at least one."""
        await outbox.append(events(3, size=10))
        batch = await outbox.claim_batch(100, 21)  # 10 + 1 + 10
        assert len(batch.events) == 2
        assert batch.full
        await outbox.release(batch.claim, batch.seqs)
        alone = await outbox.claim_batch(100, 5)
        assert len(alone.events) == 1

    async def test_batches_never_mix_sensors_and_every_event_is_claimed(
        self, outbox: Outbox
    ) -> None:
        """A batch holds the events of one sensor (in receive order); those of another passed
        over on the way are claimed later, none lost and none twice."""
        sent = [
            NewEvent(new_id(), b"{}", sensor=sensor)
            for sensor in ["a", "b", "a", None, "a", "b", "b", None, "a"]
        ]
        await outbox.append(sent)
        claimed: list[list[str]] = []
        while (batch := await outbox.claim_batch(3, 10_000)).events:
            assert len({e.sensor for e in batch.events}) == 1
            assert batch.seqs == sorted(batch.seqs)
            claimed.append([e.id for e in batch.events])
            await outbox.acknowledge(batch.claim, batch.seqs)
        ids = [i for batch in claimed for i in batch]
        assert sorted(ids) == sorted(e.id for e in sent)
        assert claimed[0] == [sent[0].id, sent[2].id]  # of the first 3 looked at

    async def test_linger_is_decided_in_the_claim(self, outbox: Outbox) -> None:
        """A partial batch younger than the linger is not claimed; the answer says when."""
        await outbox.append(events(2))
        early = await outbox.claim_batch(10, 10_000, linger_s=30)
        assert early.events == []
        assert early.ready_in is not None
        assert 0 < early.ready_in <= 30
        full = await outbox.claim_batch(2, 10_000, linger_s=30)
        assert len(full.events) == 2  # a full batch goes at once

    async def test_outcome_of_a_lost_claim_is_not_applied(self, outbox: Outbox) -> None:
        """Fencing: once a claim is released and the events claimed again, an outcome under
        the old claim is refused; the new holder's stands."""
        await outbox.append(events(2))
        old = await outbox.claim_batch(10, 10_000)
        await outbox.release(old.claim, old.seqs)
        new = await outbox.claim_batch(10, 10_000)
        assert new.seqs == old.seqs
        await outbox.acknowledge(old.claim, old.seqs)
        await outbox.dead_letter(old.claim, old.seqs, "refused", 422, "stale")
        stats = await outbox.stats()
        assert (stats.events, stats.dead_letters, stats.delivered_total) == (2, 0, 0)
        await outbox.acknowledge(new.claim, new.seqs)
        assert (await outbox.stats()).delivered_total == 2

    async def test_failure_counts_an_attempt_and_requeues(self, outbox: Outbox) -> None:
        await outbox.append(events(1))
        batch = await outbox.claim_batch(1, 10_000)
        await outbox.record_failure(batch.claim, batch.seqs, "HTTP 503")
        again = await outbox.claim_batch(1, 10_000)
        assert again.events[0].attempts == 1
        assert again.events[0].first_attempt_at is not None

    async def test_wait_appended_wakes_on_append(self, outbox: Outbox) -> None:
        await outbox.claim_batch(1, 10_000)
        waiting = asyncio.ensure_future(outbox.wait_appended(10))
        await asyncio.sleep(0)  # it waits now
        await outbox.append(events(1))
        await asyncio.wait_for(waiting, 5)


class TestDeadLetters:
    async def test_dead_letter_replay_purge(self, outbox: Outbox) -> None:
        new = events(3)
        await outbox.append(new)
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.dead_letter(batch.claim, batch.seqs, "refused", 422, '{"error": "bad"}')
        listed = await outbox.dead_letters(10, None)
        assert [d.id for d in listed] == [e.id for e in new]
        assert (listed[0].reason, listed[0].status, listed[0].attempts) == ("refused", 422, 1)
        assert [d.id for d in await outbox.dead_letters(10, listed[0].id)] == [
            e.id for e in new[1:]
        ]
        seen: list[int] = []
        assert await outbox.replay_dead_letters([new[0].id], progress=seen.append) == 1
        assert seen == [1]
        assert (await outbox.claim_batch(10, 10_000)).events[0].id == new[0].id
        assert await outbox.purge_dead_letters(None) == 2
        stats = await outbox.stats()
        assert (stats.dead_letters, stats.dead_lettered_total) == (0, 3)


class TestStats:
    async def test_counts_follow_the_events(self, outbox: Outbox) -> None:
        await outbox.append(events(5, size=10))
        stats = await outbox.stats()
        assert (stats.events, stats.bytes) == (5, 50)
        assert stats.oldest_received_at is not None
        batch = await outbox.claim_batch(2, 10_000)
        await outbox.acknowledge(batch.claim, batch.seqs)
        stats = await outbox.stats()
        assert (stats.events, stats.bytes, stats.delivered_total) == (3, 30, 2)


class TestPlatformJobs:
    async def test_job_lifecycle(self, outbox: Outbox) -> None:
        """Acknowledged into a platform job, the events wait with their bodies; a failed job
        confirms what it processed, dead-letters what it names, and queues the rest again."""
        await outbox.append(events(3))
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.claim, batch.seqs, "job-1")
        assert await outbox.pending_platform_jobs() == ["job-1"]
        done, bad, again = (e.id for e in batch.events)
        assert await outbox.job_ids_sent_in("job-1") == [done, bad, again]
        outcome = PlatformJobOutcome(True, f"{bad} broke", {done: "41"}, frozenset({bad}))
        assert await outbox.finish_platform_job("job-1", outcome) == 1
        journeys = await outbox.journeys([done, bad, again])
        assert {i: j.state for i, j in journeys.items()} == {
            done: "confirmed",
            bad: "dead_lettered",
            again: "waiting",
        }
        assert journeys[done].platform_id == "41"
        stats = await outbox.stats()
        assert (stats.events, stats.dead_letters) == (1, 1)

    async def test_app_jobs(self, outbox: Outbox) -> None:
        new = events(2)
        await outbox.append(new, job="app-job")
        assert await outbox.job_event_ids("app-job") == [e.id for e in new]
        assert await outbox.job_event_ids("nope") is None

    async def test_given_up_jobs(self, outbox: Outbox) -> None:
        await outbox.append(events(1))
        batch = await outbox.claim_batch(10, 10_000)
        await outbox.acknowledge(batch.claim, batch.seqs, "job-2")
        await outbox.platform_job_polled("job-2", "active", None)
        await outbox.give_up_platform_job("job-2", "never finished")
        assert await outbox.pending_platform_jobs() == []
        assert (await outbox.stats()).platform_jobs == {"unconfirmed": 1}


class TestPostgresClaims:
    async def test_an_expired_lease_before_where_claims_got_to_is_claimed_in_a_backlog(
        self, database: str
    ) -> None:
        """Through a backlog a claim starts where the replica's last one ended; what waits
        before that point (here another replica's claim, its lease expired) is still claimed
        while the backlog lasts, not only once it is gone."""
        async with open_test_outbox("postgres", Path("/nonexistent"), database) as a:
            await a.append(events(30))
            settings = OutboxSettings(url=database)
            b = await Outbox(PostgresStorage(settings, lease_s=0.2), settings).open()
            try:
                lost = await b.claim_batch(10, 100_000)  # never acknowledged: b "died"
            finally:
                await b.close()
            taken: list[int] = []

            async def taken_over() -> bool:
                await a.append(events(10))  # the backlog lasts: every claim is full
                batch = await a.claim_batch(10, 100_000)
                assert batch.full
                await a.acknowledge(batch.claim, batch.seqs)
                taken.extend(batch.seqs)
                return set(lost.seqs) <= set(taken)

            await eventually(taken_over, timeout=15)

    async def test_an_event_that_commits_late_is_never_passed_over(self, database: str) -> None:
        """A claim takes the events after the head and moves it past them; an event that drew
        a lower seq and committed after that claim would be passed over for good. Ingest
        commits one group at a time for that: here a group holds its transaction open (an
        ingest slow to commit), another replica's append waits for it instead of committing
        a higher seq first, and both events are claimed."""
        async with (
            open_test_outbox("postgres", Path("/nonexistent"), database) as box,
            open_test_outbox("postgres", Path("/nonexistent"), database) as other,
        ):
            await box.append(events(1))  # partitions made; claimed below with the others
            late, early = events(1)[0], events(1)[0]
            conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
            try:
                slow = conn.transaction()
                await slow.start()
                await store_events(conn, [late.id], [late.body], [None], [None], None)
                appending = asyncio.ensure_future(other.append([early]))

                async def committed_or_waiting() -> bool:
                    return appending.done() or await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM pg_locks "
                        "WHERE locktype = 'advisory' AND NOT granted)"
                    )

                await eventually(committed_or_waiting)
                first = await box.claim_batch(10, 100_000)
                await box.acknowledge(first.claim, first.seqs)
                await slow.commit()
            finally:
                await conn.close()
            await appending
            rest = await box.claim_batch(10, 100_000)
            claimed = [e.id for e in first.events + rest.events]
            assert late.id in claimed
            assert early.id in claimed
            assert (await box.stats()).events == len(rest.events)

    async def test_delivered_bodies_give_their_space_back(self, database: str) -> None:
        """Bodies are stored in partitions of BODIES_SPAN seqs; once nothing in a partition
        waits it is dropped (or emptied), so what was delivered gives its disk back without a
        vacuum, while the waiting events keep theirs."""
        async with open_test_outbox(
            "postgres", Path("/nonexistent"), database, max_events=10**6
        ) as box:
            assert isinstance(box.storage, PostgresStorage)
            await box.append(events(BODIES_SPAN + 500, size=200))
            while (batch := await box.claim_batch(1000, 10**7)).events:
                await box.acknowledge(batch.claim, batch.seqs)
            waiting = events(3)
            await box.append(waiting)

            async def bodies() -> tuple[int, int]:
                conn = await asyncpg.connect(database)
                try:
                    count, size = await conn.fetchrow(
                        "SELECT count(*), sum(pg_relation_size(relid)) FROM pg_partition_tree("
                        f"'{SCHEMA}.bodies') WHERE isleaf AND pg_relation_size(relid) > 0"
                    )
                finally:
                    await conn.close()
                return int(count), int(size or 0)

            async def given_back() -> bool:
                await box.claim_batch(1000, 10**7, linger_s=60)  # looks, claims nothing
                return (await bodies())[0] <= 1

            await eventually(given_back, timeout=10)
            # The full partition (16,384 bodies of 200 bytes) is gone; the one being filled
            # keeps its 500 delivered bodies while the three waiting events are in it.
            assert (await bodies())[1] < 1 << 20
            claimed = await box.claim_batch(10, 100_000)
            assert [e.id for e in claimed.events] == [e.id for e in waiting]

    async def test_replicas_give_the_space_back_together(self, database: str) -> None:
        """Two replicas draining one backlog both drop and empty partitions as they go; one
        may find a partition the other just dropped, which is no error."""
        async with (
            open_test_outbox("postgres", Path("/nonexistent"), database, max_events=10**6) as a,
            open_test_outbox("postgres", Path("/nonexistent"), database, max_events=10**6) as b,
        ):
            await a.append(events(3 * BODIES_SPAN, size=100))

            async def drain(box: Outbox) -> None:
                while (batch := await box.claim_batch(500, 10**7)).events:
                    await box.acknowledge(batch.claim, batch.seqs)

            with structlog.testing.capture_logs() as logs:
                await asyncio.gather(drain(a), drain(b), drain(a), drain(b))

                async def given_back() -> bool:
                    await asyncio.gather(drain(a), drain(b))  # claims nothing: housekeeping
                    conn = await asyncpg.connect(database)
                    try:
                        left = await conn.fetchval(
                            "SELECT sum(pg_relation_size(relid)) "
                            f"FROM pg_partition_tree('{SCHEMA}.bodies') WHERE isleaf"
                        )
                    finally:
                        await conn.close()
                    # (seqs start at 1: the last event is alone in the partition being filled,
                    # which is kept until it holds TRUNCATE_AT bytes)
                    return bool(left < 64 * 1024)

                await eventually(given_back, timeout=15)
            assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
            assert (await a.stats()).delivered_total == 3 * BODIES_SPAN

    async def test_a_partition_another_replica_dropped_meanwhile_is_no_error(
        self, database: str
    ) -> None:
        """Between listing the partitions and emptying one, another replica may drop it: the
        look and the TRUNCATE find it gone and say so, nothing raised."""
        async with open_test_outbox("postgres", Path("/nonexistent"), database):
            conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
            try:
                gone = 10**6  # a partition that does not exist
                assert await bodies._worth_emptying(conn, gone, 0) is False
                assert await bodies._empty(conn, gone, None) is False
            finally:
                await conn.close()

    async def test_seqs_drawn_past_the_partitions_made_are_stored(self, database: str) -> None:
        """Partitions of `bodies` are made ahead of the seqs this replica has seen; when other
        replicas drew more meanwhile, an ingest finds no partition for its rows, makes them and
        stores its events (the first try is not the app's 503)."""
        async with open_test_outbox("postgres", Path("/nonexistent"), database) as box:
            await box.append(events(1))
            conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
            try:  # as if other replicas had stored three partitions' worth meanwhile
                await conn.execute(
                    "SELECT setval('events_seq_seq', nextval('events_seq_seq') + $1)",
                    3 * BODIES_SPAN,
                )
            finally:
                await conn.close()
            later = events(2)
            assert (await box.append(later)).accepted == 2
            claimed = await box.claim_batch(10, 100_000)
            assert [e.id for e in claimed.events][-2:] == [e.id for e in later]

    async def test_delivered_events_are_pruned_after_the_window(self, database: str) -> None:
        """Delivered events are kept for the dedupe window, then removed with their sent rows
        (the totals unchanged: they were no longer waiting)."""
        async with open_test_outbox(
            "postgres", Path("/nonexistent"), database, dedupe_window_s=0.2
        ) as box:
            assert isinstance(box.storage, PostgresStorage)
            box.prune_every_s = 0  # every acknowledgement group prunes
            first = events(3)
            await box.append(first)
            batch = await box.claim_batch(10, 100_000)
            await box.acknowledge(batch.claim, batch.seqs)
            conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
            try:

                async def pruned() -> bool:
                    more = await box.claim_batch(1, 10_000)
                    if more.events:
                        await box.acknowledge(more.claim, more.seqs)
                    else:
                        await box.append(events(1))
                    kept = await conn.fetchval(
                        "SELECT count(*) FROM events WHERE id = ANY($1::text[])",
                        [e.id for e in first],
                    )
                    return bool(kept == 0)

                await eventually(pruned)
                assert not await conn.fetchval(
                    "SELECT count(*) FROM sent WHERE seqs && $1::bigint[]", batch.seqs
                )
            finally:
                await conn.close()
            stats = await box.stats()
            assert stats.events in (0, 1)  # the one appended last may wait
            assert stats.delivered_total >= 3


class TestPostgresTotals:
    async def test_totals_hold_for_statements_from_any_session(self, database: str) -> None:
        """Rows written by a session without the sidecar's search_path (an operator's psql, a
        bulk COPY) still keep the totals right."""
        async with open_test_outbox("postgres", Path("/nonexistent"), database) as box:
            conn = await asyncpg.connect(database)
            try:
                await conn.copy_records_to_table(
                    "events",
                    schema_name=SCHEMA,
                    records=[(new_id(), 2, 0.0) for _ in range(3)],
                    columns=["id", "size", "received_at"],
                )
            finally:
                await conn.close()
            assert (await box.stats()).events == 3

    async def test_replicas_acknowledging_at_once_never_deadlock(self, database: str) -> None:
        """Two replicas, four deliveries each, claiming and acknowledging as fast as they can:
        every acknowledgement commits (the acknowledgements of concurrent deliveries share a
        transaction; when each of its statements counted into a random shard of the totals,
        two such transactions deadlocked, and the loser's events were sent again)."""
        async with (
            open_test_outbox("postgres", Path("/nonexistent"), database) as one,
            open_test_outbox("postgres", Path("/nonexistent"), database) as two,
        ):
            await one.append(events(6000))

            async def deliver(box: Outbox) -> None:
                while batch := await box.claim_batch(10, 100_000):
                    if not batch.events:
                        return
                    await box.acknowledge(batch.claim, batch.seqs)

            await asyncio.gather(*(deliver(box) for box in (one, two) for _ in range(4)))
            stats = await one.stats()
            assert (stats.events, stats.delivered_total) == (0, 6000)

    async def test_the_listen_connection_comes_back(self, database: str) -> None:
        """After its LISTEN connection is cut (a PostgreSQL restart does the same to every
        connection), the outbox listens again, and an append by another process wakes it."""
        async with (
            open_test_outbox("postgres", Path("/nonexistent"), database) as box,
            open_test_outbox("postgres", Path("/nonexistent"), database) as other,
        ):
            admin = await asyncpg.connect(database)
            try:
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1 AND datname = current_database()",
                    LISTENER_NAME,
                )
                assert killed == 2
                await eventually(lambda: _listeners(admin, 2))
            finally:
                await admin.close()
            await box.claim_batch(10, 10_000)  # clears what it was woken for
            waiting = asyncio.ensure_future(box.wait_appended(30))
            await asyncio.sleep(0)  # it waits now
            await other.append(events(1))
            async with asyncio.timeout(10):
                await waiting  # woken by the NOTIFY, long before the 30 s


class TestPostgresSessions:
    async def test_ingest_behind_a_lock_never_let_go_is_storage_busy(self, database: str) -> None:
        """An append waiting for the ingest lock that another session holds and never lets go
        (a replica frozen mid-commit) fails as storage_busy, which readiness reports, instead
        of hanging; once the lock is free, appends commit again."""
        async with open_test_outbox("postgres", Path("/nonexistent"), database) as box:
            holder = await asyncpg.connect(database)
            try:
                async with holder.transaction():
                    await holder.execute("SELECT pg_advisory_xact_lock($1)", INGEST_LOCK)
                    with pytest.raises(OutboxUnavailable) as refused:
                        async with asyncio.timeout(15):  # a hang fails instead of stalling
                            await box.append(events(1))
                    assert refused.value.reason == "storage_busy"
                    assert box.unwritable_reason() == "storage_busy"
            finally:
                await holder.close()
            await box.append(events(1))
            assert box.unwritable_reason() is None

    async def test_an_operator_overrides_a_timeout_in_the_url(self, database: str) -> None:
        """A session gets the sidecar's timeouts and keepalives, but for those `outbox.url`
        names, as a parameter of its own or in `options`: those are the URL's."""
        url = f"{database}?lock_timeout=7s&options=-c%20statement_timeout%3D11s"
        conn = await asyncpg.connect(url, server_settings=session_settings(url))
        try:
            shown = [
                await conn.fetchval(f"SHOW {name}")
                for name in (
                    "lock_timeout",
                    "statement_timeout",
                    "idle_in_transaction_session_timeout",
                    "tcp_keepalives_idle",
                )
            ]
        finally:
            await conn.close()
        assert shown == ["7s", "11s", "5s", "10"]


async def _listeners(admin: asyncpg.Connection, count: int) -> bool:
    found = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
        "AND datname = current_database() AND query LIKE 'LISTEN%'",
        LISTENER_NAME,
    )
    return bool(found == count)


OpenBox = Callable[..., contextlib.AbstractAsyncContextManager[Outbox]]


@pytest.fixture(params=BACKENDS)
def open_box(
    request: pytest.FixtureRequest, tmp_path: Path, database_if_needed: str | None
) -> OpenBox:
    """Open an outbox of this backend with some settings changed."""

    def opening(**settings: Any) -> contextlib.AbstractAsyncContextManager[Outbox]:
        return open_test_outbox(request.param, tmp_path, database_if_needed, **settings)

    return opening


class TestLimitsAndWindows:
    async def test_delivered_ids_are_new_after_the_window(self, open_box: OpenBox) -> None:
        """An id delivered within dedupe_window_s is a duplicate; after it, it is new."""
        async with open_box(dedupe_window_s=0.3) as box:
            batch = events(1)
            await box.append(batch)
            claimed = await box.claim_batch(10, 10_000)
            await box.acknowledge(claimed.claim, claimed.seqs)
            assert (await box.append(batch)).duplicates == 1

            async def new_again() -> bool:
                return (await box.append(batch)).accepted == 1  # a duplicate is not stored

            await eventually(new_again, timeout=10)
            assert (await box.stats()).events == 1

    async def test_full_by_bytes_then_room_again(self, open_box: OpenBox) -> None:
        """Past max_bytes appends are refused until deliveries make room."""
        async with open_box(max_bytes=100) as box:
            await box.append(events(2, size=40))
            with pytest.raises(OutboxUnavailable, match="full"):
                await box.append(events(1, size=40))
            claimed = await box.claim_batch(1, 10_000)
            await box.acknowledge(claimed.claim, claimed.seqs)
            assert (await box.append(events(1, size=40))).accepted == 1

    async def test_group_commit(self, open_box: OpenBox) -> None:
        """Concurrent appends share transactions: far fewer commits than requests."""
        async with open_box() as box:
            before = box.commits
            results = await asyncio.gather(*(box.append(events(1)) for _ in range(200)))
            assert all(r.accepted == 1 for r in results)
            assert 1 <= box.commits - before <= 20

    async def test_close_commits_what_is_queued(self, open_box: OpenBox) -> None:
        """Appends queued when the outbox closes are committed first; later ones are refused."""
        async with open_box() as box:
            pending = [asyncio.ensure_future(box.append(events(1))) for _ in range(20)]
            await asyncio.sleep(0)
        assert all(p.result().accepted == 1 for p in pending)
        with pytest.raises(OutboxUnavailable):
            await box.append(events(1))

    async def test_failed_job_naming_none_dead_letters_all_unprocessed(
        self, open_box: OpenBox
    ) -> None:
        async with open_box() as box:
            await box.append(events(2))
            batch = await box.claim_batch(10, 10_000)
            await box.acknowledge(batch.claim, batch.seqs, "job-3")
            outcome = PlatformJobOutcome(True, "the job crashed")
            assert await box.finish_platform_job("job-3", outcome) == 2


class TestPostgresUpgrade:
    @pytest.mark.parametrize("version", [1, 2, 3])
    async def test_an_older_database_keeps_everything(self, version: int) -> None:
        """A database at an older schema version holding waiting, delivered, sent-and-awaiting
        its platform job, and dead-lettered events migrates in place: nothing lost, duplicates
        still known, the waiting events are sent and the open job is still followed."""
        from caliper_sidecar.outbox.postgres.schema import MIGRATIONS

        with fresh_database() as url:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE SCHEMA {SCHEMA}; SET search_path = {SCHEMA}")
                for migration in MIGRATIONS[:version]:
                    await conn.execute(migration)
                await conn.execute(
                    "CREATE TABLE schema_version (version integer NOT NULL);"
                    f"INSERT INTO schema_version VALUES ({version})"
                )
                waiting, delivered, dead, sent = new_id(), new_id(), new_id(), new_id()
                await conn.execute(
                    "INSERT INTO events (id, body, size, received_at, delivered_at, "
                    "platform_job) VALUES ($1, '{}', 2, 1, extract(epoch from now()), 'job-9')",
                    sent,
                )
                await conn.execute(
                    "INSERT INTO platform_jobs (id, sent_at, state) VALUES ('job-9', 1, 'waiting')"
                )
                await conn.execute(
                    "INSERT INTO events (id, body, size, received_at) VALUES ($1, '{}', 2, 1)",
                    waiting,
                )
                if version >= 3:  # a waiting event has its row in the queue: here, claimed
                    # by a replica of the older release (stopped for the upgrade)
                    await conn.execute(
                        "INSERT INTO queue (seq, claimed_by, claim_until) "
                        "SELECT seq, 'older', 1e12 FROM events WHERE id = $1",
                        waiting,
                    )
                await conn.execute(
                    "INSERT INTO events (id, body, size, received_at, delivered_at) "
                    "VALUES ($1, '', 0, 1, extract(epoch from now()))",
                    delivered,
                )
                await conn.execute(
                    "INSERT INTO dead_letters (id, body, received_at, reason, attempts, "
                    "dead_lettered_at) VALUES ($1, '{}', 1, 'refused', 1, 1)",
                    dead,
                )
            finally:
                await conn.close()
            async with open_outbox(OutboxSettings(url=url), exclusive=False) as box:
                stats = await box.stats()
                assert (stats.events, stats.dead_letters) == (1, 1)
                again = [NewEvent(delivered, b"{}"), NewEvent(dead, b"{}")]
                assert (await box.append(again)).duplicates == 2
                batch = await box.claim_batch(10, 10_000)
                assert [e.id for e in batch.events] == [waiting]
                await box.acknowledge(batch.claim, batch.seqs)
                assert (await box.journeys([waiting]))[waiting].attempts == 1
                assert [d.id for d in await box.dead_letters(10)] == [dead]
                assert await box.pending_platform_jobs() == ["job-9"]
                assert await box.job_ids_sent_in("job-9") == [sent]
                assert await box.finish_platform_job("job-9", PlatformJobOutcome(False)) == 0
                assert (await box.journeys([sent]))[sent].state == "confirmed"

    async def test_a_version_4_database_gains_destinations(self) -> None:
        """A database of the release before [[destinations]] (schema version 4) holding a
        waiting event (given back by a replica that stopped), a delivered one and a dead
        letter migrates in place: nothing lost, totals kept, duplicates still known, the
        dead letter [upstream]'s; then a destination added gets what arrives from then on,
        and [upstream] still the waiting event."""
        from caliper_sidecar.outbox import DestinationPlan
        from caliper_sidecar.outbox.postgres.schema import MIGRATIONS, VERSION

        with fresh_database() as url:
            waiting, delivered, dead = new_id(), new_id(), new_id()
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE SCHEMA {SCHEMA}; SET search_path = {SCHEMA}")
                for migration in MIGRATIONS[:4]:
                    await conn.execute(migration)
                await conn.execute(
                    "CREATE TABLE schema_version (version integer NOT NULL);"
                    "INSERT INTO schema_version VALUES (4);"
                    f"CREATE TABLE bodies_0 PARTITION OF bodies FOR VALUES FROM (0) "
                    f"TO ({BODIES_SPAN})"
                )
                # as version 4's ingest, claim, give-back and acknowledgement left them
                await conn.execute(
                    "INSERT INTO events (id, size, received_at) VALUES ($1, 2, 1), ($2, 2, 1)",
                    waiting,
                    delivered,
                )
                await conn.execute("INSERT INTO bodies (seq, body) VALUES (1, '{}'), (2, '{}')")
                await conn.execute(
                    "UPDATE head SET next = 3; INSERT INTO batches (lo, seqs) VALUES (1, '{1}');"
                    "INSERT INTO sent (span, seqs, delivered_at) "
                    "VALUES ('[2,2]', '{2}', extract(epoch from now()));"
                    "SELECT count_change(-1, -2, 0, 1, 0)"
                )
                await conn.execute(
                    "INSERT INTO dead_letters (id, body, received_at, reason, attempts, "
                    "dead_lettered_at) VALUES ($1, '{}', 1, 'refused', 1, 1)",
                    dead,
                )
            finally:
                await conn.close()
            settings = OutboxSettings(url=url)
            plans = [DestinationPlan("lrs")]
            async with open_outbox(settings, exclusive=False, destinations=plans) as box:
                stats = await box.stats()
                assert (stats.events, stats.delivered_total) == (1, 1)
                assert (stats.dead_letters, stats.dead_lettered_total) == (1, 1)
                (letter,) = await box.dead_letters(10, destination="upstream")
                assert (letter.id, letter.destination) == (dead, "upstream")
                again = [NewEvent(delivered, b"{}"), NewEvent(dead, b"{}")]
                assert (await box.append(again)).duplicates == 2
                assert (await box.destination_stats("lrs")).waiting == 0
                later = events(2)
                await box.append(later)
                theirs = await box.queue("lrs").claim_batch(10, 10_000)
                assert [e.id for e in theirs.events] == [e.id for e in later]
                mine = await box.claim_batch(10, 10_000)
                assert [(e.id, e.body) for e in mine.events][:1] == [(waiting, b"{}")]
                assert (await box.destination_stats("lrs")).dead_letters == 0
            conn = await asyncpg.connect(url)
            try:
                found = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version")
                assert found == VERSION
            finally:
                await conn.close()

    async def test_a_version_6_database_has_nothing_to_reconcile(self) -> None:
        """What a release before reconciliation sent (schema version 6) waits for no check
        once migrated, even when reconciliation is turned on with the upgrade: its sent rows
        hold neither themselves nor bodies; what is delivered from then on waits for its
        check."""
        from caliper_sidecar.outbox.postgres.schema import MIGRATIONS

        with fresh_database() as url:
            delivered = new_id()
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE SCHEMA {SCHEMA}; SET search_path = {SCHEMA}")
                for migration in MIGRATIONS[:6]:
                    await conn.execute(migration)
                await conn.execute(
                    "CREATE TABLE schema_version (version integer NOT NULL);"
                    "INSERT INTO schema_version VALUES (6);"
                    f"CREATE TABLE bodies_0 PARTITION OF bodies FOR VALUES FROM (0) "
                    f"TO ({BODIES_SPAN})"
                )
                await conn.execute(
                    "INSERT INTO events (id, size, received_at) VALUES ($1, 2, 1)", delivered
                )
                await conn.execute(
                    "INSERT INTO bodies (seq, body) VALUES (1, '{}');"
                    "UPDATE head SET next = 2;"
                    "INSERT INTO sent (span, seqs, delivered_at) "
                    "VALUES ('[1,1]', '{1}', extract(epoch from now()));"
                    "SELECT count_change(0, 0, 0, 1, 0)"
                )
            finally:
                await conn.close()
            settings = OutboxSettings(url=url)
            async with open_outbox(settings, exclusive=False, reconciling=True) as box:
                assert await box.delivered_upstream(0, True, 10) == []
                later = events(2)
                await box.append(later)
                batch = await box.claim_batch(10, 10_000)
                await box.acknowledge(batch.claim, batch.seqs)
                waiting = await box.delivered_upstream(0, True, 10)
                assert [r.id for r in waiting] == [e.id for e in later]

    async def test_a_version_5_database_gains_marks(self) -> None:
        """A database of the release before marks (schema version 5) holding an event that
        waits for [upstream] and a destination migrates in place: nothing lost, totals
        kept; then an event is replayed and marked, and its journey shows it."""
        from caliper_sidecar.outbox import DestinationPlan, Mark, Replay
        from caliper_sidecar.outbox.postgres.schema import MIGRATIONS, VERSION

        with fresh_database() as url:
            waiting = new_id()
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE SCHEMA {SCHEMA}; SET search_path = {SCHEMA}")
                for migration in MIGRATIONS[:5]:
                    await conn.execute(migration)
                await conn.execute(
                    "CREATE TABLE schema_version (version integer NOT NULL);"
                    "INSERT INTO schema_version VALUES (5);"
                    f"CREATE TABLE bodies_0 PARTITION OF bodies FOR VALUES FROM (0) "
                    f"TO ({BODIES_SPAN})"
                )
                # as version 5's ingest left it, with the destination at its start
                await conn.execute(
                    "INSERT INTO destinations (name, next) VALUES ('lrs', 1);"
                    "SELECT setval('events_seq_seq', 1, false)"
                )
                await store_events(conn, [waiting], [b"{}"], [None], [None], None)
            finally:
                await conn.close()
            settings = OutboxSettings(url=url)
            plans = [DestinationPlan("lrs")]
            async with open_outbox(settings, exclusive=False, destinations=plans) as box:
                assert (await box.stats()).events == 1
                assert (await box.destination_stats("lrs")).waiting == 1
                mine = await box.claim_batch(10, 10_000)
                assert [(e.id, e.body) for e in mine.events] == [(waiting, b"{}")]
                theirs = await box.queue("lrs").claim_batch(10, 10_000)
                assert [e.id for e in theirs.events] == [waiting]
                await box.acknowledge(mine.claim, mine.seqs)
                await box.queue("lrs").acknowledge(theirs.claim, theirs.seqs)
                await box.replay([Replay(waiting, b"{}", ("upstream",))])
                await box.add_marks([Mark(waiting, "verified", "lrs")])
                journey = (await box.journeys([waiting]))[waiting]
                assert [(m.what, m.destination) for m in journey.marks] == [
                    ("replayed", "upstream"),
                    ("verified", "lrs"),
                ]
                again = await box.claim_batch(10, 10_000)
                assert [e.id for e in again.events] == [waiting]
            conn = await asyncpg.connect(url)
            try:
                found = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version")
                assert found == VERSION
            finally:
                await conn.close()
