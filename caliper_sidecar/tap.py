"""What happens to events as it happens, for whoever watches (`GET /v1/tail`, `caliper-sidecar
tail`): accepted, sent, confirmed, dead-lettered, each with its destination, sender label and
event ids — never event content, as the logs (docs/guarantees.md).

Publishing costs nothing while nobody watches. Each watcher has a bounded queue: one that
reads too slowly loses lines, never memory, and is told how many (`dropped`), so that a
terminal left open over a slow link never holds the sidecar back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

#: lines a watcher may fall behind by before lines are dropped for it
WATCHER_QUEUE: Final = 1000
#: event ids shown in one line at most (a batch of 100 is summarised, not listed whole)
IDS_SHOWN: Final = 20


class Tap:
    """The stream of what happens to events; see the module."""

    def __init__(self) -> None:
        self._watchers: set[Watcher] = set()

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    def publish(self, what: str, ids: Sequence[str] = (), **fields: Any) -> None:
        """One thing that happened (`what`), to these events, with plain fields (counts,
        names, reasons: never a body)."""
        if not self._watchers:
            return
        line: dict[str, Any] = {"at": round(time.time(), 3), "what": what}
        line.update({k: v for k, v in fields.items() if v is not None})
        if ids:
            line["events"] = len(ids)
            line["ids"] = list(ids[:IDS_SHOWN])
        for watcher in self._watchers:
            watcher.put(line)

    @contextlib.contextmanager
    def watching(self) -> Iterator[Watcher]:
        """A watcher of what happens from now on, for as long as the block runs."""
        watcher = Watcher()
        self._watchers.add(watcher)
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)


class Watcher:
    """One watcher's lines, oldest first (`get`; safe to cancel while it waits). Lines that
    find its queue full are dropped, and a `dropped` line takes their place in the order, once
    there is room again."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WATCHER_QUEUE)
        self._dropped = 0

    def put(self, line: dict[str, Any]) -> None:
        if self._dropped:
            if self._queue.qsize() >= WATCHER_QUEUE - 1:
                self._dropped += 1
                return
            gap = {"at": line["at"], "what": "dropped", "lines": self._dropped}
            self._queue.put_nowait(gap)
            self._dropped = 0
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            self._dropped += 1

    async def get(self) -> dict[str, Any]:
        return await self._queue.get()
