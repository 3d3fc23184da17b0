"""Opening the outbox the settings name: the one place that picks the backend and owns what is
backend-specific (SQLite's one-process file lock, PostgreSQL's connection pool)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxLocked
from caliper_sidecar.outbox.outbox import Outbox
from caliper_sidecar.outbox.records import DestinationPlan
from caliper_sidecar.outbox.sqlite.lock import OutboxLock
from caliper_sidecar.outbox.sqlite.schema import VERSION, file_version
from caliper_sidecar.outbox.sqlite.storage import RESERVE_BYTES, SqliteStorage
from caliper_sidecar.outbox.storage import Storage


@contextlib.asynccontextmanager
async def open_outbox(
    settings: OutboxSettings,
    exclusive: bool = True,
    lease_s: float = 65.0,
    agreement: Mapping[str, str] | None = None,
    destinations: Sequence[DestinationPlan] | None = None,
    reconciling: bool = False,
) -> AsyncIterator[Outbox]:
    """The outbox of `outbox.url` (PostgreSQL, shared by replicas) or `outbox.path` (SQLite).

    `exclusive` is for `run`: a SQLite file is then locked for this process (a second `run`
    refuses to start); the CLI's inspection commands open it without the lock. `lease_s` is how
    long a replica's claim on events lasts before others may take them over (PostgreSQL; a
    SQLite file has one process, whose claims last as long as it does). `agreement` is what a
    `run` replica on PostgreSQL must have alike with the live ones (it refuses to start
    otherwise). `destinations` is for `run`: each gets its queue, and the stored state is set
    to them (new ones start at the newest event, removed ones' state is dropped); None leaves
    the stored state as it is (the inspection commands). `reconciling` (`reconcile.after_s`
    set) keeps a delivered event's body until reconciliation has checked it. Everything opened
    is closed on exit, in reverse order, whatever happens.
    """
    async with contextlib.AsyncExitStack() as stack:
        storage: Storage
        if settings.url:
            from caliper_sidecar.outbox.postgres.storage import PostgresStorage

            storage = PostgresStorage(
                settings, lease_s, agreement, keep_delivered_bodies=reconciling
            )
        else:
            if exclusive:
                stack.enter_context(OutboxLock(settings.path))
            else:
                _refuse_to_migrate_under_run(settings.path)
            storage = SqliteStorage(
                settings, keep_delivered_bodies=reconciling, index_leftovers=exclusive
            )
        outbox = await Outbox(storage, settings, destinations).open()
        stack.push_async_callback(outbox.close)
        yield outbox


def _refuse_to_migrate_under_run(path: str) -> None:
    """A command of a newer release opening a file that a `run` of an older one holds would
    migrate the file under it (schema 7 rebuilds the events table): refused, saying so."""
    found = file_version(Path(path))
    if not found or found >= VERSION:  # none yet, or new: nothing to migrate
        return
    holder = OutboxLock.holder(path)
    if holder is not None:
        raise OutboxLocked(
            f"the outbox {path} has schema version {found} and is in use by caliper-sidecar "
            f"run ({holder}) of an earlier release; this release would migrate it to "
            f"{VERSION} under that process: stop it first (docs/operators.md, Upgrades)"
        )


def sqlite_outbox(settings: OutboxSettings, reserve_bytes: int = RESERVE_BYTES) -> Outbox:
    """An outbox over the SQLite file of `outbox.path`, not yet opened and not locked (for
    tests and benchmarks that open one file by hand; `run` goes through `open_outbox`)."""
    return Outbox(SqliteStorage(settings, reserve_bytes), settings)
