"""Several `run` replicas on one PostgreSQL outbox, as real processes (docs/operators.md): every
promise holds across them. Skipped, saying why, where no PostgreSQL server answers."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from caliper_sidecar.outbox.postgres.schema import INGEST_LOCK, MIGRATION_LOCK, SCHEMA, VERSION
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_events, write_config
from .outboxes import empty, fresh_database


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
async def shared(database: str) -> str:
    """The module's database, emptied for this test."""
    await empty(database)
    return database


def replica(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    url: str,
    name: str,
    **extra: Any,
) -> SidecarProcess:
    port = free_port()
    settings: dict[str, Any] = {
        "outbox__url": url,
        "upstream__timeout_s": 2,
        "upstream__batch_max_events": 20,
        **extra,
    }
    config = write_config(
        tmp_path / f"{name}.toml", platform, tmp_path / "unused.db", port, **settings
    )
    process = SidecarProcess(config, port, tmp_path / f"{name}.log")
    processes.append(process)
    return process


async def drained(replicas: list[SidecarProcess]) -> None:
    """Until no replica has anything waiting or in flight (each one's /v1/status): after
    that, nothing more can reach the platform."""

    async def idle() -> bool:
        async with aiohttp.ClientSession() as http:
            for r in replicas:
                async with http.get(f"{r.url}/v1/status") as resp:
                    status = await resp.json()
                if status["outbox"]["events"] or status["upstream"]["in_flight"]:
                    return False
        return True

    await eventually(idle, timeout=30)


async def _waits_for_the_lock(url: str) -> bool:
    """A sidecar's connection is waiting for an advisory lock (the migration's)."""
    conn = await asyncpg.connect(url)
    try:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
    finally:
        await conn.close()
    return bool(waiting)


async def freeze_holding_the_ingest_lock(p: SidecarProcess, url: str) -> None:
    """SIGSTOP the replica at a moment one of its sessions holds the ingest lock in an open
    transaction (a box that hangs or loses power mid-commit); tried again until it does."""
    conn = await asyncpg.connect(url)
    try:
        for _ in range(500):
            p.proc.send_signal(signal.SIGSTOP)
            # What it sent before it stopped is still being done: wait until its session is
            # either idle in its transaction, holding the lock, or done with it.
            for _ in range(50):
                state = await conn.fetchval(
                    "SELECT a.state FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1 "
                    "AND l.objid = $2 AND l.objsubid = 1",
                    INGEST_LOCK >> 32,
                    INGEST_LOCK & 0xFFFFFFFF,
                )
                if state == "idle in transaction":
                    return
                if state is None:
                    break
                await asyncio.sleep(0.01)
            p.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(random.uniform(0.005, 0.05))
        raise AssertionError("the replica was never stopped holding the ingest lock")
    finally:
        await conn.close()


