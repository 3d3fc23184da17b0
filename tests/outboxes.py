"""The outbox backends the tests run against, each opened fresh: SQLite in a temporary folder,
PostgreSQL in a database of its own per test module on the local server (skipped, saying why,
where no server answers)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import Outbox, open_outbox
from caliper_sidecar.outbox.postgres.schema import SCHEMA

BACKENDS = ["sqlite", "postgres"]
#: the server the tests use; CI and the project's machines run one here (trust auth)
SERVER = os.environ.get("CALIPER_SIDECAR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def admin(statement: str) -> None:
    """Run one statement on the server's `postgres` database (in a thread of its own: the
    callers are synchronous fixtures, with or without an event loop around them)."""

    async def run() -> None:
        conn = await asyncpg.connect(f"{SERVER}/postgres", timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the test server, dropped afterwards; its URL. Skips, saying
    why, when no server answers."""
    name = f"sidecar_test_{uuid.uuid4().hex[:12]}"
    try:
        admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as e:
        pytest.skip(f"no PostgreSQL server answers at {SERVER}: {e}")
    try:
        yield f"{SERVER}/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def empty(url: str) -> None:
    """Empty every table of the outbox in this database (between tests of one module)."""
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", f"{SCHEMA}.events"):
            await conn.execute(
                f"TRUNCATE {SCHEMA}.events, {SCHEMA}.bodies, {SCHEMA}.batches, {SCHEMA}.sent, "
                f"{SCHEMA}.dead_letters, {SCHEMA}.jobs, {SCHEMA}.platform_jobs, "
                f"{SCHEMA}.replicas, {SCHEMA}.destinations, {SCHEMA}.destination_batches, "
                f"{SCHEMA}.destination_attempts, {SCHEMA}.marks, {SCHEMA}.reconcile_turn "
                "RESTART IDENTITY; "
                f"UPDATE {SCHEMA}.head SET next = 1; "
                f"UPDATE {SCHEMA}.totals SET events = 0, bytes = 0, dead_letters = 0, "
                "delivered_total = 0, dead_lettered_total = 0"
            )
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def open_test_outbox(
    backend: str, tmp_path: Path, database: str | None = None, **settings: Any
) -> AsyncIterator[Outbox]:
    """A new, empty outbox of this backend (PostgreSQL: in `database`, emptied first)."""
    if backend == "postgres":
        assert database is not None
        await empty(database)
        settings["url"] = database
    lease_s = settings.pop("lease_s", 65.0)  # the outbox's, not a setting
    destinations = settings.pop("destinations", None)  # the plans `run` would give
    reconciling = settings.pop("reconciling", False)  # reconcile.after_s set
    config = OutboxSettings(path=str(tmp_path / "outbox.db"), synchronous="normal", **settings)
    async with open_outbox(
        config,
        exclusive=False,
        lease_s=lease_s,
        destinations=destinations,
        reconciling=reconciling,
    ) as box:
        yield box


async def relation_files_holding(url: str, *needles: bytes) -> list[str]:
    """The relation files of this database that hold any of these bytes, read by the server
    itself (as superuser: `pg_read_binary_file`) once it has written every page out
    (CHECKPOINT), named "relation (path)"."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CHECKPOINT")
        relations = await conn.fetch(
            "SELECT relname, pg_relation_filepath(oid) AS path FROM pg_class "
            "WHERE pg_relation_filepath(oid) IS NOT NULL"
        )
        found = []
        for row in relations:
            data = await conn.fetchval("SELECT pg_read_binary_file($1::text)", row["path"])
            if data and any(n in data for n in needles):
                found.append(f"{row['relname']} ({row['path']})")
        return found
    finally:
        await conn.close()
