"""The outbox writer: one SQLite connection and the one thread that uses it.

Every write of the SQLite outbox runs here (ingest's group commits, delivery outcomes, dead
letters, platform jobs), each transaction with all its statements (for ingest: the dedupe
lookup, the capacity check, the insert, the commit) in one hand-off from the event loop.
Through aiosqlite each statement was a round trip of its own: seven loop passes and thread
wake-ups per ingest group, on the loop that also parses and validates every request, while
the transaction held SQLite's one write lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from caliper_sidecar.exceptions import OutboxUnavailable

R = TypeVar("R")

#: the settings every connection of the outbox takes, with its `synchronous` level
PRAGMAS: Final = (
    "PRAGMA busy_timeout = 5000",
    # Debian's SQLite overwrites whatever is deleted with zeros (SQLITE_SECURE_DELETE): an
    # emptied body's freed overflow page, and every pruned row, written out again only to
    # zero it (bench/writes.py: pruning 4,388 -> 273 bytes an event). FAST zeroes what is
    # deleted only where no extra write is needed; `erase` turns it fully on for its own
    # transaction (erasing.py), which is where overwriting is promised.
    "PRAGMA secure_delete = FAST",
)


#: Checkpoints run in the background (SqliteStorage._checkpoint_often), not in the thread of
#: the commit that crosses this; it is only the backstop, set in pages of the file's size so
#: that the WAL it allows fits in the room the capacity check keeps (storage.RESERVE_BYTES,
#: 32 MiB) on an older file's 4 KB pages too (10,000 pages were 40 MB there).
WAL_BACKSTOP_BYTES: Final = 10 * 1_048_576


class Writer:
    """Owns the writing connection and its thread, from `open` to `close`."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        try:
            self._conn = await self._in_thread(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> sqlite3.Connection:
        # Autocommit (isolation_level None): each write says BEGIN and COMMIT itself
        # (sqlite_writes.immediate).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        for pragma in PRAGMAS:
            conn.execute(pragma)
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_BYTES // int(page_size)}")
        return conn

    async def run(self, work: Callable[[sqlite3.Connection], R]) -> R:
        """Run `work` with the connection in the writer's thread; raises what it raises, and
        OutboxUnavailable once the writer is closed."""
        conn = self._conn
        if conn is None:
            raise OutboxUnavailable("closed", "the outbox is not open")
        return await self._in_thread(lambda: work(conn))

    async def _in_thread(self, work: Callable[[], R]) -> R:
        if self._executor is None:
            raise sqlite3.ProgrammingError("the outbox writer is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def close(self) -> None:
        if self._executor is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._in_thread(conn.close)
        executor, self._executor = self._executor, None
        executor.shutdown(wait=True)