async def sessions(url: str) -> list[str]:
    """Every other session of the database: its state, what it waits for, its locks awaited,
    and the start of its query (for a failure's message)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT a.pid, a.state, a.wait_event_type, a.wait_event, "
            "now() - a.xact_start AS in_transaction, left(a.query, 100) AS query, "
            "(SELECT string_agg(l.locktype || ':' || l.mode, ',') FROM pg_locks l "
            " WHERE l.pid = a.pid AND NOT l.granted) AS awaiting "
            "FROM pg_stat_activity a WHERE a.datname = current_database() "
            "AND a.pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [str(dict(row)) for row in rows]


async def post(url: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/events", json=events) as r:
        assert r.status == 202, await r.text()
        body: dict[str, Any] = await r.json()
        return body


class TestReplicas:
    @pytest.mark.parametrize("count", [2, 3])
    async def test_replicas_share_the_work(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        shared: str,
        count: int,
    ) -> None:
        """Events posted to any replica are delivered once each, by whichever replica claims
        them; every replica takes part."""
        replicas = [replica(tmp_path, platform, processes, shared, f"r{i}") for i in range(count)]
        for r in replicas:
            await r.wait_ready()
        sent: set[str] = set()
        for round_ in range(10):
            events = make_events(30)
            await post(replicas[round_ % count].url, events)
            sent.update(e["id"] for e in events)
        await platform.fake.wait_for(sent, timeout=30)
        await drained(replicas)
        assert platform.fake.duplicates == 0
        for r in replicas:
            assert await r.terminate() == 0
        senders = [r for r in replicas if "batch_delivered" in r.events()]
        assert len(senders) >= 2

    async def test_ingest_deduplicates_across_replicas(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], shared: str
    ) -> None:
        """The same events sent to two replicas (an app retrying through a load balancer) are
        stored and sent once."""
        a = replica(tmp_path, platform, processes, shared, "a")
        b = replica(tmp_path, platform, processes, shared, "b")
        await a.wait_ready()
        await b.wait_ready()
        events = make_events(10)
        first, second = await asyncio.gather(post(a.url, events), post(b.url, events))
        assert first["accepted"] + second["accepted"] == 10
        assert first["duplicates"] + second["duplicates"] == 10
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)
        await drained([a, b])
        assert platform.fake.duplicates == 0

    async def test_killed_replica_s_events_are_sent_by_the_others(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], shared: str
    ) -> None:
        """A replica SIGKILLed with envelopes in flight: once its leases expire the other
        delivers everything; duplicates at most what the dead one had in flight."""
        platform.fake.faults.latency_s = 1.5  # envelopes stay in flight
        a = replica(tmp_path, platform, processes, shared, "a")
        await a.wait_ready()
        events = make_events(200)
        for start in range(0, 200, 50):
            await post(a.url, events[start : start + 50])
        # a has claimed and is sending (the fake is slow)
        await eventually(lambda: platform.fake.requests_arrived > 0)
        a.kill()
        platform.fake.faults.latency_s = 0
        b = replica(tmp_path, platform, processes, shared, "b")
        await b.wait_ready()
        await platform.fake.wait_for({e["id"] for e in events}, timeout=60)
        in_flight_max = 4 * 20  # concurrency x batch_max_events of the killed replica
        assert platform.fake.duplicates <= in_flight_max
        assert await b.terminate() == 0

    async def test_a_frozen_replica_never_stalls_ingest_on_the_others(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], shared: str
    ) -> None:
        """A replica frozen (SIGSTOP) while its commit holds the ingest lock: another replica
        answers 503 + Retry-After instead of hanging, and says it is not ready, until the
        database cuts the frozen session off; then it accepts again, and every event either
        acknowledged is delivered."""
        a = replica(tmp_path, platform, processes, shared, "a")
        b = replica(tmp_path, platform, processes, shared, "b")
        await a.wait_ready()
        await b.wait_ready()
        acknowledged: set[str] = set()
        loading = True

        async def load() -> None:
            async with aiohttp.ClientSession() as http:
                while loading:
                    events = make_events(5)
                    try:
                        async with http.post(f"{a.url}/v1/events", json=events) as r:
                            if r.status == 202:
                                acknowledged.update(e["id"] for e in events)
                    except aiohttp.ClientError:
                        pass

        loaders = [asyncio.create_task(load()) for _ in range(4)]
        try:
            await eventually(lambda: acknowledged, timeout=20)
            await freeze_holding_the_ingest_lock(a, shared)
            loading = False
            # A client timeout only so that a hang fails the test instead of stalling it.
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
                async with http.post(f"{b.url}/v1/events", json=make_events(3)) as r:
                    assert r.status == 503, await r.text()
                    assert int(r.headers["Retry-After"]) > 0
                    assert (await r.json())["error"] == "storage_busy"
                async with http.get(f"{b.url}/readyz") as r:
                    assert r.status == 503
                    assert (await r.json())["reason"] == "storage_busy"

                answers: list[str] = []

                async def accepted() -> bool:
                    events = make_events(3)
                    async with http.post(f"{b.url}/v1/events", json=events) as r:
                        if r.status != 202:
                            answers.append(f"{r.status} {(await r.text())[:200]}")
                            return False
                    acknowledged.update(e["id"] for e in events)
                    return True

                # a is still stopped: the database cut its session off
                try:
                    await eventually(accepted, timeout=30)
                except AssertionError:
                    # Once seen in a full suite run, never alone: say what held b up.
                    raise AssertionError(
                        f"b's last answers: {answers[-3:]}; sessions: {await sessions(shared)}"
                    ) from None
        finally:
            loading = False
            for task in loaders:
                task.cancel()
            await asyncio.gather(*loaders, return_exceptions=True)
            a.proc.send_signal(signal.SIGCONT)
        await platform.fake.wait_for(acknowledged, timeout=60)

    async def test_replay_from_the_cli_while_replicas_run(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], shared: str
    ) -> None:
        """Dead letters replayed from the CLI are picked up by the running replicas."""
        a = replica(tmp_path, platform, processes, shared, "a")
        b = replica(tmp_path, platform, processes, shared, "b")
        await a.wait_ready()
        await b.wait_ready()
        events = make_events(5)
        platform.fake.faults.refuse_ids = {e["id"] for e in events}
        await post(a.url, events)

        async def all_dead() -> bool:
            conn = await asyncpg.connect(shared)
            try:
                return int(await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.dead_letters")) == 5
            finally:
                await conn.close()

        await eventually(all_dead, timeout=20)
        platform.fake.faults.refuse_ids = set()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "caliper_sidecar",
            "dead-letters",
            "replay",
            "--all",
            "-c",
            str(tmp_path / "a.toml"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "replayed 5" in out.decode()
        await platform.fake.wait_for({e["id"] for e in events}, timeout=20)

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
    async def test_a_signal_during_start_up_is_no_kill(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        shared: str,
        sig: signal.Signals,
    ) -> None:
        """SIGTERM during start-up (a rollout right after a start) stops the process cleanly,
        exit 0, and SIGHUP reloads or is ignored: neither is the default action that kills it.
        Start-up is held here by the schema's migration lock."""
        admin = await asyncpg.connect(shared)
        try:
            async with admin.transaction():
                await admin.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                p = replica(tmp_path, platform, processes, shared, "a")
                await eventually(lambda: _waits_for_the_lock(shared), timeout=20)
                p.proc.send_signal(sig)
                await asyncio.sleep(0)
            # the lock is released: start-up goes on
            if sig == signal.SIGTERM:
                assert await p.wait_exit() == 0
            else:
                await p.wait_ready()
                assert await p.terminate() == 0
        finally:
            await admin.close()

    async def test_replica_refuses_a_newer_schema(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], shared: str
    ) -> None:
        """A replica of an older release, on a database a newer one migrated, refuses to start
        and says why."""
        a = replica(tmp_path, platform, processes, shared, "a")
        await a.wait_ready()
        assert await a.terminate() == 0
        conn = await asyncpg.connect(shared)
        try:
            await conn.execute(
                f"INSERT INTO {SCHEMA}.schema_version (version) VALUES ($1)", VERSION + 1
            )
            old = replica(tmp_path, platform, processes, shared, "old")
            code = await old.wait_exit(timeout=30)
            assert code == 1
            assert f"schema version {VERSION + 1}" in old.logs()
        finally:
            await conn.execute(
                f"DELETE FROM {SCHEMA}.schema_version WHERE version = $1", VERSION + 1
            )
            await conn.close()


