"""Replicas on one PostgreSQL outbox must agree on what decides delivery (docs/operators.md): the
platform, the endpoint, the dedupe window. Each registers what it has in the `replicas` table
with a heartbeat; one that differs from the live ones refuses to start."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

import asyncpg

from caliper_sidecar.exceptions import ReplicasDisagree
from caliper_sidecar.outbox.postgres.schema import REPLICAS_LOCK

NOW: Final = "extract(epoch from clock_timestamp())::double precision"


async def join(
    conn: asyncpg.Connection, replica_id: str, ours: Mapping[str, str], lease_s: float
) -> None:
    """Register as a live replica (in the caller's transaction), unless the live ones deliver
    differently.

    Replicas that differ on the platform, the endpoint or the dedupe window would split one
    queue between two platforms, or prune for each other what the other still needs. Replicas
    whose heartbeat stopped (stopped, killed) no longer count: once every replica has stopped,
    a new setting may take over."""
    # Waited for as long as it takes: a replica stopped while it joins is cut off by the
    # database (idle_in_transaction_session_timeout), which lets the lock go.
    await conn.execute("SET LOCAL lock_timeout = 0")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", REPLICAS_LOCK)
    await conn.execute(f"DELETE FROM replicas WHERE seen_until < {NOW}")
    differ: dict[str, str] = {}
    for row in await conn.fetch("SELECT settings FROM replicas"):
        theirs = json.loads(row["settings"])
        for key, value in ours.items():
            if theirs.get(key) != value:
                differ[key] = str(theirs.get(key))
    if differ:
        said = "; ".join(
            f"{key} is {theirs!r} there, {ours[key]!r} here"
            for key, theirs in sorted(differ.items())
        )
        raise ReplicasDisagree(
            f"live replicas on this outbox.url deliver differently: {said}. Replicas must "
            "agree; to change these, stop every replica first"
        )
    await conn.execute(
        f"INSERT INTO replicas (id, settings, seen_until) VALUES ($1, $2, {NOW} + $3)",
        replica_id,
        json.dumps(dict(ours), sort_keys=True),
        lease_s,
    )
