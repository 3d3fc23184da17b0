"""The outbox: where an event lives from its acknowledgement until the platform confirms it.

`Outbox` is the storage interface the receiver and the dispatcher use; `SqliteOutbox` is the
implementation for one process per file. A backend for several replicas (PostgreSQL) would
implement the same protocol.
"""

from __future__ import annotations

from .base import (
    AppendResult,
    Batch,
    DeadLetter,
    Journey,
    NewEvent,
    Outbox,
    OutboxStats,
    PlatformJobOutcome,
    StoredEvent,
)
from .lock import OutboxLock
from .sqlite import SqliteOutbox

__all__ = [
    "AppendResult",
    "Batch",
    "DeadLetter",
    "Journey",
    "NewEvent",
    "Outbox",
    "OutboxLock",
    "OutboxStats",
    "PlatformJobOutcome",
    "SqliteOutbox",
    "StoredEvent",
]