class TestReplicasAgree:
    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("upstream__endpoint", "learnwith"),
            ("upstream__platform", "learnwith-ai"),
            ("outbox__dedupe_window_s", 60),
        ],
    )
    async def test_a_replica_that_differs_refuses_to_start(
        self,
        tmp_path: Path,
        platform: RunningFake,
        processes: list[SidecarProcess],
        shared: str,
        key: str,
        value: Any,
    ) -> None:
        """A replica whose platform, endpoint or dedupe window differs from the live ones' on
        the same database exits 2 naming the key; once every replica has stopped, the new
        setting takes over."""
        if value == "learnwith":
            value = platform.learnwith_url
        a = replica(tmp_path, platform, processes, shared, "a")
        await a.wait_ready()
        other = replica(tmp_path, platform, processes, shared, "b", **{key: value})
        assert await other.wait_exit(timeout=30) == 2
        assert key.replace("__", ".") in other.logs()
        assert "stop every replica first" in other.logs()
        assert await a.terminate() == 0
        again = replica(tmp_path, platform, processes, shared, "c", **{key: value})
        await again.wait_ready()
        assert await again.terminate() == 0

    async def test_jobs_of_a_stopped_replica_are_followed_by_the_others(
        self, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess], shared: str
    ) -> None:
        """A replica stopped (scale-down by SIGTERM) while it follows open platform jobs: the
        other replica adopts them and confirms the events."""
        fake = platform.fake
        fake.faults.stuck_jobs = True
        beyond = {
            "upstream__endpoint": platform.beyond_url,
            "upstream__jobs_url": platform.jobs_url,
        }
        a = replica(tmp_path, platform, processes, shared, "a", **beyond)
        b = replica(tmp_path, platform, processes, shared, "b", **beyond)
        await a.wait_ready()
        await b.wait_ready()
        events = make_events(5)
        await post(a.url, events)
        await fake.wait_for({e["id"] for e in events}, timeout=20)
        assert await a.terminate() == 0
        fake.faults.stuck_jobs = False
        for job in fake.jobs.values():
            job.stuck = False

        async def confirmed() -> bool:
            async with aiohttp.ClientSession() as http:
                for event in events:
                    async with http.get(f"{b.url}/v1/events/{event['id']}") as r:
                        if (await r.json())["state"] != "confirmed":
                            return False
            return True

        await eventually(confirmed, timeout=40)
