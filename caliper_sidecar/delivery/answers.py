"""Reading what the platform and the token endpoint answer: never more than is kept.

A 503 from a proxy with a 300 MB body, or an endless token answer, must not become 300 MB of
memory: the body is read up to a limit and the rest is left unread (the connection is then
closed instead of reused).
"""

from __future__ import annotations

from typing import Final

import aiohttp

#: bytes of an answer read at most: room for a job status listing every event of an envelope
ANSWER_LIMIT: Final = 1_048_576


async def read_answer(response: aiohttp.ClientResponse, limit: int = ANSWER_LIMIT) -> str:
    """The answer's body as text (invalid UTF-8 replaced), cut at `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size >= limit and not response.content.at_eof():
        response.close()  # the rest is not wanted: drop the connection rather than drain it
    return b"".join(chunks).decode("utf-8", errors="replace")
