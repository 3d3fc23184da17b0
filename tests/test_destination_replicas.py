"""Replicas sharing a PostgreSQL outbox with [[destinations]]: a destination's leases hold
across real processes as [upstream]'s do (tests/test_replicas.py). Skipped, saying why, where
no PostgreSQL server answers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterator

import pytest

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import DestinationPlan, NewEvent, open_outbox

from .conftest import eventually, new_id
from .outboxes import empty, fresh_database

#: a replica as far as the outbox goes (`run` opens it so, with its destinations): it
#: claims a batch for the destination "lrs", says which events, and holds on to them
REPLICA = """
import asyncio, json, sys
from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import DestinationPlan, open_outbox

async def main(url: str, lease_s: float) -> None:
    async with open_outbox(
        OutboxSettings(url=url), exclusive=False, lease_s=lease_s, agreement={},
        destinations=[DestinationPlan("lrs")],
    ) as box:
        batch = await box.queue("lrs").claim_batch(50, 10**6)
        print(json.dumps([e.id for e in batch.events]), flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""
LEASE_S = 3.0


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


class TestDestinationLeases:
    async def test_a_replica_killed_holding_a_destination_lease(self, database: str) -> None:
        """A replica SIGKILLed while it holds a destination's lease on events (sending them,
        say): the other replica does not take them while the lease lasts, then sends them to
        that destination, each once; [upstream] gets every event regardless."""
        await empty(database)
        sent = [NewEvent(new_id(), b'{"n": %d}' % i) for i in range(30)]
        plans = [DestinationPlan("lrs")]
        settings = OutboxSettings(url=database)
        async with open_outbox(
            settings, exclusive=False, lease_s=LEASE_S, agreement={}, destinations=plans
        ) as survivor:
            await survivor.append(sent)
            killed = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                REPLICA,
                database,
                str(LEASE_S),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                line = await asyncio.wait_for(killed.stdout.readline(), 30)  # type: ignore[union-attr]
                assert json.loads(line or b"null") == [e.id for e in sent], (
                    await killed.stderr.read()  # type: ignore[union-attr]
                ).decode()
            finally:
                killed.send_signal(signal.SIGKILL)
                await killed.wait()
            queue = survivor.queue("lrs")
            assert (await queue.claim_batch(50, 10**6)).events == []  # the lease holds
            got: list[tuple[str, bytes]] = []

            async def taken_over() -> bool:
                batch = await queue.claim_batch(50, 10**6)
                got.extend((e.id, e.body) for e in batch.events)
                if batch.events:
                    await queue.acknowledge(batch.claim, batch.seqs)
                return bool(got)

            await eventually(taken_over, timeout=LEASE_S + 10)
            assert got == [(e.id, e.body) for e in sent]
            assert (await queue.claim_batch(50, 10**6)).events == []
            stats = await survivor.destination_stats("lrs")
            assert (stats.waiting, stats.delivered_total) == (0, len(sent))
            upstream = await survivor.claim_batch(50, 10**6)
            assert [e.id for e in upstream.events] == [e.id for e in sent]
