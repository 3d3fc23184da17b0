"""Waiting for an asyncio.Event with a time limit, cancellably.

`asyncio.wait_for(event.wait(), t)` on Python 3.11 can swallow a cancellation that arrives as
the event is set or the time runs out: the cancelled task then waits again and its `stop()`
never returns (seen: a sidecar following platform jobs hung at shutdown on every run of a test
script). `asyncio.timeout` carries the cancellation through.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until the event is set or `timeout` seconds pass (None: no limit); True when set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
