"""Reading what the platform and the token endpoint answer: never more than is kept.

A 503 from a proxy with a 300 MB body, or an endless token answer, must not become 300 MB of
memory: the body is read up to a limit and the rest is left unread (the connection is then
closed instead of reused).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

import aiohttp
from prometheus_client import Histogram
from yarl import URL

from caliper_sidecar.delivery.backoff import parse_retry_after
from caliper_sidecar.exceptions import RetryLater
from caliper_sidecar.metrics import LabelledCounter

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


async def exchange(
    session: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    who: str,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
    requests: LabelledCounter,
    seconds: Histogram,
    body: bytes | None = None,
) -> tuple[int, float | None, str]:
    """One request to the platform, never redirected: its status, its Retry-After (seconds)
    and its body (bounded), counted in `requests` by status (`timeout`, `error`: no answer)
    and timed in `seconds`. Raises RetryLater, saying what `who` did, when nothing answered."""
    started = time.monotonic()
    try:
        async with session.request(
            method, url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            text = await read_answer(resp)
            code = resp.status
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    except TimeoutError as e:
        requests.labels(code="timeout").inc()
        raise RetryLater(f"{who} timed out") from e
    except aiohttp.ClientError as e:
        requests.labels(code="error").inc()
        raise RetryLater(f"{who} unreachable: {type(e).__name__}: {e}") from e
    finally:
        seconds.observe(time.monotonic() - started)
    requests.labels(code=str(code)).inc()
    return code, retry_after, text
