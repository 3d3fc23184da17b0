"""Group commit: callers submit work, one task takes everything queued and commits it at once.

Ingest uses it so that concurrent requests share one transaction (and one fsync); the
dispatcher's acknowledgements use it so that concurrent deliveries share one. Either way the
cost of a commit is paid per group, not per caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog

from caliper_sidecar.exceptions import OutboxUnavailable, storage_error

log = structlog.get_logger("sidecar.outbox")

T = TypeVar("T")
R = TypeVar("R")

#: commits a group; returns one result (or the reason it failed) per item, in order
Commit = Callable[[list[T]], Awaitable[list[R | OutboxUnavailable]]]


class GroupCommit(Generic[T, R]):
    """Queues items and commits them in groups, one group at a time, in submission order."""

    def __init__(self, commit: Commit[T, R], name: str) -> None:
        self._commit = commit
        self._name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._queued = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def submit(self, item: T) -> R:
        """Wait until the group holding this item is committed; raises OutboxUnavailable."""
        if self._closing:
            raise OutboxUnavailable("shutting_down", "the sidecar is shutting down")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._queued.set()
        # A caller that goes away cancels only its own future, never the commit others share:
        # that runs in _run's task, which skips a future already done. (No asyncio.shield: it
        # cost a second future and its callbacks on every request.)
        return await future

    async def close(self) -> None:
        """Commit what is queued, then stop; later submissions raise OutboxUnavailable."""
        self._closing = True
        self._queued.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._queued.wait()
                self._queued.clear()
                continue
            group, self._queue = self._queue, []
            results: list[R | OutboxUnavailable]
            try:
                results = await self._commit([item for item, _ in group])
            except OutboxUnavailable as e:
                results = [e] * len(group)
            except Exception as e:  # never leave a caller hanging, whatever broke
                log.exception("outbox_commit_failed", group=self._name)
                results = [storage_error(e)] * len(group)
            for (_, future), result in zip(group, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, OutboxUnavailable):
                    future.set_exception(result)
                else:
                    future.set_result(result)
