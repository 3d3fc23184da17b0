"""The LISTEN connection of a PostgreSQL outbox: appends and replays by any replica (or the
CLI) NOTIFY, and every replica's dispatcher looks at once instead of at its idle poll.

One owner for the connection's whole life: opened with the outbox, opened again after a
PostgreSQL restart or a terminated backend (with backoff), closed with the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Final

import asyncpg
import structlog

from caliper_sidecar.outbox.postgres.schema import SCHEMA
from caliper_sidecar.outbox.postgres.sessions import session_settings
from caliper_sidecar.outbox.postgres.writes import CHANNEL

log = structlog.get_logger("sidecar.outbox")

#: the application_name of the LISTEN connection (pg_stat_activity shows it)
LISTENER_NAME: Final = "caliper-sidecar-listen"


class Listener:
    """Calls `notified` on every NOTIFY of the outbox's channel, and once more after the
    connection came back (what was appended meanwhile is looked at then)."""

    def __init__(self, dsn: str, notified: Callable[[], None]) -> None:
        self._dsn = dsn
        self._notified = notified
        self._conn: asyncpg.Connection | None = None
        self._again: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        conn = await asyncpg.connect(
            self._dsn,
            server_settings=session_settings(
                self._dsn, search_path=SCHEMA, application_name=LISTENER_NAME
            ),
        )
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(self._lost)
        self._conn = conn

    async def close(self) -> None:
        self._closing = True
        if self._again is not None:
            self._again.cancel()
            await asyncio.gather(self._again, return_exceptions=True)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    def _on_notify(self, *_: Any) -> None:
        self._notified()

    def _lost(self, _: object) -> None:
        """The connection died: get it back, or this replica would notice the others'
        appends only at the idle poll."""
        if self._closing or (self._again is not None and not self._again.done()):
            return
        log.warning("outbox_listen_lost")
        self._again = asyncio.create_task(self._open_again(), name="outbox-relisten")

    async def _open_again(self) -> None:
        delay = 0.5
        while not self._closing:
            try:
                await self.open()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("outbox_listen_retry", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("outbox_listen_restored")
            self._notified()
            return
