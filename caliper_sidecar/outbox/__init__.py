"""The outbox: where an event lives from its acknowledgement until the platform confirms it.

`Outbox` (outbox.py) is the one interface the receiver, the dispatcher and the CLI use, over a
`Storage` (storage.py): `sqlite/` (one process per file, the embedded default) or `postgres/`
(one database shared by several `run` replicas). `open_outbox` opens the one the settings name.
"""

from __future__ import annotations

from caliper_sidecar.outbox.opening import open_outbox, sqlite_outbox
from caliper_sidecar.outbox.outbox import Outbox
from caliper_sidecar.outbox.queues import DestinationQueue
from caliper_sidecar.outbox.records import (
    AppendResult,
    Batch,
    Claim,
    DeadLetter,
    DestinationPart,
    DestinationPlan,
    DestinationStats,
    Erasure,
    Journey,
    Mark,
    NewEvent,
    OutboxStats,
    PlatformJobOutcome,
    Replay,
    StoredEvent,
)
from caliper_sidecar.outbox.sqlite.lock import OutboxLock

__all__ = [
    "AppendResult",
    "Batch",
    "Claim",
    "DeadLetter",
    "DestinationPart",
    "DestinationPlan",
    "DestinationQueue",
    "DestinationStats",
    "Erasure",
    "Journey",
    "Mark",
    "NewEvent",
    "Outbox",
    "OutboxLock",
    "OutboxStats",
    "PlatformJobOutcome",
    "Replay",
    "StoredEvent",
    "open_outbox",
    "sqlite_outbox",
]
