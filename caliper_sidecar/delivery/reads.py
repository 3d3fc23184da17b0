"""Reads from the platform on behalf of apps: the events it stored (Beyond AI's
`GET /caliper/events[/{id}]`), read through with the sidecar's own token.

A read is not delivery and must never cost delivery anything. It has connections of its own
(a small pool: a dozen slow listings once held every connection delivery had, sends timed out
and the state blamed the Caliper endpoint), its own metric (never counted as requests to the
Caliper endpoint), and it uses the token delivery holds as it is: a 401 on a read is the
read's answer and never discards that token (fifty refused reads once made fifty token
requests); delivery finds out about a revoked token by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import quote

import aiohttp
from yarl import URL

from caliper_sidecar.delivery.answers import exchange
from caliper_sidecar.delivery.tokens import TokenSource
from caliper_sidecar.delivery.upstream import redact
from caliper_sidecar.metrics import Metrics

#: connections reads may hold at once; more reads wait for one (within upstream.timeout_s)
READ_CONNECTIONS: Final = 2


def read_session() -> aiohttp.ClientSession:
    """The connections reads use, and no other part: the caller closes it."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=READ_CONNECTIONS),
        headers={"User-Agent": "caliper-sidecar"},
    )


class PlatformReader:
    """GETs the platform's listing (`events_url`), or one event of it, with the token delivery
    holds."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        timeout_s: float,
        tokens: TokenSource,
        metrics: Metrics,
    ) -> None:
        self._session = session
        #: the platform's listing; an event's id is one path segment below it
        self.events_url = str(URL(url))
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._tokens = tokens
        self._metrics = metrics

    def url(self, event_id: str | None, query: str) -> URL:
        """The listing, or the event with this id (sent as one path segment, quoted here and
        nowhere else: `;` stays `%3B`), with this query as any URL carries it."""
        path = self.events_url
        if event_id is not None:
            path += "/" + quote(event_id, safe="")
        if query:
            path += "?" + URL("?" + query).raw_query_string
        return URL(path, encoded=True)

    async def get(self, event_id: str | None = None, query: str = "") -> tuple[int, str]:
        """The platform's status and body for the listing (or one event), with the token
        redacted from it. Raises RetryLater when the platform (or the token endpoint) cannot be
        reached, AuthFailed when the token endpoint refuses the sidecar's credentials."""
        code, _, text = await self._get(self.url(event_id, query))
        return code, text

    async def page(self, query: Mapping[str, str]) -> tuple[int, float | None, str]:
        """One page of the listing (reconciliation's reads): status, Retry-After, body."""
        return await self._get(URL(self.events_url).with_query(query))

    async def _get(self, url: URL) -> tuple[int, float | None, str]:
        token = await self._tokens.bearer()
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        code, retry_after, text = await exchange(
            self._session,
            "GET",
            url,
            who="the platform's listing",
            headers=headers,
            timeout=self._timeout,
            requests=self._metrics.platform_reads,
            seconds=self._metrics.platform_read_seconds,
        )
        return code, retry_after, redact(text, [token])
