"""The outbox: where an event lives from its acknowledgement until the platform confirms it.

`Outbox` is the storage interface the receiver and the dispatcher use; `open_outbox` opens the
one the settings name: `SqliteOutbox` (one process per file, the embedded default) or
`PostgresOutbox` (one database shared by several `run` replicas).
"""

from __future__ import annotations

from caliper_sidecar.outbox.base import (
    AppendResult,
    Batch,
    Claim,
    DeadLetter,
    Journey,
    NewEvent,
    Outbox,
    OutboxStats,
    PlatformJobOutcome,
    StoredEvent,
)
from caliper_sidecar.outbox.lock import OutboxLock
from caliper_sidecar.outbox.opening import open_outbox
from caliper_sidecar.outbox.sqlite import SqliteOutbox

__all__ = [
    "AppendResult",
    "Batch",
    "Claim",
    "DeadLetter",
    "Journey",
    "NewEvent",
    "Outbox",
    "OutboxLock",
    "OutboxStats",
    "PlatformJobOutcome",
    "SqliteOutbox",
    "StoredEvent",
    "open_outbox",
]
